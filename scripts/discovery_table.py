"""Print the README's discovery table (Markdown) from ``scripts/discovery_table.sh``'s output.

``python scripts/discovery_table.py runs/discovery`` reads ``<dir>/<protocol>-<features>/summary.json``
(written by ``python -m components.seeds``) and prints one row per protocol and feature kind:
mean ± std over the seeds of the stream's clustering accuracy (all / old / new, and the
class-balanced new), NMI, ARI, assigned-new precision and recall, and the estimated number of
new classes per seed (from ``scripts/recluster.py``'s ``k_estimate.json`` where present).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("digits-7/3", "digits", "supervised", "supervised-only (v0's features)"),
    ("digits-7/3", "digits", "contrastive", "contrastive (GCD: SimCLR + SupCon + CE, projector)"),
    ("fmnist-7/3", "fmnist", "supervised", "supervised-only (v0's features)"),
    ("fmnist-7/3", "fmnist", "contrastive", "contrastive (GCD: SimCLR + SupCon + CE, projector)"),
]


def pct(stats: dict) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _estimates(folder: Path, summary: dict) -> list[int]:
    """Per seed: the silhouette estimate of ``scripts/recluster.py`` (``k_estimate.json``) when
    it was run, else the one the run itself reported."""
    out = []
    for i, value in enumerate(summary["k_estimated"]["values"]):
        seeds = sorted(folder.glob("seed*"))
        again = seeds[i] / "k_estimate.json" if i < len(seeds) else None
        if again is not None and again.exists():
            value = json.loads(again.read_text())["silhouette"]["k_estimate"]
        out.append(int(value))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    print("| protocol | features | all | old | new | new, balanced | NMI | ARI | assigned-new precision | "
          "assigned-new recall | k estimated (true 3) | s / run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for protocol, key, kind, label in ROWS:
        path = root / f"{key}-{kind}" / "summary.json"
        if not path.exists():
            print(f"| {protocol} | {label} | (not run) |")
            continue
        m = json.loads(path.read_text())["metrics"]
        cells = [pct(m[f"stream.{g}"]) for g in ("all", "old", "new", "new_balanced")]
        cells += [f"{m[f'stream.{g}']['mean']:.3f}" for g in ("nmi", "ari")]
        cells += [pct(m["assigned_new.precision"]), pct(m["assigned_new.recall"])]
        cells.append(", ".join(str(k) for k in _estimates(root / f"{key}-{kind}", m)))
        cells.append(f"{m['seconds']['mean']:.0f}")
        print(f"| {protocol} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
