"""The Ignite ``train`` graph against a bare PyTorch loop doing the same work.

Both sides train the same freshly seeded ``Network(SmallConvNet(1, 32), num_classes=7)`` on the
same labeled digits, through the same loader (``image_loader``, instance sampler, seed 0,
``drop_last=True`` as the graph uses), the same ``BatchAugment(pad=1)``, SGD (lr 0.05,
momentum 0.9) and the same per-iteration cosine decay to zero (ignite's
``CosineAnnealingScheduler(cycle_size=total + 1)`` written out by hand). Side A keeps the
graph's rich progress bar on stderr: it is part of the graph's real cost.

Before timing, one untimed run of each side checks that they did the same work: the same
number of iterations, the same learning rate at every step and bit-identical final weights
(parameters and BatchNorm buffers).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from components.data import BatchAugment, ImageSet, digits, image_loader
from components.models import Network, SmallConvNet
from graphs.train import train

EPOCHS = 5
BATCH_SIZE = 64
LR = 0.05
MOMENTUM = 0.9
NUM_CLASSES = 7
SEED = 0
PAD = 1
DEVICE = torch.device("cpu")
TARGET = 1.05  # A/B

Factory = Callable[..., torch.optim.Optimizer]


def labeled_digits() -> ImageSet:
    """The digits training split (seed 0), classes ``0..NUM_CLASSES-1``: the labels a
    ``num_classes=7`` classifier can be trained on (digits has 10 classes)."""
    train_set, _ = digits(0)
    keep = torch.nonzero(train_set.targets < NUM_CLASSES).flatten()
    return train_set.subset(keep, f"digits/train[0-{NUM_CLASSES - 1}]")


def fresh_model() -> nn.Module:
    torch.manual_seed(SEED)  # also fixes the augmentation's draws that follow
    return Network(SmallConvNet(in_channels=1, width=32), num_classes=NUM_CLASSES)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def run_graph(model: nn.Module, images: ImageSet, augment: nn.Module,
              optimizer: Factory = sgd) -> int:
    """Side A: the library's Ignite graph. Returns the number of iterations it ran."""
    engine = train(
        model, images, augment, DEVICE, epochs=EPOCHS, batch_size=BATCH_SIZE,
        sampler="instance", optimizer=optimizer,
        seed=SEED, on_first_step=None,
    )
    return engine.state.iteration


def run_bare(model: nn.Module, images: ImageSet, augment: nn.Module,
             optimizer: Factory = sgd) -> int:
    """Side B: a plain loop. Returns the number of iterations it ran."""
    model.to(DEVICE)
    opt = optimizer(model.parameters())
    loader = image_loader(images, BATCH_SIZE, sampler="instance", drop_last=True, seed=SEED)
    cycle = EPOCHS * len(loader) + 1  # lr reaches 0 one step after the last one
    start = opt.param_groups[0]["lr"]
    model.train()
    augment.train()
    step = 0
    for _ in range(EPOCHS):
        for x, y, _ in loader:
            # ignite's CosineAnnealingScheduler.get_param, evaluated the same way
            lr = start + ((0.0 - start) / 2) * (1 - math.cos(math.pi * (step / cycle)))
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = x.to(DEVICE), y.to(DEVICE)
            loss = F.cross_entropy(model.encode(augment(x))["logits"], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # the graph reads the loss every iteration too
            step += 1
    return step


def _recording(lrs: list[float]) -> Factory:
    def factory(params) -> torch.optim.Optimizer:
        opt = sgd(params)
        opt.register_step_pre_hook(lambda o, args, kwargs: lrs.append(o.param_groups[0]["lr"]))
        return opt

    return factory


def check_same_work(images: ImageSet) -> str:
    """One untimed run of each side (also the warm-up): same iterations, learning rates and
    final weights, or an AssertionError."""
    states, lrs, iterations = [], [], []
    for side in (run_graph, run_bare):
        model, recorded = fresh_model(), []
        iterations.append(side(model, images, BatchAugment(pad=PAD), _recording(recorded)))
        lrs.append(recorded)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert iterations[0] == iterations[1] == len(lrs[0]), f"iterations differ: {iterations}"
    assert lrs[0] == lrs[1], "the learning-rate schedules differ"
    diff = max((states[0][k].double() - states[1][k].double()).abs().max().item()
               for k in states[0])
    assert diff == 0.0, f"final weights differ by up to {diff:.3g}"
    return f"{iterations[0]} iterations, same lr at every step, bit-identical final weights"


def run(repeats: int) -> list[dict]:
    images = labeled_digits()
    checked = check_same_work(images)
    times: dict[str, list[float]] = {"A": [], "B": []}
    iterations: dict[str, set[int]] = {"A": set(), "B": set()}
    for _ in range(repeats):  # A, B, A, B, ...: drift cancels out of the ratio
        for key, side in (("A", run_graph), ("B", run_bare)):
            model, augment = fresh_model(), BatchAugment(pad=PAD)
            gc.collect()
            start = time.perf_counter()
            iterations[key].add(side(model, images, augment))
            times[key].append(time.perf_counter() - start)
    if len(iterations["A"] | iterations["B"]) != 1:
        raise AssertionError(f"iteration counts differ between runs: {iterations}")
    n_iter = iterations["A"].pop()
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    pairs = [ta / tb for ta, tb in zip(times["A"], times["B"], strict=True)]
    seen = n_iter * BATCH_SIZE
    data = (f"{len(images)} images, {EPOCHS} epochs × {n_iter // EPOCHS} batches of "
            f"{BATCH_SIZE} = {n_iter} iterations")
    return [
        {"name": "A: graphs.train.train (Ignite + progress bar)", "median_s": a,
         "images_per_s": seen / a, "notes": data},
        {"name": "B: bare PyTorch loop", "median_s": b, "images_per_s": seen / b,
         "notes": checked},
        {"name": "A / B (time)", "ratio": a / b, "target": f"<= {TARGET}",
         "ok": a / b <= TARGET,
         "notes": f"overhead {(a - b) / n_iter * 1e3:+.2f} ms per iteration; ratio of the "
                  f"medians of {repeats} interleaved repeats; per-pair A/B median "
                  f"{statistics.median(pairs):.2f}, range {min(pairs):.2f}-{max(pairs):.2f}"},
    ]
