"""Training throughput with ``data_parallel.compile = True`` (``torch.compile``, default inductor
backend) against eager, through the ``train`` graph, on two models:

* *small convnet*: the digits job's model (``gin/models/small_convnet.gin``, width 32) on the
  1,198 training digits (real 8×8 images) with the digits augmentation, class-balanced batches
  of 64, ``SMALL_EPOCHS`` epochs (as in ``bench/distributed.py``);
* *ResNet-18*: torchvision's with the CIFAR stem (``gin/models/resnet18_cifar.gin``, the device
  check's model) on ``RESNET_IMAGES`` random 32×32 images, batches of 64, one epoch.

Every call trains a fresh model; eager and compiled calls alternate, and only calls after each
side's first are timed (the median is reported). A compiled call after the first reuses what
dynamo compiled: each ``train`` call wraps its new model again, but the code and shapes are the
same. **Compile time** is the first compiled call minus the median compiled call, measured
twice: with an empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``: a machine's first
run) and again after ``torch._dynamo.reset()`` with the cache that compile filled (later runs).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import gin
import torch

from components.data import ImageSet
from graphs.train import train

SMALL_EPOCHS = 5
RESNET_IMAGES = 256
BATCH_SIZE = 64


def _small() -> tuple[Callable[[], torch.nn.Module], ImageSet, dict]:
    from bench.distributed import WIDTH, _augment, _images
    from components.models import Network, SmallConvNet

    images = _images()
    return (lambda: Network(SmallConvNet(in_channels=1, width=WIDTH), len(images.classes)), images,
            {"augment": _augment(), "epochs": SMALL_EPOCHS, "sampler": "class_balanced"})


def _resnet() -> tuple[Callable[[], torch.nn.Module], ImageSet, dict]:
    import torchvision

    from components.data import BatchAugment
    from components.models import Network
    from components.models.extractors import TorchvisionBackbone

    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (RESNET_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.arange(RESNET_IMAGES) % 10, [str(c) for c in range(10)], "random-32px")
    augment = BatchAugment(mean=[0.5] * 3, std=[0.5] * 3, pad=4, flip=True)
    return (lambda: Network(TorchvisionBackbone(torchvision.models.resnet18, cifar_stem=True), 10), images,
            {"augment": augment, "epochs": 1, "sampler": "instance"})


def _call(make_model, images: ImageSet, setting: dict, compiled: bool) -> float:
    """Seconds for one ``train`` call on a fresh model, eager or with ``data_parallel.compile``."""
    torch.manual_seed(0)
    model = make_model()
    with gin.unlock_config():
        gin.bind_parameter("data_parallel.compile", compiled)
    start = time.perf_counter()
    train(model, images, setting["augment"], torch.device("cpu"), epochs=setting["epochs"],
          batch_size=BATCH_SIZE, sampler=setting["sampler"], seed=0,
          optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4))
    return time.perf_counter() - start


def _rows(label: str, make_model, images: ImageSet, setting: dict, repeats: int) -> list[dict]:
    eager, compiled = [], []
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # an empty cache: a first run's compile
        try:
            torch._dynamo.reset()
            first_eager = _call(make_model, images, setting, False)  # warm-up, untimed
            cold = _call(make_model, images, setting, True)
            for _ in range(repeats):
                eager.append(_call(make_model, images, setting, False))
                compiled.append(_call(make_model, images, setting, True))
            torch._dynamo.reset()  # dynamo compiles again, inductor finds its cache
            warm = _call(make_model, images, setting, True)
        finally:
            torch._dynamo.reset()
            gin.clear_config()
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    e, c = statistics.median(eager), statistics.median(compiled)
    n = len(images) * setting["epochs"]
    return [
        {"name": f"{label}: train, eager", "median_s": e, "images_per_s": n / e,
         "notes": f"{setting['epochs']} epoch(s) of {len(images):,} images, batch {BATCH_SIZE}; "
                  f"first call {first_eager:.2f} s (untimed)"},
        {"name": f"{label}: train, data_parallel.compile = True", "median_s": c, "images_per_s": n / c,
         "notes": "torch.compile, inductor; calls after the first"},
        {"name": f"{label}: compiled / eager (images/s)", "ratio": e / c,
         "notes": f"{repeats} interleaved repeats, median"},
        {"name": f"{label}: compile time, empty inductor cache", "median_s": cold - c,
         "notes": f"first compiled call {cold:.1f} s minus the median call"},
        {"name": f"{label}: compile time, inductor cache filled", "median_s": warm - c,
         "notes": "after torch._dynamo.reset(): a later run on this machine"},
    ]


def run(repeats: int) -> list[dict]:
    return (_rows("small convnet, digits 8×8", *_small(), repeats)
            + _rows("ResNet-18 CIFAR stem, 32×32", *_resnet(), repeats))
