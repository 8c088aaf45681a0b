"""Image sources: the embedded digits, any torchvision classification dataset, ImageFolder trees.

Every source returns a ``(train, test)`` pair of :class:`ImageSet`. Images are held as uint8
tensors ``[N, C, H, W]`` so that augmentation can run on whole batches on the model's device,
or, for sets larger than memory (:mod:`components.data.store`), as :class:`ImageRows`: rows of
a memory-mapped file that are read only when a batch is indexed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import gin
import numpy as np
import torch

log = logging.getLogger(__name__)


Index = torch.Tensor | np.ndarray | Sequence[int] | slice


def _row_index(index: Index) -> torch.Tensor | slice:
    """Row numbers as a long tensor (a boolean mask becomes the rows it selects), or the slice."""
    if isinstance(index, slice):
        return index
    index = torch.as_tensor(index)
    return index.nonzero().squeeze(1) if index.dtype == torch.bool else index.long()


class ImageRows:
    """Rows of uint8 image tensors ``[N, C, H, W]``, read only when indexed: the images of a set
    that stays on disk (an image store, :mod:`components.data.store`, maps its file into one).

    Row ``i`` is row ``rows[i]`` of the ``bases`` stacked one after the other (all rows of the
    bases when ``rows`` is None). ``len``, ``shape``, ``dtype`` and ``ndim`` are a tensor's;
    indexing it (an int, a slice, row numbers or a boolean mask) reads those rows and returns
    them as an ordinary uint8 tensor. :meth:`take` and :func:`concat_images` select and join
    rows without reading any, so every subset, stream and training set made from a store is
    one of these, never a copy.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, bases: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> None:
        self.bases = tuple(bases)
        if not self.bases or any(not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.ndim != 4
                                 or b.shape[1:] != self.bases[0].shape[1:] for b in self.bases):
            got = [f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
                   for b in self.bases]
            raise ValueError(f"ImageRows needs uint8 tensors [N, C, H, W] of one image shape, got {got}")
        sizes = torch.tensor([0] + [len(b) for b in self.bases])
        self.starts = sizes.cumsum(0)  # base b holds rows starts[b] .. starts[b + 1] - 1
        self.rows = torch.arange(int(self.starts[-1])) if rows is None else torch.as_tensor(rows).long()
        self.shape = torch.Size([len(self.rows), *self.bases[0].shape[1:]])

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"ImageRows({len(self)} rows of {len(self.bases)} base(s), shape {tuple(self.shape)})"

    def locate(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, row in that base)`` of positions ``rows`` of the stacked bases."""
        base = torch.searchsorted(self.starts, rows, right=True) - 1
        return base, rows - self.starts[base]

    def take(self, index: Index) -> ImageRows:
        """The rows at ``index``, still unread."""
        return ImageRows(self.bases, self.rows[_row_index(index)])

    def __getitem__(self, index: int | Index) -> torch.Tensor:
        if isinstance(index, int | np.integer):
            return self[self.rows.new_tensor([index])][0]
        base, local = self.locate(self.rows[_row_index(index)])
        # index_select copies whole rows (several times faster than tensor[index] on uint8)
        if len(self.bases) == 1:
            return self.bases[0].index_select(0, local)
        grouped = torch.argsort(base, stable=True)  # the rows of each base together, then back in order
        counts = torch.bincount(base, minlength=len(self.bases)).tolist()
        per_base = local[grouped].split(counts)
        parts = [b.index_select(0, rows) for b, rows in zip(self.bases, per_base, strict=True)]
        return torch.cat(parts).index_select(0, torch.argsort(grouped))


def take_images(images: torch.Tensor | ImageRows, index: Index) -> torch.Tensor | ImageRows:
    """Rows ``index`` of ``images``: a copy for a tensor (``images[index]``), still unread rows
    for :class:`ImageRows`."""
    index = _row_index(index)
    return images.take(index) if isinstance(images, ImageRows) else images[index]


def concat_images(parts: Sequence[torch.Tensor | ImageRows]) -> torch.Tensor | ImageRows:
    """``torch.cat(parts)`` when every part is a tensor; when one is :class:`ImageRows`, the
    rows of all of them, unread (a tensor part joins as a base of its own, not copied)."""
    if not any(isinstance(p, ImageRows) for p in parts):
        return torch.cat(list(parts))
    bases: list[torch.Tensor] = []
    picked: list[tuple[ImageRows, list[int]]] = []  # each part, and where its bases are in `bases`
    for part in parts:
        part = part if isinstance(part, ImageRows) else ImageRows([part])
        where = []
        for base in part.bases:
            if not any(base is b for b in bases):
                bases.append(base)
            where.append(next(i for i, b in enumerate(bases) if b is base))
        picked.append((part, where))
    starts = torch.tensor([0] + [len(b) for b in bases]).cumsum(0)
    rows = []
    for part, where in picked:
        base, local = part.locate(part.rows)
        rows.append(starts[torch.tensor(where, dtype=torch.long)[base]] + local)
    return ImageRows(bases, torch.cat(rows))


@dataclasses.dataclass
class ImageSet:
    """Images as a uint8 tensor ``[N, C, H, W]`` (or :class:`ImageRows` of one, kept on disk),
    integer labels ``[N]`` and class names."""

    images: torch.Tensor | ImageRows
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

    def subset(self, index: Index, name: str | None = None) -> ImageSet:
        """The images at ``index`` (row numbers, a boolean mask or a slice) with their labels.

        Images held as a tensor are indexed as a tensor is (``tensor[index]``: rows copied into
        a new one; in-memory sets, the default); images held as :class:`ImageRows` (a store on
        disk) stay unread rows of the same file, so subsets of a store, and subsets of those,
        never load it."""
        index = _row_index(index)
        return ImageSet(take_images(self.images, index), self.targets[index], self.classes, name or self.name)


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
    "CIFAR10": "on a machine with internet, download cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and untar it into {root} (it unpacks to "
    "cifar-10-batches-py/), or pass download=True there",
    "CIFAR100": "on a machine with internet, download cifar-100-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and untar it into {root} (it unpacks to "
    "cifar-100-python/), or pass download=True there",
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
    """Un-gzip Debian's ``dataset-fashion-mnist`` files into torchvision's layout under root.

    Each file is written under a name of its own and renamed into place, so that runs started
    together (a suite's jobs side by side) can unpack at once: each rename puts a whole file
    there, and none takes another's half-written one."""
    import gzip
    import shutil
    import tempfile

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
            with tempfile.NamedTemporaryFile(dir=raw, prefix=f".{stem}.", suffix=".tmp", delete=False) as dst:
                tmp = Path(dst.name)
                try:
                    with gzip.open(gz, "rb") as src:
                        shutil.copyfileobj(src, dst)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
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


def _report_unreadable(path: Path, unreadable: list[tuple[str, str]], skip: bool,
                       source: str = "image_folder") -> None:
    """Stop on unreadable files, naming the first few; or, when asked to skip them, warn once.
    ``source`` is the configurable whose ``skip_unreadable`` the message names."""
    listed = "; ".join(f"{file} ({why})" for file, why in unreadable[:UNREADABLE_SHOWN])
    more = f" and {len(unreadable) - UNREADABLE_SHOWN} more" if len(unreadable) > UNREADABLE_SHOWN else ""
    if not skip:
        raise ValueError(
            f"{path.resolve()}: {len(unreadable)} image file(s) cannot be decoded: {listed}{more}. "
            f"Replace or delete them, or bind {source}.skip_unreadable = True to leave them out"
        )
    log.warning(f"{path.resolve()}: skipped {len(unreadable)} unreadable image file(s) "
                f"({source}.skip_unreadable = True): {listed}{more}")


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


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet and miniImageNet in their distributed layouts (torchvision has no loader for either)
# --------------------------------------------------------------------------------------------

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MINI_IMAGENET_SPLIT_URL = "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _check_present(files: list[Path], listed_in: str, source: str) -> None:
    """Every file an index lists must exist: name the first few that do not."""
    absent = [str(f.resolve()) for f in files if not f.is_file()]
    if absent:
        more = f" and {len(absent) - UNREADABLE_SHOWN} more" if len(absent) > UNREADABLE_SHOWN else ""
        raise FileNotFoundError(
            f"{source}: {len(absent)} image file(s) listed in {listed_in} are missing: "
            f"{'; '.join(absent[:UNREADABLE_SHOWN])}{more}. Copy the complete dataset there"
        )


def _decoded(files: list[Path], targets: list[int], classes: list[str], image_size: int,
             where: Path, skip_unreadable: bool, source: str, name: str) -> ImageSet:
    """Decode ``files`` (PIL, converted to RGB as ImageFolder does) to uint8
    ``[N, 3, image_size, image_size]``; unreadable files stop the load or, with
    ``skip_unreadable``, are left out with one warning (as :func:`image_folder` does)."""
    from torchvision.transforms.v2 import functional as F

    log.info(f"{name}: decoding {len(files):,} images from {where.resolve()}")
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    kept, unreadable = [], []
    for file, target in zip(files, targets, strict=True):
        try:
            decoded = _decode_rgb(str(file))
        except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated or not an image
            unreadable.append((str(file), _why_unreadable(error)))
            continue
        if tuple(decoded.shape[-2:]) != (image_size, image_size):
            decoded = F.resize(decoded, [image_size, image_size], antialias=True)
        images[len(kept)] = decoded
        kept.append(target)
    if unreadable:
        _report_unreadable(where, unreadable, skip_unreadable, source)
    lost = sorted(set(targets) - set(kept))
    if lost:  # every image of a class was unreadable and skipped
        raise ValueError(f"{where.resolve()}: no readable image left of class(es) "
                         f"{[classes[c] for c in lost]}: replace their files")
    return ImageSet(images[: len(kept)], torch.as_tensor(kept, dtype=torch.long), classes, name)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)


@gin.configurable
def tiny_imagenet(
    root: str = gin.REQUIRED, image_size: int = 64, skip_unreadable: bool = False
) -> tuple[ImageSet, ImageSet]:
    """Tiny-ImageNet (200 classes of 64×64 images, 500 training and 50 validation images each)
    from its unzipped ``tiny-imagenet-200`` folder, as distributed:

    * ``root/train/<wnid>/images/*.JPEG``: the training images, one folder per WordNet id;
    * ``root/val/images/*.JPEG`` with ``root/val/val_annotations.txt``, one
      ``<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>`` line per image: the labeled validation set,
      used as the test set (the official ``test/`` images have no labels and are not read).

    Class ids are the positions of the sorted WordNet ids of ``train/`` (ImageFolder's order);
    class names are the WordNet ids. Images are decoded once into memory (about 1.4 GB for the
    110,000 images at 64 px) and resized only if they are not ``image_size`` square. A file that
    cannot be decoded stops the load with its path, unless ``skip_unreadable=True``.
    """
    base = Path(root)
    train_dir, val_images = base / "train", base / "val" / "images"
    annotations = base / "val" / "val_annotations.txt"
    absent = [p for p in (train_dir, val_images, annotations) if not p.exists()]
    if absent:
        raise FileNotFoundError(
            f"Tiny-ImageNet not found: {', '.join(str(p.resolve()) for p in absent)} missing. "
            f"Expected the unzipped tiny-imagenet-200 folder at {base.resolve()} "
            "(train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt). To get it: on "
            f"a machine with internet, download {TINY_IMAGENET_URL}, unzip it and bind "
            "tiny_imagenet.root to its tiny-imagenet-200 folder"
        )
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train_dir.resolve()} has no class folders: expected "
                                f"{train_dir}/<wnid>/images/*.JPEG")
    train_files, train_targets, empty = [], [], []
    for target, wnid in enumerate(classes):
        files = _images_in(train_dir / wnid / "images")
        empty += [] if files else [wnid]
        train_files += files
        train_targets += [target] * len(files)
    if empty:
        raise ValueError(f"{train_dir.resolve()}: class folder(s) {empty} hold no image in "
                         f"<wnid>/images/ ({', '.join(_IMAGE_SUFFIXES)}): add their images or remove "
                         "the folders")
    index = {wnid: i for i, wnid in enumerate(classes)}
    test_files, test_targets = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(f"{annotations.resolve()}, line {number}: expected "
                             f"'<file>\\t<wnid>\\t<box>' with a WordNet id that train/ has, got {line!r}")
        test_files.append(val_images / fields[0])
        test_targets.append(index[fields[1]])
    _check_present(test_files, str(annotations.resolve()), "Tiny-ImageNet")
    train = _decoded(train_files, train_targets, classes, image_size, train_dir, skip_unreadable,
                     "tiny_imagenet", "tiny-imagenet/train")
    test = _decoded(test_files, test_targets, classes, image_size, val_images, skip_unreadable,
                    "tiny_imagenet", "tiny-imagenet/test")
    return train, test


MINI_IMAGENET_SPLITS = ("train", "val", "test")


@gin.configurable
def mini_imagenet(
    root: str = gin.REQUIRED,
    image_size: int = 84,
    test_per_class: int = 100,
    skip_unreadable: bool = False,
) -> tuple[ImageSet, ImageSet]:
    """miniImageNet (Vinyals et al., 2016: 100 ImageNet classes, 600 images each) in the layout
    of Ravi & Larochelle's split (ICLR 2017): ``root/images/<file>.jpg`` and ``root/train.csv``,
    ``val.csv``, ``test.csv``, each a ``filename,label`` header then one row per image (the label
    is the WordNet id; 64, 16 and 20 classes).

    All 100 classes are read. Class ids follow the csv files: the train.csv classes first, then
    val.csv's, then test.csv's, each group in sorted WordNet-id order (ids 0-63, 64-79, 80-99 in
    the standard split), so the few-shot split's test classes can be named as the new ones
    (``gin/data/miniimagenet.gin``). Those files split classes, not images; the images of each
    class are split here by sorted file name: the last ``test_per_class`` (default 100, the
    500 / 100 split of FSCIL, Tao et al. CVPR 2020) are the test set, the rest the training
    pool. Images are resized to ``image_size`` (84, the few-shot convention) and decoded once
    into memory (about 1.3 GB).
    """
    base = Path(root)
    csvs = [base / f"{split}.csv" for split in MINI_IMAGENET_SPLITS]
    absent = [p for p in (base / "images", *csvs) if not p.exists()]
    if absent:
        raise FileNotFoundError(
            f"miniImageNet not found: {', '.join(str(p.resolve()) for p in absent)} missing. Expected "
            f"{base.resolve()}/images/<file>.jpg and train.csv, val.csv, test.csv beside it "
            "(filename,label rows: Ravi & Larochelle's split). To get it: take the csv files from "
            f"{MINI_IMAGENET_SPLIT_URL} and the images from ImageNet with that repository's script "
            "(or a prepared mini-imagenet copy with the same layout), and bind mini_imagenet.root there"
        )
    if test_per_class < 1:
        raise ValueError(f"mini_imagenet.test_per_class must be >= 1, got {test_per_class}")
    files_of: dict[str, list[str]] = {}
    for csv_file in csvs:
        rows = _csv_rows(csv_file)
        for label in sorted({label for _, label in rows} - set(files_of)):
            files_of[label] = []
        for filename, label in rows:
            files_of[label].append(filename)
    classes = list(files_of)
    train_files, train_targets, test_files, test_targets = [], [], [], []
    for target, wnid in enumerate(classes):
        files = sorted(set(files_of[wnid]))
        if len(files) <= test_per_class:
            raise ValueError(f"miniImageNet class {wnid} has {len(files)} images in the csv files, "
                             f"not more than mini_imagenet.test_per_class = {test_per_class}: lower it")
        cut = len(files) - test_per_class
        train_files += [base / "images" / f for f in files[:cut]]
        test_files += [base / "images" / f for f in files[cut:]]
        train_targets += [target] * cut
        test_targets += [target] * test_per_class
    _check_present(train_files + test_files, f"the csv files of {base.resolve()}", "miniImageNet")
    train = _decoded(train_files, train_targets, classes, image_size, base / "images", skip_unreadable,
                     "mini_imagenet", "mini-imagenet/train")
    test = _decoded(test_files, test_targets, classes, image_size, base / "images", skip_unreadable,
                    "mini_imagenet", "mini-imagenet/test")
    return train, test


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of a miniImageNet split file (its header line skipped)."""
    import csv

    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and [c.strip().lower() for c in rows[0]] == ["filename", "label"]:
        rows = rows[1:]
    bad = next((i for i, row in enumerate(rows) if len(row) != 2 or not all(c.strip() for c in row)), None)
    if bad is not None:
        raise ValueError(f"{path.resolve()}: expected 'filename,label' rows, got {rows[bad]!r}")
    if not rows:
        raise ValueError(f"{path.resolve()} lists no image: expected 'filename,label' rows")
    return [(name.strip(), label.strip()) for name, label in rows]
