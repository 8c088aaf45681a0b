"""Feature extractors: a small convnet for small images, and torchvision backbones.

Every extractor is an ``nn.Module`` mapping images ``[B, C, H, W]`` to features ``[B, D]`` and
exposing ``out_dim = D``.
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import torch
import torchvision
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


@gin.configurable
class SmallConvNet(nn.Module):
    """Three conv-BN-ReLU stages with 2×2 pooling between them and global average pooling.

    Fast on CPU for 8×8 digits and 28×28 Fashion-MNIST; ``out_dim = 4 * width``.
    ``channels_last=True`` runs the convolutions in NHWC memory layout, about 1.5× faster on
    CPU for 28×28 images (same maths, different rounding).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, channels_last: bool = False) -> None:
        super().__init__()
        self.out_dim = 4 * width
        self.channels_last = channels_last
        self.body = nn.Sequential(
            _block(in_channels, width), _block(width, width), nn.MaxPool2d(2),
            _block(width, 2 * width), _block(2 * width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)

    def forward_taps(self, x: torch.Tensor,
                     taps: tuple[int, ...]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The features, and the channel means (global average pooling) of the outputs of the
        stages ``taps`` (indices into ``body``: conv blocks 0, 1, 3, 4, 6; 2 and 5 are the
        pools), earliest first."""
        if bad := [t for t in taps if not 0 <= t < len(self.body) - 2]:
            raise ValueError(f"SmallConvNet taps index its {len(self.body) - 2} stages before the final "
                             f"pooling (conv blocks 0, 1, 3, 4, 6), got {bad}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pooled = {}
        for i, stage in enumerate(self.body):
            x = stage(x)
            if i in taps:
                pooled[i] = x.mean(dim=(2, 3))
        return x, pooled


def _replace_head(model: nn.Module) -> int:
    """Swap the classification head of a torchvision model for Identity; return its width."""
    for attr in ("fc", "head", "classifier"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        linear = head if isinstance(head, nn.Linear) else [m for m in head.modules()
                                                          if isinstance(m, nn.Linear)][-1]
        setattr(model, attr, nn.Identity())
        return linear.in_features
    raise ValueError(f"{type(model).__name__}: no fc/head/classifier attribute to replace")


def _replace_first_conv(model: nn.Module, conv: Callable[[nn.Conv2d], nn.Conv2d]) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], conv(module))
            return


@gin.configurable
class TorchvisionBackbone(nn.Module):
    """A torchvision classification model used as a feature extractor (head removed).

    ``arch`` is a torchvision model builder (``torchvision.models.resnet18``,
    ``efficientnet_b0``, ``swin_t`` …). ``cifar_stem=True`` gives ResNets the CIFAR stem of
    He et al. (2016, §4.2): a 3×3 stride-1 first convolution and no max-pool.
    ``in_channels`` adapts the first convolution to grayscale input.
    """

    def __init__(
        self,
        arch: Callable[..., nn.Module] = torchvision.models.resnet18,
        weights: str | None = None,
        cifar_stem: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        model = arch(weights=weights)
        if cifar_stem:
            if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
                raise ValueError(f"cifar_stem applies to ResNets, not {type(model).__name__}")
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        if in_channels != 3:
            _replace_first_conv(model, lambda c: nn.Conv2d(
                in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=c.bias is not None
            ))
        self.out_dim = _replace_head(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
