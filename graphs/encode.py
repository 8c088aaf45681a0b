"""The encode graph: run a model over a dataset once and cache features, logits and labels."""

from __future__ import annotations

import numpy as np
import torch
from ignite.engine import Engine
from torch import nn

from components.cache import FeatureCache, data_fingerprint, fingerprint, model_fingerprint
from components.data import ImageSet, image_loader
from graphs.handlers import RunFailure, progress


def cache_entry(model: nn.Module, images: ImageSet, augment: nn.Module, views: int = 0,
                seed: int = 0) -> tuple[str, dict[str, str]]:
    """The cache key of encoding ``images`` with ``model``, and the fingerprints stored with it
    (``model``, ``data``, ``preprocess``) so a reader can check what the file holds."""
    parts = {
        "model": model_fingerprint(model),
        "data": data_fingerprint(images.images, images.targets, images.name),
        "preprocess": repr(augment.eval()) + (f"; {views} augmented views, seed {seed}" if views else ""),
    }
    return fingerprint(**parts), parts


def encode(
    model: nn.Module,
    images: ImageSet,
    augment: nn.Module,
    cache: FeatureCache,
    device: torch.device,
    batch_size: int = 512,
    views: int = 0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Encode (or read from ``cache``) ``images``; see :func:`encode_entry`."""
    return encode_entry(model, images, augment, cache, device, batch_size, views, seed)[0]


def encode_entry(
    model: nn.Module,
    images: ImageSet,
    augment: nn.Module,
    cache: FeatureCache,
    device: torch.device,
    batch_size: int = 512,
    views: int = 0,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
    """``features``, ``projected``, ``logits``, ``targets`` and ``ids`` (row in ``images``) of
    every image, from the cache when this model, data and preprocessing were encoded before.

    ``views=0`` encodes each image once with eval-mode preprocessing. ``views=V`` encodes ``V``
    randomly augmented copies of each image (the augmentation in training mode, the model in
    eval mode, drawn from ``seed``); rows are stacked view by view, ``ids`` says which image.

    Returns the arrays, the cache key and the fingerprints stored with them (:func:`cache_entry`).
    """
    key, parts = cache_entry(model, images, augment, views, seed)

    def run() -> dict[str, np.ndarray]:
        model.to(device).eval()
        augment.eval()
        chunks: dict[str, list[torch.Tensor]] = {}

        @torch.no_grad()
        def step(engine: Engine, batch) -> None:
            x, y, ids = batch
            out = model.encode(augment(x.to(device)))
            out.update(targets=y, ids=ids)
            for name, value in out.items():
                chunks.setdefault(name, []).append(value.detach().cpu())

        engine = Engine(step)
        with progress(engine, f"encode {images.name}", show=None), torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []
        ):
            if views:
                torch.manual_seed(seed)
                augment.train()
            for _ in range(max(views, 1)):
                engine.run(image_loader(images, batch_size, shuffle=False))
        augment.eval()
        arrays = {name: torch.cat(parts).numpy() for name, parts in chunks.items()}
        for name, array in arrays.items():  # refused here, by name, never cached
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int((~np.isfinite(array)).any(axis=tuple(range(1, array.ndim))).sum())
                raise RunFailure(f"encode {images.name}: the model's {name!r} are not finite for {bad} of "
                                 f"{len(array)} images: the model diverged (a learning rate too high?) or "
                                 "the images hold NaN; nothing was cached")
        return arrays

    return cache.get(key, run, dataset=images.name, **parts), key, parts
