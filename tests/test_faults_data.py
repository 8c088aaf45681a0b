"""Bad data gets one message naming the file or class and what to do.

ImageFolder trees with truncated or non-image files, an empty class folder, train and test
trees with different classes; images whose channel count the model does not take; new classes
the stream could never show. The trees are tiny and written by the tests.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from components.data import ImageSet, check_channels, check_model_input, image_folder, input_channels
from components.data.splits import make_protocol
from components.models.extractors import SmallConvNet, TorchvisionBackbone
from components.models.network import Network

pytestmark = pytest.mark.faults


def _encoded(fmt: str, seed: int = 0) -> bytes:
    """A real 16×16 RGB image of random pixels, encoded as PNG or JPEG."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _tree(root: Path, classes: dict[str, int], split: str = "train") -> Path:
    """``root/split/<class>/<i>.png`` with the given number of good images per class."""
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i}.png").write_bytes(_encoded("PNG", seed=i))
    return root / split


def _good_trees(root: Path) -> None:
    _tree(root, {"cat": 2, "dog": 2}, "train")
    _tree(root, {"cat": 1, "dog": 1}, "val")


def _spoil(root: Path) -> list[Path]:
    """Three bad files in the training tree: half a PNG, half a JPEG, a text file named .png."""
    png, jpeg = _encoded("PNG", seed=7), _encoded("JPEG", seed=8)
    bad = [root / "train" / "cat" / "half.png", root / "train" / "dog" / "half.jpg",
           root / "train" / "dog" / "notes.png"]
    bad[0].write_bytes(png[: len(png) // 2])
    bad[1].write_bytes(jpeg[: len(jpeg) // 2])
    bad[2].write_text("not an image, whatever the extension says\n")
    return bad


# --------------------------------------------------------------------------------------------
# unreadable image files
# --------------------------------------------------------------------------------------------


def test_unreadable_image_files_stop_the_load_naming_each_file_and_the_way_out(tmp_dir):
    _good_trees(tmp_dir)
    bad = _spoil(tmp_dir)
    with pytest.raises(ValueError) as info:
        image_folder(str(tmp_dir), image_size=8)
    message = str(info.value)
    assert f"{(tmp_dir / 'train').resolve()}: 3 image file(s) cannot be decoded" in message
    for path in bad:
        assert str(path) in message
    assert f"{bad[0]} (truncated)" in message and f"{bad[2]} (not an image PIL can read)" in message
    assert "bind image_folder.skip_unreadable = True" in message


def test_unreadable_files_are_left_out_with_one_warning_when_asked(tmp_dir, caplog):
    _good_trees(tmp_dir)
    bad = _spoil(tmp_dir)
    with caplog.at_level(logging.WARNING, logger="components.data.sources"):
        train, test = image_folder(str(tmp_dir), image_size=8, skip_unreadable=True)
    assert train.images.shape == (4, 3, 8, 8) and train.targets.tolist() == [0, 0, 1, 1]
    assert len(test) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 unreadable image file(s)" in warnings[0]
    assert all(str(path) in warnings[0] for path in bad)


def test_many_unreadable_files_are_counted_after_the_first_few(tmp_dir):
    _good_trees(tmp_dir)
    for i in range(8):
        (tmp_dir / "train" / "cat" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError) as info:
        image_folder(str(tmp_dir), image_size=8)
    message = str(info.value)
    assert "8 image file(s) cannot be decoded" in message and "and 3 more" in message
    assert message.count("broken") == 5


# --------------------------------------------------------------------------------------------
# classes
# --------------------------------------------------------------------------------------------


def test_a_class_folder_with_no_images_is_named(tmp_dir):
    _tree(tmp_dir, {"cat": 2, "dog": 2}, "train")
    _tree(tmp_dir, {"cat": 1, "dog": 1}, "val")
    for split in ("train", "val"):
        (tmp_dir / split / "bird").mkdir()
    (tmp_dir / "train" / "bird" / "readme.txt").write_text("no images here")  # not an image file
    with pytest.raises(ValueError) as info:
        image_folder(str(tmp_dir), image_size=8)
    message = str(info.value)
    assert f"{(tmp_dir / 'train').resolve()}: class folder(s) ['bird'] hold no image" in message
    assert "add images to them, or remove them from both this tree and 'val'" in message


def test_a_class_whose_every_file_is_skipped_is_named_too(tmp_dir):
    _good_trees(tmp_dir)
    for i in range(2):
        (tmp_dir / "train" / "cat" / f"{i}.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['cat'\] hold no readable image"):
        image_folder(str(tmp_dir), image_size=8, skip_unreadable=True)


def test_train_and_test_trees_with_different_classes_name_what_differs(tmp_dir):
    _tree(tmp_dir, {"cat": 1, "dog": 1, "bird": 1}, "train")
    _tree(tmp_dir, {"cat": 1, "dog": 1, "fish": 1}, "val")
    with pytest.raises(ValueError) as info:
        image_folder(str(tmp_dir), image_size=8)
    message = str(info.value)
    assert "the 'train' and 'val' trees have different class folders" in message
    assert "only in 'train': ['bird']; only in 'val': ['fish']" in message


def test_a_split_with_no_class_folders_names_the_folder(tmp_dir):
    _tree(tmp_dir, {"cat": 1}, "train")
    (tmp_dir / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val has no class folders"):
        image_folder(str(tmp_dir), image_size=8)


# --------------------------------------------------------------------------------------------
# channels
# --------------------------------------------------------------------------------------------


def _images(channels: int) -> ImageSet:
    return ImageSet(torch.zeros(4, channels, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                    ["a", "b"], "tiny/train")


def test_images_of_the_wrong_channel_count_name_the_binding_to_change():
    grayscale_model = Network(SmallConvNet(in_channels=1, width=4), num_classes=2)
    assert input_channels(grayscale_model) == (1, "SmallConvNet.in_channels")
    with pytest.raises(ValueError) as info:
        check_model_input(_images(3), grayscale_model)
    assert str(info.value) == ("tiny/train: the images have 3 channel(s) but the model takes 1 "
                               "(SmallConvNet.in_channels = 1); bind SmallConvNet.in_channels = 3 "
                               "to match the images")
    check_model_input(_images(1), grayscale_model)  # matching: no error


def test_a_torchvision_backbone_names_its_own_binding():
    rgb_model = Network(TorchvisionBackbone(arch=torchvision.models.resnet18, cifar_stem=True), num_classes=2)
    assert input_channels(rgb_model) == (3, "TorchvisionBackbone.in_channels")
    with pytest.raises(ValueError, match=r"bind TorchvisionBackbone.in_channels = 1 to match"):
        check_model_input(_images(1), rgb_model)


def test_a_model_without_convolution_is_not_checked_and_a_count_can_be_given():
    assert input_channels(nn.Sequential(nn.Flatten(), nn.Linear(64, 2))) is None
    check_model_input(_images(3), nn.Sequential(nn.Flatten(), nn.Linear(192, 2)))
    with pytest.raises(ValueError, match=r"have 1 channel\(s\) but the model takes 3"):
        check_channels(_images(1), 3)


# --------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------


def _set(counts: list[int], names: list[str]) -> ImageSet:
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return ImageSet(torch.zeros(len(targets), 1, 2, 2, dtype=torch.uint8), targets, names, "toy/train")


def test_a_new_class_without_training_images_is_refused_by_name():
    """A new class the source has no image of would never be in the stream."""
    train = _set([6, 6, 6, 0], ["a", "b", "c", "d"])
    with pytest.raises(ValueError) as info:
        make_protocol(source=None, new_classes=[3], source_sets=(train, train))
    message = str(info.value)
    assert "new classes [3 ('d')] do not occur in toy/train" in message
    assert "the stream would hold no sample of them" in message


@pytest.mark.parametrize("phased", [False, True])
def test_every_new_class_reaches_the_stream_even_with_a_single_image(phased):
    """The split rule gives the stream the larger half of every class, so a new class with one
    training image still shows up: a new class with no stream sample cannot arise from it."""
    train = _set([6, 6, 6, 1, 1], ["a", "b", "c", "d", "e"])
    layout = dict(phases=[[0, 1, 2], [3], [4]]) if phased else dict(new_classes=[3, 4])
    p = make_protocol(source=None, source_sets=(train, train), **layout)
    assert p.n_new == 2
    assert sorted(set(p.stream.targets.tolist()) & {3, 4}) == [3, 4]
