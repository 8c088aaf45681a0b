"""The data files of the named datasets (gin/data/cifar10.gin, cifar100.gin, tinyimagenet.gin,
miniimagenet.gin) driven through their loaders and ``make_protocol`` on small files written here
in each dataset's exact on-disk layout, the message when the files are absent, and every data
file composing with gin/distill.gin by ``include``.

Each image's pixels encode its class (a solid colour), so a test can tell that labels and images
stay together through the loader.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from test_data import _py2_pickle  # CIFAR's Python 2 pickles, written as tests/test_data.py does

from components.data.splits import long_tail_counts, make_protocol
from components.run import main, parse_config

ROOT = Path(__file__).resolve().parents[1]

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile "
    "cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp "
    "lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree "
    "orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum "
    "rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider "
    "squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
# The fine classes of the four superclasses gin/data/cifar100.gin holds out, from the CIFAR-100
# page (https://www.cs.toronto.edu/~kriz/cifar.html), written out here independently of the table
# in components/data/splits.py.
HELD_OUT_SUPERCLASSES = {
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
}


def _colour(target: int) -> tuple[int, int, int]:
    """The solid colour of every image of class ``target`` (distinct for 200 classes)."""
    return (target, 255 - target, (target * 7) % 256)


def _protocol(data_file: str, *bindings: str):
    """Parse gin/distill.gin with the data file included as a command-line binding (the way the
    docs show), then build the protocol the data file configures."""
    parse_config(["gin/distill.gin"], [f"include '{data_file}'", *bindings])
    return make_protocol()


def _check_split_rule(protocol, train_per_class: dict[int, int], test_per_class: dict[int, int],
                      ratio: float) -> None:
    """Counts by the split rule: labeled = the long-tail profile over the old classes' first
    halves (a 0 raised to 1), stream = every class's second half, test = every test image."""
    n_max = min(train_per_class[c] // 2 for c in range(protocol.n_old))
    expected = [max(1, n) for n in long_tail_counts(protocol.n_old, n_max, ratio, "exp")]
    assert protocol.train_counts == expected
    assert torch.bincount(protocol.labeled.targets, minlength=protocol.n_old).tolist() == expected
    assert len(protocol.stream) == sum(n - n // 2 for n in train_per_class.values())
    assert set(protocol.stream.targets.tolist()) == set(range(protocol.num_classes))
    assert len(protocol.test) == sum(test_per_class.values())
    assert protocol.val is not None and protocol.val.targets.max() < protocol.n_old


def _pixels_follow_labels(images, classes_by_id: list[int]) -> None:
    """Every image is its class's solid colour (JPEG: within a few levels)."""
    for subset in images:
        red = subset.images[:, 0].float().mean((1, 2))
        truth = torch.tensor([classes_by_id[t] for t in subset.targets.tolist()], dtype=torch.float)
        assert (red - truth).abs().max() < 4, subset.name


# --------------------------------------------------------------------------- CIFAR (torchvision's pickles)




def _cifar_rows(labels: list[int]) -> np.ndarray:
    """Rows of 3,072 bytes, the R, G and B planes of 32×32 each, row-major (the CIFAR format),
    every image the solid colour of its class."""
    return np.stack([np.repeat(np.array(_colour(t), np.uint8), 1024) for t in labels])


def _write_cifar10(root: Path, train_per_class: int, test_per_class: int) -> None:
    """cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta, as in cifar-10-python.tar.gz."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    keys = {"data", "labels", "batch_label", "filenames", "label_names", "num_cases_per_batch",
            "num_vis", *CIFAR10_NAMES}
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), train_per_class)).tolist()
    for b, part in enumerate(np.array_split(np.array(labels), 5), 1):
        batch = {"batch_label": f"training batch {b} of 5", "labels": part.tolist(),
                 "data": _cifar_rows(part.tolist()),
                 "filenames": [f"img_{b}_{i}.png" for i in range(len(part))]}
        (folder / f"data_batch_{b}").write_bytes(_py2_pickle(batch, keys))
    test_labels = np.repeat(np.arange(10), test_per_class).tolist()
    test = {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": _cifar_rows(test_labels),
            "filenames": [f"t{i}.png" for i in range(len(test_labels))]}
    (folder / "test_batch").write_bytes(_py2_pickle(test, keys))
    meta = {"num_cases_per_batch": len(labels) // 5, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta, keys))


def _write_cifar100(root: Path, train_per_class: int, test_per_class: int) -> None:
    """cifar-100-python/: train, test, meta, as in cifar-100-python.tar.gz (fine and coarse labels)."""
    from components.data.splits import CIFAR100_COARSE, CIFAR100_SUPERCLASSES

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    keys = {"data", "fine_labels", "coarse_labels", "filenames", "batch_label", "fine_label_names",
            "coarse_label_names", *CIFAR100_NAMES, *CIFAR100_SUPERCLASSES}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.random.default_rng(1).permutation(np.repeat(np.arange(100), per_class)).tolist()
        entry = {"filenames": [f"{split}_{i}.png" for i in range(len(fine))], "batch_label": split,
                 "fine_labels": fine, "coarse_labels": [CIFAR100_COARSE[f] for f in fine],
                 "data": _cifar_rows(fine)}
        (folder / split).write_bytes(_py2_pickle(entry, keys))
    meta = {"fine_label_names": CIFAR100_NAMES, "coarse_label_names": CIFAR100_SUPERCLASSES}
    (folder / "meta").write_bytes(_py2_pickle(meta, keys))


@pytest.fixture
def cifar_md5_ignored(monkeypatch):
    """torchvision checks the md5 sums of the real CIFAR files; these tiny ones cannot match, so
    integrity is reduced to "the file exists" (as tests/test_data.py does)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_gin_gives_the_5_5_protocol(tmp_dir, cifar_md5_ignored):
    _write_cifar10(tmp_dir, train_per_class=40, test_per_class=3)
    with pytest.warns(UserWarning, match="keeping 1"):  # 20 first-half images at ratio 100
        protocol = _protocol("gin/data/cifar10.gin", f"torchvision_dataset.root = '{tmp_dir}'")
    assert protocol.name == "cifar10-5/5" and (protocol.n_old, protocol.n_new) == (5, 5)
    assert protocol.class_names == CIFAR10_NAMES  # old 0-4 then new 5-9, in id order
    assert protocol.labeled.images.shape[1:] == (3, 32, 32)
    _check_split_rule(protocol, dict.fromkeys(range(10), 40), dict.fromkeys(range(10), 3), 100)
    _pixels_follow_labels([protocol.labeled, protocol.stream, protocol.test], list(range(10)))
    assert gin.query_parameter("TorchvisionBackbone.cifar_stem") is True
    assert gin.query_parameter("BatchAugment.pad") == 4 and gin.query_parameter("BatchAugment.degrees") == 0


def test_cifar100_gin_holds_out_whole_superclasses(tmp_dir, cifar_md5_ignored):
    _write_cifar100(tmp_dir, train_per_class=10, test_per_class=2)
    with pytest.warns(UserWarning, match="keeping 1"):
        protocol = _protocol("gin/data/cifar100.gin", f"torchvision_dataset.root = '{tmp_dir}'")
    assert protocol.name == "cifar100-80/20-super" and (protocol.n_old, protocol.n_new) == (80, 20)
    new = protocol.class_names[protocol.n_old:]
    assert sorted(new) == sorted(name for names in HELD_OUT_SUPERCLASSES.values() for name in names)
    assert set(HELD_OUT_SUPERCLASSES["vehicles_1"]) <= set(new)
    old = protocol.class_names[: protocol.n_old]
    assert old == [n for n in CIFAR100_NAMES if n not in new]  # ranked by fine class id
    assert set(protocol.labeled.targets.tolist()) == set(range(80))
    _check_split_rule(protocol, dict.fromkeys(range(100), 10), dict.fromkeys(range(100), 2), 100)
    by_id = [CIFAR100_NAMES.index(n) for n in protocol.class_names]  # remapped id -> fine id
    _pixels_follow_labels([protocol.labeled, protocol.stream, protocol.test], by_id)


# --------------------------------------------------------------------------- Tiny-ImageNet (JPEG tree)


def _jpeg(path: Path, colour: tuple[int, int, int], size: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).convert(mode).save(path, "JPEG", quality=95)


def _tiny_wnids(n: int = 200) -> list[str]:
    return [f"n{1000000 + 7919 * i:08d}" for i in range(n)]  # increasing: sorted = this order


def _write_tiny_imagenet(root: Path, train_per_class: int, val_per_class: int) -> Path:
    """tiny-imagenet-200/ as unzipped: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG
    with <wnid>_boxes.txt, val/images/val_<i>.JPEG with val/val_annotations.txt, test/images/."""
    base = root / "tiny-imagenet-200"
    wnids = _tiny_wnids()
    shuffled = [wnids[i] for i in np.random.default_rng(2).permutation(len(wnids))]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in shuffled))  # not sorted, as the real one
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, object {i}\n" for i, w in enumerate(wnids)))
    for target, wnid in enumerate(wnids):
        folder = base / "train" / wnid
        for i in range(train_per_class):
            if (target, i) == (3, 0):  # a few real ones are grayscale: read back as RGB
                _jpeg(folder / "images" / f"{wnid}_{i}.JPEG", (target,) * 3, 64, "L")
            else:
                _jpeg(folder / "images" / f"{wnid}_{i}.JPEG", _colour(target), 64)
        (folder / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(train_per_class)))
    lines, k = [], 0
    for _ in range(val_per_class):
        for target in np.random.default_rng(3).permutation(len(wnids)):
            _jpeg(base / "val" / "images" / f"val_{k}.JPEG", _colour(int(target)), 64)
            lines.append(f"val_{k}.JPEG\t{wnids[target]}\t1\t2\t60\t61\n")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    _jpeg(base / "test" / "images" / "test_0.JPEG", (9, 9, 9), 64)  # unlabeled: never read
    return base


def test_tinyimagenet_gin_gives_the_180_20_protocol(tmp_dir):
    base = _write_tiny_imagenet(tmp_dir, train_per_class=4, val_per_class=1)
    with pytest.warns(UserWarning, match="keeping 1"):
        protocol = _protocol("gin/data/tinyimagenet.gin", f"tiny_imagenet.root = '{base}'")
    wnids = _tiny_wnids()
    assert protocol.name == "tinyimagenet-180/20" and (protocol.n_old, protocol.n_new) == (180, 20)
    assert protocol.class_names == wnids  # sorted WordNet ids; the last 20 are new
    assert protocol.labeled.images.shape[1:] == (3, 64, 64)
    _check_split_rule(protocol, dict.fromkeys(range(200), 4), dict.fromkeys(range(200), 1), 100)
    # the test set is val/, labeled by val_annotations.txt (written in shuffled class order)
    _pixels_follow_labels([protocol.labeled, protocol.stream, protocol.test], list(range(200)))
    assert gin.query_parameter("BatchAugment.pad") == 8


def test_tiny_imagenet_loader_reads_val_annotations_and_resizes(tmp_dir):
    from components.data.sources import tiny_imagenet

    base = _write_tiny_imagenet(tmp_dir, train_per_class=1, val_per_class=2)
    train, test = tiny_imagenet(str(base), image_size=32)
    assert train.images.shape == (200, 3, 32, 32) and test.images.shape == (400, 3, 32, 32)
    assert torch.bincount(test.targets).tolist() == [2] * 200
    _pixels_follow_labels([train, test], list(range(200)))
    (base / "val" / "images" / "val_7.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed in .*val_annotations.txt.*val_7"):
        tiny_imagenet(str(base))


# --------------------------------------------------------------------------- miniImageNet (csv splits)


def _mini_wnids() -> dict[str, list[str]]:
    """64 / 16 / 20 WordNet ids of train.csv, val.csv, test.csv; the test ones sort first overall,
    so an id order by sorting all 100 would differ from the csv order the loader promises."""
    ids = [f"n{2000000 + 3571 * i:08d}" for i in range(100)]
    return {"test": ids[:20], "val": ids[20:36], "train": ids[36:]}


def _write_mini_imagenet(root: Path, per_class: int) -> Path:
    """mini-imagenet/: images/<wnid><8 digits>.jpg (84×84) and train.csv, val.csv, test.csv with
    a filename,label header, as Ravi & Larochelle's split files and images are distributed."""
    base = root / "mini-imagenet"
    splits = _mini_wnids()
    order = splits["train"] + splits["val"] + splits["test"]  # class ids the loader should give
    for split, wnids in splits.items():
        rows = ["filename,label"]
        for wnid in wnids:
            target = order.index(wnid)
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                _jpeg(base / "images" / name, _colour(target), 84)
                rows.append(f"{name},{wnid}")
        (base / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return base


def test_miniimagenet_gin_holds_out_the_test_csv_classes(tmp_dir):
    base = _write_mini_imagenet(tmp_dir, per_class=6)
    with pytest.warns(UserWarning, match="keeping 1"):
        protocol = _protocol("gin/data/miniimagenet.gin", f"mini_imagenet.root = '{base}'",
                             "mini_imagenet.test_per_class = 2")  # 600 per class in the real files
    splits = _mini_wnids()
    assert protocol.name == "miniimagenet-80/20" and (protocol.n_old, protocol.n_new) == (80, 20)
    assert protocol.class_names == splits["train"] + splits["val"] + splits["test"]
    assert protocol.labeled.images.shape[1:] == (3, 84, 84)
    _check_split_rule(protocol, dict.fromkeys(range(100), 4), dict.fromkeys(range(100), 2), 100)
    _pixels_follow_labels([protocol.labeled, protocol.stream, protocol.test], list(range(100)))


def test_mini_imagenet_loader_splits_each_class_by_file_name(tmp_dir):
    from components.data.sources import mini_imagenet

    base = _write_mini_imagenet(tmp_dir, per_class=3)
    train, test = mini_imagenet(str(base), image_size=16, test_per_class=1)
    assert train.images.shape == (200, 3, 16, 16) and test.images.shape == (100, 3, 16, 16)
    assert torch.bincount(test.targets).tolist() == [1] * 100
    with pytest.raises(ValueError, match="has 3 images .*test_per_class = 3"):
        mini_imagenet(str(base), test_per_class=3)


# --------------------------------------------------------------------------- absent files


ABSENT = [
    ("gin/data/cifar10.gin", "torchvision_dataset.root", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ("gin/data/cifar100.gin", "torchvision_dataset.root", "cifar-100-python", "cifar-100-python.tar.gz"),
    ("gin/data/tinyimagenet.gin", "tiny_imagenet.root", "val_annotations.txt", "tiny-imagenet-200.zip"),
    ("gin/data/miniimagenet.gin", "mini_imagenet.root", "train.csv", "meta-learning-lstm"),
]


@pytest.mark.parametrize("data_file, root, looked_for, how", ABSENT, ids=[a[0] for a in ABSENT])
def test_absent_files_name_the_path_and_how_to_get_them(tmp_dir, data_file, root, looked_for, how):
    missing = tmp_dir / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        _protocol(data_file, f"{root} = '{missing}'")
    message = str(info.value)
    assert str(missing.resolve()) in message and looked_for in message and how in message
    assert not missing.exists()


def test_the_command_reports_an_absent_dataset_in_one_line(tmp_dir, capsys):
    missing, run_dir = tmp_dir / "nowhere", tmp_dir / "run"
    code = main(["--gin", "gin/distill.gin", "--gin-bindings", "include 'gin/data/tinyimagenet.gin'",
                 "--gin-bindings", f"tiny_imagenet.root = '{missing}'", "--run-dir", str(run_dir)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err
    assert re.search(r"config error: Tiny-ImageNet not found: .*nowhere", err)
    assert "tiny-imagenet-200.zip" in err and not run_dir.exists()


# --------------------------------------------------------------------------- every data file composes


DATA_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "gin" / "data").glob("*.gin"))


@pytest.mark.parametrize("data_file", DATA_FILES)
def test_every_data_file_composes_with_distill_gin(data_file):
    """``--gin gin/distill.gin --gin-bindings "include '<data file>'"`` resolves (what
    --print-config shows), every bound value passes the checker, and the data file's source and
    protocol win over the digits ones distill.gin brought."""
    parse_config(["gin/distill.gin"], [f"include '{data_file}'"])  # raises ConfigError if not
    gin.finalize()
    config = gin.config_str()
    assert "run.graph = @lifecycle" in config and "lifecycle.data = @make_protocol" in config
    own = (ROOT / data_file).read_text()
    name = re.search(r"^make_protocol\.name = '([^']+)'", own, re.M)
    if name:  # files that only include another one keep its name unless they set their own
        assert gin.query_parameter("make_protocol.name") == name.group(1)
    source = re.search(r"^make_protocol\.source = (@\w+)", own, re.M)
    if source:
        assert f"make_protocol.source = {source.group(1)}" in config
    if "include 'gin/models/resnet18_cifar.gin'" in own:
        assert gin.query_parameter("TorchvisionBackbone.cifar_stem") is True
        assert gin.query_parameter("BatchAugment.degrees") == 0  # digits' rotation is not kept
        assert gin.query_parameter("make_protocol.new_classes") != [7, 8, 9]  # nor its new classes


def test_a_written_dataset_parses_from_a_data_file_of_ones_own(tmp_dir, cifar_md5_ignored):
    """Data files compose by ``include`` from a file of the user's own, too (a CIFAR-10 copy with
    ratio 10 and its root set), the way docs/data.md describes adding a dataset."""
    _write_cifar10(tmp_dir / "data", train_per_class=40, test_per_class=1)
    own = tmp_dir / "mine.gin"
    own.write_text(f"include 'gin/data/cifar10.gin'\nmake_protocol.ratio = 10\n"
                   f"torchvision_dataset.root = '{tmp_dir / 'data'}'\n")
    parse_config(["gin/distill.gin", str(own)], [])
    protocol = make_protocol()
    assert protocol.name == "cifar10-5/5" and protocol.train_counts == long_tail_counts(5, 20, 10, "exp")
