"""cRT from the HDF5 feature cache against cRT that re-encodes the images every epoch.

Both sides re-train a fresh linear classifier for the same epochs with the same class-balanced
batches (same seed) on the features of the same frozen network: side A reads the features from
the cache file (the read is timed), side B runs the backbone over each batch's images again,
as a cRT without a cache does. The sides are interleaved (A, B, A, B …) and the medians
compared; the classifiers they end with are compared too (they must agree to float rounding).
The one-time encode that fills the cache is timed and reported on its own row.

Data: the fmnist-lt labeled set (ratio 100, 14,7xx real Fashion-MNIST images) from Debian's
``dataset-fashion-mnist``; the digits-lt labeled set when those files are missing (printed).
The network is the fmnist-lt table's (16-wide SmallConvNet, NHWC); its weights do not change
the timing, so it is freshly initialized with a fixed seed.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from components.cache import FeatureCache, read_checked
from components.data import BatchAugment, digits, make_protocol, torchvision_dataset
from components.data.sources import fashion_mnist_from_debian
from components.models import GrowingLinear, Network, SmallConvNet
from graphs.encode import cache_entry, encode
from graphs.recalibrate import fit_head

EPOCHS = 10
BATCH_SIZE = 128
TARGET = 20.0
DATA_ROOT = Path(tempfile.gettempdir()) / "bench-data"


def load():
    try:
        fashion_mnist_from_debian(str(DATA_ROOT))
        sets = torchvision_dataset("FashionMNIST", root=str(DATA_ROOT), download=False)
        protocol = make_protocol(source=None, source_sets=sets, halve=False, ratio=100, n_max=5900,
                                 name="fmnist-lt")
        augment = BatchAugment(mean=(0.286,), std=(0.353,))
    except FileNotFoundError as error:
        print(f"crt_cache: Fashion-MNIST unavailable ({error}); using digits-lt", file=sys.stderr)
        protocol = make_protocol(source=None, source_sets=digits(0), halve=False, ratio=10, n_max=100,
                                 name="digits-lt")
        augment = BatchAugment()
    return protocol.labeled, augment.eval()


def run(repeats: int) -> list[dict]:
    images, augment = load()
    torch.manual_seed(0)
    net = Network(SmallConvNet(1, 16, channels_last=True), 10).eval()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        cache = FeatureCache(folder)
        start = time.perf_counter()
        encode(net, images, augment, cache, device)
        encode_s = time.perf_counter() - start
        key, parts = cache_entry(net, images, augment)
        path = cache.path(key)

        def from_cache() -> GrowingLinear:
            arrays = read_checked(path, model=parts["model"], data=parts["data"])
            features = torch.from_numpy(arrays["features"])
            torch.manual_seed(1)
            head = GrowingLinear(features.shape[1], 10)
            fit_head(head, features.__getitem__, torch.from_numpy(arrays["targets"]), EPOCHS,
                     BATCH_SIZE, seed=0, description="A: cRT from the cache")
            return head

        @torch.no_grad()
        def re_encode(index: torch.Tensor) -> torch.Tensor:
            return net.backbone(augment(images.images[index]))

        def from_images() -> GrowingLinear:
            torch.manual_seed(1)
            head = GrowingLinear(net.backbone.out_dim, 10)
            fit_head(head, re_encode, images.targets, EPOCHS, BATCH_SIZE, seed=0,
                     description="B: cRT re-encoding images")
            return head

        times: dict[str, list[float]] = {"A": [], "B": []}
        heads = {}
        for _ in range(repeats):
            for side, fn in (("A", from_cache), ("B", from_images)):
                gc.collect()
                start = time.perf_counter()
                heads[side] = fn()
                times[side].append(time.perf_counter() - start)
    median = {side: statistics.median(t) for side, t in times.items()}
    diff = float((heads["A"].weight - heads["B"].weight).detach().abs().max())
    ratio = median["B"] / median["A"]
    what = f"{images.name}: {len(images):,} images, {EPOCHS} epochs, batch {BATCH_SIZE}"
    return [
        {"name": "one-time encode into the HDF5 cache", "median_s": encode_s,
         "images_per_s": len(images) / encode_s, "notes": "once per model; not in A's time"},
        {"name": "A: cRT from the cache (read + train)", "median_s": median["A"], "notes": what},
        {"name": "B: cRT re-encoding images every epoch", "median_s": median["B"],
         "notes": "frozen backbone in eval mode, same batches"},
        {"name": "B / A (time)", "ratio": ratio, "target": f">= {TARGET:g}", "ok": ratio >= TARGET,
         "notes": f"{repeats} interleaved repeats, median; classifiers differ by at most {diff:.1e}"},
    ]
