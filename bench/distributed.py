"""Training throughput in 2 processes (ignite.distributed, gloo) against 1 process.

The ``train`` graph trains the digits small convnet (``gin/models/small_convnet.gin``: width 32)
on the 1,198 training digits (real 8×8 images) with the digits augmentation and class-balanced
sampling, global batch 64, for ``EPOCHS`` epochs: in this process, then in 2 processes spawned once by
``idist.Parallel`` (each draws half of every batch; DDP averages the gradients). Only the
``train`` calls are timed, after one untimed warm-up call on each side; process start-up and
the process group's set-up are not. 1 process uses torch's intra-op threads (``--threads``),
each of the 2 processes half of them (at least 1).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import ignite.distributed as idist
import torch

from components.data import BatchAugment, ImageSet, digits
from components.models import Network, SmallConvNet
from components.run import _free_port, leave
from graphs.train import train

EPOCHS = 10
BATCH_SIZE = 64
WIDTH = 32


def _images() -> ImageSet:
    return digits()[0]  # the training pool, all 10 classes


def _augment() -> BatchAugment:  # gin/data/digits.gin
    return BatchAugment(mean=[0.5], std=[0.5], pad=1, degrees=15, translate=0.1, scale=(0.8, 1.0))


def _train_once(images: ImageSet) -> float:
    """Seconds for one ``train`` call of ``EPOCHS`` epochs on a fresh model."""
    torch.manual_seed(0)
    model = Network(SmallConvNet(in_channels=1, width=WIDTH), len(images.classes))
    if idist.get_world_size() > 1:
        idist.barrier()  # start together
    start = time.perf_counter()
    train(model, images, _augment(), torch.device("cpu"), epochs=EPOCHS, batch_size=BATCH_SIZE,
          sampler="class_balanced",
          optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4))
    return time.perf_counter() - start


def _worker(local_rank: int, repeats: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    images = _images()
    _train_once(images)  # warm-up
    times = [_train_once(images) for _ in range(repeats)]
    if idist.get_rank() == 0:
        Path(out).write_text(" ".join(map(str, times)))
    idist.barrier()
    leave(0)  # as the command line's processes do (components.run.leave)


def run(repeats: int) -> list[dict]:
    images = _images()
    threads = torch.get_num_threads()
    per_process = max(1, threads // 2)
    _train_once(images)  # warm-up
    one = statistics.median(_train_once(images) for _ in range(repeats))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "times"
        with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=_free_port()) as parallel:
            parallel.run(_worker, repeats, per_process, str(out))
        two = statistics.median(float(t) for t in out.read_text().split())
    steps = len(images) // BATCH_SIZE * EPOCHS
    n = steps * BATCH_SIZE
    what = f"{EPOCHS} epochs of {len(images)} digits, global batch {BATCH_SIZE}, small convnet width {WIDTH}"
    return [
        {"name": f"train, 1 process ({threads} threads)", "median_s": one, "images_per_s": n / one,
         "notes": what},
        {"name": f"train, 2 processes gloo ({per_process} thread each)", "median_s": two,
         "images_per_s": n / two, "notes": "idist.Parallel; DDP, sharded class-balanced sampler"},
        {"name": "2 processes / 1 process (images/s)", "ratio": one / two,
         "notes": f"{repeats} repeats each, median; start-up not timed"},
    ]
