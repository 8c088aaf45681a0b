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
    series per method; the dotted lines mark the few / medium / many-shot bounds
    (docs/definitions.md)."""
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


def training_curves(path: Path, histories: Mapping[str, Sequence[Mapping[str, float]]], title: str) -> Path:
    """Per-epoch mean loss (left) and training-batch accuracy (right, where tracked) of each
    training stage, one line per stage."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage, history in histories.items():
        epochs = range(1, len(history) + 1)
        left.plot(epochs, [h["loss"] for h in history], marker=".", label=stage)
        if history and "accuracy" in history[0]:
            right.plot(epochs, [100 * h["accuracy"] for h in history], marker=".", label=stage)
    left.set_xlabel("epoch")
    left.set_ylabel("mean training loss")
    left.set_title("loss")
    left.legend()
    right.set_xlabel("epoch")
    right.set_ylabel("training-batch accuracy (%)")
    right.set_ylim(0, 100)
    right.set_title("accuracy (supervised stage)")
    if right.lines:
        right.legend()
    fig.suptitle(title)
    return _save(fig, path)


def confusion_plot(path: Path, y_true, y_pred, labels: Sequence[str], title: str) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), scikit-learn's display."""
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(y_true), np.asarray(y_pred), labels=list(range(len(labels))), display_labels=labels,
        ax=ax, colorbar=False, xticks_rotation=60, values_format="d")
    ax.set_title(title)
    return _save(fig, path)


def pool_over_stream(path: Path, trace: Sequence[tuple[int, int]], trigger: int, title: str) -> Path:
    """Pool size against stream position, with the trigger size and where the pool fired."""
    fig, ax = plt.subplots(figsize=(7, 4))
    positions, sizes = zip(*trace, strict=True) if trace else ((), ())
    ax.step(positions, sizes, where="post", label="pooled samples")
    ax.axhline(trigger, color="tab:red", linestyle="--", label=f"trigger ({trigger})")
    fired = [p for p, n in trace if n >= trigger][:1]
    for p in fired:
        ax.axvline(p, color="tab:green", linestyle=":", label=f"fired at sample {p}")
    ax.set_xlabel("stream position (samples seen)")
    ax.set_ylabel("samples in the pool")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def embedding_plot(path: Path, features, truth, clusters, class_names: Sequence[str], title: str,
                   method: str = "pca", seed: int = 0, n_old: int | None = None) -> Path:
    """2-D view of features (scikit-learn's PCA, or t-SNE with ``method="tsne"``), colored by
    true class (left) and by cluster (right; clusters from ``n_old`` on are the new ones)."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in ("pca", "tsne"):
        raise ValueError(f"embedding method must be 'pca' or 'tsne', got {method!r}")
    x = np.asarray(features, dtype=np.float32)
    reducer = PCA(2, random_state=seed) if method == "pca" else TSNE(2, random_state=seed, init="pca")
    xy = reducer.fit_transform(x)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = ((axes[0], np.asarray(truth), "true class"), (axes[1], np.asarray(clusters), "cluster"))
    for ax, labels, what in panels:
        for value in np.unique(labels):
            mask = labels == value
            name = class_names[value] if what == "true class" and value < len(class_names) else str(value)
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.7, label=name)
        ax.set_title(f"colored by {what}")
        ax.set_xlabel(f"{method.upper()} 1")
        ax.set_ylabel(f"{method.upper()} 2")
        legend_title = "class" if what == "true class" else (
            "cluster" if n_old is None else f"cluster (from {n_old}: new)")
        ax.legend(fontsize=7, markerscale=2, ncol=2, title=legend_title, title_fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def accuracy_per_round(path: Path, matrix: Sequence[Mapping[str, float | None]], groups: Sequence[str],
                       title: str) -> Path:
    """The continual loop's accuracy matrix: test accuracy of each class group after every round
    (a group enters once the stream has reached its phase)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = list(range(len(matrix)))
    for group in ["all", *groups]:
        values = [row.get(group) for row in matrix]
        points = [(r, 100 * v) for r, v in zip(rounds, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=group,
                    linewidth=2.5 if group == "all" else 1.5)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(rounds)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def classes_over_time(path: Path, positions: Sequence[int], known: Sequence[int], true_seen: Sequence[int],
                      title: str) -> Path:
    """Classes the model knows after each round against the classes the stream has shown."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(positions, known, where="post", marker="o", label="classes the model knows")
    ax.step(positions, true_seen, where="post", linestyle="--", label="classes the stream has shown")
    ax.set_xlabel("stream position (samples seen)")
    ax.set_ylabel("classes")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def pool_over_rounds(path: Path, trace: Sequence[Sequence[int]], rounds: Sequence[tuple[int, int]],
                     segment_ends: Sequence[int], title: str) -> Path:
    """Pool size over the whole stream; a dotted line where each round discovered (with its
    number), grey bands for the stream's segments."""
    fig, ax = plt.subplots(figsize=(8, 4))
    if trace:
        positions, sizes = zip(*[(int(p), int(n)) for p, n in trace], strict=True)
        ax.step(positions, sizes, where="post", label="pooled samples")
    start = 0
    for i, end in enumerate(segment_ends):
        if i % 2:
            ax.axvspan(start, end, color="0.92", zorder=0)
        start = end
    for number, position in rounds:
        ax.axvline(position, color="tab:green", linestyle=":")
        ax.annotate(f"r{number}", (position, 0), textcoords="offset points", xytext=(2, 2), fontsize=8)
    ax.set_xlabel("stream position (samples seen; grey bands: alternate segments)")
    ax.set_ylabel("samples in the pool")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
