"""Metrics with the exact definitions of docs/definitions.md.

* clustering accuracy: one Hungarian assignment over all evaluated samples, then accuracy on
  the old subset, the new subset and all; a class-balanced variant; NMI and ARI beside it;
* many / medium / few-shot: classes with > 100, 20..100, < 20 training images, each group the
  mean of its per-class accuracies; tail-3: the mean accuracy of the 3 rarest classes;
* novelty: new-class samples are positives; AUROC, FPR at 95 % TPR, AUPR (new and old as
  positive);
* pool precision (share of new among pooled) and recall (share of the stream's new pooled).

The Ignite metrics at the bottom accumulate predictions batch by batch (detached) and compute
these at the end of an evaluation run; in a distributed run over every process's share
(:func:`gather_rows`), so each process computes the metrics of the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm


def hungarian_mapping(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """Map each predicted id to a true class maximizing the number of matches."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    size = int(max(y_true.max(), y_pred.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return dict(zip(rows.tolist(), cols.tolist(), strict=True))


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    return np.array([
        (y_pred[y_true == c] == c).mean() if (y_true == c).any() else np.nan for c in classes
    ])


def clustering_accuracy(y_true, y_pred, old_mask) -> dict[str, float]:
    """Accuracy after one Hungarian assignment over all samples, on all / old / new samples,
    with class-balanced variants (mean of per-class accuracies), NMI and ARI."""
    y_true, y_pred, old_mask = np.asarray(y_true), np.asarray(y_pred), np.asarray(old_mask, bool)
    mapping = hungarian_mapping(y_true, y_pred)
    mapped = np.array([mapping.get(p, -1) for p in y_pred])
    hit = mapped == y_true
    out = {"all": float(hit.mean())}
    for group, mask in (("old", old_mask), ("new", ~old_mask)):
        out[group] = float(hit[mask].mean()) if mask.any() else float("nan")
        classes = np.unique(y_true[mask])
        acc = per_class_accuracy(y_true[mask], mapped[mask], classes)
        out[f"{group}_balanced"] = float(np.nanmean(acc)) if len(acc) else float("nan")
    out["all_balanced"] = float(np.nanmean(per_class_accuracy(y_true, mapped, np.unique(y_true))))
    out["nmi"] = float(skm.normalized_mutual_info_score(y_true, y_pred))
    out["ari"] = float(skm.adjusted_rand_score(y_true, y_pred))
    return out


def shot_accuracy(y_true, y_pred, train_counts: Sequence[int]) -> dict[str, float]:
    """Many (> 100), medium (20..100) and few (< 20) shot accuracy of the classes
    ``0..len(train_counts)-1``; a group with no class is NaN."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = np.asarray(train_counts)
    acc = per_class_accuracy(y_true, y_pred, range(len(counts)))
    groups = {"many": counts > 100, "medium": (counts >= 20) & (counts <= 100), "few": counts < 20}
    return {g: float(np.nanmean(acc[m])) if m.any() else float("nan") for g, m in groups.items()}


def longtail_accuracy(y_true, y_pred, train_counts: Sequence[int], tail: int = 3) -> dict:
    """Accuracy of a long-tailed classifier on a test set of the classes
    ``0..len(train_counts)-1``: overall, many / medium / few-shot (:func:`shot_accuracy`), the
    mean accuracy of the ``tail`` classes with the fewest training images (``tail3``), and the
    per-class accuracies in class order."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = np.asarray(train_counts)
    per_class = per_class_accuracy(y_true, y_pred, range(len(counts)))
    rarest = np.argsort(counts, kind="stable")[:tail]
    return {
        "all": float((y_true == y_pred).mean()),
        **shot_accuracy(y_true, y_pred, counts),
        f"tail{tail}": float(np.nanmean(per_class[rarest])),
        "per_class": per_class.tolist(),
    }


def novelty_metrics(scores, is_new) -> dict[str, float]:
    """Novelty detection with new-class samples as positives (higher score = more likely new):
    AUROC, FPR at 95 % TPR (the share of old-class samples scoring at or above the threshold
    that catches 95 % of the new ones), AUPR with new as positive (``aupr_new``, "AUPR-Out" in
    OpenOOD's words) and with old as positive (``aupr_old``, "AUPR-In", on negated scores)."""
    scores, is_new = np.asarray(scores, np.float64), np.asarray(is_new, bool)
    if is_new.all() or not is_new.any():
        nan = float("nan")
        return {"auroc": nan, "fpr95": nan, "aupr_new": nan, "aupr_old": nan}
    if not np.isfinite(scores).all():  # scikit-learn would stop deep inside with "Input contains NaN"
        raise ValueError(f"novelty scores hold {int((~np.isfinite(scores)).sum())} non-finite values of "
                         f"{len(scores)}: the score's inputs (logits or features) are not finite")
    fpr, tpr, _ = skm.roc_curve(is_new, scores)
    return {
        "auroc": float(skm.roc_auc_score(is_new, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        "aupr_new": float(skm.average_precision_score(is_new, scores)),
        "aupr_old": float(skm.average_precision_score(~is_new, -scores)),
    }


def pool_quality(pooled: np.ndarray, is_new: np.ndarray) -> dict[str, float]:
    """Precision: share of new among pooled. Recall: share of the stream's new that was pooled.
    ``pooled`` and ``is_new`` are boolean masks over the stream."""
    pooled, is_new = np.asarray(pooled, bool), np.asarray(is_new, bool)
    precision = float(is_new[pooled].mean()) if pooled.any() else float("nan")
    recall = float(pooled[is_new].mean()) if is_new.any() else float("nan")
    return {"precision": precision, "recall": recall, "size": int(pooled.sum())}


def grouped_accuracy(y_true, y_pred, groups: dict[str, Sequence[int]]) -> dict[str, float | None]:
    """Accuracy after one Hungarian assignment over all samples whose class is in ``groups``,
    then on all of them (``"all"``) and on each group's samples; ``None`` for a group with no
    sample. The continual loop's accuracy matrix is this, round after round, over the test
    images of the classes seen so far."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = sorted({int(c) for ids in groups.values() for c in ids})
    keep = np.isin(y_true, classes)
    if not keep.any():
        return {"all": None} | dict.fromkeys(groups)
    y_true, y_pred = y_true[keep], y_pred[keep]
    mapping = hungarian_mapping(y_true, y_pred)
    hit = np.array([mapping.get(p, -1) for p in y_pred]) == y_true
    out: dict[str, float | None] = {"all": float(hit.mean())}
    for name, ids in groups.items():
        mask = np.isin(y_true, list(ids))
        out[name] = float(hit[mask].mean()) if mask.any() else None
    return out


def own_output_accuracy(y_true, y_pred, classes: Sequence[int]) -> float | None:
    """Accuracy on the samples of ``classes`` with output ``c`` read as class ``c`` (no Hungarian
    assignment): how well labeled classes are still told by their own outputs. The clustering
    accuracy can fall below it without any forgetting: when a new class that has no output of its
    own is predicted as an old class's output, one assignment over all classes may give that
    output to the new class. ``None`` without a sample."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    mask = np.isin(y_true, list(classes))
    return float((y_pred[mask] == y_true[mask]).mean()) if mask.any() else None


def where_classes_go(y_true, y_pred, classes: Sequence[int], top: int = 3) -> list[dict]:
    """For each class in ``classes``: its number of samples and the ``top`` outputs that take most
    of them, as ``{"class", "samples", "outputs": [[output, share], …]}``, most first. Read from
    a model's test predictions, it shows which class was absorbed by which output."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rows = []
    for c in classes:
        taken = y_pred[y_true == c]
        if not len(taken):
            continue
        outputs, counts = np.unique(taken, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        rows.append({"class": int(c), "samples": len(taken),
                     "outputs": [[int(outputs[i]), float(counts[i] / len(taken))] for i in order]})
    return rows


def continual_summary(matrix: Sequence[dict[str, float | None]], groups: Sequence[str]) -> dict:
    """From the accuracy matrix (one dict per round: ``"all"`` and each group, ``None`` where a
    group was not seen yet): the final accuracies, the average incremental accuracy (mean over
    rounds of ``"all"``) and each group's forgetting in points (its best accuracy in an earlier
    round minus its final one; ``None`` with no earlier round)."""
    final = dict(matrix[-1])
    alls = [row["all"] for row in matrix if row["all"] is not None]
    forgetting: dict[str, float | None] = {}
    for g in groups:
        earlier = [row[g] for row in matrix[:-1] if row.get(g) is not None]
        forgetting[g] = (100 * (max(earlier) - final[g])
                         if earlier and final.get(g) is not None else None)
    return {"final": final, "average_incremental": float(np.mean(alls)) if alls else None,
            "forgetting": forgetting}


def cluster_truth(targets: np.ndarray) -> dict:
    """What a pseudo-labeled cluster really holds (for reporting only, never for decisions):
    its majority true class (``-1``: distractors), that class's share, and the distractor share."""
    targets = np.asarray(targets)
    values, counts = np.unique(targets, return_counts=True)
    top = int(values[np.argmax(counts)])
    return {"majority": top, "purity": float(counts.max() / len(targets)),
            "distractors": float(np.mean(targets == -1))}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` (the row counts may differ), concatenated in rank order,
    in every process (Ignite's ``all_gather`` wants one shape: rows are padded, then cut)."""
    counts = [int(c) for c in idist.all_gather(torch.tensor([len(x)]))]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype)
    padded[:len(x)] = x
    gathered = idist.all_gather(padded)
    step = max(counts)
    return torch.cat([gathered[r * step:r * step + c] for r, c in enumerate(counts)])


class _Accumulating(Metric):
    """Collects (predictions, targets) over an epoch; ``output_transform`` gives the pair.
    Across processes, each holds its share of the samples and :meth:`compute` sees them all."""

    @reinit__is_reduced
    def reset(self) -> None:
        self._pred: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []

    @reinit__is_reduced
    def update(self, output) -> None:
        pred, true = output
        self._pred.append(pred.detach().cpu())
        self._true.append(true.detach().cpu())

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        pred, true = torch.cat(self._pred), torch.cat(self._true)
        if idist.get_world_size() > 1:
            pred, true = gather_rows(pred), gather_rows(true)
        return pred.numpy(), true.numpy()


class ClusteringAccuracy(_Accumulating):
    """Ignite metric: :func:`clustering_accuracy` of argmax predictions; classes
    ``< n_old`` are old. Output: a dict."""

    def __init__(self, n_old: int, output_transform=lambda x: x, device="cpu") -> None:
        self.n_old = n_old
        super().__init__(output_transform, device=device)

    def compute(self) -> dict[str, float]:
        logits, y = self._arrays()
        return clustering_accuracy(y, logits.argmax(1), y < self.n_old)


class ShotAccuracy(_Accumulating):
    """Ignite metric: many / medium / few-shot accuracy over the old classes (identity mapping)."""

    def __init__(self, train_counts: Sequence[int], output_transform=lambda x: x, device="cpu"):
        self.train_counts = list(train_counts)
        super().__init__(output_transform, device=device)

    def compute(self) -> dict[str, float]:
        logits, y = self._arrays()
        old = y < len(self.train_counts)
        return shot_accuracy(y[old], logits[old].argmax(1), self.train_counts)
