"""Distractors: stream images that belong to no class at all (the "cloud" data of the design).

A deployed model's stream holds more than images of classes: sensor noise, blank or saturated
frames, images of something else entirely. :class:`Distractors` makes such images in the
protocol's image shape; :func:`components.data.splits.make_protocol` mixes them into every stream
segment with target ``-1``. A loop that pools them must not turn them into a class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gin
import numpy as np
import torch
import torch.nn.functional as F

from components.data.sources import ImageSet

KINDS = ("noise", "blank", "saturated", "other")


def _fit_shape(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """uint8 ``[N, C', H', W']`` resized (antialiased) and converted to ``shape = (C, H, W)``:
    colour to grey by the mean, grey to colour by repetition."""
    channels, height, width = shape
    x = images.float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True)
        x = x.expand(-1, channels, -1, -1)
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def photo_patches(n: int, shape: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
    """``n`` random square crops of scikit-learn's two bundled photographs (china.jpg and
    flower.jpg, no download), resized to ``shape``: natural images of no class."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in load_sample_images().images]
    out = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(32, min(photo.shape[1:]) + 1))
        top = int(rng.integers(photo.shape[1] - side + 1))
        left = int(rng.integers(photo.shape[2] - side + 1))
        out.append(_fit_shape(photo[None, :, top:top + side, left:left + side], shape))
    return torch.cat(out) if out else torch.empty(0, *shape, dtype=torch.uint8)


@gin.configurable
class Distractors:
    """Make ``n`` images of no class, the ``kinds`` in turn (as evenly as ``n`` allows):

    * ``"noise"``: every pixel uniform in 0..255;
    * ``"blank"``: a flat dark frame (one grey level in 0..15 per image);
    * ``"saturated"``: a flat bright frame (240..255);
    * ``"other"``: images of another dataset, resized to the stream's shape — the training
      images of ``other`` (a source, e.g. ``@digits`` beside Fashion-MNIST), or, without one,
      crops of scikit-learn's two bundled photographs (:func:`photo_patches`).

    Deterministic in the generator it is given.
    """

    def __init__(self, kinds: Sequence[str] = KINDS,
                 other: Callable[[], tuple[ImageSet, ImageSet]] | None = None) -> None:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"unknown distractor kinds {unknown or list(kinds)}: choose from {list(KINDS)}")
        self.kinds, self.other = tuple(kinds), other
        self._other_images: torch.Tensor | None = None

    def _others(self, n: int, shape: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
        if self.other is None:
            return photo_patches(n, shape, rng)
        if self._other_images is None:
            self._other_images = self.other()[0].images
        pick = rng.choice(len(self._other_images), n, replace=n > len(self._other_images))
        return _fit_shape(self._other_images[torch.from_numpy(np.sort(pick))], shape)

    def __call__(self, n: int, shape: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
        """``n`` distractor images, uint8 ``[n, *shape]``, in the order of ``kinds`` repeated."""
        kinds = [self.kinds[i % len(self.kinds)] for i in range(n)]
        out = torch.empty(n, *shape, dtype=torch.uint8)
        for kind in self.kinds:
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if not rows:
                continue
            m = len(rows)
            if kind == "noise":
                images = torch.from_numpy(rng.integers(0, 256, (m, *shape), dtype=np.uint8))
            elif kind == "blank":
                images = torch.from_numpy(np.broadcast_to(
                    rng.integers(0, 16, (m, 1, 1, 1)), (m, *shape)).astype(np.uint8))
            elif kind == "saturated":
                images = torch.from_numpy(np.broadcast_to(
                    rng.integers(240, 256, (m, 1, 1, 1)), (m, *shape)).astype(np.uint8))
            else:
                images = self._others(m, shape, rng)
            out[rows] = images
        return out
