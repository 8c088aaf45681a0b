"""What ``lifecycle.claim_rate`` would have given finished single-round runs, for several rates
at once, without training again: loads each run's reported student, fits the discovered
outputs' offsets on its held-out known-class images for every rate (one offset, and per output:
``each``) and measures the test images with them. Reads the test set, so it is a tuning tool for
choosing the default on a suite, never part of a run.

    python scripts/claim_sweep.py runs/suite-fmnist/*/ --rates 0.01 0.02 0.03

``--adjust`` first applies the known classes' logit adjustment that the loop applies by default
before any offset (``lifecycle.logit_adjustment``; without it the rows are those of the runs
made before that default, the fourth session of 2026-11-29). ``--gain`` adds a row where each
discovered output is lowered as far as maximises the held-out known-class accuracy (a variant
that lost, docs/loop.md). ``--explain RATE`` prints, per run, each discovered output's
per-output offset at that rate, the true class the test's one Hungarian assignment gives it
(what "old" and "new" accuracy credit it for), and the held-out images it claims by class, with
that class's labeled count.

Each run folder needs its ``operative_config.gin``, ``metrics.json`` and checkpoints (a run of
``gin/distill.gin`` or ``gin/distill_fmnist.gin``; a run that already lowered or adjusted its
outputs is measured from the student before both). Prints each run's line, then per rate the
mean ± std test accuracy (all / old / new, %) over the runs, the worst run's new and, for suite runs
(``…-ratio<R>-…`` folders), all / new / worst new per ratio.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import gin
import numpy as np
import torch
from ignite.handlers import Checkpoint

import components  # noqa: F401  (registers the configurables the configs name)
import components.run  # noqa: F401
import graphs  # noqa: F401
from components.gin_files import resolve
from components.metrics import hungarian_mapping
from components.recalibration import discovered_offset, known_prior_adjustment
from graphs.encode import encode
from graphs.evaluate import evaluate
from graphs.handlers import load_checkpoint


def gain_offsets(logits: np.ndarray, targets: np.ndarray, n_old: int) -> np.ndarray:
    """Each discovered output lowered (alone) as far as maximises the held-out known-class
    accuracy: of the images it claims, released from the smallest margin up, the count whose
    runner-up is their true class peaks there (no offset when it never rises above zero)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(targets)
    offsets = np.zeros(z.shape[1] - n_old)
    for j in range(n_old, z.shape[1]):
        others = torch.cat([z[:, :j], z[:, j + 1:]], 1)
        runner_up = others.argmax(1) + (others.argmax(1) >= j).long()  # back to output ids
        margin = z[:, j] - others.max(1).values
        claimed = margin > 0
        order = torch.argsort(margin[claimed])
        gained = torch.cumsum((runner_up[claimed] == y[claimed])[order].long(), 0)
        if len(gained) and gained.max() > 0:
            best = margin[claimed][order][int(gained.argmax())]
            offsets[j - n_old] = float(best + 1e-5 * best.abs().clamp_min(1.0))
    return offsets


def _load(folder: Path):
    """The run's protocol, its reported student's val and test outputs, and k_new (None if
    nothing was discovered)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    k_new = metrics["k_new"]
    if k_new == 0:
        return None
    gin.clear_config()
    gin.parse_config_file(str(folder / "operative_config.gin"))
    data, model, augment, cache = (resolve(gin.query_parameter(f"lifecycle.{k}"))
                                   for k in ("data", "model", "augment", "cache"))
    protocol = data()
    saved = {p.name.split("_")[0]: p for p in sorted((folder / "checkpoints").glob("*.pt"))}
    name = "consolidated" if (metrics.get("consolidation") or {}).get("decision") == "promoted" else "student"
    net = model(num_classes=protocol.n_old + k_new)
    Checkpoint.load_objects({"model": net}, load_checkpoint(saved[name]))
    device = torch.device("cpu")
    return protocol, encode(net, protocol.val, augment, cache, device), \
        encode(net, protocol.test, augment, cache, device), k_new


def adjust(protocol, val: dict, test: dict) -> float:
    """Apply the loop's known-class logit adjustment (``lifecycle.logit_adjustment``, τ chosen on
    the held-out images) to ``val`` and ``test`` logits in place; returns τ."""
    n_old = protocol.n_old
    offsets, entry = known_prior_adjustment(val["logits"], val["targets"], protocol.train_counts[:n_old])
    for outputs in (val, test):
        outputs["logits"] = outputs["logits"].copy()
        outputs["logits"][:, :n_old] -= offsets
    return entry["tau"]


def sweep(folder: Path, rates: list[float], gain: bool = False, explain: float | None = None,
          adjusted: bool = False):
    loaded = _load(folder)
    if loaded is None:
        return None
    protocol, val, test, k_new = loaded
    if adjusted:
        adjust(protocol, val, test)
    n_old, held_out = protocol.n_old, torch.as_tensor(val["logits"])
    variants = {"none": np.zeros(k_new)}
    for rate in rates:
        variants[str(rate)] = discovered_offset(held_out, n_old, rate)[0]
        variants[f"{rate} each"] = discovered_offset(held_out, n_old, rate, per_output=True)[0]
    if gain:
        variants["gain"] = gain_offsets(val["logits"], val["targets"], n_old)
    out = {}
    for key, offsets in variants.items():
        logits = test["logits"].copy()
        logits[:, n_old:] -= offsets.astype(np.float32)
        accuracy = evaluate({"logits": logits, "targets": test["targets"]}, n_old,
                            protocol.train_counts)["accuracy"]
        out[key] = {k: 100 * accuracy[k] for k in ("all", "old", "new")} | {"offset": float(offsets.max())}
    out["none"]["claimed"] = 100 * float((val["logits"].argmax(1) >= n_old).mean())
    if explain is not None:
        offsets = discovered_offset(held_out, n_old, explain, per_output=True)[0]
        mapped = hungarian_mapping(test["targets"], test["logits"].argmax(1))
        predicted = val["logits"].argmax(1)
        for j in range(n_old, n_old + k_new):
            claims = np.bincount(val["targets"][predicted == j], minlength=n_old)
            said = ", ".join(f"class {c} ({protocol.train_counts[c]} labeled): {n}"
                             for c, n in enumerate(claims) if n)
            print(f"  output {j}: offset {offsets[j - n_old]:.2f} at {explain} each; the test's "
                  f"assignment gives it class {mapped.get(j)}; held-out images it claims: {said or 'none'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.02, 0.03])
    parser.add_argument("--gain", action="store_true", help="add the accuracy-maximising variant")
    parser.add_argument("--adjust", action="store_true", help="first apply the known classes' logit "
                        "adjustment, as the loop does by default (lifecycle.logit_adjustment)")
    parser.add_argument("--explain", type=float, metavar="RATE", help="print each output's offset, "
                        "test assignment and held-out claims at this per-output rate")
    args = parser.parse_args()
    table: dict[str, list[dict]] = {}
    for folder in args.runs:
        print(folder)
        result = sweep(folder, args.rates, args.gain, args.explain, args.adjust)
        if result is None:
            print("  nothing discovered, skipped")
            continue
        line = "  ".join(f"{r}: {v['all']:.1f}/{v['old']:.1f}/{v['new']:.1f} (δ≤{v['offset']:.2f})"
                         for r, v in result.items())
        print(f"  claimed {result['none']['claimed']:.1f} % of held-out; {line}")
        ratio = re.search(r"ratio(\d+)", folder.name)
        for r, v in result.items():
            table.setdefault(r, []).append(v | {"ratio": ratio and int(ratio.group(1))})
    print("('each': one offset per output)")
    summarize(table, "rate")


def summarize(table: dict[str, list[dict]], label: str) -> None:
    """Per row of ``table`` (a variant: its runs' all / old / new and suite ratio), the mean ± std
    over the runs, the worst run's new and all / new / worst new per ratio."""
    print(f"{label:<10} all          old          new          worst new   (mean ± std over runs, %; "
          "per ratio: all / new / worst new)")
    for r, values in table.items():
        stats = {k: (np.mean([v[k] for v in values]), np.std([v[k] for v in values]))
                 for k in ("all", "old", "new")}
        worst = min(v["new"] for v in values)
        ratios = sorted({v["ratio"] for v in values if v["ratio"] is not None})
        by_ratio = "  ".join(
            f"ratio {q}: {np.mean([v['all'] for v in values if v['ratio'] == q]):.1f} / "
            f"{np.mean([v['new'] for v in values if v['ratio'] == q]):.1f} / "
            f"{min(v['new'] for v in values if v['ratio'] == q):.1f}" for q in ratios)
        print(f"{r:<10} " + " ".join(f"{m:.1f} ± {d:.1f}".ljust(12) for m, d in stats.values())
              + f" {worst:.1f}   {by_ratio}")


if __name__ == "__main__":
    main()
