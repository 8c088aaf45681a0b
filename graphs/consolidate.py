"""Consolidation: label the discovered classes again, from everything the stream showed.

A model that has grown by discovered classes learned them from a pool: the samples the first
model was unsure of, clustered once. Consolidation asks the grown model which stream samples
belong to its discovered classes, clusters all of those afresh (semi-supervised k-means anchored
by the labeled classes, k = the number of discovered classes, in a representation learned on
the labeled images and the stream), gives each new cluster the discovered output it shares most
samples with (Hungarian), and distills a student on the labeled images plus these labels. The
student's teacher speaks for the labeled classes only: its discovered outputs are what is being
relabeled, and distilling them would teach the old labels again.

The continual loop runs it once at the stream's end (``continual.consolidate``), the
single-round loop after its distillation (``lifecycle.consolidate``); docs/loop.md and
docs/suite.md measure both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from ignite.engine import Engine
from scipy.optimize import linear_sum_assignment
from torch import nn

from components.cache import FeatureCache
from components.data import ImageSet, concat_images, take_images
from components.kmeans import confident
from graphs.encode import encode
from graphs.handlers import rank_zero
from graphs.train import distill


class FirstOutputs(nn.Module):
    """``model``'s first ``n`` logits: a teacher that speaks only for those classes."""

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        self.model, self.n = model, n

    @property
    def num_classes(self) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, :self.n]


def consolidate(model: nn.Module, teacher: nn.Module, labeled: ImageSet, stream: ImageSet, n_old: int,
                names: list[str], augment: nn.Module, cache: FeatureCache, device: torch.device,
                labeler: Callable, representation: Callable | None, cluster_on: str,
                keep_fraction: float = 1.0) -> tuple[nn.Module | None, dict, Engine | None]:
    """Relabel ``model``'s discovered outputs (``n_old`` and up, named by ``names``) from the
    ``stream`` samples it assigns to them and distill a student on ``labeled`` (classes below
    ``n_old``) plus those labels, with ``teacher`` (first ``n_old`` outputs) for the labeled
    classes.

    Returns ``(student, entry, engine)``: ``entry`` has the number of candidates and, when a
    student was made, ``ids`` (stream rows) and ``targets`` (their outputs); ``engine`` is the
    distillation's (for a checkpoint). With fewer than two candidates per discovered class the
    student and engine are None and ``entry["decision"]`` says why."""
    logits = encode(model, stream, augment, cache, device)["logits"]
    predicted, k = logits.argmax(1), logits.shape[1] - n_old  # k: the discovered outputs
    ids = np.flatnonzero(predicted >= n_old)
    entry: dict = {"candidates": int(len(ids))}
    if k < 1 or len(ids) < 2 * k:
        entry["decision"] = "no discovered classes" if k < 1 else "too few samples"
        return None, entry, None
    images = stream.subset(ids, f"{stream.name}/assigned-new")
    learner = copy.deepcopy(model)
    if representation is not None:
        representation(learner, labeled, stream, augment, device)
    on_u = encode(learner, images, augment, cache, device)
    on_l = encode(learner, labeled, augment, cache, device)
    relabeler = copy.copy(labeler)  # k is known here: the classes the model kept
    relabeler.k_new = k
    if hasattr(relabeler, "overcluster"):  # one cluster per output
        relabeler.overcluster = 1
    result = rank_zero(relabeler, on_u[cluster_on], on_l[cluster_on], on_l["targets"], n_old)
    # each new cluster takes the discovered output it shares most samples with
    new = result.labels >= n_old
    counts = np.zeros((k, k))
    np.add.at(counts, (result.labels[new] - n_old, predicted[ids][new] - n_old), 1)
    rows, cols = linear_sum_assignment(-counts)
    output = dict(zip(rows + n_old, cols + n_old, strict=True))
    keep = confident(result, keep_fraction, first=n_old) & new
    entry["ids"] = ids[keep]
    entry["targets"] = np.array([output[c] for c in result.labels[keep]], dtype=np.int64)
    taught = ImageSet(concat_images([labeled.images, take_images(stream.images, entry["ids"])]),
                      torch.cat([labeled.targets, torch.from_numpy(entry["targets"])]),
                      list(names), f"{stream.name}/labeled+relabeled")
    engine = distill(learner, FirstOutputs(teacher, n_old), taught, augment, device)
    return learner, entry, engine


__all__ = ["FirstOutputs", "consolidate"]
