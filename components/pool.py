"""The sample pool: low-confidence stream samples wait here until there are enough to cluster."""

from __future__ import annotations

import gin
import numpy as np
import torch


@gin.configurable
class SamplePool:
    """Holds stream sample ids whose novelty score exceeds ``threshold``, in arrival order.

    ``ready`` turns true once ``trigger_size`` samples have arrived since the last
    :meth:`new_round` (at first: since the pool was made), so samples a round left in the pool
    do not fire the next trigger by themselves. The threshold is either given, or set by the
    graph from held-out known-class scores with a rule of :mod:`components.thresholds` (e.g. a
    5 % false-alarm rate). Each sample remembers the round it entered in, so samples that
    several rounds could not turn into a class can age out (:meth:`age_out`).
    """

    def __init__(self, trigger_size: int = gin.REQUIRED, threshold: float | None = None) -> None:
        if trigger_size < 1:
            raise ValueError(f"trigger_size must be >= 1, got {trigger_size}")
        self.trigger_size, self.threshold = trigger_size, threshold
        self._ids = np.array([], dtype=np.int64)
        self._entered = np.array([], dtype=np.int64)
        self.arrived = 0  # samples added since the last new_round()
        self.round = 0

    def add(self, ids: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> int:
        """Pool the samples whose score exceeds the threshold; return how many were pooled."""
        if self.threshold is None:
            raise RuntimeError("SamplePool has no threshold: pass one, or set it from known-class scores "
                               "(components.thresholds.false_alarm_threshold)")
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores)
        keep = ids[scores > self.threshold]
        self._ids = np.concatenate([self._ids, keep])
        self._entered = np.concatenate([self._entered, np.full(len(keep), self.round, dtype=np.int64)])
        self.arrived += len(keep)
        return len(keep)

    @property
    def ids(self) -> np.ndarray:
        """The pooled stream ids, oldest first."""
        return self._ids.copy()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ready(self) -> bool:
        return self.arrived >= self.trigger_size

    def remove(self, ids: np.ndarray) -> None:
        """Drop samples that were turned into pseudo-labels; the rest keep their order and wait
        for the next trigger."""
        keep = ~np.isin(self._ids, np.asarray(ids, dtype=np.int64))
        self._ids, self._entered = self._ids[keep], self._entered[keep]

    def new_round(self, round_: int) -> None:
        """Start counting arrivals for the next trigger; samples added from now on entered in
        ``round_``."""
        self.arrived, self.round = 0, round_

    def age_out(self, rounds: int) -> np.ndarray:
        """Drop (and return) the samples that have waited through ``rounds`` discoveries or more
        without becoming a class: they entered at least ``rounds`` rounds before the current one."""
        old = self.round - self._entered >= rounds
        dropped = self._ids[old]
        self._ids, self._entered = self._ids[~old], self._entered[~old]
        return dropped

    def state_dict(self) -> dict:
        return {"ids": torch.from_numpy(self._ids.copy()), "entered": torch.from_numpy(self._entered.copy()),
                "arrived": self.arrived, "round": self.round, "threshold": self.threshold,
                "trigger_size": self.trigger_size}

    def load_state_dict(self, state: dict) -> None:
        self._ids = state["ids"].numpy().astype(np.int64)
        self._entered = state["entered"].numpy().astype(np.int64)
        self.arrived, self.round = int(state["arrived"]), int(state["round"])
        self.threshold, self.trigger_size = state["threshold"], int(state["trigger_size"])
