"""Run one experiment for several seeds and print the mean ± std of its metrics.

``python -m components.seeds --gin gin/distill.gin --seeds 0 1 2 [--gin-bindings B ...]``
runs ``components.run`` once per seed (binding ``SEED``) into ``<out>/seed<N>`` and writes
``<out>/summary.json``. This is the command behind the README's result tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from components.run import main as run_main
from graphs.handlers import RunDir, console

REPORTED = [
    ("test", "all"), ("test", "old"), ("test", "new"), ("teacher_old_accuracy", None),
    ("shots", "medium"), ("shots", "few"), ("novelty", "auroc"), ("pool", "precision"),
    ("pool", "recall"), ("pool_clustering", "new"), ("seconds", None),
]


LONGTAIL = ("all", "many", "medium", "few", "tail3")
NOVELTY = [("novelty", "auroc"), ("novelty", "fpr95"), ("novelty", "aupr_new"), ("novelty", "aupr_old"),
           ("pool", "precision"), ("pool", "recall")]


def _novelty_value(row: dict, group: str, key: str) -> float:
    """One metric of one score in a novelty run; NaN where the score could not be measured."""
    return float(row[group][key]) if group in row else float("nan")


def _stats(values: Sequence[float | None]) -> dict:
    """Mean, population std and the values; a value that does not exist in a run (``None``) is
    left out, and a metric no run has gets ``None`` for its mean and std (never NaN)."""
    kept = np.array([v for v in values if v is not None], float)
    if not len(kept):
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept)), "values": kept.tolist()}


def summarize(runs: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean, std and per-seed values of each reported metric; a long-tail run reports every
    method's overall, many / medium / few and tail-3 accuracy (``"<method>.<metric>"``), a
    novelty run every score's AUROC, FPR95, AUPRs and pool precision / recall."""
    if runs[0].get("graph") == "continual":
        return _continual_summary(runs)
    if "assigned_new" in runs[0]:
        out = {f"stream.{k}": _stats([r["stream"][k] for r in runs]) for k in runs[0]["stream"]}
        for k in ("precision", "recall"):
            out[f"assigned_new.{k}"] = _stats([r["assigned_new"][k] for r in runs])
        out["k_new"] = _stats([r["k_new"] for r in runs])
        if runs[0].get("k_estimated") is not None:
            out["k_estimated"] = _stats([r["k_estimated"] for r in runs])
        out["seconds"] = _stats([r["seconds"] for r in runs])
        return out
    if "scores" in runs[0]:
        out = {"old_accuracy.all": _stats([r["old_accuracy"]["all"] for r in runs])}
        for score in runs[0]["scores"]:
            for group, key in NOVELTY:
                out[f"{score}.{key}"] = _stats([_novelty_value(r["scores"][score], group, key) for r in runs])
        out["seconds"] = _stats([r["seconds"] for r in runs])
        return out
    if "methods" in runs[0]:
        out = {f"{method}.{key}": _stats([r["methods"][method][key] for r in runs])
               for method in runs[0]["methods"] for key in LONGTAIL}
        out["seconds"] = _stats([r["seconds"] for r in runs])
        return out
    out = {}
    for group, key in REPORTED:
        name = group if key is None else f"{group}.{key}"
        out[name] = _stats([r[group] if key is None else r[group][key] for r in runs])
    return out


def _continual_summary(runs: Sequence[dict]) -> dict[str, dict[str, float]]:
    """The continual loop's final accuracies (all, old, new, each phase, old by its own outputs),
    forgetting in points, average incremental accuracy, discovered / duplicate / spurious counts
    and seconds; a value that does not exist in a run (null) is left out of that metric's
    statistics."""
    out = {f"final.{k}": _stats([r["final"][k] for r in runs]) for k in ("all", "old", "new")}
    for i in range(len(runs[0]["final"]["phases"])):
        out[f"final.phase{i + 1}"] = _stats([r["final"]["phases"][i] for r in runs])
    out["forgetting.old"] = _stats([r["forgetting"]["old"] for r in runs])
    # the labeled classes by their own outputs (no Hungarian assignment); runs before it have none
    out["final.old_own"] = _stats([r["final"].get("old_own") for r in runs])
    out["forgetting.old_own"] = _stats([r["forgetting"].get("old_own") for r in runs])
    for i in range(len(runs[0]["forgetting"]["phases"])):
        out[f"forgetting.phase{i + 1}"] = _stats([r["forgetting"]["phases"][i] for r in runs])
    out["average_incremental"] = _stats([r["average_incremental"] for r in runs])
    for key in ("discovered", "duplicates", "spurious", "seconds"):
        out[key] = _stats([r[key] for r in runs])
    return out


def _fmt(name: str, value: float) -> str:
    """Seconds as they are, AUROC / FPR95 / AUPR as fractions, everything else as a percentage."""
    if value is None:
        return "–"
    if name in ("seconds", "k_new", "k_estimated", "discovered", "duplicates", "spurious") \
            or name.startswith("forgetting"):
        return f"{value:.1f}"
    fractions = ("auroc", "fpr95", "aupr", "nmi", "ari")
    return f"{value:.3f}" if any(k in name for k in fractions) else f"{100 * value:.1f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.seeds", description=__doc__)
    parser.add_argument("--gin", action="append", required=True, metavar="FILE")
    parser.add_argument("--gin-bindings", action="append", default=[], metavar="BINDING")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/seeds", help="folder for the per-seed runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = []
    for seed in args.seeds:
        run_dir = Path(args.out) / f"seed{seed}"
        argv_one = [a for f in args.gin for a in ("--gin", f)]
        argv_one += [a for b in [*args.gin_bindings, f"SEED = {seed}"] for a in ("--gin-bindings", b)]
        code = run_main([*argv_one, "--run-dir", str(run_dir)])
        if code != 0:
            return code
        runs.append(json.loads((run_dir / "metrics.json").read_text()))
    summary = summarize(runs)
    RunDir(args.out).write_json("summary.json", {"seeds": args.seeds, "metrics": summary,
                                                 "gin": args.gin, "bindings": args.gin_bindings})
    table = Table(title=f"{runs[0]['protocol']}: mean ± std over seeds {args.seeds}")
    for column in ("metric", "mean", "std", "per seed"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, s in summary.items():
        table.add_row(name, _fmt(name, s["mean"]), _fmt(name, s["std"]),
                      " ".join(_fmt(name, v) for v in s["values"]))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
