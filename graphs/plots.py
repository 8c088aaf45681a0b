"""Plots written into the run directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    """Write the figure under a temporary name and rename it into place."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


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
    return _save(fig, path)


def score_histogram(path: Path, scores, is_new, title: str, bins: int = 40) -> Path:
    """Histogram of novelty scores of old-class and new-class stream samples (densities, so
    the two groups compare whatever their sizes); the farther apart, the better the score."""
    import numpy as np

    scores, is_new = np.asarray(scores, dtype=np.float64), np.asarray(is_new, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.histogram_bin_edges(scores, bins=bins)
    for mask, label, color in ((~is_new, "old classes", "tab:blue"), (is_new, "new classes", "tab:orange")):
        if mask.any():
            ax.hist(scores[mask], bins=edges, density=True, alpha=0.55, color=color,
                    label=f"{label} ({int(mask.sum())})")
    ax.set_xlabel("novelty score (higher = more likely new)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
