"""A fixed-budget exemplar memory: what the continual loop replays so it does not forget.

iCaRL (Rebuffi et al., CVPR 2017): every known class keeps ``budget // number of classes``
exemplars, chosen by *herding* so that their mean feature stays close to the class mean
(Algorithm 4); when new classes arrive, each class keeps the first exemplars of its herding
order (Algorithm 5), so shrinking a class never re-selects. Labeled classes and discovered
(pseudo-labeled) classes are stored alike; an exemplar is a key ``(source, index)`` that the
graph resolves to an image (source 0: the labeled set, 1: the stream).
"""

from __future__ import annotations

import gin
import numpy as np
import torch

LABELED, STREAM = 0, 1


def herding(features: np.ndarray, m: int | None = None) -> np.ndarray:
    """The order in which iCaRL's herding picks rows of ``features`` (L2-normalized first):
    the k-th pick makes the mean of the first k closest to the mean of all rows. Returns the
    first ``m`` row indices (all by default), without repeats."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    m = len(x) if m is None else min(m, len(x))
    target = x.mean(0)
    chosen: list[int] = []
    total = np.zeros_like(target)
    available = np.ones(len(x), dtype=bool)
    for k in range(1, m + 1):
        gaps = np.linalg.norm(target[None] - (total[None] + x) / k, axis=1)
        gaps[~available] = np.inf
        pick = int(np.argmin(gaps))
        chosen.append(pick)
        available[pick] = False
        total += x[pick]
    return np.array(chosen, dtype=np.int64)


@gin.configurable
class ExemplarMemory:
    """Per-class exemplars under a total ``budget`` (iCaRL's fixed memory, see the module
    docstring). ``selection="herding"`` is iCaRL's; ``"random"`` keeps a seeded random order,
    the usual baseline. Classes with fewer candidates than their share keep them all."""

    def __init__(self, budget: int = 2000, selection: str = "herding", seed: int = 0) -> None:
        if budget < 1:
            raise ValueError(f"the memory budget must be >= 1 exemplar, got {budget}")
        if selection not in ("herding", "random"):
            raise ValueError(f"selection must be 'herding' or 'random', got {selection!r}")
        self.budget, self.selection, self.seed = budget, selection, seed
        self._keys: dict[int, np.ndarray] = {}  # class id -> [n, 2] (source, index), in selection order

    @property
    def per_class(self) -> int:
        return max(1, self.budget // max(1, len(self._keys) or 1))

    def add_class(self, class_id: int, keys: np.ndarray, features: np.ndarray) -> None:
        """Store class ``class_id`` from candidate ``keys`` ``[n, 2]`` and their ``features``,
        then shrink every class to the new per-class share."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        if len(keys) == 0:
            raise ValueError(f"class {class_id} has no candidate exemplar")
        if len(keys) != len(features):
            raise ValueError(f"{len(keys)} keys but {len(features)} feature rows for class {class_id}")
        share = max(1, self.budget // (len(self._keys | {class_id: keys})))
        if self.selection == "herding":
            order = herding(features, share)
        else:
            order = np.random.default_rng(self.seed + class_id).permutation(len(keys))[:share]
        self._keys[class_id] = keys[order]
        for c in self._keys:
            self._keys[c] = self._keys[c][:share]

    def keep_classes(self, order: list[int]) -> None:
        """Keep only the classes ``order``, class ``order[j]`` becoming class ``j`` (a classifier
        that dropped outputs, :meth:`Network.keep_outputs`); their exemplars are unchanged."""
        order = list(order)
        if len(set(order)) != len(order) or not set(order) <= set(self._keys):
            raise ValueError(f"keep_classes needs distinct stored classes {self.classes()}, got {order}")
        self._keys = {j: self._keys[c] for j, c in enumerate(order)}

    def classes(self) -> list[int]:
        return sorted(self._keys)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All exemplars: keys ``[n, 2]`` and their class ids ``[n]``, class by class."""
        if not self._keys:
            return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
        keys = np.concatenate([self._keys[c] for c in self.classes()])
        targets = np.concatenate([np.full(len(self._keys[c]), c) for c in self.classes()])
        return keys, targets

    def __len__(self) -> int:
        return sum(len(k) for k in self._keys.values())

    def state_dict(self) -> dict:
        return {"budget": self.budget, "selection": self.selection, "seed": self.seed,
                "keys": {int(c): torch.from_numpy(k.copy()) for c, k in self._keys.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.budget, self.selection, self.seed = int(state["budget"]), state["selection"], int(state["seed"])
        self._keys = {int(c): k.numpy().astype(np.int64) for c, k in state["keys"].items()}
