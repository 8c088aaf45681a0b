"""What the known classes' logit adjustment (``lifecycle.logit_adjustment``) gives finished
single-round runs, without training again: loads each run's distilled student (before any
adjustment or offset), chooses τ on its held-out known-class images as the loop does
(:func:`components.recalibration.known_prior_adjustment`) and measures the test images as
distilled, with that τ, and with each fixed τ of ``--taus``. Reads the test set, so it is a
tuning tool for choosing the default on a suite, never part of a run.

    python scripts/adjust_sweep.py runs/suite-fmnist/*/ --taus 0.5 1.0

``--per-class`` prints each known class's test accuracy (images predicted as their own class)
as distilled and adjusted. ``--confusion`` prints, as distilled and adjusted, how many test
images of each class (columns, in the protocol's order) each output predicts (rows), and the
output → class assignment the test's one Hungarian matching makes (what "old" and "new"
accuracy credit).

Prints each run's line (the τ chosen, held-out accuracy before → after, test all / old / new per
row), then per row the mean ± std over the runs, the worst run's new and, for suite runs, all /
new / worst new per ratio.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from claim_sweep import _load, summarize  # the same run loader and table as the claim-rate sweep

from components.metrics import hungarian_mapping
from components.recalibration import known_prior_adjustment
from graphs.evaluate import evaluate


def sweep(folder: Path, taus: list[float], confusion: bool = False,
          per_class: bool = False) -> tuple[dict, dict] | None:
    loaded = _load(folder)
    if loaded is None:
        return None
    protocol, val, test, _ = loaded
    n_old = protocol.n_old
    counts = protocol.train_counts[:n_old]
    offsets, entry = known_prior_adjustment(val["logits"], val["targets"], counts)
    rows = {"distilled": np.zeros(n_old, np.float32), "held-out τ": offsets}
    rows |= {f"τ = {t:g}": known_prior_adjustment(val["logits"], val["targets"], counts, taus=[t])[0]
             for t in taus}  # a grid of one: that τ's offsets
    out = {}
    for name, shift in rows.items():
        logits = test["logits"].copy()
        logits[:, :n_old] -= shift
        accuracy = evaluate({"logits": logits, "targets": test["targets"]}, n_old,
                            protocol.train_counts)["accuracy"]
        out[name] = {k: 100 * accuracy[k] for k in ("all", "old", "new")}
        if name == "held-out τ" and per_class:
            adjusted, before = logits.argmax(1), test["logits"].argmax(1)
            print("  per class, test images predicted as their own class, distilled → adjusted: " + "; ".join(
                f"{protocol.class_names[c]} ({protocol.train_counts[c]} labeled) "
                f"{100 * (before[test['targets'] == c] == c).mean():.0f} → "
                f"{100 * (adjusted[test['targets'] == c] == c).mean():.0f} %" for c in range(n_old)))
        if confusion and name in ("distilled", "held-out τ"):
            predicted, truth = logits.argmax(1), test["targets"]
            counts = np.zeros((logits.shape[1], protocol.n_old + protocol.n_new), int)
            np.add.at(counts, (predicted, truth), 1)
            print(f"  {name}: test images per output (rows) and class (columns); assignment "
                  f"{hungarian_mapping(truth, predicted)}")
            print("\n".join("    " + " ".join(f"{c:5d}" for c in row) for row in counts))
    return out, entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--taus", nargs="+", type=float, default=[0.5, 1.0],
                        help="fixed τ to measure beside the one chosen on held-out images")
    parser.add_argument("--confusion", action="store_true",
                        help="print the test confusion counts and assignment, distilled and adjusted")
    parser.add_argument("--per-class", action="store_true",
                        help="print each known class's test accuracy, distilled and adjusted")
    args = parser.parse_args()
    table: dict[str, list[dict]] = {}
    for folder in args.runs:
        print(folder)
        result = sweep(folder, args.taus, args.confusion, args.per_class)
        if result is None:
            print("  nothing discovered, skipped")
            continue
        rows, entry = result
        line = "  ".join(f"{r}: {v['all']:.1f}/{v['old']:.1f}/{v['new']:.1f}" for r, v in rows.items())
        print(f"  τ {entry['tau']:g} (held-out {100 * entry['held_out_before']:.1f} → "
              f"{100 * max(entry['held_out']):.1f}); {line}")
        ratio = re.search(r"ratio(\d+)", folder.name)
        for r, v in rows.items():
            table.setdefault(r, []).append(v | {"ratio": ratio and int(ratio.group(1))})
    summarize(table, "row")


if __name__ == "__main__":
    main()
