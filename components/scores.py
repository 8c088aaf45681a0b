"""Novelty scores: one number per sample, higher = more likely a new class.

Two forms, one convention:

* plain functions of logits ``[N, C] -> [N]`` (:func:`max_softmax`, :func:`energy`), as the
  online graph binds them today (``lifecycle.score = @energy``);
* :class:`Score` objects with one interface for every method, post-hoc or not:
  ``score.fit(train)`` with cached training outputs (a no-op for the logit scores), then
  ``score(outputs)`` where ``outputs`` maps ``"logits"`` / ``"features"`` to arrays of the
  samples to score (a bare tensor is taken as logits). Those that need training features say
  so clearly when they have none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import gin
import numpy as np
import torch

from components.losses import evidence_of

log = logging.getLogger(__name__)

Outputs = Mapping[str, torch.Tensor | np.ndarray] | torch.Tensor


@gin.configurable
def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Least confidence, ``1 - max softmax`` (Hendrycks & Gimpel, ICLR 2017)."""
    return 1.0 - logits.softmax(dim=1).amax(dim=1)


@gin.configurable
def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy ``-T · logsumexp(logits / T)`` (Liu et al., NeurIPS 2020)."""
    if temperature <= 0:
        raise ValueError(f"energy temperature must be > 0, got {temperature}")
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def _get(outputs: Outputs, key: str, who: str) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        if key != "logits":
            raise ValueError(f"{who} scores {key}, but was given a bare tensor: pass a dict with "
                             f"{key!r} (e.g. the encode graph's cached arrays)")
        return outputs
    if key not in outputs:
        raise ValueError(f"{who} needs {key!r} in the outputs it scores, got {sorted(outputs)}")
    return torch.as_tensor(np.asarray(outputs[key])).float()


class Score:
    """A novelty score. ``fit(train)`` learns what it needs from cached training outputs and
    returns ``self``; calling it on outputs returns ``[N]`` scores, higher = more likely new."""

    name = "score"

    def fit(self, train: Outputs) -> Score:
        return self

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@gin.configurable
class MaxSoftmax(Score):
    """Least confidence, ``1 - max_c softmax(z)_c`` (Hendrycks & Gimpel, ICLR 2017)."""

    name = "max-softmax"

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        return max_softmax(_get(outputs, "logits", self.name))


@gin.configurable
class Entropy(Score):
    """Entropy of the softmax, ``-Σ p log p``."""

    name = "entropy"

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        log_p = _get(outputs, "logits", self.name).log_softmax(dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)


@gin.configurable
class Margin(Score):
    """Minus the gap between the two largest softmax probabilities: a small gap is doubt."""

    name = "margin"

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        top = _get(outputs, "logits", self.name).softmax(dim=1).topk(2, dim=1).values
        return top[:, 1] - top[:, 0]


@gin.configurable
class MaxLogit(Score):
    """Minus the largest logit (Hendrycks et al., ICML 2022)."""

    name = "max-logit"

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        return -_get(outputs, "logits", self.name).amax(dim=1)


@gin.configurable
class Energy(Score):
    """Free energy ``-T · logsumexp(z / T)`` (Liu et al., NeurIPS 2020)."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"energy temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        return energy(_get(outputs, "logits", self.name), self.temperature)

    def __repr__(self) -> str:
        return f"Energy(temperature={self.temperature})"


@gin.configurable
class EvidentialUncertainty(Score):
    """Dirichlet uncertainty ``K / Σ α`` with ``α = act(z) + 1`` (Sensoy et al., NeurIPS 2018);
    ``activation`` must be the one the head was trained with (``EvidentialLoss.activation``).

    ``z`` is the ``evidence`` output of an :class:`~components.models.EvidentialHead` trained
    with :class:`~components.losses.EvidentialLoss` beside the classifier (the default), or the
    classifier's own logits (``key="logits"``) when the classifier itself was trained with it.
    """

    name = "evidential"

    def __init__(self, key: str = "evidence", activation: str = "relu") -> None:
        evidence_of(torch.zeros(1), activation)  # fail early on an unknown name
        self.key, self.activation = key, activation

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor) and self.key not in outputs:
            raise ValueError(
                f"evidential uncertainty reads {self.key!r}, which these outputs lack (they have "
                f"{sorted(outputs)}): give the model an evidential head (Network.confidence = "
                "@EvidentialHead, train.confidence_loss = @EvidentialLoss()), or use key='logits' "
                "for a classifier trained with EvidentialLoss"
            )
        evidence = outputs if isinstance(outputs, torch.Tensor) else _get(outputs, self.key, self.name)
        alpha = evidence_of(evidence, self.activation) + 1
        return evidence.shape[1] / alpha.sum(dim=1)

    def __repr__(self) -> str:
        return f"EvidentialUncertainty(key={self.key!r}, activation={self.activation!r})"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalized rows, float32 and contiguous (what faiss takes)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def _needs_fit(score: Score, fitted: bool) -> None:
    if not fitted:
        raise RuntimeError(f"{type(score).__name__} needs cached training features: call "
                           "fit(train) with the encode graph's arrays of the labeled set first")


@gin.configurable
class KNNDistance(Score):
    """Distance to the ``k``-th nearest L2-normalized training feature (Sun et al., ICML 2022).

    ``nlist=None`` searches exactly (faiss ``IndexFlatL2``). ``nlist=L`` searches approximately
    with faiss's inverted file (``IndexIVFFlat``: the bank is split into ``L`` k-means cells and
    each query visits its ``nprobe`` nearest cells), which trades a little accuracy of the
    distance for several times the speed on long streams (see ``bench/scoring.py``). A bank
    smaller than ``39 · L`` (faiss's minimum for training the cells) is searched exactly, with an
    info line: its cells would hold too few neighbours, and exact search of it is fast anyway.

    ``use_gpu``: search on faiss-gpu (the bank is built and, for IVF, its cells trained on the
    CPU, then the index is copied to GPU 0). Default: where faiss sees a GPU, as for k-means.
    """

    name = "knn"

    def __init__(self, k: int = 50, nlist: int | None = None, nprobe: int = 4,
                 use_gpu: bool | None = None) -> None:
        if k < 1:
            raise ValueError(f"kNN needs k >= 1, got {k}")
        if nlist is not None and not 1 <= nprobe <= nlist:
            raise ValueError(f"kNN needs 1 <= nprobe <= nlist, got nprobe={nprobe}, nlist={nlist}")
        from components.kmeans import gpu_default

        self.k, self.nlist, self.nprobe = k, nlist, nprobe
        self.use_gpu = gpu_default(use_gpu)
        if self.use_gpu and max(k, nprobe if nlist else 0) > 2048:  # faiss-gpu's limits
            raise ValueError(f"kNN on faiss-gpu finds at most 2048 neighbours in at most 2048 cells, "
                             f"got k={k}, nprobe={nprobe}: lower them or bind KNNDistance.use_gpu = False")
        self.name = f"knn-k{k}" + ("" if nlist is None else f"-ivf{nlist}")
        self.index = None

    def fit(self, train: Outputs) -> KNNDistance:
        import faiss

        features = _get(train, "features", "kNN").numpy()
        if len(features) < self.k:
            raise ValueError(f"kNN with k={self.k} needs at least {self.k} training features, got "
                             f"{len(features)}: lower k")
        features = _unit_rows(features)
        dim = features.shape[1]
        if self.nlist is not None and len(features) < 39 * self.nlist:
            log.info(f"kNN: {len(features)} training features are too few for {self.nlist} IVF "
                     f"cells (faiss wants {39 * self.nlist}), so they are searched exactly")
        if self.nlist is None or len(features) < 39 * self.nlist:
            self.index = faiss.IndexFlatL2(dim)
        else:
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, self.nlist)
            self.index.cp.seed = 0  # the cells' k-means: same bank, same cells
            self.index.train(features)
            self.index.nprobe = self.nprobe
        self.index.add(features)
        if self.use_gpu:
            from components.kmeans import to_gpu

            self.index = to_gpu(self.index)
        return self

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        _needs_fit(self, self.index is not None)
        x = _unit_rows(_get(outputs, "features", "kNN").numpy())
        distances, _ = self.index.search(x, self.k)  # squared L2, ascending
        kth = distances[:, -1]
        # an approximate search can find fewer than k neighbours in the visited cells (faiss
        # pads with +inf / 3.4e38): those samples are far from everything, score them at the
        # largest possible distance between unit vectors
        kth = np.where(kth > 4.0, 4.0, kth)
        return torch.from_numpy(np.sqrt(np.maximum(kth, 0.0)))

    def __repr__(self) -> str:
        approx = "" if self.nlist is None else f", nlist={self.nlist}, nprobe={self.nprobe}"
        gpu = ", use_gpu=True" if self.use_gpu else ""
        return f"KNNDistance(k={self.k}{approx}{gpu})"


@gin.configurable
class Mahalanobis(Score):
    """Smallest Mahalanobis distance to a class mean of the training features, with one
    covariance shared by all classes (Lee et al., NeurIPS 2018; without their input
    perturbation).

    ``keys`` names the cached outputs it reads: ``("features",)`` by default; several (e.g.
    ``("tap3", "features")``, earlier stages from :class:`~components.models.Network`'s
    ``taps``) make Lee et al.'s feature ensemble: one class-conditional Gaussian per layer, each
    layer's distance standardized by its mean and spread on the fitted samples, and the
    standardized distances averaged. (Lee et al. weight the layers by a logistic regression fitted
    on validation samples of the novel data; the loop has none before it discovers, so every
    layer weighs the same.)"""

    name = "mahalanobis"

    def __init__(self, keys: tuple[str, ...] = ("features",)) -> None:
        if not keys:
            raise ValueError("Mahalanobis needs at least one output to read: keys = ('features',)")
        self.keys = tuple(keys)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.spread: list[tuple[float, float]] = []
        if self.keys != ("features",):
            self.name = "mahalanobis-" + "+".join(self.keys)

    def fit(self, train: Outputs) -> Mahalanobis:
        targets = torch.as_tensor(np.asarray(train["targets"])).long()
        classes = torch.unique(targets)
        self.layers, self.spread = [], []
        for key in self.keys:
            features = _get(train, key, "Mahalanobis").double()
            means = torch.stack([features[targets == c].mean(0) for c in classes])
            centered = features - means[torch.searchsorted(classes, targets)]
            precision = torch.linalg.pinv(centered.T @ centered / len(features), hermitian=True)
            self.layers.append((means, precision))
            if len(self.keys) > 1:  # the ensemble standardizes each layer on the fitted samples
                d = self._distance(features, means, precision)
                self.spread.append((float(d.mean()), float(d.std().clamp_min(1e-12))))
        return self

    @staticmethod
    def _distance(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        # (x - μ)ᵀ P (x - μ) = xᵀPx - 2 xᵀPμ + μᵀPμ, for every class at once
        xp = x @ precision
        means_p = means @ precision
        d = (xp * x).sum(1, keepdim=True) - 2 * xp @ means.T + (means_p * means).sum(1)
        return d.amin(dim=1).clamp_min(0)

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        _needs_fit(self, bool(self.layers))
        distances = [self._distance(_get(outputs, key, "Mahalanobis").double(), *layer)
                     for key, layer in zip(self.keys, self.layers, strict=True)]
        if len(distances) == 1:
            return distances[0].float()
        return torch.stack([(d - mean) / std for d, (mean, std) in zip(distances, self.spread, strict=True)]
                           ).mean(0).float()

    def __repr__(self) -> str:
        return "Mahalanobis()" if self.keys == ("features",) else f"Mahalanobis(keys={self.keys!r})"
