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

    norm_free = False  # True where the logits ignore the rows' norms (align() refuses then)

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        layer = nn.Linear(in_features, out_features, bias=bias)
        self.weight = layer.weight
        self.bias = layer.bias  # None without bias

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
        self.weight = nn.Parameter(torch.cat([self.weight, new_w]))
        if self.bias is not None:
            new_b = torch.full((k,), float(self.bias.mean()), device=self.bias.device,
                               dtype=self.bias.dtype)
            self.bias = nn.Parameter(torch.cat([self.bias, new_b]))
        return self

    @torch.no_grad()
    def align(self, n_old: int) -> float:
        """Weight aligning (Zhao et al., *Maintaining Discrimination and Fairness in Class
        Incremental Learning*, CVPR 2020), in place: scale the rows ``n_old`` and up by
        ``γ = mean ||w_old|| / mean ||w_new||``, so that new classes, learned from more samples
        and more recently, no longer win by the norm of their weights. Only the weights are
        scaled (the bias stays), and only when the new rows are the larger (``γ < 1``, as
        PyCIL's WA does); returns the ``γ`` applied (1.0 when nothing changed). The paper also
        clips the classifier's weights to non-negative values during training; that is not
        done here."""
        if self.norm_free:
            raise ValueError(f"{type(self).__name__} divides each row by its norm, so weight aligning "
                             "changes nothing: unset distill.align_weights, or use GrowingLinear")
        if not 0 < n_old < self.out_features:
            raise ValueError(f"align needs 0 < n_old < {self.out_features} (the old rows, then at least "
                             f"one new one), got {n_old}")
        norms = self.weight.norm(dim=1)
        gamma = float(norms[:n_old].mean() / norms[n_old:].mean().clamp_min(1e-12))
        if gamma >= 1.0:
            return 1.0
        self.weight[n_old:] *= gamma
        return gamma

    @torch.no_grad()
    def keep(self, index: list[int]) -> GrowingLinear:
        """Keep only the output rows ``index`` (in that order), in place; the others are gone.
        Parameters are replaced, as by :meth:`grow`."""
        index = list(index)
        if not index or len(set(index)) != len(index) or not all(0 <= i < self.out_features for i in index):
            raise ValueError(f"keep needs distinct output ids in [0, {self.out_features}), got {index}")
        rows = torch.tensor(index, device=self.weight.device)
        self.weight = nn.Parameter(self.weight[rows].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias[rows].clone())
        return self

    @torch.no_grad()
    def lower(self, start: int, delta) -> GrowingLinear:
        """Lower the logits of outputs ``start`` and up by ``delta`` (one number, or one per
        output), in place, through the bias (:func:`components.recalibration.discovered_offset`
        says by how much)."""
        if self.bias is None:
            raise ValueError(f"{type(self).__name__} has no bias to lower its outputs {start}.. by: "
                             "use a classifier with a bias (GrowingLinear) or turn off what shifts "
                             "its logits (lifecycle.claim_rate = None, lifecycle.logit_adjustment = False)")
        if not 0 <= start <= self.out_features:
            raise ValueError(f"start must be in [0, {self.out_features}], got {start}")
        self.bias[start:] -= torch.as_tensor(delta, dtype=self.bias.dtype, device=self.bias.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


@gin.configurable
class EvidentialHead(GrowingLinear):
    """A confidence head beside the classifier: a linear map from features to ``K`` evidence
    logits, ``α = relu(z) + 1`` (Sensoy et al., NeurIPS 2018). Trained with
    :class:`components.losses.EvidentialLoss` (``train.confidence_loss``) while the classifier
    keeps its cross-entropy; scored by :class:`components.scores.EvidentialUncertainty`."""


@gin.configurable
class CosineLinear(GrowingLinear):
    """Cosine classifier: ``cos(x, w_c)`` per class, no bias (the normalized linear layer LDAM
    uses, Cao et al. 2019; the loss supplies the scale)."""

    norm_free = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).T


@gin.configurable
class CausalNormClassifier(GrowingLinear):
    """The de-confounded classifier of causal TDE (Tang et al., NeurIPS 2020).

    Features and weights are split into ``num_heads`` parts; per head,
    ``logit_c = (τ / K) · (x / ||x||) · w_c / (||w_c|| + γ)``, summed over heads. In training
    mode it keeps the moving average of the features it sees (``direction``, momentum ``μ``:
    ``d ← μ d + mean(x)``). In eval mode with ``alpha > 0`` it returns the total direct
    effect: the counterfactual part along the head direction is removed,
    ``x̂ − α · cos(x̂, d̂) · d̂`` with ``x̂, d̂`` unit vectors, before the product with ``w``.
    """

    norm_free = True

    def __init__(self, in_features: int, out_features: int, num_heads: int = 2, tau: float = 16.0,
                 gamma: float = 1 / 32, momentum: float = 0.9, alpha: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias=False)
        if in_features % num_heads:
            raise ValueError(f"in_features {in_features} is not divisible by num_heads {num_heads}")
        self.num_heads, self.tau, self.gamma = num_heads, tau, gamma
        self.momentum, self.alpha = momentum, alpha
        self.register_buffer("direction", torch.zeros(in_features))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.num_heads, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.direction.mul_(self.momentum).add_(x.detach().mean(0))
        w = self._heads(self.weight)
        w = w / (w.norm(dim=-1, keepdim=True) + self.gamma)  # [C, K, d]
        nx = nn.functional.normalize(self._heads(x), dim=-1)  # [B, K, d]
        if not self.training and self.alpha:
            nd = nn.functional.normalize(self._heads(self.direction), dim=-1)  # [K, d]
            cos = (nx * nd).sum(-1, keepdim=True)  # [B, K, 1]
            nx = nx - self.alpha * cos * nd
        return (self.tau / self.num_heads) * torch.einsum("bkd,ckd->bc", nx, w)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_heads={self.num_heads}, tau={self.tau}, "
                f"gamma={self.gamma}, alpha={self.alpha}")
