"""The on-disk image store (``components/data/store.py``) against in-memory tensors.

**Read throughput.** 50,000 random 64×64×3 uint8 images (614 MB) are held once as an in-memory
tensor and once as a store written from it (``write_store``: the same ``.npy`` file a
build writes) in a temporary folder. Each side serves one shuffled epoch in batches of 256
through ``image_loader``, the way every graph reads its images. The store is timed four ways,
interleaved with the in-memory side in every repeat:

* *fresh mapping*: opened again before the epoch, as each run's first epoch is; the file's
  pages are in the page cache as a build leaves them (dropped, then read back with buffered
  reads, which is what the build's ``pwrite`` calls leave too) but not yet mapped into the
  process, so every page is a minor fault;
* *mapped*: a second epoch over the same mapping (later epochs of a run);
* *cold-ish*: the file is synced and dropped from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` before the first batches (only the first
  ``COLD_BATCHES`` are timed). The share of the file still resident just before timing is
  measured with ``mincore`` and printed; the virtual disk's host may still cache the file, so
  this is not a cold disk;
* *fresh mapping of pages a mapping read in*: the cold epoch is finished untimed, so the page
  cache holds the file as a run that read it cold through its mapping leaves it (4 KB pages,
  where buffered I/O leaves large folios), and the store is opened again and timed.

**Build rate.** ``build_store`` decodes ``N_JPEGS`` generated JPEGs (96×96 smooth gradients
with noise, 10 classes, page-cached by an untimed first build) to 64×64 with 1 and 2
DataLoader worker processes (and 0: decoding in the main process), each into a fresh folder.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components.data import ImageSet, image_loader
from components.data.store import build_store, open_store, write_store

N, SIDE, BATCH = 50_000, 64, 256
COLD_BATCHES = 40
N_JPEGS, JPEG_SIDE, CLASSES = 3_000, 96, 10
TARGET = 0.8


def epoch(images: ImageSet, seed: int, batches: int | None = None) -> tuple[float, int]:
    """Seconds to draw shuffled batches of ``BATCH`` through ``image_loader`` and the count."""
    loader = image_loader(images, batch_size=BATCH, shuffle=True, seed=seed)
    start, seen = time.perf_counter(), 0
    for i, (x, _, _) in enumerate(loader):
        if batches is not None and i == batches:
            break
        seen += len(x)
    return time.perf_counter() - start, seen


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` over a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(m, np.uint8)
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) != 0:
                return float("nan")
            del view
            return sum(v & 1 for v in vec) / pages
        finally:
            m.close()


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED leaves dirty pages alone
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def read_rows(folder: Path, repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (N, 3, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    targets = torch.arange(N) % CLASSES
    memory = ImageSet(pixels, targets, [str(c) for c in range(CLASSES)], "memory")
    path = write_store(folder, "train", pixels, targets, memory.classes, "store/train")
    cold_ok = hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")
    epoch(memory, 0, 20)  # warm-up: allocator, loader code paths
    times: dict[str, list[float]] = {"memory": [], "fresh": [], "mapped": [], "cold": [],
                                     "cold_memory": [], "refaulted": []}
    resident_before: list[float] = []
    cold_images = N
    for r in range(repeats):
        gc.collect()
        times["memory"].append(epoch(memory, r)[0])
        if cold_ok:  # the page cache as a build (or `cat`) leaves it, whatever the last repeat did
            drop_from_cache(path)
        warm_cache(path)
        stored = open_store(folder, "train")
        times["fresh"].append(epoch(stored, r)[0])
        times["mapped"].append(epoch(stored, r + 100)[0])
        del stored
        gc.collect()
        if cold_ok:
            drop_from_cache(path)
            resident_before.append(resident_fraction(path))
            stored = open_store(folder, "train")
            seconds, cold_images = epoch(stored, r, COLD_BATCHES)
            times["cold"].append(seconds)
            times["cold_memory"].append(epoch(memory, r, COLD_BATCHES)[0])
            epoch(stored, r + 200)  # untimed: the rest of the file is paged in through the mapping
            del stored
            gc.collect()
            stored = open_store(folder, "train")
            times["refaulted"].append(epoch(stored, r)[0])
            del stored
            gc.collect()
    median = {k: statistics.median(v) for k, v in times.items() if v}
    rate = {k: (cold_images if k.startswith("cold") else N) / m for k, m in median.items()}
    where = (f"{N:,} random {SIDE}×{SIDE}×3 uint8 ({N * 3 * SIDE * SIDE / 1e6:,.0f} MB), "
             f"shuffled batches of {BATCH}")
    rows = [
        {"name": "in-memory tensor: image_loader epoch", "median_s": median["memory"],
         "images_per_s": rate["memory"], "notes": where},
        {"name": "store, fresh mapping (a run's first epoch)", "median_s": median["fresh"],
         "images_per_s": rate["fresh"], "notes": "page cache warm; pages faulted into the new mapping"},
        {"name": "store, mapped (later epochs)", "median_s": median["mapped"],
         "images_per_s": rate["mapped"], "notes": "second epoch over the same mapping"},
    ]
    for key, label in (("fresh", "fresh mapping"), ("mapped", "mapped")):
        ratio = rate[key] / rate["memory"]
        rows.append({"name": f"store ({label}) / in-memory (images/s)", "ratio": ratio,
                     "target": f">= {TARGET:g}", "ok": ratio >= TARGET,
                     "notes": f"{repeats} interleaved repeats, median"})
    if cold_ok:
        rows += [
            {"name": f"store, cold-ish (first {COLD_BATCHES} batches after FADV_DONTNEED)",
             "median_s": median["cold"], "images_per_s": rate["cold"],
             "notes": f"resident before: {max(resident_before):.1%} of the file (mincore, max over "
                      "repeats); the VM host may still cache the disk"},
            {"name": "store cold-ish / in-memory, same batches (images/s)",
             "ratio": rate["cold"] / rate["cold_memory"],
             "notes": "no target: disk-bound; realistic runs read a warm cache after the build"},
            {"name": "store, fresh mapping of pages an earlier mapping read in", "median_s":
             median["refaulted"], "images_per_s": rate["refaulted"],
             "notes": "the cold epoch finished, then opened again: the page cache holds the file "
                      "in 4 KB pages, each faulted in alone"},
            {"name": "store (fresh mapping, pages read in by a mapping) / in-memory (images/s)",
             "ratio": rate["refaulted"] / rate["memory"],
             "notes": "no target; a cold store `cat` once before the run (buffered reads) "
                      "reads as a fresh build"},
        ]
    return rows


def write_jpegs(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, JPEG_SIDE)
    for i in range(N_JPEGS):
        folder = root / "train" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * ramp[None, :] + b * ramp[:, None] * 0.5 + c * 0.2] * 3, -1)
        noise = rng.normal(0, 12, (JPEG_SIDE, JPEG_SIDE, 3))
        image = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    for c in range(CLASSES):  # the test tree: one image per class
        folder = root / "val" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(next((root / "train" / f"c{c}").iterdir()), folder / "0.jpg")


def build_rows(folder: Path, repeats: int) -> list[dict]:
    tree = folder / "tree"
    write_jpegs(tree)

    def build(workers: int, out: Path) -> float:
        summary = build_store(tree, out, image_size=SIDE, num_workers=workers, progress=False)
        seconds = summary["train"]["seconds"] + summary["val"]["seconds"]
        shutil.rmtree(out)
        return seconds

    build(0, folder / "warm")  # page-caches the JPEGs
    sides = (0, 1, 2)
    times: dict[int, list[float]] = {w: [] for w in sides}
    for r in range(repeats):
        for w in sides:
            times[w].append(build(w, folder / f"out-{w}-{r}"))
    n = N_JPEGS + CLASSES
    rate = {w: n / statistics.median(t) for w, t in times.items()}
    rows = [{"name": f"build: {n:,} JPEGs {JPEG_SIDE}px → {SIDE}px, workers={w}",
             "median_s": statistics.median(times[w]), "images_per_s": rate[w],
             "notes": "decoding in the main process" if w == 0 else
             "DataLoader worker processes (start-up timed)"} for w in sides]
    rows.append({"name": "build: workers=2 / workers=1 (images/s)", "ratio": rate[2] / rate[1],
                 "notes": f"{os.cpu_count()} CPUs; the main process writes while workers decode"})
    return rows


def run(repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-image-store-") as tmp:
        folder = Path(tmp)
        rows = read_rows(folder / "store", repeats)
        gc.collect()
        rows += build_rows(folder, repeats)
    return rows
