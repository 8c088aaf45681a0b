"""The batched in-memory data path against torchvision's per-sample transforms.

Path A is the library's: ``image_loader`` over an :class:`ImageSet` (``__getitems__`` hands the
DataLoader a whole uint8 batch in one indexing op) followed by ``BatchAugment`` (pad + random
crop, horizontal flip, normalization) on the batch. Path B is the usual torchvision recipe:
``torchvision.datasets.FashionMNIST`` (a PIL image per sample) with a ``transforms.v2``
pipeline doing the same augmentation, through a ``DataLoader`` with ``num_workers=0`` and,
as a second row, ``num_workers=2`` (persistent, warmed up: worker start-up is not timed,
which favours B). Each path produces the same number of normalized float32 batches; the
paths are interleaved (A, B0, B2, A, ...) and the medians compared.

Data: the real Fashion-MNIST training images from Debian's ``dataset-fashion-mnist``
(un-gzipped once into ``<tempdir>/bench-data``); if those files are missing, the 1,797 real
8×8 digits upscaled to 28×28, with a printed note.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from components.data import BatchAugment, ImageSet, digits, image_loader, torchvision_dataset
from components.data.sources import fashion_mnist_from_debian

N_IMAGES = 16_384  # 64 batches of 256 per timed pass
WARMUP_IMAGES = 2_048
BATCH_SIZE = 256
PAD = 4
SIZE = 28
MEAN, STD = (0.2860,), (0.3530,)  # Fashion-MNIST training set
TARGET = 3.0  # A/B images per second
DATA_ROOT = Path(tempfile.gettempdir()) / "bench-data"


@dataclasses.dataclass
class Source:
    images: ImageSet  # for path A
    per_sample: Callable[[Callable], Dataset]  # for path B: transform -> PIL-per-sample dataset
    note: str


class PILImages(Dataset):
    """Per-sample PIL images from a uint8 tensor, as torchvision's MNIST family serves them."""

    def __init__(self, images: ImageSet, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images.images[i, 0].numpy())  # 2-D uint8 -> mode "L"
        return self.transform(image), int(self.images.targets[i])


def load_source() -> Source:
    import torchvision.datasets as tvd

    try:
        fashion_mnist_from_debian(str(DATA_ROOT))
    except FileNotFoundError as error:
        print(f"data_path: Fashion-MNIST unavailable ({error}); falling back to the digits "
              f"upscaled to {SIZE}×{SIZE}", file=sys.stderr)
    else:
        root = str(DATA_ROOT)
        train, _ = torchvision_dataset("FashionMNIST", root=root, download=False)
        return Source(
            train,
            lambda t: tvd.FashionMNIST(root, train=True, transform=t, download=False),
            f"Fashion-MNIST train ({len(train):,} real {SIZE}×{SIZE} images)",
        )
    from torchvision.transforms.v2 import functional as F

    train, test = digits(0)
    both = torch.cat([train.images, test.images])
    big = F.resize(both, [SIZE, SIZE], antialias=True)
    images = ImageSet(big, torch.cat([train.targets, test.targets]), train.classes, "digits28")
    return Source(images, lambda t: PILImages(images, t),
                  f"FALLBACK: {len(images):,} digits upscaled 8→{SIZE} (Fashion-MNIST missing)")


def per_sample_transform() -> v2.Compose:
    return v2.Compose([
        v2.ToImage(), v2.RandomCrop(SIZE, padding=PAD), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
    ])


def check_same_output(source: Source) -> None:
    """Without the random ops both paths must give the same normalized tensors."""
    index = list(range(BATCH_SIZE))
    a = BatchAugment(MEAN, STD).eval()(source.images.images[index])
    plain = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )
    dataset = source.per_sample(plain)
    b = torch.stack([torch.as_tensor(dataset[i][0]) for i in index])
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-6):
        raise AssertionError("path A and path B do not produce the same normalized images")


def time_path(loader: DataLoader, augment: BatchAugment | None, n_images: int = N_IMAGES) -> float:
    """Seconds to get ``n_images`` normalized float32 images out of ``loader`` (+ ``augment``)."""
    iterator = iter(loader)  # (persistent workers: drains the previous pass, untimed)
    start = time.perf_counter()
    seen = 0
    while seen < n_images:
        try:
            batch = next(iterator)
        except StopIteration:  # only with the small fallback data
            iterator = iter(loader)
            continue
        x = batch[0] if augment is None else augment(batch[0])
        assert x.dtype == torch.float32 and x.shape[1:] == (1, SIZE, SIZE), (x.dtype, x.shape)
        seen += len(x)
    elapsed = time.perf_counter() - start
    del iterator
    return elapsed


def run(repeats: int) -> list[dict]:
    source = load_source()
    check_same_output(source)
    augment = BatchAugment(mean=MEAN, std=STD, pad=PAD, flip=True).train()
    paths = {
        "A": (image_loader(source.images, batch_size=BATCH_SIZE, sampler="instance"), augment),
        "B0": (DataLoader(source.per_sample(per_sample_transform()), batch_size=BATCH_SIZE,
                          shuffle=True, num_workers=0), None),
        "B2": (DataLoader(source.per_sample(per_sample_transform()), batch_size=BATCH_SIZE,
                          shuffle=True, num_workers=2, persistent_workers=True), None),
    }
    for loader, aug in paths.values():  # warm-up (and start the persistent workers)
        time_path(loader, aug, WARMUP_IMAGES)
    times: dict[str, list[float]] = {key: [] for key in paths}
    for _ in range(repeats):  # A, B0, B2, A, B0, B2, ...
        for key, (loader, aug) in paths.items():
            gc.collect()
            times[key].append(time_path(loader, aug))
    del paths
    gc.collect()  # shuts the persistent workers down

    median = {key: statistics.median(t) for key, t in times.items()}
    rate = {key: N_IMAGES / m for key, m in median.items()}
    per = f"{N_IMAGES:,} images in batches of {BATCH_SIZE} per repeat"
    rows = [
        {"name": "A: image_loader + BatchAugment (batched)", "median_s": median["A"],
         "images_per_s": rate["A"], "notes": f"{source.note}; {per}"},
        {"name": "B: torchvision v2 per-sample, workers=0", "median_s": median["B0"],
         "images_per_s": rate["B0"], "notes": "FashionMNIST (PIL) + Compose, DataLoader"},
        {"name": "B: torchvision v2 per-sample, workers=2", "median_s": median["B2"],
         "images_per_s": rate["B2"], "notes": "persistent workers, start-up not timed"},
    ]
    for key, workers in (("B0", 0), ("B2", 2)):
        ratio = rate["A"] / rate[key]
        rows.append({"name": f"A / B(workers={workers}) (images/s)", "ratio": ratio,
                     "target": f">= {TARGET:g}", "ok": ratio >= TARGET,
                     "notes": f"{repeats} interleaved repeats, median"})
    return rows
