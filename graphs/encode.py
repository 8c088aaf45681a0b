"""The encode graph: run a model over a dataset once and cache features, logits and labels."""

from __future__ import annotations

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from torch import nn

from components.cache import FeatureCache, data_fingerprint, fingerprint, model_fingerprint
from components.data import ImageSet, image_loader
from components.metrics import gather_rows
from graphs.handlers import RunFailure, progress


def cache_entry(model: nn.Module, images: ImageSet, augment: nn.Module, views: int = 0,
                seed: int = 0) -> tuple[str, dict[str, str]]:
    """The cache key of encoding ``images`` with ``model``, and the fingerprints stored with it
    (``model``, ``data``, ``preprocess``) so a reader can check what the file holds."""
    drawn = f"; {views} augmented views, seed {seed}" if views else ""
    if views and idist.get_world_size() > 1:  # each process draws its share's views
        drawn += f", {idist.get_world_size()} processes"
    taps = getattr(model, "taps", ())  # the same weights encode more arrays with taps
    parts = {
        "model": model_fingerprint(model) + (f"; taps {list(taps)}" if taps else ""),
        "data": data_fingerprint(images.images, images.targets, images.name),
        "preprocess": repr(augment.eval()) + drawn,
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

    In a distributed run each process encodes a contiguous share of the images (with ``views``,
    from its own seed ``seed + rank``) and the shares are gathered in order: every process gets
    the same arrays, and only process 0 writes the cache entry.
    """
    key, parts = cache_entry(model, images, augment, views, seed)
    if idist.get_world_size() > 1:
        return _encode_distributed(model, images, augment, cache, device, batch_size, views, seed, key,
                                   parts), key, parts

    def run() -> dict[str, np.ndarray]:
        arrays = {name: np.concatenate(per_view)
                  for name, per_view in _encoded(model, images, augment, device, batch_size, views,
                                                 seed).items()}
        return _finite(arrays, images.name)

    return cache.get(key, run, dataset=images.name, **parts), key, parts


def _encoded(model: nn.Module, images: ImageSet, augment: nn.Module, device: torch.device,
             batch_size: int, views: int, seed: int) -> dict[str, list[np.ndarray]]:
    """``model.encode`` of ``images``: per output name, one array per view (one with ``views=0``)."""
    model.to(device).eval()
    augment.eval()
    chunks: list[dict[str, list[torch.Tensor]]] = []

    @torch.no_grad()
    def step(engine: Engine, batch) -> None:
        x, y, ids = batch
        out = model.encode(augment(x.to(device)))
        out.update(targets=y, ids=ids)
        for name, value in out.items():
            chunks[-1].setdefault(name, []).append(value.detach().cpu())

    engine = Engine(step)
    with progress(engine, f"encode {images.name}", show=None), torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else []
    ):
        if views:
            torch.manual_seed(seed)
            augment.train()
        for _ in range(max(views, 1)):
            chunks.append({})
            engine.run(image_loader(images, batch_size, shuffle=False))
    augment.eval()
    return {name: [torch.cat(view[name]).numpy() for view in chunks] for name in chunks[0]}


def _finite(arrays: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """``arrays``, refused by name when a float array holds NaN or inf (never cached)."""
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).any(axis=tuple(range(1, array.ndim))).sum())
            raise RunFailure(f"encode {name}: the model's {key!r} are not finite for {bad} of "
                             f"{len(array)} images: the model diverged (a learning rate too high?) or "
                             "the images hold NaN; nothing was cached")
    return arrays


def _encode_distributed(model, images, augment, cache, device, batch_size, views, seed, key,
                        parts) -> dict[str, np.ndarray]:
    """Every process reads the entry, or (when one of them cannot) each encodes its contiguous
    share of the images, the shares are gathered in order, and process 0 writes the entry."""
    world, rank = idist.get_world_size(), idist.get_rank()
    arrays = cache.load(key)
    if idist.all_reduce(int(arrays is not None), op="MIN") == 1:
        cache.hits += 1
        cache.used.add(cache.path(key))
        return arrays
    cache.misses += 1
    share = -(-len(images) // world)  # rows per process; the last may hold fewer (or none)
    start, stop = min(rank * share, len(images)), min((rank + 1) * share, len(images))
    # a process with no share encodes one image for the arrays' shapes, and keeps none
    first, last = (start, stop) if stop > start else (0, 1)
    mine = images.subset(slice(first, last))
    local = _encoded(model, mine, augment, device, batch_size, views, seed + rank)
    if stop == start:
        local = {name: [view[:0] for view in per_view] for name, per_view in local.items()}
    arrays = {}
    for name, per_view in local.items():
        if name == "ids":
            per_view = [ids + start for ids in per_view]
        arrays[name] = np.concatenate([gather_rows(torch.from_numpy(view)).numpy() for view in per_view])
    arrays = _finite(arrays, images.name)
    if rank == 0:
        cache.save(key, arrays, dataset=images.name, **parts)
    return arrays
