"""The model: feature extractor → (projector, growing classifier); and BatchNorm over every
process's batch for distributed training on any device (:func:`global_batchnorm`)."""

from __future__ import annotations

from collections.abc import Callable

import gin
import torch
import torch.distributed as dist
from torch import nn

from components.models.heads import GrowingLinear, MLPProjector


@gin.configurable
class Network(nn.Module):
    """``backbone`` features feed a linear classifier over the known classes and a projector
    (the space for contrastive learning and clustering).

    ``projector`` is a factory taking the feature width, so its sizes can be bound in gin;
    ``classifier`` one taking (width, classes): :class:`GrowingLinear`, :class:`CosineLinear`
    or :class:`CausalNormClassifier`; ``confidence`` an optional second head of the same shape
    (:class:`EvidentialHead`) that scores how sure the model is.
    ``forward`` returns logits; :meth:`encode` returns features, projections and logits, and the
    confidence head's output as ``evidence`` when there is one. ``taps`` (stages of a backbone
    with ``forward_taps``, e.g. :class:`SmallConvNet`'s conv blocks) adds each tapped stage's
    channel means as ``tap<i>``: the earlier layers a feature-ensemble score reads
    (:class:`~components.scores.Mahalanobis` with ``keys``).
    """

    def __init__(
        self,
        backbone: nn.Module = gin.REQUIRED,
        num_classes: int = gin.REQUIRED,
        projector: Callable[[int], nn.Module] = MLPProjector,
        classifier: Callable[[int, int], GrowingLinear] = GrowingLinear,
        confidence: Callable[[int, int], GrowingLinear] | None = None,
        taps: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if taps and not hasattr(backbone, "forward_taps"):
            raise ValueError(f"Network.taps reads earlier stages of the backbone, and "
                             f"{type(backbone).__name__} does not expose them (forward_taps): use "
                             "SmallConvNet, or Network.taps = ()")
        self.taps = tuple(taps)
        self.backbone = backbone
        self.projector = projector(backbone.out_dim)
        self.classifier = classifier(backbone.out_dim, num_classes)
        self.confidence = confidence(backbone.out_dim, num_classes) if confidence else None

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.taps:
            features, tapped = self.backbone.forward_taps(x, self.taps)
        else:
            features, tapped = self.backbone(x), {}
        out = {
            **{f"tap{i}": value for i, value in tapped.items()},
            "features": features,
            "projected": self.projector(features),
            "logits": self.classifier(features),
        }
        if self.confidence is not None:
            out["evidence"] = self.confidence(features)
        return out

    def grow(self, k: int, rows: torch.Tensor | None = None) -> Network:
        """Grow the classifier by ``k`` classes (``rows`` initialize them, see
        :meth:`GrowingLinear.grow`) and the confidence head with it (default init)."""
        self.classifier.grow(k, rows)
        if self.confidence is not None:
            self.confidence.grow(k)
        return self

    def keep_outputs(self, index: list[int]) -> Network:
        """Keep only the classes ``index`` (in that order) in the classifier and the confidence
        head: output ``index[j]`` becomes output ``j``."""
        self.classifier.keep(index)
        if self.confidence is not None:
            self.confidence.keep(index)
        return self


_SIDE_GROUP: dict[int, object] = {}


def side_group():
    """A process group of its own (the same processes) for the collectives that layers and
    losses run inside a training step (statistics, gathered embeddings, and their gradients):
    DDP reduces gradients asynchronously on the default group during the backward pass."""
    key = id(dist.group.WORLD)  # a new default group (a new run in this process) gets a new one
    if key not in _SIDE_GROUP:
        _SIDE_GROUP.clear()
        _SIDE_GROUP[key] = dist.new_group()
    return _SIDE_GROUP[key]


class _AllReduce(torch.autograd.Function):
    """Sum over the processes; the gradient of every process's copy of the sum is summed back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=side_group())
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=side_group())
        return grad


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduce.apply(x)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of every process's batch together
    (Ioffe & Szegedy 2015, over the global batch, as ``torch.nn.SyncBatchNorm`` does on CUDA),
    by two differentiable all-reduces over ``torch.distributed``, so it also runs on CPU with
    gloo. Same parameters, buffers and state-dict keys as the BatchNorm it replaces; in eval
    mode, or outside a distributed run, it is plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = _all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = _all_reduce(x.sum(dims)) / count
        centered = x - mean.view(shape)
        var = _all_reduce((centered * centered).sum(dims)) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(factor * mean)
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        return y


def global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced, in place, by a :class:`GlobalBatchNorm`
    holding the same parameters and buffers (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    for any device). Returns the module (a new one if ``module`` itself is a BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child))
    return module
