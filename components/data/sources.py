"""Image sources: the embedded digits, any torchvision classification dataset, ImageFolder trees.

Every source returns a ``(train, test)`` pair of :class:`ImageSet`. Images are held as uint8
tensors ``[N, C, H, W]`` so that augmentation can run on whole batches on the model's device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gin
import numpy as np
import torch


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
) -> tuple[ImageSet, ImageSet]:
    """ImageFolder trees ``root/{train_dir,test_dir}/<class>/<image>`` (TinyImageNet after
    reorganising its val folder, MiniImageNet, ImageNet), decoded once and resized to
    ``image_size`` into memory. For trees too large for memory, cache features instead.
    """
    import torchvision.datasets as tvd
    from torchvision.transforms.v2 import functional as F

    def load(split: str) -> ImageSet:
        path = Path(root) / split
        if not path.is_dir():
            raise FileNotFoundError(
                f"no ImageFolder tree at {path.resolve()}: expected {path}/<class>/<image> "
                f"(set image_folder.root, train_dir and test_dir)"
            )
        folder = tvd.ImageFolder(str(path))  # PIL loader, RGB
        images = torch.empty(len(folder), 3, image_size, image_size, dtype=torch.uint8)
        for i, (image, _) in enumerate(folder):
            images[i] = F.resize(F.pil_to_tensor(image), [image_size, image_size], antialias=True)
        targets = torch.as_tensor(folder.targets, dtype=torch.long)
        return ImageSet(images, targets, list(folder.classes), f"{Path(root).name}/{split}")

    train, test = load(train_dir), load(test_dir)
    if train.classes != test.classes:
        raise ValueError(f"{root}: {train_dir} and {test_dir} have different class folders")
    return train, test
