"""Projector and classifier heads."""

from __future__ import annotations

import math

import gin
import torch
from torch import nn


@gin.configurable
class MLPProjector(nn.Module):
    """Linear → BN → ReLU → Linear projector (SimCLR, Chen et al. 2020) mapping features to
    the space where contrastive losses and k-means work."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 64) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@gin.configurable
class GrowingLinear(nn.Module):
    """A linear classifier that can grow by ``k`` classes, keeping the rows it already has."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        layer = nn.Linear(in_features, out_features)
        self.weight, self.bias = layer.weight, layer.bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def grow(self, k: int, rows: torch.Tensor | None = None) -> GrowingLinear:
        """Append ``k`` output rows, in place. ``rows`` ``[k, in_features]`` initializes them
        (e.g. from cluster means, scaled to the old rows' mean norm); else the default init.
        Parameters are replaced: build the optimizer after growing."""
        if k < 1:
            raise ValueError(f"grow needs k >= 1, got {k}")
        new_w = torch.empty(k, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        if rows is None:
            nn.init.kaiming_uniform_(new_w, a=math.sqrt(5))
        else:
            if rows.shape != new_w.shape:
                raise ValueError(f"rows must have shape {tuple(new_w.shape)}, got {tuple(rows.shape)}")
            scale = self.weight.norm(dim=1).mean() / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            new_w.copy_(rows * scale)
        new_b = torch.full((k,), float(self.bias.mean()), device=self.bias.device, dtype=self.bias.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight, new_w]))
        self.bias = nn.Parameter(torch.cat([self.bias, new_b]))
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
