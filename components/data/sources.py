"""Image sources: the embedded digits, any torchvision classification dataset, ImageFolder trees.

Every source returns a ``(train, test)`` pair of :class:`ImageSet`. Images are held as uint8
tensors ``[N, C, H, W]`` so that augmentation can run on whole batches on the model's device.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import gin
import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageSet:
    """Images as a uint8 tensor ``[N, C, H, W]``, integer labels ``[N]`` and class names."""

    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str]
    name: str = "images"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be a uint8 tensor [N, C, H, W], got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.targets):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.targets)} labels"
            )
        self.targets = self.targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.targets[index], self.classes, name or self.name)


def _stratified_split(
    targets: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    train, test = train_test_split(
        index, test_size=test_fraction, stratify=targets, random_state=seed
    )
    return np.sort(train), np.sort(test)


@gin.configurable
def digits(seed: int = 0, test_fraction: float = 1 / 3) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's bundled handwritten digits (1,797 real 8×8 images, no download).

    Pixel values 0..16 are scaled to 0..255. The test split is a seeded stratified
    ``test_fraction`` of the images; the rest is the training pool.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    train, test = _stratified_split(bunch.target, test_fraction, seed)
    images, targets = torch.from_numpy(pixels), torch.from_numpy(bunch.target)
    classes = [str(c) for c in bunch.target_names]
    full = ImageSet(images, targets, classes, "digits")
    return full.subset(train, "digits/train"), full.subset(test, "digits/test")


def _as_nchw_uint8(data) -> torch.Tensor:
    array = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if array.ndim == 3:  # [N, H, W] grayscale (MNIST family)
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3):  # [N, H, W, C] (CIFAR)
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


_HOW_TO_GET = {
    "FashionMNIST": "apt-get install dataset-fashion-mnist, then gunzip the four files from "
    "/usr/share/datasets/fashion-mnist/ into {root}/FashionMNIST/raw/ "
    "(or call components.data.sources.fashion_mnist_from_debian(root))",
}


@gin.configurable
def torchvision_dataset(
    name: str = gin.REQUIRED, root: str = "data", download: bool = False
) -> tuple[ImageSet, ImageSet]:
    """Any torchvision classification dataset with a ``train`` flag, by class name.

    Works for datasets that keep their images in memory as ``.data`` (MNIST, FashionMNIST,
    KMNIST, CIFAR10, CIFAR100, …). The files must be in torchvision's on-disk layout under
    ``root``; with ``download=True`` torchvision fetches them (needs internet).
    """
    import torchvision.datasets as tvd

    if not hasattr(tvd, name):
        raise ValueError(f"torchvision.datasets has no dataset named {name!r}")
    cls = getattr(tvd, name)
    if name == "FashionMNIST" and Path(DEBIAN_FASHION_MNIST).is_dir():
        fashion_mnist_from_debian(root, DEBIAN_FASHION_MNIST)  # no-op once the files are there
    sets = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
            hint = _HOW_TO_GET.get(
                name, "pass download=True on a machine with internet, or copy the files there"
            ).format(root=root)
            # CIFAR keeps its files in `base_folder`; the MNIST family in <root>/<Name>/raw.
            folder = Path(root) / getattr(cls, "base_folder", f"{name}/raw")
            raise FileNotFoundError(
                f"{name} not found: torchvision looked in {folder.resolve()} "
                f"({str(error).rstrip('.')}). To get it: {hint}."
            ) from None
        if not hasattr(ds, "data"):
            raise ValueError(f"{name} does not hold its images in memory; use image_folder()")
        targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
        split = "train" if train else "test"
        sets.append(ImageSet(_as_nchw_uint8(ds.data), targets, list(ds.classes), f"{name}/{split}"))
    return sets[0], sets[1]


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def fashion_mnist_from_debian(root: str = "data", source: str = DEBIAN_FASHION_MNIST) -> Path:
    """Un-gzip Debian's ``dataset-fashion-mnist`` files into torchvision's layout under root."""
    import gzip
    import shutil

    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for stem in names:
        gz = Path(source) / f"{stem}.gz"
        if not gz.exists():
            raise FileNotFoundError(
                f"{gz} is missing: install it with `apt-get install dataset-fashion-mnist`"
            )
        if not (raw / stem).exists():
            tmp = raw / f".{stem}.tmp"
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(raw / stem)
    return raw


@gin.configurable
def image_folder(
    root: str = gin.REQUIRED,
    train_dir: str = "train",
    test_dir: str = "val",
    image_size: int = 64,
    skip_unreadable: bool = False,
) -> tuple[ImageSet, ImageSet]:
    """ImageFolder trees ``root/{train_dir,test_dir}/<class>/<image>`` (TinyImageNet after
    reorganising its val folder, MiniImageNet, ImageNet), decoded once and resized to
    ``image_size`` into memory. For trees too large for memory, cache features instead.

    Labels are the positions of the class folders, so both trees must have the same ones, and
    every class folder needs an image. A file that cannot be decoded (truncated, or not an
    image at all) stops the load with its path, unless ``skip_unreadable=True``: then such files
    are left out, with one warning that counts them.
    """
    train = _load_tree(Path(root), train_dir, test_dir, image_size, skip_unreadable)
    test = _load_tree(Path(root), test_dir, train_dir, image_size, skip_unreadable)
    _check_same_classes(root, train_dir, train.classes, test_dir, test.classes)
    return train, test


def _load_tree(root: Path, split: str, other: str, image_size: int, skip_unreadable: bool) -> ImageSet:
    """One ImageFolder tree decoded to uint8 RGB ``[N, 3, image_size, image_size]``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    from torchvision.transforms.v2 import functional as F

    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"no ImageFolder tree at {path.resolve()}: expected {path}/<class>/<image> "
            f"(set image_folder.root, train_dir and test_dir)"
        )
    try:
        classes, class_to_idx = find_classes(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path.resolve()} has no class folders: expected {path}/<class>/<image>"
        ) from None
    samples = make_dataset(str(path), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    targets, unreadable = [], []
    for file, target in samples:
        try:
            decoded = _decode_rgb(file)
        except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated or not an image
            unreadable.append((file, _why_unreadable(error)))
            continue
        images[len(targets)] = F.resize(decoded, [image_size, image_size], antialias=True)
        targets.append(target)
    if unreadable:
        _report_unreadable(path, unreadable, skip_unreadable)
    _check_no_empty_class(path, classes, targets, other, skipped=bool(unreadable))
    return ImageSet(images[: len(targets)], torch.as_tensor(targets, dtype=torch.long), classes,
                    f"{root.name}/{split}")


def _decode_rgb(file: str) -> torch.Tensor:
    """Decode a whole image file as torchvision's ImageFolder does (PIL, converted to RGB)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(file) as image:
        return F.pil_to_tensor(image.convert("RGB"))  # convert() reads the whole file


def _why_unreadable(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can read"
    return "truncated" if "truncat" in str(error).lower() else f"{type(error).__name__}: {error}"


UNREADABLE_SHOWN = 5  # paths a message lists before it just counts


def _report_unreadable(path: Path, unreadable: list[tuple[str, str]], skip: bool) -> None:
    """Stop on unreadable files, naming the first few; or, when asked to skip them, warn once."""
    listed = "; ".join(f"{file} ({why})" for file, why in unreadable[:UNREADABLE_SHOWN])
    more = f" and {len(unreadable) - UNREADABLE_SHOWN} more" if len(unreadable) > UNREADABLE_SHOWN else ""
    if not skip:
        raise ValueError(
            f"{path.resolve()}: {len(unreadable)} image file(s) cannot be decoded: {listed}{more}. "
            "Replace or delete them, or bind image_folder.skip_unreadable = True to leave them out"
        )
    log.warning(f"{path.resolve()}: skipped {len(unreadable)} unreadable image file(s) "
                f"(image_folder.skip_unreadable = True): {listed}{more}")


def _check_no_empty_class(path: Path, classes: list[str], targets: list[int], other: str,
                          skipped: bool) -> None:
    """A class folder with no image would be a class the model never sees: say which, and how."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    present = set(targets)
    empty = [name for i, name in enumerate(classes) if i not in present]
    if empty:
        readable = "readable " if skipped else ""
        raise ValueError(
            f"{path.resolve()}: class folder(s) {empty} hold no {readable}image "
            f"({', '.join(IMG_EXTENSIONS)}): add images to them, or remove them from both this tree "
            f"and {other!r} (the class folders of both trees must match)"
        )


def _check_same_classes(root: str, train_dir: str, train: list[str], test_dir: str, test: list[str]) -> None:
    """Labels are folder positions: trees with different class folders would mislabel the test set."""
    if train == test:
        return
    only_train = sorted(set(train) - set(test))
    only_test = sorted(set(test) - set(train))
    raise ValueError(
        f"{Path(root).resolve()}: the {train_dir!r} and {test_dir!r} trees have different class "
        f"folders (only in {train_dir!r}: {only_train}; only in {test_dir!r}: {only_test}); labels "
        "are the folders' sorted positions, so give both trees the same class folders"
    )
