"""Print the README's novelty tables (Markdown) from ``scripts/novelty_table.sh``'s output.

``python scripts/novelty_table.py runs/novelty`` reads ``<dir>/<protocol>-<head>/summary.json``
(written by ``python -m components.seeds``) and prints, per protocol, one row per score: mean ±
std over the seeds of AUROC, FPR at 95 % TPR, AUPR (new and old as positive) and the pool's
precision and recall at the threshold rule of the run. Every score but the evidential one comes
from the plain cross-entropy model; the evidential rows from the same model with the evidential
head (exp evidence, and relu evidence when ``<protocol>-evidential-relu`` exists), whose
old-class accuracy is compared below each table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PROTOCOLS = {"digits": "digits-7/3", "fmnist": "fmnist-7/3"}
ORDER = ["max-softmax", "entropy", "margin", "max-logit", "energy", "knn", "mahalanobis", "evidential"]
COLUMNS = [("auroc", 3), ("fpr95", 3), ("aupr_new", 3), ("aupr_old", 3), ("precision", 1), ("recall", 1)]


def cell(stats: dict, digits: int) -> str:
    if math.isnan(stats["mean"]):
        return "–"
    scale = 100 if digits == 1 else 1
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _metrics(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text())["metrics"] if path.exists() else None


def table(root: Path, key: str) -> str:
    plain, evidential = _metrics(root / f"{key}-ce"), _metrics(root / f"{key}-evidential")
    relu = _metrics(root / f"{key}-evidential-relu")  # the same head with the paper's relu evidence
    if plain is None:
        return f"({root / f'{key}-ce'} not run)"
    lines = [f"**{PROTOCOLS[key]}**\n",
             "| score | AUROC | FPR@95 | AUPR (new +) | AUPR (old +) | pool precision % | pool recall % |",
             "|---|---|---|---|---|---|---|"]
    names = [name[: -len(".auroc")] for name in plain if name.endswith(".auroc")]
    rows = [(name, plain) for name in sorted(names, key=lambda n: (ORDER.index(n.split("-k")[0]), n))]
    if evidential is not None and "evidential.auroc" in evidential:
        rows.append(("evidential", evidential))
    best = max(rows, key=lambda r: r[1][f"{r[0]}.auroc"]["mean"])[0]
    if relu is not None:
        rows.append(("evidential", relu))
    for name, metrics in rows:
        label = f"**{name}**" if name == best else name
        if metrics is relu:
            label = "evidential, relu evidence (the paper's)"
        elif name == "evidential":
            label = "evidential, exp evidence"
        lines.append(f"| {label} | " + " | ".join(cell(metrics[f"{name}.{c}"], d) for c, d in COLUMNS) + " |")
    if evidential is not None:
        a, b = plain["old_accuracy.all"], evidential["old_accuracy.all"]
        lines.append(f"\nOld-class test accuracy: cross-entropy {cell(a, 1)} %, with the evidential "
                     f"head {cell(b, 1)} % (difference {100 * (b['mean'] - a['mean']):+.1f} points); "
                     f"seconds per run {plain['seconds']['mean']:.0f} / {evidential['seconds']['mean']:.0f}.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    for key in PROTOCOLS:
        print(table(root, key) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
