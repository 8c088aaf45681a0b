"""Print the continual loop's table (Markdown) from ``scripts/continual_table.sh``'s output.

``python scripts/continual_table.py runs/continual`` reads ``<dir>/<name>/summary.json`` (and
the runs' metrics.json for the per-seed discoveries) and prints one row per protocol and phase
order: mean ± std over the seeds of the final test accuracy (all, old, new, each phase), the
old classes' forgetting, the classes discovered (true 5), duplicates, spurious classes and the
seconds per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("digits", "digits-phased"), ("digits-reversed", "digits-phased, phases reversed"),
        ("fmnist", "fmnist-phased"), ("fmnist-reversed", "fmnist-phased, phases reversed")]


def pct(s: dict) -> str:
    return "–" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def num(s: dict, digits: int = 1) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    print("| protocol | all | old | new | phase 1 | phase 2 | old forgetting (points) "
          "| discovered (true 5), per seed | duplicates | spurious | s / run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder, label in ROWS:
        summary = root / folder / "summary.json"
        if not summary.exists():
            continue
        m = json.loads(summary.read_text())["metrics"]
        runs = [json.loads(f.read_text()) for f in sorted((root / folder).glob("seed*/metrics.json"))]
        found = ", ".join(str(r["discovered"]) for r in runs)
        print(f"| {label} | {pct(m['final.all'])} | {pct(m['final.old'])} | {pct(m['final.new'])} | "
              f"{pct(m['final.phase1'])} | {pct(m['final.phase2'])} | {num(m['forgetting.old'])} | "
              f"{found} | {num(m['duplicates'])} | {num(m['spurious'])} | {m['seconds']['mean']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
