"""Batched in-memory loading, samplers and on-device augmentation.

An :class:`ImageSet` is served by a regular ``torch.utils.data.DataLoader`` whose dataset
implements ``__getitems__``: the loader asks for a whole batch of indices at once and gets one
uint8 tensor back, so no per-sample Python or PIL work runs in the training loop. Augmentation
(:class:`BatchAugment`) then runs on the whole batch on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import gin
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)
from torchvision.transforms.v2 import functional as F

from components.data.sources import ImageSet


class BatchedImages(Dataset):
    """Map-style dataset over an :class:`ImageSet` that returns whole batches.

    ``dataset[i]`` gives ``(image, target, i)``; ``dataset.__getitems__(indices)`` gives the
    batched tensors ``(images [B,C,H,W] uint8, targets [B], indices [B])`` in one indexing op.
    """

    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images.images[i], self.images.targets[i], i

    def __getitems__(self, indices: Sequence[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images.images  # a tensor, or ImageRows of a store (which index_select too)
        # index_select copies whole rows: several times faster than images[index] on uint8
        batch = images.index_select(0, index) if isinstance(images, torch.Tensor) else images[index]
        return batch, self.images.targets[index], index


def _keep_batch(batch):
    return batch


def class_balanced_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``1 / n_class``: every class is drawn equally often."""
    counts = torch.bincount(targets)
    return 1.0 / counts[targets].double()


def class_power_weights(targets: torch.Tensor, q: float) -> torch.Tensor:
    """Per-sample weights that draw class ``c`` with probability ``∝ n_c ** q`` (Kang et al.,
    ICLR 2020, eq. 1): ``q = 1`` instance, ``q = 1/2`` square-root, ``q = 0`` class-balanced."""
    counts = torch.bincount(targets).double()
    return counts[targets] ** (q - 1.0)


class ProgressivelyBalancedSampler(Sampler[int]):
    """Progressively-balanced sampling (Kang et al., ICLR 2020): in epoch ``t`` of ``T`` class
    ``c`` is drawn with probability ``(1 - t/T) · n_c/N + (t/T) · 1/C`` (``t = 0..T-1``), moving
    from instance towards class-balanced sampling over training.

    Each ``iter()`` is one epoch (a DataLoader asks once per epoch); :meth:`set_epoch` sets it
    explicitly, as with ``DistributedSampler``.
    """

    def __init__(self, targets: torch.Tensor, epochs: int, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if epochs < 1:
            raise ValueError(f"progressive sampling needs epochs >= 1, got {epochs}")
        self.targets, self.epochs = targets, epochs
        self.counts = torch.bincount(targets).double()
        self.num_samples = num_samples or len(targets)
        self.generator = generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def class_probabilities(self, epoch: int) -> torch.Tensor:
        present = self.counts > 0
        t = min(epoch / self.epochs, 1.0)
        return (1 - t) * self.counts / self.counts.sum() + t * present / present.sum()

    def __iter__(self):
        probs = self.class_probabilities(self.epoch)
        weights = (probs / self.counts.clamp_min(1))[self.targets]
        self.epoch += 1
        yield from torch.multinomial(weights, self.num_samples, True, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive")


def make_sampler(targets: torch.Tensor, sampler: str, generator: torch.Generator | None = None,
                 epochs: int | None = None) -> Sampler[int] | None:
    """The sampler named ``sampler`` over ``targets``, drawing ``len(targets)`` per epoch;
    ``None`` for ``'instance'`` (plain shuffling)."""
    n = len(targets)
    if sampler == "instance":
        return None
    if sampler == "class_balanced":
        return WeightedRandomSampler(class_balanced_weights(targets), n, True, generator=generator)
    if sampler == "sqrt":
        return WeightedRandomSampler(class_power_weights(targets, 0.5), n, True, generator=generator)
    if sampler == "progressive":
        if epochs is None:
            raise ValueError("the 'progressive' sampler needs the number of epochs (epochs=...)")
        return ProgressivelyBalancedSampler(targets, epochs, n, generator)
    raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")


class ShardedSampler(Sampler[int]):
    """One process's share of ``sampler``'s epoch, for data-parallel training.

    Every process draws the whole epoch from ``sampler``, whose generator is seeded alike in
    each process, so all draw the same indices; process ``rank`` of ``world_size`` keeps
    positions ``rank, rank + world_size, ...``. Batches of ``batch_size / world_size`` from each
    process then make up, together, exactly the batches one process with ``batch_size`` draws
    (same images, same steps). ``pad`` repeats the epoch's first positions so every process
    gets as many indices (a loader that keeps its last, short batch); otherwise the last
    ``len % world_size`` positions are dropped, which ``drop_last`` drops anyway.

    Ignite's ``DistributedProxySampler`` does the same but reseeds torch's global generator
    with the epoch number on every epoch, which would also reset the augmentation's draws.
    :meth:`set_epoch` is passed on to ``sampler`` (the progressive sampler's schedule).
    """

    def __init__(self, sampler: Sampler[int], world_size: int, rank: int, pad: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.sampler, self.world_size, self.rank, self.pad = sampler, world_size, rank, pad

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _total(self) -> int:
        n, w = len(self.sampler), self.world_size
        return -(-n // w) * w if self.pad else n // w * w

    def __iter__(self):
        indices = list(self.sampler)  # the whole epoch's draw, as one process would make it
        total = self._total()
        if self.pad and indices:
            indices += (indices * (total // len(indices) + 1))[:total - len(indices)]
        yield from indices[self.rank:total:self.world_size]

    def __len__(self) -> int:
        return self._total() // self.world_size


@gin.configurable(denylist=["images", "world_size", "rank"])
def image_loader(
    images: ImageSet,
    batch_size: int = 128,
    shuffle: bool = True,
    sampler: str = "instance",
    drop_last: bool = False,
    seed: int | None = None,
    epochs: int | None = None,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader yielding ``(uint8 images, targets, indices)`` batches.

    ``sampler`` is ``'instance'`` (each image once per epoch, shuffled), ``'class_balanced'``
    (a class uniformly, then one of its images), ``'sqrt'`` (classes ``∝ sqrt(n_c)``) or
    ``'progressive'`` (instance → class-balanced over ``epochs``); see :func:`make_sampler`.

    With ``world_size > 1`` the loader is process ``rank``'s shard (:class:`ShardedSampler`):
    ``batch_size`` is the global batch, each process gets ``batch_size / world_size`` of it,
    and together the processes see the batches one process would (same ``seed``, every
    process the same number of batches).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    chosen = make_sampler(images.targets, sampler, generator, epochs)
    dataset = BatchedImages(images)
    drop_last = drop_last and len(images) > batch_size
    if world_size > 1:
        if seed is None:
            raise ValueError("a sharded loader needs a seed: every process must draw the same epoch "
                             "for the shards to fit together (give image_loader a seed)")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes: "
                             f"choose a multiple of {world_size} (each process takes batch_size / "
                             "world_size)")
        if chosen is None:
            chosen = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        chosen = ShardedSampler(chosen, world_size, rank, pad=not drop_last)
        batch_size //= world_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and chosen is None,
        sampler=chosen,
        drop_last=drop_last,
        collate_fn=_keep_batch,
        generator=generator,
    )


@gin.configurable
class BatchAugment(nn.Module):
    """Per-sample random affine (rotation, scale, translation), pad + random crop, horizontal
    flip and normalization on a uint8 batch.

    Runs on the batch's device. In eval mode (``module.eval()``) it only converts and
    normalizes. torchvision's v2 transforms draw one set of parameters per call, so the
    per-sample parameters are drawn here and applied to the whole batch at once (one
    ``grid_sample`` for the affine, one gather for the crop).
    """

    def __init__(
        self,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        pad: int = 0,
        flip: bool = False,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: Sequence[float] = (1.0, 1.0),
    ) -> None:
        super().__init__()
        self.mean, self.std, self.pad, self.flip = list(mean), list(std), pad, flip
        self.degrees, self.translate, self.scale = degrees, translate, tuple(scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images, got {images.dtype}")
        x = F.to_dtype(images, torch.float32, scale=True)
        if self.training and (self.degrees or self.translate or self.scale != (1.0, 1.0)):
            x = self._random_affine(x)
        if self.training and self.pad > 0:
            x = self._random_crop(x)
        if self.training and self.flip:
            flipped = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return F.normalize(x, self.mean, self.std)

    def _random_affine(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, device=x.device).uniform_(low, high)

        angle = torch.deg2rad(uniform(-self.degrees, self.degrees))
        zoom = uniform(*self.scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        shift = [uniform(-2 * self.translate, 2 * self.translate) for _ in range(2)]
        theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1),
                             torch.stack([sin, cos, shift[1]], 1)], 1)  # [n, 2, 3]
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, padding_mode="zeros", align_corners=False)

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = nn.functional.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        left = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        rows = top + torch.arange(h, device=x.device)  # [n, h]
        cols = left + torch.arange(w, device=x.device)  # [n, w]
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [n,h,w,c]
        return out.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f"mean={self.mean}, std={self.std}, pad={self.pad}, flip={self.flip}, "
                f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}")
