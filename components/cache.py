"""HDF5 feature cache: encode a dataset once, read features, logits and labels back in seconds.

One file per fingerprint of (model weights, dataset, split, preprocessing). A file is written
under a temporary name and renamed into place only when complete, so a crash never leaves a
file that reads as complete; a changed model, dataset or preprocessing changes the fingerprint
and so never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import gin
import h5py
import numpy as np
import torch
from torch import nn

FORMAT_VERSION = "1"


def _hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every parameter and buffer of ``model``, with their names and shapes."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def data_fingerprint(images: torch.Tensor, targets: torch.Tensor, name: str) -> str:
    """SHA-1 of the images, labels and split name."""
    h = hashlib.sha1(name.encode())
    _hash_tensor(h, images)
    _hash_tensor(h, targets)
    return h.hexdigest()


def fingerprint(**parts: str) -> str:
    h = hashlib.sha1(FORMAT_VERSION.encode())
    for key in sorted(parts):
        h.update(f"{key}={parts[key]};".encode())
    return h.hexdigest()[:20]


@gin.configurable
class FeatureCache:
    """A folder of ``<fingerprint>.h5`` files, each holding named arrays of equal length.

    ``get(key, encode)`` returns the cached arrays for ``key`` or calls ``encode()`` (which
    returns a dict of arrays) and stores its result atomically.
    """

    def __init__(self, root: str = "cache") -> None:
        self.root = Path(root)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.h5"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("fingerprint") != key or not f.attrs.get("complete", False):
                    return None
                return {name: f[name][()] for name in f.keys()}
        except OSError:  # truncated or foreign file: treat as absent, it will be rewritten
            return None

    def save(self, key: str, arrays: dict[str, np.ndarray], **attrs: str) -> Path:
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"cached arrays must have equal length, got {lengths}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with h5py.File(tmp, "w") as f:
                for name, array in arrays.items():
                    f.create_dataset(name, data=np.asarray(array))
                for name, value in attrs.items():
                    f.attrs[name] = value
                f.attrs["fingerprint"] = key
                f.attrs["complete"] = True
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def get(self, key: str, encode: Callable[[], dict[str, np.ndarray]], **attrs: str):
        """The arrays stored under ``key``, or ``encode()``'s, stored with ``attrs`` (strings
        such as the model and data fingerprints, checked later by :func:`read_checked`)."""
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        arrays = {k: np.asarray(v) for k, v in encode().items()}
        self.save(key, arrays, **attrs)
        return arrays


class CacheMismatch(ValueError):
    """A cache file was written for another model, split or preprocessing than expected."""


WHAT = {"model": "model weights", "data": "data split", "preprocess": "preprocessing"}


def read_checked(path: str | Path, **expected: str) -> dict[str, np.ndarray]:
    """Read a complete cache file, refusing it when one of its stored fingerprints
    (``model``, ``data``, ``preprocess`` …) differs from ``expected``; the message says which."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no feature cache at {path}: run the encode step (or the graph "
                                "that writes it) first")
    with h5py.File(path, "r") as f:
        if not f.attrs.get("complete", False):
            raise CacheMismatch(f"{path} is incomplete (a crashed write?): delete it and re-encode")
        for key, want in expected.items():
            got = f.attrs.get(key)
            if got != want:
                raise CacheMismatch(
                    f"{path} was written for other {WHAT.get(key, key)}: its {key} fingerprint is "
                    f"{str(got)[:12]}…, expected {want[:12]}… Re-encode with this model and split "
                    "instead of reusing this file."
                )
        return {name: f[name][()] for name in f.keys()}
