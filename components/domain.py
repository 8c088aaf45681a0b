"""Whether images belong to the known classes' domain, judged without the model's features.

A stream carries images of no class: sensor noise, flat dark or bright frames. In a model's
features such a group can lie as close to the known classes as a new class does (a network
maps what it was never trained on somewhere, often near the middle), so a distance cannot tell
it from a class (docs/loop.md, "the domain bound"). Its pixels can: **input complexity**, an
image's length under a lossless compressor (Serrà et al., *Input complexity and
out-of-distribution detection with likelihood-based generative models*, ICLR 2020), is about
the image alone. A flat frame compresses to almost nothing, uniform noise not at all, and the
images of one dataset, whatever their class, lie in a band between.

:class:`InputComplexity` learns that band from held-out known-class images (the central
``coverage`` of their PNG lengths) and flags an image outside it. One image outside proves
little (2 % of known-class images are, by construction, and a small or sparse object, such as
a sandal, compresses well). The continual loop (``continual.domain``) can reject a *cluster*
most of whose members are outside (``ClusterAcceptance.max_off_domain``) or keep such images out
of the pool (``continual.pool_off_domain = False``); both were measured and lost, so both are off
(docs/loop.md, "A domain test on the pixels").
"""

from __future__ import annotations

import io

import gin
import numpy as np
import torch
from PIL import Image

from components.data.sources import ImageRows


def input_complexity(images: torch.Tensor | ImageRows, batch: int = 4096) -> np.ndarray:
    """Each uint8 image's ``[C, H, W]`` length in bytes as a PNG (Pillow, compression level 9):
    Serrà et al.'s complexity L(x) with PNG as the compressor. Grey images are encoded as one
    channel, three-channel ones as RGB."""
    lengths = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        if chunk.dtype != torch.uint8 or chunk.dim() != 4 or chunk.shape[1] not in (1, 3):
            raise ValueError(f"input complexity needs uint8 images [N, 1 or 3, H, W], got {chunk.dtype} "
                             f"{tuple(chunk.shape)}")
        pixels = chunk.permute(0, 2, 3, 1).numpy()
        for i, image in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                buffer, format="PNG", compress_level=9)
            lengths[start + i] = buffer.tell()
    return lengths


@gin.configurable
class InputComplexity:
    """The known domain as a band of input complexity: :meth:`fit` on held-out known-class
    images keeps the central ``coverage`` of their complexities; :meth:`outside` flags images
    below or above it."""

    def __init__(self, coverage: float = 0.98) -> None:
        if not 0 < coverage < 1:
            raise ValueError(f"InputComplexity.coverage must be in (0, 1), got {coverage}")
        self.coverage = coverage
        self.band: tuple[float, float] | None = None

    def fit(self, images: torch.Tensor | ImageRows) -> InputComplexity:
        if len(images) < 2:
            raise ValueError(f"the domain band needs held-out known-class images, got {len(images)}: "
                             "set make_protocol.val_per_class")
        tail = (1 - self.coverage) / 2
        low, high = np.quantile(input_complexity(images), [tail, 1 - tail])
        self.band = (float(low), float(high))
        return self

    def outside(self, images: torch.Tensor | ImageRows) -> np.ndarray:
        """A boolean per image: its complexity lies outside the fitted band."""
        if self.band is None:
            raise RuntimeError("InputComplexity.outside before fit: fit it on held-out known-class images")
        lengths = input_complexity(images)
        return (lengths < self.band[0]) | (lengths > self.band[1])

    def __repr__(self) -> str:
        return f"InputComplexity(coverage={self.coverage}, band={self.band})"


__all__ = ["InputComplexity", "input_complexity"]
