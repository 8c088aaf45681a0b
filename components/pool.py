"""The sample pool: low-confidence stream samples wait here until there are enough to cluster."""

from __future__ import annotations

import gin
import numpy as np
import torch


@gin.configurable
class SamplePool:
    """Holds stream sample ids whose novelty score exceeds ``threshold``.

    ``ready`` turns true once the pool holds ``trigger_size`` samples. The threshold is either
    given, or set by the graph from held-out known-class scores with a rule of
    :mod:`components.thresholds` (e.g. a 5 % false-alarm rate).
    """

    def __init__(self, trigger_size: int = gin.REQUIRED, threshold: float | None = None) -> None:
        if trigger_size < 1:
            raise ValueError(f"trigger_size must be >= 1, got {trigger_size}")
        self.trigger_size, self.threshold = trigger_size, threshold
        self._ids: list[np.ndarray] = []

    def add(self, ids: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> int:
        """Pool the samples whose score exceeds the threshold; return how many were pooled."""
        if self.threshold is None:
            raise RuntimeError("SamplePool has no threshold: pass one, or set it from known-class scores "
                               "(components.thresholds.false_alarm_threshold)")
        ids, scores = np.asarray(ids), np.asarray(scores)
        keep = ids[scores > self.threshold]
        self._ids.append(keep)
        return len(keep)

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate(self._ids) if self._ids else np.array([], dtype=np.int64)

    def __len__(self) -> int:
        return sum(len(a) for a in self._ids)

    @property
    def ready(self) -> bool:
        return len(self) >= self.trigger_size

    def remove(self, ids: np.ndarray) -> None:
        """Drop samples that were turned into pseudo-labels; the rest wait for the next trigger."""
        self._ids = [np.setdiff1d(self.ids, ids)]
