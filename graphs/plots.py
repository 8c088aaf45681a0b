"""Plots written into the run directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def per_class_accuracy_plot(path: Path, train_counts: Sequence[int], rows: Mapping[str, Sequence[float]],
                            class_names: Sequence[str], title: str) -> Path:
    """Test accuracy of each class against its number of training images (log scale), one
    series per method; the dotted lines mark DESIGN.md's few / medium / many-shot bounds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = sorted(range(len(train_counts)), key=lambda c: -train_counts[c])
    counts = [train_counts[c] for c in order]
    for name, per_class in rows.items():
        ax.plot(counts, [100 * per_class[c] for c in order], marker="o", markersize=4, label=name)
    for bound in (20, 100):
        ax.axvline(bound, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training images of the class (log scale, head → tail)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    secondary = ax.secondary_xaxis("top")
    secondary.set_xticks(counts)
    secondary.set_xticklabels([class_names[c] for c in order], rotation=60, fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
