"""The on-disk image store (components/data/store.py): built from an ImageFolder tree of tiny
PNG and JPEG files written here, it must hold exactly what ``image_folder`` decodes, stay on
disk when read, survive a killed build, refuse a changed tree, and not depend on the number
of decoding workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gin
import numpy as np
import pytest
import torch

from components.cache import data_fingerprint
from components.data.distractors import Distractors
from components.data.loading import image_loader
from components.data.sources import ImageRows, ImageSet, concat_images, image_folder, take_images
from components.data.splits import make_protocol
from components.data.store import (
    StoreMismatch,
    build_store,
    image_store,
    main,
    open_store,
    write_store,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cow")
SIZE = 12


def write_tree(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.<ext>``: PNGs (RGB, grayscale, RGBA, palette) and JPEGs of
    assorted sizes, so decoding, RGB conversion and resizing all matter."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(6, 30, 2))
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                kind = i % 5
                if kind == 1:
                    image = image.convert("L")
                elif kind == 2:
                    image = image.convert("RGBA")
                elif kind == 3:
                    image = image.convert("P")
                ext = ".jpg" if kind == 4 else ".png"
                image.save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "tree", {"train": 6, "val": 2})


def assert_same(a, b) -> None:
    assert a.name == b.name and a.classes == b.classes
    assert torch.equal(a.targets, b.targets)
    assert a.images.shape == b.images.shape and torch.equal(a.images[:], b.images[:])  # [:] reads a store


def test_the_store_holds_exactly_what_image_folder_decodes(tree, tmp_path):
    expected = image_folder(str(tree), image_size=SIZE)
    got = image_store(str(tree), str(tmp_path / "store"), image_size=SIZE, num_workers=0, progress=False)
    for memory, stored in zip(expected, got, strict=True):
        assert_same(memory, stored)
        assert len(stored) and stored.images[:].any()  # not an empty or blank store passing by accident
    again = image_store(str(tree), str(tmp_path / "store"), image_size=SIZE, num_workers=0, progress=False)
    assert_same(got[0], again[0])
    # a store copied without its tree opens alone
    alone = image_store(None, str(tmp_path / "store"), image_size=SIZE)
    assert_same(got[1], alone[1])
    with pytest.raises(StoreMismatch, match="holds 12×12 images, not 64×64"):
        image_store(None, str(tmp_path / "store"))


def _mapped_files() -> list[tuple[int, int, str]]:
    rows = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            rows.append((lo, hi, parts[5]))
    return rows


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_images_stay_in_the_file_and_a_full_epoch_does_not_load_them(tmp_path):
    n, side = 5000, 64  # 61 MB
    nbytes = n * 3 * side * side
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
    targets = rng.integers(0, 5, n)
    path = write_store(tmp_path / "big", "train", pixels, targets, [str(c) for c in range(5)], "big/train")
    first_rows = torch.from_numpy(pixels[:256].copy())
    del pixels
    warm = ImageSet(first_rows, torch.zeros(256, dtype=torch.long), ["0"])  # the loader's own allocations
    for _ in image_loader(warm, batch_size=64, seed=0):
        pass
    before = _rss_anon()
    stored = open_store(tmp_path / "big", "train")
    # the tensor's memory is a mapping of the .npy file itself
    ptr = stored.images.bases[0].data_ptr()
    owner = [name for lo, hi, name in _mapped_files() if lo <= ptr < hi]
    assert owner == [str(path.resolve())], owner
    seen = 0
    for images, labels, ids in image_loader(stored, batch_size=64, shuffle=True, seed=0):
        seen += len(images)
        assert torch.equal(labels, torch.as_tensor(targets)[ids])
    assert seen == n
    grown = _rss_anon() - before
    assert grown < nbytes / 4, f"reading every image grew anonymous memory by {grown:,} bytes of {nbytes:,}"
    assert torch.equal(stored.images[:256], first_rows)


def test_a_batch_through_image_loader_equals_the_in_memory_one(tree, tmp_path):
    memory, _ = image_folder(str(tree), image_size=SIZE)
    stored, _ = image_store(str(tree), str(tmp_path / "store"), image_size=SIZE, num_workers=0,
                            progress=False)
    for sampler in ("instance", "class_balanced"):
        a = list(image_loader(memory, batch_size=5, sampler=sampler, seed=3))
        b = list(image_loader(stored, batch_size=5, sampler=sampler, seed=3))
        assert len(a) == len(b) > 1
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    # subsets (what make_protocol takes) read the same rows
    index = torch.tensor([5, 0, 17, 3])
    assert_same(memory.subset(index, "s"), stored.subset(index, "s"))


KILLED_BUILD = """
import os, signal, sys
from components.data.store import build_store

def die(files_done):
    if files_done >= {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)

build_store(sys.argv[1], sys.argv[2], image_size={size}, num_workers=0, chunk={chunk},
            progress=False, after_chunk=die)
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def _without_time(files: dict[str, bytes]) -> dict[str, object]:
    return {name: ({k: v for k, v in json.loads(data).items() if k != "built"}
                   if name.endswith(".json") else data) for name, data in files.items()}


def test_a_killed_build_resumes_from_its_last_flushed_chunk(tmp_path):
    tree = write_tree(tmp_path / "tree", {"train": 10, "val": 2})  # 30 training images
    store = tmp_path / "store"
    script = KILLED_BUILD.format(kill_at=16, size=SIZE, chunk=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tree), str(store)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert not (store / "train.json").exists() and not (store / "train.npy").exists()
    progress = json.loads((store / ".train.partial.json").read_text())
    assert (progress["files_done"], progress["rows"]) == (16, 16)
    with pytest.raises(FileNotFoundError, match="interrupted at 16 of 30 files"):
        open_store(store, "train")

    resumed = build_store(tree, store, image_size=SIZE, num_workers=0, chunk=8, progress=False)
    assert resumed["train"]["resumed_from"] == 16 and resumed["train"]["decoded"] == 14
    assert resumed["val"]["resumed_from"] == 0 and resumed["val"]["decoded"] == 6
    whole = build_store(tree, tmp_path / "whole", image_size=SIZE, num_workers=0, chunk=8, progress=False)
    assert whole["train"]["decoded"] == 30
    assert _without_time(_files(store)) == _without_time(_files(tmp_path / "whole"))
    assert_same(open_store(store, "train"), image_folder(str(tree), image_size=SIZE)[0])


class Interrupted(Exception):
    pass


def test_a_partial_build_of_a_changed_tree_starts_over(tree, tmp_path, capsys):
    store = tmp_path / "store"

    def stop(files_done: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        build_store(tree, store, image_size=SIZE, num_workers=0, chunk=4, progress=False, after_chunk=stop)
    assert (store / ".train.partial.json").exists()
    assert main(["info", str(store)]) == 0  # says how far the partial build got, no traceback
    assert "partial build, 4 of" in capsys.readouterr().out
    write_tree(tree, {"train": 7}, seed=1)  # rewrites the images and adds one per class
    summary = build_store(tree, store, image_size=SIZE, num_workers=0, chunk=4, progress=False)
    assert summary["train"]["resumed_from"] == 0 and summary["train"]["decoded"] == 21
    assert_same(open_store(store, "train"), image_folder(str(tree), image_size=SIZE)[0])


def test_a_changed_tree_or_size_is_refused_with_how_to_fix_it(tree, tmp_path):
    store = tmp_path / "store"
    image_store(str(tree), str(store), image_size=SIZE, num_workers=0, progress=False)
    built = _files(store)
    extra = tree / "train" / "bee" / "999.png"
    extra.write_bytes((tree / "train" / "bee" / "000.png").read_bytes())
    with pytest.raises(StoreMismatch, match="from 18 image files; .* now has 19") as caught:
        image_store(str(tree), str(store), image_size=SIZE, num_workers=0, progress=False)
    assert "--rebuild" in str(caught.value) and f"delete {store}" in str(caught.value)
    extra.unlink()
    (tree / "train" / "bee" / "000.png").write_bytes((tree / "train" / "bee" / "001.png").read_bytes())
    with pytest.raises(StoreMismatch, match="when its files .* were different"):
        image_store(str(tree), str(store), image_size=SIZE, num_workers=0, progress=False)
    with pytest.raises(StoreMismatch, match="at image size 12, not 16"):
        image_store(str(tree), str(store), image_size=16, num_workers=0, progress=False)
    assert _files(store) == built  # a refused store is left as it was

    assert main(["info", str(store), "--root", str(tree)]) == 1
    assert main(["build", str(tree), "--out", str(store), "--image-size", str(SIZE), "--workers", "0"]) == 2
    assert main(["build", str(tree), "--out", str(store), "--image-size", str(SIZE), "--workers", "0",
                 "--rebuild"]) == 0
    assert main(["info", str(store), "--root", str(tree)]) == 0
    assert_same(open_store(store, "train"), image_folder(str(tree), image_size=SIZE)[0])


def test_two_workers_write_the_same_bytes_as_none(tree, tmp_path):
    build_store(tree, tmp_path / "w0", image_size=SIZE, num_workers=0, chunk=5, progress=False)
    summary = build_store(tree, tmp_path / "w2", image_size=SIZE, num_workers=2, chunk=5, progress=False)
    assert summary["train"]["decoded"] == 18
    w0, w2 = _files(tmp_path / "w0"), _files(tmp_path / "w2")
    assert set(w0) == {"train.npy", "train.json", "val.npy", "val.json"}
    assert _without_time(w0) == _without_time(w2)


def test_unreadable_files_stop_the_build_and_skipping_them_needs_no_second_decode(tree, tmp_path):
    store = tmp_path / "store"
    jpeg = next((tree / "train" / "cow").glob("*.jpg"))
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    (tree / "train" / "ant" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="2 image file.* cannot be decoded") as caught:
        build_store(tree, store, image_size=SIZE, num_workers=0, progress=False)
    message = str(caught.value)
    assert "notes.png (not an image PIL can read)" in message and "truncated" in message
    assert "image_store.skip_unreadable" in message and "--skip-unreadable" in message
    again = build_store(tree, store, image_size=SIZE, num_workers=0, skip_unreadable=True, progress=False)
    assert again["train"]["decoded"] == 0 and again["train"]["skipped"] == 2
    assert again["train"]["images"] == 17
    expected = image_folder(str(tree), image_size=SIZE, skip_unreadable=True)
    got = image_store(str(tree), str(store), image_size=SIZE, skip_unreadable=True, progress=False)
    assert_same(expected[0], got[0])
    assert (store / "train.npy").stat().st_size < 19 * 3 * SIZE * SIZE  # reserved rows cut off
    with pytest.raises(ValueError, match="cannot be decoded"):  # as image_folder refuses the tree
        image_store(str(tree), str(store), image_size=SIZE, progress=False)


def test_a_data_gin_file_can_take_its_protocol_from_the_store(tree, tmp_path):
    gin.parse_config(f"""
        import components.data.store
        image_store.root = '{tree}'
        image_store.store = '{tmp_path / "store"}'
        image_store.image_size = {SIZE}
        image_store.num_workers = 0
        make_protocol.source = @image_store
        make_protocol.new_classes = [2]
    """)
    protocol = make_protocol()
    gin.clear_config()
    memory = make_protocol(source=lambda: image_folder(str(tree), image_size=SIZE), new_classes=[2])
    for part in ("labeled", "stream", "test"):
        assert_same(getattr(memory, part), getattr(protocol, part))


def test_a_missing_tree_or_store_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no ImageFolder tree at"):
        image_store(str(tmp_path / "nothing"), str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match="no finished image store for 'train'.*build"):
        image_store(None, str(tmp_path / "store"))
    assert main(["info", str(tmp_path)]) == 2
    assert "no image store here" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# subsets and joins of a store stay on disk (ImageRows)
# --------------------------------------------------------------------------------------------

def test_rows_of_a_store_read_what_the_tensor_holds_and_join_without_reading():
    g = torch.Generator().manual_seed(0)
    file, other = (torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8) for n in (40, 6))
    rows = ImageRows([file])
    index = torch.tensor([7, 0, 7, 39, 12])
    assert len(rows) == 40 and rows.shape == file.shape and rows.dtype == torch.uint8 and rows.ndim == 4
    assert torch.equal(rows[index], file[index]) and torch.equal(rows[5], file[5])
    assert torch.equal(rows[np.array([3, 1])], file[[3, 1]]) and torch.equal(rows[10:14], file[10:14])
    view = take_images(rows, index)  # rows, not pixels
    assert isinstance(view, ImageRows) and view.bases[0] is file
    mask = np.array([True, False, True, False, True])
    assert torch.equal(take_images(view, mask)[:], file[index][torch.from_numpy(mask)])
    # joining views (and an in-memory tensor) reads the same rows as torch.cat of the copies
    joined = concat_images([view, other, take_images(rows, slice(30, 35)), other])
    copies = torch.cat([file[index], other, file[30:35], other])
    assert isinstance(joined, ImageRows) and len(joined.bases) == 2  # `other` is one base, not two
    order = torch.randperm(len(copies), generator=g)
    assert torch.equal(joined[:], copies) and torch.equal(joined[order], copies[order])
    assert torch.equal(take_images(joined, order)[:], copies[order])
    # tensors alone are joined and taken as before: copies
    assert isinstance(concat_images([other, other]), torch.Tensor)
    assert isinstance(take_images(file, index), torch.Tensor)
    # an encode's data fingerprint is the same for the rows and for the copies
    targets = torch.arange(len(copies))
    assert data_fingerprint(joined, targets, "s") == data_fingerprint(copies, targets, "s")
    shuffled = take_images(joined, order)
    assert data_fingerprint(shuffled, targets, "s") != data_fingerprint(copies, targets, "s")


PHASED = {"phases": [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], "distractor_fraction": 0.05,
          "distractors": Distractors(kinds=("noise", "blank", "saturated"))}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_a_protocol_made_from_a_store_stays_on_disk_and_reads_what_memory_holds(tmp_path):
    n, side = 5000, 64  # 61 MB of training images
    nbytes = n * 3 * side * side
    rng = np.random.default_rng(0)
    classes = [str(c) for c in range(10)]
    targets = {"train": rng.integers(0, 10, n), "test": rng.integers(0, 10, 200)}
    for split, labels in targets.items():
        pixels = rng.integers(0, 256, (len(labels), 3, side, side), dtype=np.uint8)
        write_store(tmp_path / "big", split, pixels, labels, classes, f"big/{split}")
    del pixels
    kwargs = [{"new_classes": [7, 8, 9], "val_per_class": 20, "val_partial": True}, PHASED]
    for settings in kwargs:  # the code paths run once: allocations of their own are not counted
        make_protocol(source=lambda: (open_store(tmp_path / "big", "test"),) * 2, **settings)
    before = _rss_anon()
    train, test = (open_store(tmp_path / "big", split) for split in ("train", "test"))
    lazy = [make_protocol(source=lambda: (train, test), **settings) for settings in kwargs]
    grown = _rss_anon() - before
    assert grown < nbytes / 4, f"making the protocols grew anonymous memory by {grown:,} bytes of {nbytes:,}"
    file = train.images.bases[0]
    for protocol in lazy:
        for part in ("labeled", "val", "stream", "test"):
            images = getattr(protocol, part).images if getattr(protocol, part) else None
            assert images is None or isinstance(images, ImageRows), (part, type(images))
        assert protocol.labeled.images.bases == (file,) and protocol.stream.images.bases[0] is file
    assert len(lazy[1].stream.images.bases) > 1  # the phased stream's distractors joined in memory
    # the same protocols made in memory hold the same pixels, labels and names
    loaded = [ImageSet(s.images[:], s.targets, s.classes, s.name) for s in (train, test)]
    for protocol, settings in zip(lazy, kwargs, strict=True):
        memory = make_protocol(source=lambda: loaded, **settings)
        assert memory.segment_ends == protocol.segment_ends
        for part in ("labeled", "val", "stream", "test"):
            if getattr(memory, part) is not None:
                assert_same(getattr(memory, part), getattr(protocol, part))


LOOPS = {  # short schedules that still discover, distill and promote
    "gin/distill.gin": ["train.epochs = 15", "adapt.epochs = 2", "distill.epochs = 2",
                        "SamplePool.trigger_size = 120", "SemiSupervisedKMeans.n_init = 1",
                        "lifecycle.consolidate = True"],
    "gin/continual.gin": ["adapt.epochs = 5", "distill.epochs = 20", "SemiSupervisedKMeans.n_init = 1",
                          "ClusterAcceptance.resamples = 2"],
}


def _timeless(metrics):
    if isinstance(metrics, dict):
        return {k: _timeless(v) for k, v in metrics.items() if k != "seconds"}
    return [_timeless(v) for v in metrics] if isinstance(metrics, list) else metrics


@pytest.mark.parametrize("gin_file", sorted(LOOPS))
def test_the_loop_from_a_store_ends_with_the_metrics_it_has_in_memory(gin_file, tmp_path, monkeypatch):
    """The digits lifecycle (digits-7/3: train, online, adapt, discover, distill, consolidate)
    and the continual loop (digits-phased, with distractors and an exemplar memory), each once
    on the in-memory digits and once on the same images in a store: every set a stage loads
    batches from is rows of the file, and every metric is the same, bit for bit."""
    from components.data.loading import BatchedImages
    from components.data.sources import digits
    from components.run import main as run

    monkeypatch.chdir(ROOT)
    for split, s in zip(("train", "test"), digits(seed=0), strict=True):
        write_store(tmp_path / "digits", split, s.images, s.targets.tolist(), s.classes, s.name)
    kinds: set[str] = set()
    real = BatchedImages.__init__

    def recording(self, images):  # every image_loader of every stage builds one
        kinds.add(type(images.images).__name__)
        real(self, images)

    monkeypatch.setattr(BatchedImages, "__init__", recording)
    metrics = {}
    for where, source in (("memory", []), ("store", [
            "make_protocol.source = @image_store", "image_store.root = None",
            f"image_store.store = '{tmp_path / 'digits'}'", "image_store.test_dir = 'test'",
            "image_store.image_size = 8"])):
        kinds.clear()
        argv = ["--gin", gin_file, "--run-dir", str(tmp_path / where), "--gin-bindings",
                f"FeatureCache.root = '{tmp_path / where / 'cache'}'"]
        assert run(argv + [a for b in LOOPS[gin_file] + source for a in ("--gin-bindings", b)]) == 0
        metrics[where] = _timeless(json.loads((tmp_path / where / "metrics.json").read_text()))
        assert kinds == {"Tensor" if where == "memory" else "ImageRows"}, kinds
    assert metrics["store"] == metrics["memory"]
    if gin_file == "gin/distill.gin":
        assert metrics["memory"]["pool"]["size"] > 0 and "consolidation" in metrics["memory"]
    else:  # a promoted round: the memory holds stream images too when it is read again
        assert any(r["promotion"]["decision"] == "promoted" for r in metrics["memory"]["rounds"])
