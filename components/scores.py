"""Confidence scores: one number per sample from model outputs, higher = more likely new.

Every score takes logits ``[N, C]`` and returns ``[N]``; bind one with gin as a function
reference (``online.score = @energy``) or pass it directly.
"""

from __future__ import annotations

import gin
import torch


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
