"""Print every cluster verdict of continual runs (Markdown), from their metrics.json files.

``python scripts/verdicts_table.py runs/seeds10-dp/seed*`` prints one row per cluster that a
round's acceptance judged: its size, its true majority class and purity, its stability, its
distance to the known classes (``spread``, in median spacings between neighbouring known
classes) and to the nearest other accepted cluster of its round (``nearest_accepted``, same
units), accepted or why not. Then, over all runs, the ranges of that nearest distance for pairs of
accepted clusters of one true class (a class found twice) and of two (distractors excluded): where
they overlap, no merge distance tells a duplicate from two classes. The true classes come from
the runs' report fields, which no decision reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def name(c: int) -> str:
    return "distractors" if c == -1 else f"class {c}"


def number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def verdicts(run: Path) -> list[tuple[int, dict]]:
    """(round, verdict) for every cluster judged in ``run``, accepted ones first in each round."""
    metrics = json.loads((run / "metrics.json").read_text())
    return [(r["round"], v) for r in metrics["rounds"] for v in r["accepted"] + r["rejected"]]


def nearest_pairs(judged: list[tuple[int, dict]]) -> list[tuple[bool, float]]:
    """(same true class?, distance) for each accepted cluster and its nearest accepted neighbour,
    each pair once; pairs with a cluster of mostly distractors are left out."""
    by_round: dict[int, dict[int, dict]] = {}
    for r, v in judged:
        if v["accepted"]:
            by_round.setdefault(r, {})[v["cluster"]] = v
    pairs = {}
    for clusters in by_round.values():
        for v in clusters.values():
            other = clusters.get(v.get("nearest_cluster"))
            if other is None or -1 in (v["truth"]["majority"], other["truth"]["majority"]):
                continue
            key = tuple(sorted((v["cluster"], other["cluster"])))
            pairs[key] = (v["truth"]["majority"] == other["truth"]["majority"], v["nearest_accepted"])
    return list(pairs.values())


def table(run: Path) -> list[str]:
    lines = [f"## {run}", "", "| round | cluster | size | majority | purity | stability | spread | "
             "nearest accepted | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r, v in verdicts(run):
        verdict = "accepted" if v["accepted"] else "; ".join(v["reasons"])
        if v.get("merged_into") is not None:
            verdict += f", merged into {v['merged_into']}"
        lines.append(f"| {r} | {v['cluster']} | {v['size']} | {name(v['truth']['majority'])} | "
                     f"{v['truth']['purity']:.2f} | {v['stability']:.2f} | {v['spread']:.2f} | "
                     f"{number(v.get('nearest_accepted'))} | {verdict} |")
    return [*lines, ""]


def main(paths: list[str]) -> int:
    runs = [Path(p) for p in paths]
    missing = [str(r) for r in runs if not (r / "metrics.json").is_file()]
    if not runs or missing:
        print("usage: python scripts/verdicts_table.py RUN [RUN ...]: "
              f"no metrics.json in {missing or 'no run'}", file=sys.stderr)
        return 2
    pairs = []
    for run in runs:
        print("\n".join(table(run)))
        pairs += nearest_pairs(verdicts(run))
    for same, label in ((True, "one true class (a duplicate)"), (False, "two true classes")):
        found = sorted(d for s, d in pairs if s == same)
        spread = f"{found[0]:.2f}-{found[-1]:.2f}" if found else "–"
        print(f"accepted clusters and their nearest accepted neighbour, {label}: {len(found)} pairs, "
              f"{spread} spacings apart")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
