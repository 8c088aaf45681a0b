"""Print what a continual run's consolidation did (Markdown), from its metrics.json.

``python scripts/consolidation_table.py runs/continual/fmnist/seed0 [more runs]`` prints, for each
run, where consolidation's candidates (the stream samples the model assigned to a discovered
output) went: each relabeled output (the output it was, its size, its majority true class and
purity, its stability) and each labeled class whose cluster took candidates (those are not
relabeled). A whole new class in the second list is one the outputs had no cluster for. The true
classes come from the run's report fields, which no decision reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def name(c: int) -> str:
    return "distractors" if c == -1 else f"class {c}"


def table(run: Path) -> list[str]:
    metrics = json.loads((run / "metrics.json").read_text())
    entry = metrics["rounds"][-1].get("consolidation")
    if not entry or "outputs" not in entry:
        why = entry.get("decision", "nothing relabeled") if entry else "no consolidation"
        return [f"## {run}", "", f"{why}", ""]
    stability = entry.get("stability", {})
    head = f"{entry['candidates']} candidates; {entry['decision']}: {entry.get('why', '')}"
    lines = [f"## {run}", "", head, "", "| cluster | output (was) | size | majority | purity | stability |",
             "|---|---|---|---|---|---|"]
    for o in entry["outputs"]:  # "was" None: an output consolidation added (continual.consolidation_added)
        s = o.get("stability") if o["was"] is None else stability.get(str(o["was"]))
        kind, was = ("added", "new") if o["was"] is None else ("relabeled", o["was"])
        lines.append(f"| {kind} | {o['id']} ({was}) | {o['size']} | {name(o['truth']['majority'])} | "
                     f"{o['truth']['purity']:.2f} | {'–' if s is None else f'{s:.2f}'} |")
    for d in entry.get("dropped_outputs", []):
        lines.append(f"| dropped | – ({d['id']}) | – | – | – | {d['stability']:.2f} |")
    for row in entry.get("to_labeled", []):
        lines.append(f"| labeled class {row['class']} | – | {row['size']} | {name(row['majority'])} | "
                     f"{row['purity']:.2f} | – |")
    return [*lines, ""]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for run in map(Path, argv):
        if not (run / "metrics.json").is_file():
            print(f"{run}: no metrics.json (is it a finished continual run's directory?)", file=sys.stderr)
            return 2
        print("\n".join(table(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
