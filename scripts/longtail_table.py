"""Print the README's long-tail table (Markdown) from ``scripts/fmnist_lt_table.sh``'s output.

``python scripts/longtail_table.py runs/fmnist-lt-100`` reads ``<dir>/<method>/summary.json``
(written by ``python -m components.seeds``) and prints one row per training method and per
recalibration method: mean ± std over the seeds of overall, many / medium / few-shot and
tail-3 test accuracy, and the gain in tail-3 over plain cross-entropy.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# (row label, run folder, row of that run's metrics)
ROWS = [
    ("cross-entropy, instance sampling", "ce", "as trained"),
    ("logit-adjusted loss (τ = 1)", "logit_adjusted_loss", "as trained"),
    ("Balanced Softmax", "balanced_softmax", "as trained"),
    ("LDAM-DRW (cosine classifier)", "ldam_drw", "as trained"),
    ("class-balanced CE (β = 0.9999)", "class_balanced_loss", "as trained"),
    ("focal (γ = 2)", "focal", "as trained"),
    ("CE, class-balanced sampling", "sampler_class_balanced", "as trained"),
    ("CE, square-root sampling", "sampler_sqrt", "as trained"),
    ("CE, progressively-balanced sampling", "sampler_progressive", "as trained"),
    ("CE + cRT (cache)", "ce", "cRT"),
    ("CE + τ-norm (cache)", "ce", "tau-norm"),
    ("CE + LWS (cache)", "ce", "LWS"),
    ("CE + post-hoc logit adjustment (cache)", "ce", "logit adj. (post-hoc)"),
    ("CE + cRT on 4 augmented views per image (cache)", "ce_views4", "cRT"),
    ("CE + LWS on 4 augmented views per image (cache)", "ce_views4", "LWS"),
    ("causal-norm classifier, as trained (α = 0)", "tde", "as trained"),
    ("causal-norm classifier + TDE, α on validation (cache)", "tde", "TDE"),
]
COLUMNS = ("all", "many", "medium", "few", "tail3")


def cell(stats: dict) -> str:
    if math.isnan(stats["mean"]):
        return "–"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def table(folder: Path) -> str:
    lines = ["| method | all | many | medium | few | tail-3 | tail-3 vs CE |",
             "|---|---|---|---|---|---|---|"]
    base, missing = None, []
    for label, run, row in ROWS:
        path = folder / run / "summary.json"
        if not path.exists():
            missing.append(str(path))
            continue
        metrics = json.loads(path.read_text())["metrics"]
        stats = [metrics[f"{row}.{c}"] for c in COLUMNS]
        tail = stats[-1]["mean"]
        if base is None:  # the first row is plain cross-entropy, the reference
            base, gain = tail, ""
        else:
            gain = f"{100 * (tail - base):+.1f}"
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in stats) + f" | {gain} |")
    if missing:
        lines.append(f"\n(not run, so not shown: {', '.join(sorted(set(missing)))})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for folder in map(Path, argv):
        print(f"\n{folder.name}\n")
        print(table(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
