"""HDF5 feature cache: encode a dataset once, read features, logits and labels back in seconds.

One file per fingerprint of (model weights, dataset, split, preprocessing). What it promises:

* **No half-written entry.** A file is written under a temporary name unique to the process and
  renamed into place only when complete, so a crash never leaves a file that reads as complete,
  and processes sharing one folder never see each other's partial writes: readers only open
  ``<key>.h5``, and a rename replaces it in one step (a reader that opened the old file keeps
  reading the old file). A changed model, dataset or preprocessing changes the fingerprint and
  so never reuses a stale file.
* **Damaged bytes are detected.** Every dataset carries HDF5's Fletcher-32 checksum and the
  file's metadata (shapes, chunk indexes) carries HDF5's own checksums (file format of HDF5
  1.10). A file that fails them, is truncated, or holds arrays of unequal length is deleted
  with one warning and re-encoded by :meth:`FeatureCache.get`, and refused with one message
  by :func:`read_checked`. Attribute strings (the fingerprints) live in HDF5's global heap,
  which has no checksum: a damaged one only makes the file look foreign, so it is re-encoded
  or refused, never misread.
* **An optional size cap** (``max_bytes``) evicts the least recently used entries.

``python -m components.cachetool {list,prune,verify} [--root DIR]`` lists the entries, prunes them
by size or age, and checks every checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import gin
import h5py
import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.data.sources import ImageRows

# 2: every dataset Fletcher-32 checksummed, file format of HDF5 1.10. The fingerprint includes
# it, so files of version 1 are never looked up again: they are re-encoded under a new name
# and age out through the size cap or `prune`.
FORMAT_VERSION = "2"
# the oldest file format whose metadata (object headers, chunk indexes) is checksummed; also
# the newest, so an older HDF5 sharing the folder can still read every file
LIBVER = ("v110", "v110")
# what h5py raises on damaged bytes: OSError for a failed data checksum or a truncated file,
# KeyError for a failed metadata checksum, RuntimeError or ValueError for garbled metadata
DAMAGED = (OSError, RuntimeError, KeyError, ValueError)
# a temporary file not written to for this long belongs to a process that died mid-write
STALE_TEMPORARY_S = 3600

log = logging.getLogger("components")


def _hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    import torch  # here, not at the top: reading and writing entries does not need torch

    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    data = t.view(torch.uint8).numpy()
    for lo in range(0, data.size, 1 << 26):  # in 64 MB slices, no copy: a memory-mapped image
        h.update(data[lo:lo + (1 << 26)])    # store is read, never loaded into one bytes object


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every parameter and buffer of ``model``, with their names and shapes."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def data_fingerprint(images: torch.Tensor | ImageRows, targets: torch.Tensor, name: str) -> str:
    """SHA-1 of the images, labels and split name. The images are read in slices of rows of
    about 64 MB, never whole: the digest is the same for a tensor and for ``ImageRows`` of a
    store holding the same pixels."""
    import torch

    h = hashlib.sha1(name.encode())
    h.update(f"{images.dtype}{(images.shape.numel(),)}".encode())  # as _hash_tensor's flat header
    step = max(1, (1 << 26) // max(1, images.shape[1:].numel() * images.dtype.itemsize))
    for lo in range(0, len(images), step):
        rows = images[lo:lo + step].cpu().contiguous().reshape(-1)
        h.update(rows.view(torch.uint8).numpy())
    _hash_tensor(h, targets)
    return h.hexdigest()


def fingerprint(**parts: str) -> str:
    h = hashlib.sha1(FORMAT_VERSION.encode())
    for key in sorted(parts):
        h.update(f"{key}={parts[key]};".encode())
    return h.hexdigest()[:20]


class CacheMismatch(ValueError):
    """A cache file was written for another model, split or preprocessing than expected."""


class CacheCorrupt(CacheMismatch):
    """A cache file's bytes are damaged (or it predates checksums). A :class:`CacheMismatch`, so
    a caller that refuses an unusable file refuses this one too."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = path, why
        super().__init__(f"{path} is corrupt ({why}): delete it and re-encode")


def _same_file(path: Path, seen: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``seen`` describes: not removed or replaced since."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino)


@contextmanager
def _reading(path: Path) -> Iterator[h5py.File]:
    """``path`` open for reading; whatever h5py raises on damaged bytes becomes :class:`CacheCorrupt`.

    A file that another process removed or replaced while HDF5 was opening it (HDF5 then fails
    with "can't retrieve stat info for file", seen with eviction under load) raises
    ``FileNotFoundError`` instead: it is gone, not corrupt. HDF5's file locks are off: an entry
    is never modified after its rename, so they protect nothing here, and they fail on file
    systems without lock support (some NFS mounts).
    """
    seen = path.stat()
    try:
        f = h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise
    except DAMAGED as error:
        raise _gone_or(CacheCorrupt(path, "not a readable HDF5 file; truncated?"), path, seen) from error
    try:
        with f:
            yield f
    except CacheMismatch:
        raise
    except DAMAGED as error:
        raise _gone_or(CacheCorrupt(path, "checksum failed"), path, seen) from error


def _gone_or(error: CacheCorrupt, path: Path, seen: os.stat_result) -> OSError | CacheCorrupt:
    if _same_file(path, seen):
        return error
    return FileNotFoundError(f"{path} was removed or replaced while being read")


def _read_arrays(f: h5py.File, path: Path) -> dict[str, np.ndarray]:
    """Every dataset of ``f``, each chunk checked against its checksum as it is read."""
    unchecked = sorted(n for n, d in f.items() if not (isinstance(d, h5py.Dataset) and d.fletcher32))
    if unchecked:
        raise CacheCorrupt(path, f"no checksum on {', '.join(unchecked)}: written by an older version")
    arrays = {name: d[()] for name, d in f.items()}
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise CacheCorrupt(path, f"arrays of unequal length {lengths}")
    return arrays


def entries(root: Path) -> list[tuple[Path, os.stat_result]]:
    """The ``*.h5`` files of ``root`` with their ``stat``, least recently used first (see
    :meth:`FeatureCache.load` for why the use stamp is the mtime). Files removed by another
    process while listing are left out."""
    found = []
    for path in root.glob("*.h5"):
        try:
            found.append((path, path.stat()))
        except FileNotFoundError:
            pass
    return sorted(found, key=lambda e: e[1].st_mtime)


def temporaries(root: Path) -> list[Path]:
    """Files :meth:`FeatureCache.save` is writing, or that a process which died mid-write left."""
    return sorted(root.glob(".*.tmp"))


def evict(root: Path, max_bytes: int, keep: Path | set[Path] | None = None) -> list[tuple[Path, int]]:
    """Delete the least recently used entries of ``root`` until its entries total at most
    ``max_bytes``, never those in ``keep``; returns the deleted paths and sizes.

    Another process may be reading a deleted file: on POSIX it keeps its open file, and a
    later ``load`` finds the entry gone and re-encodes. Two processes evicting at once may
    delete a little more than needed, never a file that is still being written (temporaries
    are not entries).
    """
    kept = {keep} if isinstance(keep, Path) else set(keep or ())
    listed = entries(root)
    total = sum(s.st_size for _, s in listed)
    removed = []
    for path, stat in listed:
        if total <= max_bytes:
            break
        if path in kept:
            continue
        path.unlink(missing_ok=True)
        total -= stat.st_size
        removed.append((path, stat.st_size))
    return removed


@gin.configurable
class FeatureCache:
    """A folder of ``<fingerprint>.h5`` files, each holding named arrays of equal length.

    ``get(key, encode)`` returns the cached arrays for ``key`` or calls ``encode()`` (which
    returns a dict of arrays) and stores its result atomically. ``max_bytes`` (an int, or a
    size such as ``'20G'``; K, M, G, T are powers of 1024) caps the folder: after each save the
    least recently used entries are deleted until the ``*.h5`` files fit, never the one just
    written. ``None``: no cap.
    """

    def __init__(self, root: str = "cache", max_bytes: int | str | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = parse_size(max_bytes) if isinstance(max_bytes, str) else max_bytes
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"FeatureCache.max_bytes must be at least 0, got {max_bytes}")
        self.hits = self.misses = 0
        self.used: set[Path] = set()  # entries this process wrote or read: never evicted by it

    def path(self, key: str) -> Path:
        return self.root / f"{key}.h5"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or ``None`` when there is no usable entry.

        An incomplete or foreign file is ignored (``save`` replaces it). A corrupt one (failed
        checksum, truncated, arrays of unequal length, no checksums) gets one warning and is
        deleted rather than moved aside: its contents are re-derivable, and a kept copy would
        count against the size cap and be found again by ``verify``. It is deleted only if it
        is still the file that was read, not one another process has just renamed into place.

        A hit stamps the file's mtime: that is the use stamp the size cap evicts by, because
        atime is not updated on ``noatime`` mounts and at most daily on ``relatime`` ones.
        """
        path = self.path(key)
        try:
            seen = path.stat()
            with _reading(path) as f:
                if f.attrs.get("fingerprint") != key or not f.attrs.get("complete", False):
                    return None
                arrays = _read_arrays(f, path)
        except FileNotFoundError:
            return None
        except CacheCorrupt as error:
            log.warning("feature cache %s is corrupt (%s): deleting it, it will be re-encoded",
                        path, error.why)
            if _same_file(path, seen):
                path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)
        except OSError:  # evicted or replaced meanwhile: only this use stamp is lost
            pass
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray], **attrs: str) -> Path:
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"cached arrays must have equal length, got {lengths}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        # pid and a random part: unique across processes, also on hosts sharing a network folder
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with h5py.File(tmp, "w", libver=LIBVER, locking=False) as f:
                for name, array in arrays.items():
                    f.create_dataset(name, data=np.asarray(array), fletcher32=True)
                for name, value in attrs.items():
                    f.attrs[name] = value
                f.attrs["fingerprint"] = key
                f.attrs["complete"] = True
            os.replace(tmp, path)
        except OSError as error:  # h5py's message does not say which file (a full disk, a size limit)
            raise OSError(error.errno, f"could not write the cache entry ({error})", str(path)) from error
        finally:
            tmp.unlink(missing_ok=True)
        if self.max_bytes is not None:
            # never what this process wrote or read: a graph may read an entry back by path
            self.used.add(path)
            removed = evict(self.root, self.max_bytes, keep=self.used)
            if removed:
                log.info("feature cache over %s: removed %d least recently used entries (%s)",
                         format_size(self.max_bytes), len(removed), format_size(sum(s for _, s in removed)))
        return path

    def get(self, key: str, encode: Callable[[], dict[str, np.ndarray]], **attrs: str):
        """The arrays stored under ``key``, or ``encode()``'s, stored with ``attrs`` (strings
        such as the model and data fingerprints, checked later by :func:`read_checked`)."""
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            self.used.add(self.path(key))
            return cached
        self.misses += 1
        arrays = {k: np.asarray(v) for k, v in encode().items()}
        self.save(key, arrays, **attrs)
        return arrays


WHAT = {"model": "model weights", "data": "data split", "preprocess": "preprocessing"}


def read_checked(path: str | Path, **expected: str) -> dict[str, np.ndarray]:
    """Read a complete cache file, refusing it when one of its stored fingerprints
    (``model``, ``data``, ``preprocess`` …) differs from ``expected``; the message says which.
    A damaged file raises :class:`CacheCorrupt`, which says to delete it and re-encode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no feature cache at {path}: run the encode step (or the graph "
                                "that writes it) first")
    with _reading(path) as f:
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
        return _read_arrays(f, path)


# --------------------------------------------------------------------------------------------
# python -m components.cache
# --------------------------------------------------------------------------------------------

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``1000``, ``500M``, ``1.5G``, ``2GiB`` (K, M, G, T: powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1000000, 500M, 2G)")
    return int(float(match[1]) * UNITS[match[2].upper()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _state(path: Path) -> tuple[str, dict]:
    """What ``list`` shows of an entry without reading its data: a state and its attributes."""
    try:
        with _reading(path) as f:
            attrs = dict(f.attrs)
            rows = {len(d) for d in f.values() if isinstance(d, h5py.Dataset) and d.ndim}
            checked = all(isinstance(d, h5py.Dataset) and d.fletcher32 for d in f.values())
    except FileNotFoundError:
        return "removed", {}
    except CacheCorrupt:
        return "unreadable", {}
    attrs["rows"] = rows.pop() if len(rows) == 1 else None
    if attrs.get("fingerprint") != path.stem:
        return "foreign", attrs
    if not attrs.get("complete", False):
        return "incomplete", attrs
    return ("complete" if checked else "no checksum"), attrs


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _console():
    from rich.console import Console

    # piped or captured output is not cut to 80 columns
    return Console(width=None if sys.stdout.isatty() else 160)


def _list(root: Path) -> int:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("key", "dataset", "rows", "size", "last used", "model", "data", "state"):
        table.add_column(column, justify="right" if column in ("rows", "size") else "left", no_wrap=True)
    listed = entries(root)
    for path, stat in reversed(listed):  # most recently used first
        state, attrs = _state(path)
        table.add_row(path.stem, str(attrs.get("dataset", "")), str(attrs.get("rows") or ""),
                      format_size(stat.st_size), _when(stat.st_mtime), str(attrs.get("model", ""))[:8],
                      str(attrs.get("data", ""))[:8], state)
    console = _console()
    console.print(table)
    leftover = temporaries(root)
    extra = f"; {len(leftover)} temporary file(s) being written or left by a crash" if leftover else ""
    console.print(f"total: {_entries(len(listed))}, {format_size(sum(s.st_size for _, s in listed))}{extra}")
    return 0


def _prune(root: Path, max_size: int | None, older_than: float | None) -> int:
    removed = []
    if older_than is not None:
        cutoff = time.time() - older_than * 86400
        for path, stat in entries(root):
            if stat.st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed.append((path, stat.st_size))
    if max_size is not None:
        removed += evict(root, max_size)
    stale = time.time() - STALE_TEMPORARY_S
    for tmp in temporaries(root):
        try:
            stat = tmp.stat()
            if stat.st_mtime < stale:
                tmp.unlink()
                removed.append((tmp, stat.st_size))
        except FileNotFoundError:
            pass
    console = _console()
    for path, size in removed:
        console.print(f"removed {path.name} ({format_size(size)})")
    kept = entries(root)
    console.print(f"removed {len(removed)} file(s), {format_size(sum(s for _, s in removed))}; kept "
                  f"{_entries(len(kept))}, {format_size(sum(s.st_size for _, s in kept))}")
    return 0


def _verify(root: Path) -> int:
    console, bad = _console(), 0
    listed = entries(root)
    for path, _ in listed:
        try:
            with _reading(path) as f:
                if f.attrs.get("fingerprint") != path.stem or not f.attrs.get("complete", False):
                    raise CacheMismatch(f"{path} is incomplete or foreign: delete it and re-encode")
                _read_arrays(f, path)
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        except CacheMismatch as error:
            bad += 1
            console.print(str(error), markup=False, highlight=False)
    console.print(f"verified {_entries(len(listed))}: {bad} unusable")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.cachetool",
                                     description="List, prune and verify a feature cache folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per entry, most recently used first (metadata only: "
                        "`verify` reads the data)")
    prune = commands.add_parser("prune", help="delete entries by size (least recently used first) or age")
    prune.add_argument("--max-size", type=_size_arg, metavar="SIZE",
                       help="keep at most this much, e.g. 500M, 2G or a number of bytes")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="delete entries unused for DAYS")
    commands.add_parser("verify", help="read every entry, check its checksums; exit 1 if one fails")
    for command in commands.choices.values():
        command.add_argument("--root", default="cache", type=Path, help="the cache folder (default: cache)")
    return parser


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prune" and args.max_size is None and args.older_than is None:
        parser.error("prune needs --max-size SIZE or --older-than DAYS")
    if not args.root.is_dir():
        print(f"no cache folder at {args.root}", file=sys.stderr)
        return 2
    if args.command == "list":
        return _list(args.root)
    if args.command == "prune":
        return _prune(args.root, args.max_size, args.older_than)
    return _verify(args.root)

