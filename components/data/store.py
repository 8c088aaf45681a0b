"""An on-disk uint8 image store for ImageFolder trees larger than memory.

Built once from the same tree :func:`~components.data.sources.image_folder` reads
(``root/{train_dir,test_dir}/<class>/<image>``), decoded and resized exactly as it does, then
read back as a memory map::

    python -m components.data.store build ROOT --out DIR --image-size 64 --workers 4
    python -m components.data.store info DIR

or, from a data gin file, ``make_protocol.source = @image_store`` (with ``image_store.root``,
``image_store.store`` and ``import components.data.store`` at the top); the first run builds the
store, later runs open it. In-memory :func:`image_folder` stays the default for small sets.

**Format.** Per split, ``DIR/<split>.npy`` holds the images as one ``[N, 3, S, S]`` uint8 array
(plain NumPy ``.npy``: its header from ``numpy.lib.format.open_memmap``, its rows with
``os.pwrite``, see :class:`_Rows`) and ``DIR/<split>.json``
the rest: class names, labels, image size, count, skipped files and the fingerprint of the tree
it was built from. Why ``.npy`` and not HDF5: ``torch.from_numpy(np.load(path, mmap_mode="c"))``
is a torch tensor backed by the file, and indexing it (``images[batch]``) makes the kernel page
in only the rows a batch touches, with no chunk cache or decompression on the read path.
(``mode="c"``, copy-on-write, gives a writable array, so torch does not warn; nothing writes to
it, and a write would stay in the process.)

**Reading.** :func:`open_store` wraps that tensor in :class:`~components.data.sources.ImageRows`,
which is how an :class:`ImageSet` says its images stay on disk: ``ImageSet.subset`` and
:func:`~components.data.sources.concat_images` then select and join rows without reading them,
so ``make_protocol``'s labeled, validation, stream and test sets and every training set a graph
joins (labeled + pseudo-labeled, labeled + stream) are row numbers into the file, and only a
batch that :func:`~components.data.loading.image_loader` indexes is read (sorted, so the file
is read in order). An encode's data fingerprint reads the rows in 64 MB slices.

**What it promises** (as the feature cache in :mod:`components.cache` does):

* *Built once, never rewritten.* A split is written as ``DIR/.<split>.partial.npy`` and renamed
  to ``<split>.npy`` only when complete; its ``<split>.json`` is written (temporary name, then
  rename) last, so a store without it is not finished and is never read.
* *Fingerprinted.* The fingerprint covers the tree's file list (relative paths, labels, sizes,
  modification times), the class names and the image size. Opening or building a finished
  store whose fingerprint no longer matches the tree is refused with what differs and how to
  fix it: ``build … --rebuild``, or delete the folder.
* *Resumable.* While building, ``DIR/.<split>.partial.json`` counts the files done; it is
  rewritten after every ``chunk`` images, after the rows have been synced to disk, so a build
  killed at any point (even SIGKILL) continues from the last flushed chunk when started again.
  A partial build of another tree or image size is discarded with a warning.
* *Unreadable files* are handled as ``image_folder`` handles them: the build stops naming them,
  unless ``skip_unreadable``; the readable images are kept, so running again with
  ``skip_unreadable`` finishes at once without decoding anything again.
* *One builder at a time:* a lock on ``DIR/.lock`` makes other processes (ranks of a
  distributed run, say) wait and then open the finished store.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gin
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from components.cache import format_size
from components.data.sources import (
    UNREADABLE_SHOWN,
    ImageRows,
    ImageSet,
    _check_no_empty_class,
    _check_same_classes,
    _decode_rgb,
    _report_unreadable,
    _why_unreadable,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK = 1024  # images between two flushes of a build (what a killed build may have to redo)
LOADER_BATCH = 32  # images a decoding worker hands back at once


class StoreMismatch(ValueError):
    """A finished store was built from another version of the tree (or another image size)."""


class StoreCorrupt(ValueError):
    """A store's files cannot be read as what their sidecar says."""


def default_workers() -> int:
    """``min(4, usable CPUs)``: decoding worker processes of a build."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


# --------------------------------------------------------------------------------------------
# the tree
# --------------------------------------------------------------------------------------------

class Listing:
    """The image files of one ImageFolder tree in ``image_folder``'s order, with labels and the
    fingerprint of (relative paths, labels, sizes, modification times, classes, image size)."""

    def __init__(self, root: Path, split: str, other: str, image_size: int) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root, self.split, self.other, self.image_size = root, split, other, image_size
        self.path = path = root / split
        if not path.is_dir():
            raise FileNotFoundError(
                f"no ImageFolder tree at {path.resolve()}: expected {path}/<class>/<image> "
                f"(set image_store.root, train_dir and test_dir, or the ROOT of the build command)"
            )
        try:
            self.classes, class_to_idx = find_classes(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path.resolve()} has no class folders: expected {path}/<class>/<image>"
            ) from None
        samples = make_dataset(str(path), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        self.files = [file for file, _ in samples]
        self.targets = np.array([target for _, target in samples], dtype=np.int64)
        _check_no_empty_class(path, self.classes, self.targets.tolist(), other, skipped=False)
        h = hashlib.sha1(f"image_size={image_size};classes={self.classes!r};".encode())
        for file, target in samples:
            stat = os.stat(file)
            h.update(f"{os.path.relpath(file, path)}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                     .encode())
        self.fingerprint = h.hexdigest()
        self.name = f"{root.name}/{split}"

    def __len__(self) -> int:
        return len(self.files)


# --------------------------------------------------------------------------------------------
# files of a store
# --------------------------------------------------------------------------------------------

def _paths(out: Path, split: str) -> dict[str, Path]:
    return {"npy": out / f"{split}.npy", "json": out / f"{split}.json",
            "partial_npy": out / f".{split}.partial.npy", "partial_json": out / f".{split}.partial.json"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as error:
        raise StoreCorrupt(f"{path} cannot be read ({error}): delete the store folder and build "
                           "it again") from error


def _write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``: a temporary file, flushed to disk, renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` exclusively: one builder at a time, the others wait."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Rows:
    """The rows of a ``.npy`` being built, written with ``os.pwrite`` at their offsets.

    Not through a shared memory map: the page cache keeps what a process writes into a mapping
    in 4 KB pages, while buffered writes (and reads) fill it with large folios, and a run that
    maps the finished store faults the first kind in one page at a time. On the 614 MB bench
    store (``python -m bench --only image_store``, Linux 6.18, ext4) that made a run's first
    epoch read at 0.6× in-memory speed; written with ``pwrite`` it reads at memory speed.
    """

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None) -> None:
        # open_memmap writes the header (and sizes a new file, sparse); no row goes through it
        array = np.lib.format.open_memmap(path, "w+" if shape is not None else "r+", np.uint8, shape)
        self.shape, self.dtype, self.offset = array.shape, array.dtype, array.offset
        self.row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        del array
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, dtype=np.uint8)).cast("B")
        position, written = self.offset + row * self.row_bytes, 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self.fd, data[written:], position + written)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _shrink_npy(path: Path, rows: int) -> None:
    """Make the ``.npy`` at ``path`` say ``rows`` rows and cut the file after them (a build that
    skipped unreadable files wrote fewer rows than it reserved). NumPy pads a header so that its
    first dimension can grow, so the new header has the old one's length; if not, the file
    keeps its reserved rows and only the sidecar's count is read."""
    fmt = np.lib.format
    with open(path, "r+b") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
        header = io.BytesIO()
        write = fmt.write_array_header_1_0 if version == (1, 0) else fmt.write_array_header_2_0
        write(header, {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran,
                       "shape": (rows, *shape[1:])})
        if len(header.getvalue()) != offset:
            return
        f.seek(0)
        f.write(header.getvalue())
        f.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------

class _DecodeFiles(Dataset):
    """``files[i]`` decoded and resized as ``image_folder`` does, or the reason it cannot be."""

    def __init__(self, files: Sequence[str], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        from torchvision.transforms.v2 import functional as F

        try:
            decoded = _decode_rgb(self.files[i])
        except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated or not an image
            return None, _why_unreadable(error)
        return F.resize(decoded, [self.image_size, self.image_size], antialias=True), None


def _stack(image_size: int, items: list) -> tuple[torch.Tensor, list[str | None]]:
    """One uint8 batch (zeros where a file was unreadable) and the reasons, ``None`` where read."""
    images = torch.zeros(len(items), 3, image_size, image_size, dtype=torch.uint8)
    for i, (image, _) in enumerate(items):
        if image is not None:
            images[i] = image
    return images, [why for _, why in items]


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} images/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled)


def _unreadable_error(path: Path, skipped: list) -> ValueError:
    """``image_folder``'s message for unreadable files, with the store's option and what it keeps."""
    try:
        _report_unreadable(path, [(file, why) for _, file, why in skipped], skip=False)
    except ValueError as error:
        message = str(error).replace("image_folder.skip_unreadable", "image_store.skip_unreadable")
    else:  # pragma: no cover - _report_unreadable always raises when not skipping
        message = f"{path.resolve()}: {len(skipped)} image file(s) cannot be decoded"
    return ValueError(f"{message} (build command: --skip-unreadable). The readable images are "
                      "kept: with that option the build finishes without decoding them again")


def _warn_skipped(path: Path, skipped: list) -> None:
    listed = "; ".join(f"{file} ({why})" for _, file, why in skipped[:UNREADABLE_SHOWN])
    more = f" and {len(skipped) - UNREADABLE_SHOWN} more" if len(skipped) > UNREADABLE_SHOWN else ""
    log.warning(f"{path.resolve()}: skipped {len(skipped)} unreadable image file(s) "
                f"(image_store.skip_unreadable = True): {listed}{more}")


def _mismatch(out: Path, split: str, meta: dict, listing: Listing) -> StoreMismatch:
    if meta.get("image_size") != listing.image_size:
        what = f"at image size {meta.get('image_size')}, not {listing.image_size}"
    elif meta.get("files") != len(listing):
        what = f"from {meta.get('files'):,} image files; {listing.path} now has {len(listing):,}"
    else:
        what = (f"from {listing.path} when its files (names, labels, sizes or modification times) "
                "were different")
    return StoreMismatch(
        f"the image store {out / split}.npy was built {what}. Rebuild it: python -m "
        f"components.data.store build {listing.root} --out {out} --image-size {listing.image_size} "
        f"--rebuild (or delete {out}); use another --out folder to keep both"
    )


def _build_split(listing: Listing, out: Path, skip_unreadable: bool, rebuild: bool,
                 num_workers: int, chunk: int, bar, after_chunk: Callable[[int], None] | None) -> dict:
    split, paths = listing.split, _paths(out, listing.split)
    summary = {"split": split, "path": str(paths["npy"]), "files": len(listing), "decoded": 0,
               "resumed_from": 0, "seconds": 0.0}
    meta = _read_json(paths["json"])
    if meta is not None and not rebuild:
        if meta.get("fingerprint") != listing.fingerprint or meta.get("format") != FORMAT_VERSION:
            raise _mismatch(out, split, meta, listing)
        return {**summary, "images": meta["count"], "skipped": len(meta["skipped"]), "built": False}
    if meta is not None:  # --rebuild: the finished store goes first, its sidecar before its data
        paths["json"].unlink()
        paths["npy"].unlink(missing_ok=True)
        log.info(f"{paths['npy']}: removed, rebuilding")

    state = _read_json(paths["partial_json"])
    if state is not None and (rebuild or state.get("fingerprint") != listing.fingerprint
                              or state.get("format") != FORMAT_VERSION):
        if not rebuild:
            log.warning(f"{paths['partial_npy']}: an interrupted build of another version of "
                        f"{listing.path} (or of another image size); discarding it, starting over")
        paths["partial_json"].unlink()
        paths["partial_npy"].unlink(missing_ok=True)
        state = None
    n, size = len(listing), listing.image_size
    if state is not None and not paths["partial_npy"].exists():
        if state["files_done"] == n and paths["npy"].exists():  # died between the two renames
            return {**summary, **_finish(listing, out, state, skip_unreadable), "built": True}
        paths["partial_json"].unlink()
        state = None
    if state is None:
        state = {"format": FORMAT_VERSION, "fingerprint": listing.fingerprint, "split": split,
                 "name": listing.name, "tree": str(listing.path.resolve()), "classes": listing.classes,
                 "image_size": size, "files": n, "files_done": 0, "rows": 0, "skipped": []}
        images = _Rows(paths["partial_npy"], (n, 3, size, size))
        _write_json(paths["partial_json"], state)
    else:
        images = _Rows(paths["partial_npy"])
        if images.shape != (n, 3, size, size) or images.dtype != np.uint8:
            images.close()
            raise StoreCorrupt(f"{paths['partial_npy']} holds {images.dtype} {images.shape}, not "
                               f"uint8 {(n, 3, size, size)}: delete it and build again")
        log.info(f"{split}: resuming an interrupted build at {state['files_done']:,} of {n:,} files")

    start, summary["resumed_from"] = time.perf_counter(), state["files_done"]
    done, rows, flushed = state["files_done"], state["rows"], state["files_done"]
    task = bar.add_task(f"{split} → {paths['npy'].name}", total=n, completed=done)
    loader = DataLoader(_DecodeFiles(listing.files[done:], size), batch_size=min(LOADER_BATCH, chunk),
                        num_workers=num_workers, collate_fn=functools.partial(_stack, size))
    try:
        for batch, whys in loader:
            ok = [i for i, why in enumerate(whys) if why is None]
            images.write(rows, batch[ok].numpy())
            state["skipped"] += [[done + i, listing.files[done + i], why]
                                 for i, why in enumerate(whys) if why is not None]
            rows, done = rows + len(ok), done + len(whys)
            bar.update(task, completed=done)
            if done - flushed >= chunk or done == n:
                images.sync()  # the rows first, then the count that vouches for them
                state.update(files_done=done, rows=rows)
                _write_json(paths["partial_json"], state)
                flushed = done
                if after_chunk is not None:
                    after_chunk(done)
    finally:
        images.close()
    del loader
    summary["decoded"], summary["seconds"] = done - summary["resumed_from"], time.perf_counter() - start
    return {**summary, **_finish(listing, out, state, skip_unreadable), "built": True}


def _finish(listing: Listing, out: Path, state: dict, skip_unreadable: bool) -> dict:
    """Check a fully decoded split, then rename its data and write its sidecar into place."""
    paths, skipped = _paths(out, listing.split), state["skipped"]
    targets = np.delete(listing.targets, [i for i, _, _ in skipped])
    if skipped and not skip_unreadable:
        raise _unreadable_error(listing.path, skipped)
    _check_no_empty_class(listing.path, listing.classes, targets.tolist(), listing.other,
                          skipped=bool(skipped))
    if paths["partial_npy"].exists():
        if state["rows"] < len(listing):
            _shrink_npy(paths["partial_npy"], state["rows"])
        with open(paths["partial_npy"], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(paths["partial_npy"], paths["npy"])
    meta = {key: state[key] for key in ("format", "fingerprint", "split", "name", "tree", "classes",
                                        "image_size", "files", "skipped")}
    meta.update(count=state["rows"], targets=targets.tolist(), built=time.strftime("%Y-%m-%d %H:%M:%S"))
    _write_json(paths["json"], meta)
    paths["partial_json"].unlink(missing_ok=True)
    _fsync_dir(out)
    if skipped:
        _warn_skipped(listing.path, skipped)
    return {"images": state["rows"], "skipped": len(skipped)}


def list_trees(root: str | Path, train_dir: str = "train", test_dir: str = "val",
               image_size: int = 64) -> dict[str, Listing]:
    """The listings of both trees, after checking they have the same class folders."""
    root = Path(root)
    listings = {train_dir: Listing(root, train_dir, test_dir, image_size),
                test_dir: Listing(root, test_dir, train_dir, image_size)}
    _check_same_classes(str(root), train_dir, listings[train_dir].classes, test_dir,
                        listings[test_dir].classes)
    return listings


def build_store(
    root: str | Path,
    out: str | Path,
    train_dir: str = "train",
    test_dir: str = "val",
    image_size: int = 64,
    num_workers: int | None = None,
    skip_unreadable: bool = False,
    rebuild: bool = False,
    chunk: int = CHUNK,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Build (or finish, or just check) the store of ``root``'s two trees in ``out``.

    Decodes with ``num_workers`` DataLoader worker processes (default ``min(4, CPUs)``; 0 decodes
    in this process), flushing every ``chunk`` images. A finished split whose fingerprint
    matches is left as it is; one that does not is refused (:class:`StoreMismatch`) unless
    ``rebuild``, which deletes it and any partial build first. ``after_chunk(files_done)`` is
    called after each flush (tests use it to kill a build). Returns per split: ``images``,
    ``skipped``, ``files``, ``decoded`` (in this call), ``resumed_from``, ``seconds``, ``built``.
    """
    if image_size < 1 or chunk < 1:
        raise ValueError(f"image_size and chunk must be at least 1, got {image_size} and {chunk}")
    workers = default_workers() if num_workers is None else num_workers
    if workers < 0:
        raise ValueError(f"num_workers must be at least 0, got {num_workers}")
    return _build(list_trees(root, train_dir, test_dir, image_size), Path(out), workers, skip_unreadable,
                  rebuild, chunk, progress, after_chunk)


def _build(listings: dict[str, Listing], out: Path, workers: int, skip_unreadable: bool, rebuild: bool,
           chunk: int, progress: bool, after_chunk: Callable[[int], None] | None) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out), _progress_bar(progress) as bar:
        summaries = {split: _build_split(listing, out, skip_unreadable, rebuild, workers, chunk, bar,
                                         after_chunk)
                     for split, listing in listings.items()}
    for s in summaries.values():
        if s["decoded"]:
            log.info(f"{s['split']}: decoded {s['decoded']:,} images in {s['seconds']:.1f} s "
                     f"({s['decoded'] / max(s['seconds'], 1e-9):,.0f} images/s) with {workers} workers")
    return summaries


def write_store(out: str | Path, split: str, images: np.ndarray | torch.Tensor, targets: Sequence[int],
                classes: Sequence[str], name: str | None = None, chunk: int = 4096) -> Path:
    """Write uint8 ``images [N, C, H, W]`` (and labels) as a finished split of a store with no
    tree behind it (open it with ``root=None``): to move an in-memory set to disk, or to
    generate test and benchmark data. Same files and renames as a build."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    if array.dtype != np.uint8 or array.ndim != 4 or len(array) != len(targets):
        raise ValueError(f"write_store needs uint8 images [N, C, H, W] and N labels, got "
                         f"{array.dtype} {array.shape} and {len(targets)} labels")
    paths = _paths(out, split)
    with _locked(out):
        data = _Rows(paths["partial_npy"], array.shape)
        try:
            for i in range(0, len(array), chunk):
                data.write(i, array[i:i + chunk])
            data.sync()
        finally:
            data.close()
        os.replace(paths["partial_npy"], paths["npy"])
        _write_json(paths["json"], {
            "format": FORMAT_VERSION, "fingerprint": None, "split": split, "name": name or split,
            "tree": None, "classes": list(classes), "image_size": int(array.shape[-1]),
            "files": len(array), "skipped": [], "count": len(array),
            "targets": [int(t) for t in targets], "built": time.strftime("%Y-%m-%d %H:%M:%S")})
        _fsync_dir(out)
    return paths["npy"]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def open_store(out: str | Path, split: str, listing: Listing | None = None,
               skip_unreadable: bool = False, image_size: int | None = None) -> ImageSet:
    """The finished ``split`` of the store in ``out`` as an :class:`ImageSet` whose images are
    :class:`ImageRows` of a tensor backed by the file (nothing is read until a batch is indexed,
    and its subsets stay on disk).

    With ``listing``, the store must have been built from that tree at that image size
    (:class:`StoreMismatch` otherwise). A store built with unreadable files left out is refused
    unless ``skip_unreadable``, as ``image_folder`` refuses the tree. ``image_size``, when given,
    must be the store's.
    """
    out = Path(out)
    paths = _paths(out, split)
    meta = _read_json(paths["json"])
    if meta is None:
        state = _read_json(paths["partial_json"])
        interrupted = (f"; a build was interrupted at {state['files_done']:,} of {state['files']:,} "
                       "files: run the build again to continue it" if state else "")
        raise FileNotFoundError(
            f"no finished image store for {split!r} in {out.resolve()} (no {paths['json'].name}"
            f"{interrupted}). Build it: python -m components.data.store build ROOT --out {out}")
    if meta.get("format") != FORMAT_VERSION:
        raise StoreMismatch(f"{paths['json']} is of store format {meta.get('format')}, this code reads "
                            f"{FORMAT_VERSION}: delete {out} and build it again")
    if listing is not None and meta.get("fingerprint") != listing.fingerprint:
        raise _mismatch(out, split, meta, listing)
    if image_size is not None and meta["image_size"] != image_size:
        raise StoreMismatch(f"the image store {paths['npy']} holds {meta['image_size']}×{meta['image_size']} "
                            f"images, not {image_size}×{image_size}: bind image_store.image_size = "
                            f"{meta['image_size']}, or build a store of that size in another folder")
    if meta["skipped"] and not skip_unreadable:
        tree = Path(meta["tree"]) if meta.get("tree") else out / split
        raise _unreadable_error(tree, meta["skipped"])
    size, count = meta["image_size"], meta["count"]
    try:
        array = np.load(paths["npy"], mmap_mode="c")
    except (OSError, ValueError) as error:
        raise StoreCorrupt(f"{paths['npy']} cannot be mapped ({error}): truncated or damaged? Delete "
                           f"{out} and build it again") from error
    if (array.dtype != np.uint8 or array.ndim != 4 or array.shape[2:] != (size, size)
            or len(array) < count or len(meta["targets"]) != count):
        raise StoreCorrupt(f"{paths['npy']} holds {array.dtype} {array.shape}, its sidecar says {count} "
                           f"images of {size}×{size} with {len(meta['targets'])} labels: delete {out} "
                           "and build it again")
    if len(array) > count:  # a header that could not be shrunk: reserved rows after the images
        array = array[:count]
    targets = torch.as_tensor(meta["targets"], dtype=torch.long)
    return ImageSet(ImageRows([torch.from_numpy(array)]), targets, meta["classes"], meta["name"])


@gin.configurable
def image_store(
    root: str | None = gin.REQUIRED,
    store: str = gin.REQUIRED,
    train_dir: str = "train",
    test_dir: str = "val",
    image_size: int = 64,
    num_workers: int | None = None,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """``image_folder``'s ``(train, test)`` for trees too large for memory: the images stay in
    the on-disk store ``store`` (a folder), built from ``root`` on first use with
    ``num_workers`` decoding processes (default ``min(4, CPUs)``) and memory-mapped after.

    Same trees, labels, order and pixels as ``image_folder(root, train_dir, test_dir,
    image_size, skip_unreadable)``. Each call checks the store against the tree (one ``stat``
    per file) and refuses a store built from another version of it; ``root=None`` opens the
    store alone, without that check (a store copied to a machine without the tree).
    """
    if root is None:
        return (open_store(store, train_dir, None, skip_unreadable, image_size),
                open_store(store, test_dir, None, skip_unreadable, image_size))
    workers = default_workers() if num_workers is None else num_workers
    listings = list_trees(root, train_dir, test_dir, image_size)
    _build(listings, Path(store), workers, skip_unreadable, False, CHUNK, progress, None)
    return (open_store(store, train_dir, listings[train_dir], skip_unreadable),
            open_store(store, test_dir, listings[test_dir], skip_unreadable))


# --------------------------------------------------------------------------------------------
# python -m components.data.store
# --------------------------------------------------------------------------------------------



def _info(out: Path, root: Path | None) -> int:
    splits = sorted({p.stem for p in out.glob("*.json") if not p.name.startswith(".")}
                    | {p.name[1:-len(".partial.json")] for p in out.glob(".*.partial.json")})
    if not splits:
        print(f"{out}: no image store here (no <split>.json)", file=sys.stderr)
        return 2
    status = 0
    for split in splits:
        paths = _paths(out, split)
        meta = _read_json(paths["json"])
        if meta is None:
            state = _read_json(paths["partial_json"]) or {}
            print(f"{split}: partial build, {state.get('files_done', 0):,} of {state.get('files', 0):,} "
                  f"files done ({len(state.get('skipped', [])):,} unreadable so far), "
                  f"{state.get('image_size')}×{state.get('image_size')}; run the build again to finish it")
            continue
        size = paths["npy"].stat().st_size if paths["npy"].exists() else 0
        line = (f"{split}: {meta['count']:,} images {meta['image_size']}×{meta['image_size']}, "
                f"{len(meta['classes'])} classes, {format_size(size)}, {len(meta['skipped'])} skipped, "
                f"built {meta.get('built')} from {meta.get('tree') or 'arrays (write_store)'}")
        if root is not None:
            try:
                listing = Listing(root, split, split, meta["image_size"])
                same = listing.fingerprint == meta.get("fingerprint")
            except (FileNotFoundError, ValueError) as error:
                same, line = False, f"{line}; {error}"
            line += "; matches the tree" if same else "; DOES NOT match the tree: rebuild it"
            status = status or (0 if same else 1)
        print(line)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.data.store",
        description="Build an on-disk uint8 image store from an ImageFolder tree, or describe one "
                    "(docs/data.md#image-store).")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="decode ROOT/{train,val}/<class>/<image> into --out "
                                "(resumes an interrupted build; a finished one is only checked)")
    build.add_argument("root", type=Path, help="the folder holding the train and test trees")
    build.add_argument("--out", type=Path, required=True, help="the store folder")
    build.add_argument("--image-size", type=int, default=64, help="square side in pixels (default 64)")
    build.add_argument("--workers", type=int, default=None,
                       help=f"decoding processes (default min(4, CPUs) = {default_workers()})")
    build.add_argument("--train-dir", default="train", help="training tree under ROOT (default train)")
    build.add_argument("--test-dir", default="val", help="test tree under ROOT (default val)")
    build.add_argument("--skip-unreadable", action="store_true", help="leave undecodable files out")
    build.add_argument("--rebuild", action="store_true",
                       help="delete the finished store (and any partial build) and build it anew")
    build.add_argument("--chunk", type=int, default=CHUNK,
                       help=f"images between flushes, what an interrupted build redoes (default {CHUNK})")
    info = commands.add_parser("info", help="describe the store in DIR")
    info.add_argument("out", type=Path, metavar="DIR", help="the store folder")
    info.add_argument("--root", type=Path, default=None, help="also check it against this tree")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "info":
            if not args.out.is_dir():
                print(f"no store folder at {args.out}", file=sys.stderr)
                return 2
            return _info(args.out, args.root)
        summaries = build_store(args.root, args.out, args.train_dir, args.test_dir, args.image_size,
                                args.workers, args.skip_unreadable, args.rebuild, args.chunk)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for s in summaries.values():
        what = "built" if s["built"] else "already built, matches the tree"
        print(f"{s['split']}: {s['images']:,} images ({s['skipped']} skipped) in {s['path']}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
