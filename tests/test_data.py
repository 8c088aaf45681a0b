"""Data: long-tail counts, the split rule, sources (in their real on-disk layouts), loading,
and batched augmentation. Everything is tiny; no download, no real CIFAR/TinyImageNet."""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from components.data import sources
from components.data.loading import BatchAugment, class_balanced_weights, image_loader
from components.data.sources import ImageSet, digits, image_folder, torchvision_dataset
from components.data.splits import long_tail_counts, make_protocol, superclass_members

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# long_tail_counts
# --------------------------------------------------------------------------------------------


def test_exp_profile_reproduces_cifar10_lt():
    counts = long_tail_counts(10, 5000, 100, "exp")
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12_406


def test_exp_profile_reproduces_cifar100_lt():
    counts = long_tail_counts(100, 500, 100, "exp")
    assert len(counts) == 100
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == 10_847


def test_exp_profile_matches_formula():
    c, n_max, ratio = 7, 61, 10
    expected = [int(n_max * (1 / ratio) ** (i / (c - 1))) for i in range(c)]
    assert long_tail_counts(c, n_max, ratio) == expected
    assert long_tail_counts(5, 40, 1.0) == [40] * 5  # ratio 1: balanced


def test_step_profile_hand_computed():
    # first C // 2 = 2 classes keep n_max, the other 3 get int(100 / 3) = 33
    assert long_tail_counts(5, 100, 3, "step") == [100, 100, 33, 33, 33]
    assert long_tail_counts(4, 50, 10, "step") == [50, 50, 5, 5]


def test_ratio_below_one_raises():
    with pytest.raises(ValueError, match=r"ratio.*>= 1.*0\.5"):
        long_tail_counts(10, 100, 0.5)


def test_unknown_profile_raises_and_names_choices():
    with pytest.raises(ValueError, match=r"'linear'.*'exp'.*'step'"):
        long_tail_counts(10, 100, 10, "linear")


# --------------------------------------------------------------------------------------------
# make_protocol
# --------------------------------------------------------------------------------------------


def _indexed_set(class_sizes: list[int], seed: int = 0) -> ImageSet:
    """A synthetic training set whose images encode their own index (two bytes), labels shuffled
    so that classes are interleaved."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(class_sizes)])
    labels = np.random.default_rng(seed).permutation(labels)
    n = len(labels)
    idx = np.arange(n)
    images = np.zeros((n, 1, 1, 2), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = idx // 256, idx % 256
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels),
                    [f"class{c}" for c in range(len(class_sizes))], "indexed")


def _decode(images: torch.Tensor) -> np.ndarray:
    pixels = images.numpy().astype(np.int64)
    return pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1]


SIZES = [40, 41, 38, 39, 44, 37]  # odd sizes too: the second half gets the extra image
NEW = [1, 3]
OLD = [0, 2, 4, 5]


@pytest.fixture
def indexed_protocol():
    train = _indexed_set(SIZES)
    test = _indexed_set([3] * len(SIZES), seed=1)
    return train, test, make_protocol(
        source=None, new_classes=NEW, ratio=4, seed=0, source_sets=(train, test)
    )


def test_protocol_labeled_set_has_only_old_classes_with_profile_counts(indexed_protocol):
    train, _, p = indexed_protocol
    assert (p.n_old, p.n_new, p.num_classes) == (4, 2, 6)
    n_max = min(SIZES[c] // 2 for c in OLD)  # default: smallest first half among old classes
    assert p.train_counts == long_tail_counts(4, n_max, 4)
    assert int(p.labeled.targets.max()) < p.n_old
    counts = torch.bincount(p.labeled.targets, minlength=p.n_old).tolist()
    assert counts == p.train_counts
    # the remapped label of every labeled image is the rank of its original class among OLD
    original = train.targets.numpy()[_decode(p.labeled.images)]
    assert (p.labeled.targets.numpy() == np.array([OLD.index(c) for c in original])).all()


def test_protocol_remaps_new_classes_after_old(indexed_protocol):
    train, test, p = indexed_protocol
    order = OLD + NEW
    assert p.class_names == [f"class{c}" for c in order]
    assert p.labeled.classes == p.stream.classes == p.test.classes == p.class_names
    original = train.targets.numpy()[_decode(p.stream.images)]
    assert (p.stream.targets.numpy() == np.array([order.index(c) for c in original])).all()
    # new classes are n_old, n_old + 1 in the order given
    assert set(p.stream.targets[np.isin(original, NEW)].tolist()) == {4, 5}
    # test keeps the official split, remapped the same way
    original_test = test.targets.numpy()[_decode(p.test.images)]
    assert len(p.test) == len(test)
    assert (p.test.targets.numpy() == np.array([order.index(c) for c in original_test])).all()


def test_protocol_stream_is_the_second_half_of_every_class(indexed_protocol):
    train, _, p = indexed_protocol
    labeled_idx, stream_idx = _decode(p.labeled.images), _decode(p.stream.images)
    assert len(np.unique(labeled_idx)) == len(labeled_idx)
    assert len(np.unique(stream_idx)) == len(stream_idx)
    assert np.intersect1d(labeled_idx, stream_idx).size == 0  # disjoint by index
    targets = train.targets.numpy()
    for c, size in enumerate(SIZES):
        in_stream = (targets[stream_idx] == c).sum()
        assert in_stream == size - size // 2, f"class {c}"
    # the first half of each new class is not used anywhere
    used = np.concatenate([labeled_idx, stream_idx])
    for c in NEW:
        assert (targets[used] == c).sum() == SIZES[c] - SIZES[c] // 2
    # the stream is shuffled, not grouped by class
    s = p.stream.targets.numpy()
    assert (np.diff(s) != 0).sum() > len(SIZES)


def test_protocol_labeled_comes_from_first_half_only():
    """With n_max equal to the first-half size, old class c labels all of its first half and the
    stream all of its second half: together exactly the class, no image twice."""
    train = _indexed_set(SIZES)
    p = make_protocol(source=None, new_classes=NEW, ratio=1, seed=3,
                      n_max=min(SIZES[c] // 2 for c in OLD), source_sets=(train, train))
    targets = train.targets.numpy()
    labeled_idx, stream_idx = _decode(p.labeled.images), _decode(p.stream.images)
    c = OLD[int(np.argmin([SIZES[c] // 2 for c in OLD]))]  # the class whose half is fully used
    together = np.concatenate([labeled_idx[targets[labeled_idx] == c],
                               stream_idx[targets[stream_idx] == c]])
    assert sorted(together.tolist()) == np.flatnonzero(targets == c).tolist()


def test_protocol_is_deterministic_in_seed():
    train = _indexed_set(SIZES)

    def indices(seed):
        p = make_protocol(source=None, new_classes=NEW, ratio=4, seed=seed,
                          source_sets=(train, train))
        return _decode(p.labeled.images), _decode(p.stream.images)

    a, b, c = indices(0), indices(0), indices(1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(np.sort(a[0]), np.sort(c[0]))  # different images kept
    assert not np.array_equal(a[1], c[1])


def test_protocol_halve_false_gives_empty_stream():
    train = _indexed_set(SIZES)
    p = make_protocol(source=None, new_classes=NEW, ratio=4, halve=False,
                      source_sets=(train, train))
    assert len(p.stream) == 0
    assert p.stream.images.shape[1:] == train.images.shape[1:]
    n_max = min(SIZES[c] for c in OLD)  # whole classes now
    assert p.train_counts == long_tail_counts(4, n_max, 4)
    assert torch.bincount(p.labeled.targets).tolist() == p.train_counts


def test_protocol_class_with_zero_images_warns_and_keeps_one():
    train = _indexed_set(SIZES)
    assert long_tail_counts(4, 5, 10)[-1] == 0  # the profile would give the last class nothing
    with pytest.warns(UserWarning, match="0 images"):
        p = make_protocol(source=None, new_classes=NEW, ratio=10, n_max=5,
                          source_sets=(train, train))
    assert p.train_counts[-1] == 1
    assert (p.labeled.targets == p.n_old - 1).sum() == 1


def test_protocol_rejects_bad_classes_and_too_large_n_max():
    train = _indexed_set(SIZES)
    with pytest.raises(ValueError, match="do not occur"):
        make_protocol(source=None, new_classes=[17], source_sets=(train, train))
    with pytest.raises(ValueError, match="images"):
        make_protocol(source=None, new_classes=NEW, n_max=1000, source_sets=(train, train))


def test_protocol_digits_7_3():
    train, test = digits(seed=0)
    assert len(train) + len(test) == 1797
    p = make_protocol(source=digits, new_classes=[7, 8, 9], ratio=10, seed=0, name="digits-7/3")
    sizes = torch.bincount(train.targets).tolist()
    n_max = min(sizes[c] // 2 for c in range(7))
    assert p.train_counts == long_tail_counts(7, n_max, 10)
    assert torch.bincount(p.labeled.targets, minlength=7).tolist() == p.train_counts
    assert p.labeled.targets.max() == 6
    assert len(p.stream) == sum(n - n // 2 for n in sizes)
    assert sorted(torch.unique(p.stream.targets).tolist()) == list(range(10))
    assert len(p.test) == len(test)
    assert p.class_names == [str(c) for c in range(10)]  # digits 0..9 keep their order
    assert p.labeled.images.dtype == torch.uint8 and p.labeled.images.shape[1:] == (1, 8, 8)


# --------------------------------------------------------------------------------------------
# superclass_members
# --------------------------------------------------------------------------------------------


def test_superclass_vehicles_1():
    # bicycle 8, bus 13, motorcycle 48, pickup_truck 58, train 90 (CIFAR-100 fine ids)
    assert superclass_members(["vehicles_1"]) == [8, 13, 48, 58, 90]


def test_superclass_union_and_table_sanity():
    # vehicles_2: lawn_mower 41, rocket 69, streetcar 81, tank 85, tractor 89
    both = superclass_members(["vehicles_1", "vehicles_2"])
    assert both == [8, 13, 41, 48, 58, 69, 81, 85, 89, 90]
    # aquatic_mammals: beaver, dolphin, otter, seal, whale
    assert superclass_members(["aquatic_mammals"]) == [4, 30, 55, 72, 95]
    from components.data.splits import CIFAR100_SUPERCLASSES
    everything = superclass_members(CIFAR100_SUPERCLASSES)
    assert everything == list(range(100))  # 20 superclasses x 5 fine classes, a partition
    for name in CIFAR100_SUPERCLASSES:
        assert len(superclass_members([name])) == 5, name


def test_superclass_unknown_name_raises():
    with pytest.raises(ValueError, match="vehicles_3"):
        superclass_members(["vehicles_3"])


# --------------------------------------------------------------------------------------------
# torchvision_dataset on files in torchvision's exact on-disk layout
# --------------------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


def _py2_pickle(obj, py2_strings: set[str]) -> bytes:
    """Pickle like the real CIFAR files (Python 2 pickles): the given strings become Python 2
    ``str`` (SHORT_BINSTRING), which ``pickle.load(encoding='bytes')`` returns as ``b'data'``
    and torchvision's ``encoding='latin1'`` as ``'data'``."""
    data = pickle.dumps(obj, protocol=2)
    ops = list(pickletools.genops(data))
    out = bytearray(data[: ops[0][2]])
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
        if op.name == "BINUNICODE" and arg in py2_strings and arg.isascii() and len(arg) < 256:
            out += b"U" + bytes([len(arg)]) + arg.encode("ascii")
        else:
            out += data[pos:end]
    return bytes(out)


def _cifar_pixels(n: int, offset: int) -> np.ndarray:
    """Rows of 3072 = R plane, G plane, B plane, each 32x32 row-major (the CIFAR format);
    value at (n, c, h, w) = (offset + n * 17 + c * 101 + h * 7 + w * 3) % 256."""
    n_, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32),
                              indexing="ij")
    values = ((offset + n_ * 17 + c * 101 + h * 7 + w * 3) % 256).astype(np.uint8)
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):  # explicit, independent of any reshape in the code under test
        for ch in range(3):
            for row in range(32):
                start = ch * 1024 + row * 32
                rows[i, start:start + 32] = values[i, ch, row]
    return rows


def _write_cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    keys = {"data", "labels", "batch_label", "filenames", "label_names"} | set(CIFAR10_NAMES)
    train_labels, train_pixels = [], []
    for b in range(1, 6):
        labels = [(2 * b) % 10, (2 * b + 1) % 10]
        pixels = _cifar_pixels(2, offset=b)
        train_labels += labels
        train_pixels.append(pixels)
        batch = {"batch_label": f"training batch {b} of 5", "labels": labels, "data": pixels,
                 "filenames": [f"img_{b}_{i}.png" for i in range(2)]}
        (folder / f"data_batch_{b}").write_bytes(_py2_pickle(batch, keys))
    test_pixels = _cifar_pixels(3, offset=99)
    test = {"batch_label": "testing batch 1 of 1", "labels": [9, 0, 4], "data": test_pixels,
            "filenames": ["t0.png", "t1.png", "t2.png"]}
    (folder / "test_batch").write_bytes(_py2_pickle(test, keys))
    meta = {"num_cases_per_batch": 2, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta, keys))
    return {"train_labels": train_labels, "test_labels": [9, 0, 4], "folder": folder}


@pytest.fixture
def cifar_md5_ignored(monkeypatch):
    """torchvision compares md5 sums of the real CIFAR files (in ``_check_integrity`` and, for
    batches.meta, in ``_load_meta`` through the module's ``check_integrity``); our tiny files
    cannot match them, so integrity is reduced to "the file exists"."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_fake_cifar_files_have_the_real_pickle_layout(tmp_dir):
    info = _write_cifar10(tmp_dir)
    with open(info["folder"] / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)
    assert isinstance(entry[b"labels"], list)
    with open(info["folder"] / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"label_names"][0] == b"airplane"


def test_torchvision_cifar10(tmp_dir, cifar_md5_ignored):
    info = _write_cifar10(tmp_dir)
    train, test = torchvision_dataset("CIFAR10", root=str(tmp_dir))
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.targets.tolist() == info["train_labels"]
    assert test.targets.tolist() == info["test_labels"]
    assert train.classes == CIFAR10_NAMES == test.classes
    # pixel layout: value of (n, c, h, w) lands at images[n, c, h, w]
    n, c, h, w = 1, 2, 5, 30  # test image 1, blue plane, row 5, column 30
    assert int(test.images[n, c, h, w]) == (99 + n * 17 + c * 101 + h * 7 + w * 3) % 256
    n, c, h, w = np.indices((2, 3, 32, 32))
    expected = np.concatenate([(b + n * 17 + c * 101 + h * 7 + w * 3) % 256 for b in range(1, 6)])
    expected = expected.astype(np.uint8)
    assert np.array_equal(train.images.numpy(), expected)


def test_torchvision_cifar100_fine_labels(tmp_dir, cifar_md5_ignored):
    folder = tmp_dir / "cifar-100-python"
    folder.mkdir()
    fine_names = [f"fine{i}" for i in range(100)]
    keys = {"data", "fine_labels", "coarse_labels", "filenames", "batch_label",
            "fine_label_names", "coarse_label_names"} | set(fine_names)
    for split, labels in (("train", [8, 13, 90]), ("test", [58, 48])):
        entry = {"filenames": ["x.png"] * len(labels), "batch_label": split,
                 "fine_labels": labels, "coarse_labels": [18] * len(labels),
                 "data": _cifar_pixels(len(labels), offset=len(split))}
        (folder / split).write_bytes(_py2_pickle(entry, keys))
    meta = {"fine_label_names": fine_names, "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(_py2_pickle(meta, keys))
    train, test = torchvision_dataset("CIFAR100", root=str(tmp_dir))
    assert train.images.shape == (3, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert train.targets.tolist() == [8, 13, 90] and test.targets.tolist() == [58, 48]
    assert train.classes == fine_names
    assert int(test.images[1, 1, 31, 0]) == (4 + 1 * 17 + 1 * 101 + 31 * 7) % 256


def test_missing_cifar10_message_names_the_folder_torchvision_reads(tmp_dir):
    with pytest.raises(FileNotFoundError) as info:
        torchvision_dataset("CIFAR10", root=str(tmp_dir))
    message = str(info.value)
    assert str(tmp_dir.resolve() / "cifar-10-batches-py") in message
    assert str(tmp_dir.resolve() / "CIFAR10") not in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte, then the number of dimensions
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_fashion_mnist(tmp_dir):
    raw = tmp_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    train_y, test_y = np.array([0, 9, 3, 3, 7]), np.array([1, 8])
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    train, test = torchvision_dataset("FashionMNIST", root=str(tmp_dir))
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (2, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), train_x)
    assert np.array_equal(test.images[:, 0].numpy(), test_x)
    assert train.targets.tolist() == train_y.tolist() and test.targets.tolist() == test_y.tolist()
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10


def test_torchvision_missing_dataset_names_the_path(tmp_dir, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_dir / "no-debian-package"))
    missing = tmp_dir / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        torchvision_dataset("CIFAR10", root=str(missing))
    assert str(missing.resolve()) in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        torchvision_dataset("FashionMNIST", root=str(missing))
    message = str(info.value)
    assert str(missing.resolve()) in message and "apt-get install dataset-fashion-mnist" in message


def test_fashion_mnist_is_unpacked_from_the_debian_package(tmp_dir, monkeypatch):
    """With Debian's dataset-fashion-mnist installed, the loader un-gzips it on first use."""
    debian = tmp_dir / "debian"
    debian.mkdir()
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([1, 2, 3, 9]),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([0, 5]),
    }
    for stem, array in arrays.items():
        _write_idx(tmp_dir / stem, array)
        (debian / f"{stem}.gz").write_bytes(gzip.compress((tmp_dir / stem).read_bytes()))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(debian))
    train, test = torchvision_dataset("FashionMNIST", root=str(tmp_dir / "root"))
    assert train.targets.tolist() == [1, 2, 3, 9] and test.targets.tolist() == [0, 5]
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert not list((tmp_dir / "root" / "FashionMNIST" / "raw").glob("*.tmp"))


def test_fashion_mnist_unpacks_while_another_run_unpacks_it_too(tmp_dir, monkeypatch):
    """Two runs started together (a suite's jobs side by side) unpack the same files at once:
    here a second unpack runs to its end while the first is half-way through a file. Both end
    with whole files and no temporary left (a shared temporary name made the first one's rename
    fail: "No such file or directory: '.train-images-idx3-ubyte.tmp'")."""
    import shutil

    debian = tmp_dir / "debian"
    debian.mkdir()
    rng = np.random.default_rng(2)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.array([4, 0, 7]),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (1, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.array([8])}
    for stem, array in arrays.items():
        _write_idx(tmp_dir / stem, array)
        (debian / f"{stem}.gz").write_bytes(gzip.compress((tmp_dir / stem).read_bytes()))
    root = tmp_dir / "root"
    copy, calls = shutil.copyfileobj, []

    def interrupted_copy(src, dst, *args):
        dst.write(src.read(100))  # half-way through the first file, the other run does it all
        if not calls:
            calls.append(1)
            monkeypatch.setattr(shutil, "copyfileobj", copy)
            sources.fashion_mnist_from_debian(str(root), str(debian))
        copy(src, dst, *args)

    monkeypatch.setattr(shutil, "copyfileobj", interrupted_copy)
    raw = sources.fashion_mnist_from_debian(str(root), str(debian))
    assert calls  # the second unpack did run in the middle of the first
    for stem in arrays:
        assert (raw / stem).read_bytes() == (tmp_dir / stem).read_bytes()
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)


def test_torchvision_unknown_name_raises():
    with pytest.raises(ValueError, match="NoSuchSet"):
        torchvision_dataset("NoSuchSet", root="unused")


# --------------------------------------------------------------------------------------------
# image_folder
# --------------------------------------------------------------------------------------------

COLORS = {"cat": (10, 200, 30), "dog": (250, 5, 120)}


def _write_tree(root: Path, splits=("train", "val")) -> None:
    from PIL import Image

    for split, per_class in zip(splits, (2, 1), strict=True):
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (24, 20), color).save(folder / f"{i}.png")
    # one grayscale image: must come back as 3 equal channels
    Image.new("L", (12, 12), 77).save(root / splits[0] / "dog" / "gray.png")


def test_image_folder_loads_and_resizes(tmp_dir):
    _write_tree(tmp_dir)
    train, test = image_folder(str(tmp_dir), image_size=16)
    assert train.images.shape == (5, 3, 16, 16) and train.images.dtype == torch.uint8
    assert test.images.shape == (2, 3, 16, 16)
    assert train.classes == ["cat", "dog"] == test.classes
    assert train.targets.tolist() == [0, 0, 1, 1, 1] and test.targets.tolist() == [0, 1]
    # files sort as 0.png, 1.png, gray.png inside dog: uniform colours survive the resize
    for i, color in enumerate([COLORS["cat"]] * 2 + [COLORS["dog"]] * 2):
        assert (train.images[i] == torch.tensor(color, dtype=torch.uint8)[:, None, None]).all()
    assert (train.images[4] == 77).all()


def test_image_folder_missing_split_names_the_path(tmp_dir):
    _write_tree(tmp_dir)
    with pytest.raises(FileNotFoundError) as info:
        image_folder(str(tmp_dir), test_dir="test", image_size=16)
    assert str((tmp_dir / "test").resolve()) in str(info.value)


# --------------------------------------------------------------------------------------------
# image_loader
# --------------------------------------------------------------------------------------------


def _tiny_set(labels: list[int]) -> ImageSet:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).clone()
    return ImageSet(images, torch.tensor(labels), [str(c) for c in sorted(set(labels))])


def test_image_loader_yields_uint8_targets_and_indices():
    data = _tiny_set([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    batches = list(image_loader(data, batch_size=4, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    images, targets, index = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 2, 2)
    assert index.tolist() == [0, 1, 2, 3]
    assert torch.equal(images, data.images[index]) and torch.equal(targets, data.targets[index])
    # shuffled with a seed: every image exactly once per epoch, same order for the same seed
    seen = torch.cat([b[2] for b in image_loader(data, batch_size=3, seed=5)])
    again = torch.cat([b[2] for b in image_loader(data, batch_size=3, seed=5)])
    assert sorted(seen.tolist()) == list(range(10)) and torch.equal(seen, again)
    assert len(list(image_loader(data, batch_size=4, drop_last=True))) == 2
    with pytest.raises(ValueError, match="sampler"):
        image_loader(data, sampler="uniform")


def test_class_balanced_sampling_is_roughly_uniform_over_classes():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    data = _tiny_set(labels)
    weights = class_balanced_weights(data.targets)
    expected = torch.tensor([1 / 90, 1 / 9, 1.0], dtype=torch.double)
    assert torch.allclose(weights[[0, 90, 99]], expected)
    loader = image_loader(data, batch_size=50, sampler="class_balanced", seed=0)
    drawn = torch.cat([targets for _ in range(30) for _, targets, _ in loader])
    assert len(drawn) == 3000
    share = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.04), share
    # the instance sampler would give the rare class ~1 %
    plain = torch.cat([t for _, t, _ in image_loader(data, batch_size=50, seed=0)])
    assert (plain == 2).sum() == 1


# --------------------------------------------------------------------------------------------
# BatchAugment
# --------------------------------------------------------------------------------------------


def _ramp(n: int, c: int, h: int, w: int) -> torch.Tensor:
    return (torch.arange(n * c * h * w) * 7 % 251 + 1).to(torch.uint8).reshape(n, c, h, w)


def test_batch_augment_eval_is_plain_normalization():
    x = _ramp(3, 3, 5, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    aug = BatchAugment(mean, std, pad=2, flip=True, degrees=30, translate=0.2, scale=(0.8, 1.2))
    aug.eval()
    m, sd = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    expected = (x.float() / 255 - m) / sd
    assert torch.allclose(aug(x), expected, atol=1e-6)


def test_batch_augment_pad_crop_is_a_shifted_window():
    torch.manual_seed(0)
    n, p = 24, 2
    x = _ramp(n, 2, 4, 5)
    aug = BatchAugment((0.5,), (0.5,), pad=p).train()
    out = aug(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x.float() / 255, (p, p, p, p))
    offsets = set()
    for i in range(n):
        found = [(top, left) for top in range(2 * p + 1) for left in range(2 * p + 1)
                 if torch.allclose(out[i], (padded[i, :, top:top + 4, left:left + 5] - 0.5) / 0.5,
                                   atol=1e-6)]
        assert len(found) == 1, f"sample {i} is not one window of the padded input"
        offsets.add(found[0])
    assert len(offsets) > 1  # offsets are drawn per sample


def test_batch_augment_flip_is_per_sample():
    torch.manual_seed(0)
    x = _ramp(16, 1, 3, 4)
    out = BatchAugment(flip=True).train()(x)
    plain = (x.float() / 255 - 0.5) / 0.5
    flipped = [torch.allclose(out[i], plain[i].flip(-1), atol=1e-6) for i in range(16)]
    kept = [torch.allclose(out[i], plain[i], atol=1e-6) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_batch_augment_affine_keeps_shape_and_changes_pixels():
    torch.manual_seed(0)
    x = _ramp(4, 3, 8, 8)
    aug = BatchAugment(degrees=20, translate=0.25, scale=(0.7, 1.3))
    out = aug.train()(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out, aug.eval()(x))


def test_batch_augment_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        BatchAugment()(torch.zeros(1, 1, 4, 4))


def test_no_warning_from_plain_protocol():
    train = _indexed_set(SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_protocol(source=None, new_classes=NEW, ratio=4, source_sets=(train, train))


def test_split_seed_draws_the_new_classes_and_the_rank_order(tmp_path):
    """Random protocols by seed: the classes drawn are the same for one split_seed, differ across
    them, keep the asked sizes, and the images still follow ``seed``."""
    from components.data import make_protocol
    from components.data.sources import digits

    sets = digits()

    def protocol(**kw):
        return make_protocol(source=None, source_sets=sets, ratio=10, val_per_class=5, val_partial=True, **kw)

    a, b = protocol(split_seed=1, n_new=3), protocol(split_seed=1, n_new=3)
    c = protocol(split_seed=2, n_new=3)
    assert a.class_names == b.class_names and a.name == "protocol/split1"
    assert a.n_new == 3 and a.n_old == 7
    assert a.class_names != c.class_names  # another split, other classes (or another rank order)
    drawn = [protocol(split_seed=s, n_new=3).class_names[7:] for s in range(6)]
    assert len({tuple(d) for d in drawn}) > 3  # six seeds, at least four different sets of new classes
    # the long-tail profile follows the drawn rank order: the head class has the most images
    counts = torch.bincount(a.labeled.targets, minlength=7)
    assert counts[0] == counts.max() and counts[6] == counts.min()
    # phases keep their sizes, their classes are drawn
    phased = protocol(split_seed=3, phases=[[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert [len(p) for p in phased.phases] == [5, 2, 3] and phased.n_new == 5
    with pytest.raises(ValueError, match="only with a split_seed"):
        protocol(new_classes=[7, 8, 9], n_new=3)
    with pytest.raises(ValueError, match="n_new must be between 1 and 9"):
        protocol(split_seed=0, n_new=10)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "gin").rglob("*.gin")
                                        if "BatchAugment." in p.read_text()))
def test_a_file_that_sets_augmentation_sets_all_of_it(path):
    """Data files compose by ``include``: one included after another must leave nothing of the
    other's augmentation behind (fmnist after digits kept the digits' rotation), so a file
    that binds ``BatchAugment`` binds every parameter of it."""
    import inspect

    wanted = set(inspect.signature(BatchAugment.__init__).parameters) - {"self"}
    bound = set(re.findall(r"^BatchAugment\.(\w+)\s*=", (ROOT / path).read_text(), re.M))
    assert bound == wanted, f"{path} leaves BatchAugment.{sorted(wanted - bound)} to whatever came before"
