"""The recalibrate graph: fix a long-tailed classifier from cached features, never from images.

It reads the HDF5 caches the encode graph wrote (train, validation, test), checks each file's
fingerprints against the model being recalibrated, and runs each method bound in gin:

* ``crt``   — classifier re-training: a fresh linear classifier trained on the cached features
  with class-balanced sampling (Kang et al., ICLR 2020);
* ``tau_norm`` — τ-normalization, τ chosen on the validation split;
* ``lws``   — learnable weight scaling with class-balanced sampling;
* ``logit_adjustment`` — post-hoc logit adjustment, τ fixed or chosen on validation;
* ``tde``   — causal TDE, α chosen on validation (needs a ``CausalNormClassifier``).

Each method is a function ``(classifier, train, val, counts) -> (head, info)`` on tensors, so a
new one is a few lines. Note: the reference cRT re-trains with augmentation and BatchNorm in
training mode; features cached once in eval mode have neither. ``encode(views=V)`` caches ``V``
augmented views per image for users who want augmentation back (see README).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gin
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.cache import read_checked
from components.data.loading import make_sampler
from components.metrics import longtail_accuracy
from components.models.heads import GrowingLinear
from components.recalibration import (
    PriorAdjusted,
    TauNormalized,
    WeightScaled,
    counterfactual,
    select_on_validation,
)
from graphs.train import _fit, _step

Split = Mapping[str, torch.Tensor]  # "features", "targets" (and whatever else was cached)
Method = Callable[[nn.Module, Split, Split | None, Sequence[int]], tuple[nn.Module, dict]]


class _Rows(Dataset):
    """Indices and targets of cached rows, served a batch at a time (``__getitems__``)."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: Sequence[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return index, self.targets[index]


def row_loader(targets: torch.Tensor, batch_size: int, sampler: str, seed: int, epochs: int) -> DataLoader:
    """Batches of ``(row indices, targets)`` drawn by ``sampler``, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = make_sampler(targets, sampler, generator, epochs)
    return DataLoader(_Rows(targets), batch_size=batch_size, sampler=chosen, shuffle=chosen is None,
                      generator=generator, collate_fn=lambda batch: batch)


def fit_head(
    head: nn.Module,
    rows: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    sampler: str = "class_balanced",
    seed: int = 0,
    description: str = "fit head",
) -> Engine:
    """Train ``head``'s trainable parameters with cross-entropy on ``rows(indices)`` (cached
    features, or anything that maps row indices to features), SGD with momentum and cosine
    decay. The same ``seed`` draws the same batches whatever ``rows`` reads from."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)

    def update(engine: Engine, batch) -> dict[str, float]:
        index, y = batch
        head.train()
        return _step(opt, F.cross_entropy(head(rows(index)), y))

    loader = row_loader(targets, batch_size, sampler, seed, epochs)
    # seconds on cached features, often run many times in a selection: re-run, not resumed
    return _fit(Engine(update), head, loader, opt, epochs, description, None, resumable=False)


def _require_val(val: Split | None, method: str) -> Split:
    if val is None:
        raise ValueError(f"{method} chooses its parameter on a validation split, and none was "
                         "cached: set make_protocol.val_per_class (or give the parameter a value)")
    return val


@gin.configurable(denylist=["classifier", "train", "val", "counts"])
def crt(classifier: nn.Module, train: Split, val: Split | None, counts: Sequence[int],
        epochs: int = 10, batch_size: int = 128, lr: float = 0.1, weight_decay: float = 5e-4,
        seed: int = 0) -> tuple[nn.Module, dict]:
    """Classifier re-training (Kang et al., ICLR 2020): a freshly initialized linear classifier
    trained on frozen features with class-balanced sampling."""
    torch.manual_seed(seed)
    head = GrowingLinear(train["features"].shape[1], len(counts))
    features = train["features"]
    fit_head(head, features.__getitem__, train["targets"], epochs, batch_size, lr, weight_decay,
             "class_balanced", seed, "cRT on cached features")
    return head.eval(), {"epochs": epochs}


@gin.configurable(denylist=["classifier", "train", "val", "counts"])
def lws(classifier: nn.Module, train: Split, val: Split | None, counts: Sequence[int],
        epochs: int = 10, batch_size: int = 128, lr: float = 0.1, seed: int = 0) -> tuple[nn.Module, dict]:
    """Learnable weight scaling (Kang et al., ICLR 2020): frozen classifier, one scale per class
    learned with class-balanced sampling (no weight decay, which would pull scales to 0)."""
    head = WeightScaled(classifier, len(counts))
    features = train["features"]
    fit_head(head, features.__getitem__, train["targets"], epochs, batch_size, lr, 0.0,
             "class_balanced", seed, "LWS on cached features")
    return head.eval(), {"scales": head.scales.detach().tolist()}


@gin.configurable(denylist=["classifier", "train", "val", "counts"])
def tau_norm(classifier: nn.Module, train: Split, val: Split | None, counts: Sequence[int],
             grid: Sequence[float] = tuple(np.round(np.arange(0.0, 2.01, 0.1), 2))) -> tuple[nn.Module, dict]:
    """τ-normalization (Kang et al., ICLR 2020) with τ chosen on the validation split."""
    val = _require_val(val, "tau_norm")
    best, head, scores = select_on_validation(lambda t: TauNormalized(classifier, t), grid,
                                              val["features"], val["targets"], len(counts))
    return head, {"tau": best, "validation": scores}


@gin.configurable(denylist=["classifier", "train", "val", "counts"])
def logit_adjustment(classifier: nn.Module, train: Split, val: Split | None, counts: Sequence[int],
                     tau: float | None = 1.0,
                     grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                     ) -> tuple[nn.Module, dict]:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): ``z - τ log π``; ``tau=None``
    chooses τ on the validation split, else ``tau`` is used (1 is the paper's default)."""
    if tau is not None:
        return PriorAdjusted(classifier, counts, tau), {"tau": tau}
    val = _require_val(val, "logit_adjustment with tau=None")
    best, head, scores = select_on_validation(lambda t: PriorAdjusted(classifier, counts, t), grid,
                                              val["features"], val["targets"], len(counts))
    return head, {"tau": best, "validation": scores}


@gin.configurable(denylist=["classifier", "train", "val", "counts"])
def tde(classifier: nn.Module, train: Split, val: Split | None, counts: Sequence[int],
        alpha: float | None = None,
        grid: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)) -> tuple[nn.Module, dict]:
    """Causal TDE (Tang et al., NeurIPS 2020) with ``alpha`` fixed, or chosen on the validation
    split when ``None`` (Tang et al. use 3.0 on ImageNet-LT; it is data-dependent)."""
    if alpha is not None:
        return counterfactual(classifier, alpha), {"alpha": alpha}
    val = _require_val(val, "tde with alpha=None")
    best, head, scores = select_on_validation(lambda a: counterfactual(classifier, a), grid,
                                              val["features"], val["targets"], len(counts))
    return head, {"alpha": best, "validation": scores}


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {"features": torch.from_numpy(arrays["features"]).float(),
            "targets": torch.from_numpy(arrays["targets"]).long()}


@torch.no_grad()
def _logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return head.eval()(features)


@gin.configurable(denylist=["classifier", "caches", "expected", "counts"])
def recalibrate(
    classifier: nn.Module,
    caches: Mapping[str, str | Path],
    expected: Mapping[str, Mapping[str, str]],
    counts: Sequence[int],
    methods: Mapping[str, Method] | None = None,
) -> dict[str, dict]:
    """Recalibrate ``classifier`` with each of ``methods`` on the cached ``train`` / ``val`` /
    ``test`` features and report test accuracy (overall, many / medium / few, tail-3, per class).

    ``caches`` maps split names to HDF5 files; ``expected`` maps split names to the fingerprints
    (``model``, ``data`` …) each file must carry: a file written by another model or for another
    split is refused, naming the fingerprint that differs. The row ``"as trained"`` is the
    classifier itself.
    """
    methods = dict(methods or {})
    for split in ("train", "test"):
        if split not in caches:
            raise ValueError(f"recalibrate needs a cached {split!r} split, got {sorted(caches)}")
    data = {split: _tensors(read_checked(path, **expected.get(split, {})))
            for split, path in caches.items()}
    train, val, test = data["train"], data.get("val"), data["test"]
    classifier = copy.deepcopy(classifier).cpu().eval()  # cached features live on the CPU
    rows = {"as trained": (classifier, {})}
    seconds = {"as trained": 0.0}
    for name, method in methods.items():
        started = time.perf_counter()
        rows[name] = method(classifier, train, val, counts)
        seconds[name] = time.perf_counter() - started
    out = {}
    for name, (head, info) in rows.items():
        pred = _logits(head, test["features"]).argmax(1).numpy()
        out[name] = longtail_accuracy(test["targets"].numpy(), pred, counts) | {
            "info": info, "seconds": seconds[name]}
    return out
