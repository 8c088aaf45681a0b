"""Long-tail subsampling and the novel-class protocol (labeled set, unlabeled stream, test).

The exact rules are in docs/definitions.md ("Long-tail counts", "The split rule"):

* ``exp``:  ``n_i = int(n_max * (1 / ratio) ** (i / (C - 1)))`` for class rank ``i``;
* ``step``: the first ``C // 2`` classes keep ``n_max``, the rest get ``int(n_max / ratio)``;
* each class's training images are split in two halves by a seed; the first half of each old
  class, subsampled to the profile, is the labeled set; the second half of every class,
  shuffled, is the stream; the first half of each new class is not used.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence

import gin
import numpy as np
import torch

from components.data.sources import ImageSet, concat_images, take_images

log = logging.getLogger(__name__)

# CIFAR-100 fine class id -> superclass id (the dataset's "coarse" labels).
CIFAR100_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13,
    15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4,
    17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13,
    15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]
CIFAR100_SUPERCLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]


def long_tail_counts(num_classes: int, n_max: int, ratio: float, profile: str = "exp") -> list[int]:
    """Images kept per class rank under the ``exp`` or ``step`` profile (docs/definitions.md)."""
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1 (n_max / n_min), got {ratio}")
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"need num_classes >= 1 and n_max >= 1, got {num_classes}, {n_max}")
    if profile == "exp":
        if num_classes == 1:
            return [n_max]
        return [int(n_max * (1 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [n_max] * half + [int(n_max / ratio)] * (num_classes - half)
    raise ValueError(f"unknown long-tail profile {profile!r}: use 'exp' or 'step'")


def superclass_members(names: Sequence[str]) -> list[int]:
    """CIFAR-100 fine class ids of the given superclass names (for choosing new classes)."""
    out = []
    for name in names:
        if name not in CIFAR100_SUPERCLASSES:
            raise ValueError(f"unknown CIFAR-100 superclass {name!r}; known: {CIFAR100_SUPERCLASSES}")
        coarse = CIFAR100_SUPERCLASSES.index(name)
        out += [fine for fine, c in enumerate(CIFAR100_COARSE) if c == coarse]
    return sorted(out)


@dataclasses.dataclass
class ProtocolData:
    """A novel-class protocol. Labels are remapped: old classes -> ``0..n_old-1`` (in the order
    given, which is the long-tail rank order), new classes -> ``n_old..n_old+n_new-1``."""

    labeled: ImageSet
    stream: ImageSet
    test: ImageSet
    class_names: list[str]
    n_old: int
    n_new: int
    train_counts: list[int]  # labeled images per old class
    name: str = "protocol"
    val: ImageSet | None = None  # balanced held-out images of the old classes, if asked for
    # phases[0] = the old class ids, phases[p] = the ids first seen in stream segment p
    phases: list[list[int]] = dataclasses.field(default_factory=list)
    segment_ends: list[int] = dataclasses.field(default_factory=list)  # stream end of each segment

    def __post_init__(self) -> None:
        if not self.phases:
            self.phases = [list(range(self.n_old)), list(range(self.n_old, self.num_classes))]
        if not self.segment_ends:
            self.segment_ends = [len(self.stream)]

    @property
    def num_classes(self) -> int:
        return self.n_old + self.n_new

    def phase_of(self, class_id: int) -> int:
        """The phase a (remapped) class belongs to: 0 for the old classes."""
        return next(p for p, ids in enumerate(self.phases) if class_id in ids)


@gin.configurable(denylist=["source_sets"])
def make_protocol(
    source: Callable[[], tuple[ImageSet, ImageSet]] = gin.REQUIRED,
    new_classes: Sequence[int] = (),
    new_superclasses: Sequence[str] = (),
    profile: str = "exp",
    ratio: float = 1.0,
    n_max: int | None = None,
    halve: bool = True,
    seed: int = 0,
    name: str = "protocol",
    val_per_class: int = 0,
    val_partial: bool = False,
    phases: Sequence[Sequence[int]] | None = None,
    distractor_fraction: float = 0.0,
    distractors: Callable[[int, Sequence[int], np.random.Generator], torch.Tensor] | None = None,
    source_sets: tuple[ImageSet, ImageSet] | None = None,
    split_seed: int | None = None,
    n_new: int | None = None,
) -> ProtocolData:
    """Build the labeled set, the stream and the test set by the split rule of docs/definitions.md.

    ``source`` returns ``(train, test)``. ``halve=False`` labels the whole training set
    (long-tailed) and leaves the stream empty (the ``fmnist-lt`` protocol). ``n_max`` defaults
    to the smallest first-half (or class) size among the old classes.

    ``val_per_class > 0`` also holds out a class-balanced validation set of that many images per
    old class, taken from the first-half images the long-tail profile left out (as ImageNet-LT's
    balanced validation set was drawn from what the subsampling left); it never overlaps the
    labeled set, the stream or the test set. A class with fewer spare images is an error, unless
    ``val_partial=True``: then it gives what it has (the head class of a profile whose ``n_max``
    is the whole first half has none) and one info line names it, since it is expected. That
    suits a held-out set for the pool threshold, which needs known-class samples, not an exact
    balance.

    **Phased streams** (the continual loop). ``phases = [old, P1, P2, ...]`` lists class ids:
    ``old`` (in long-tail rank order, head first) is labeled as above; the classes of phase
    ``p >= 1`` first appear in stream segment ``p``. The stream is segments ``1..P`` in order. A
    class's stream images (its second half, shuffled by the seed) are divided evenly
    (``np.array_split``) over the segments from its phase on (old classes: all segments), so
    old classes keep appearing; each segment is shuffled by the seed. Classes in no phase are
    left out (test included). ``ProtocolData.segment_ends`` holds where each segment ends.

    **Random protocols** (``split_seed = s``): which classes are new, and the long-tail rank
    order of the old ones (head first), are drawn by ``s`` instead of being given, so a suite can
    sample many protocols of one dataset (``seed`` still draws the images). Without ``phases``,
    ``n_new`` classes are drawn as new (default: as many as ``new_classes`` lists); with
    ``phases``, their sizes are kept and their classes drawn: the first ``len(phases[0])`` of a
    seeded permutation are the old classes, the next ``len(phases[1])`` phase 1, and so on.
    The classes drawn are named in ``ProtocolData.name`` (``<name>/split<s>``).

    **Distractors** (``distractor_fraction = f``): images of no class, target ``-1``, made by
    ``distractors`` (default :class:`~components.data.distractors.Distractors`: noise, blank
    and saturated frames, another dataset's images), ``round(f · n / (1 - f))`` of them in a
    segment of ``n`` class images, so they are a share ``f`` of every segment.
    """
    if not 0 <= distractor_fraction < 1:
        raise ValueError(f"distractor_fraction must be in [0, 1), got {distractor_fraction}")
    train, test = source_sets if source_sets is not None else source()
    all_classes = sorted(int(c) for c in torch.unique(train.targets))
    if n_new is not None and split_seed is None:
        raise ValueError("make_protocol.n_new draws new classes only with a split_seed; give "
                         "make_protocol.split_seed (or list make_protocol.new_classes)")
    if split_seed is not None:
        old, new, phases = _drawn_split(split_seed, all_classes, phases, new_classes, new_superclasses, n_new)
        name = f"{name}/split{split_seed}"
    elif phases is not None:
        old, new = _phase_classes(phases, new_classes, new_superclasses, all_classes, train.name)
    else:
        new = sorted(set(int(c) for c in new_classes) | set(superclass_members(new_superclasses)))
        unknown = [c for c in new if c not in all_classes]
        if unknown:
            raise ValueError(f"new classes {_named(unknown, train.classes)} do not occur in {train.name} "
                             f"(has {all_classes}), so the stream would hold no sample of them: "
                             "choose make_protocol.new_classes among the classes that have images")
        old = [c for c in all_classes if c not in new]
    if not old:
        raise ValueError("every class is new: keep at least one old (labeled) class")

    rng = np.random.default_rng(seed)
    targets = train.targets.numpy()
    first, second = {}, {}
    for c in all_classes:
        index = rng.permutation(np.flatnonzero(targets == c))
        cut = len(index) // 2 if halve else len(index)
        first[c], second[c] = index[:cut], index[cut:]

    top = n_max if n_max is not None else min(len(first[c]) for c in old)
    counts = long_tail_counts(len(old), top, ratio, profile)
    for rank, c in enumerate(old):
        if counts[rank] == 0:
            warnings.warn(
                f"class {c} gets 0 images at ratio {ratio} with n_max {top}; keeping 1 instead",
                stacklevel=2,
            )
            counts[rank] = 1
        if counts[rank] > len(first[c]):
            raise ValueError(f"class {c} has {len(first[c])} images, the profile asks {counts[rank]}")

    order = old + new
    remap = torch.full((max(all_classes) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(len(order))

    names = [train.classes[c] for c in order]

    def remapped(subset: ImageSet) -> ImageSet:
        return ImageSet(subset.images, remap[subset.targets], names, subset.name)

    labeled_index = np.concatenate([first[c][:n] for c, n in zip(old, counts, strict=True)])
    val = None
    if val_per_class > 0:
        spare = {c: first[c][n:] for c, n in zip(old, counts, strict=True)}
        short = {train.classes[c]: len(v) for c, v in spare.items() if len(v) < val_per_class}
        if short and not val_partial:
            raise ValueError(
                f"val_per_class={val_per_class} but these classes have fewer images left after "
                f"long-tail subsampling: {short}; lower val_per_class or n_max, or pass "
                "val_partial=True to take what is left"
            )
        if sum(min(len(v), val_per_class) for v in spare.values()) == 0:
            raise ValueError("no old class has an image left for the validation split: lower n_max")
        val_index = np.concatenate([spare[c][:val_per_class] for c in old])
        if short:  # expected: the head class keeps its whole first half; val_partial asked for this
            given = len(set(int(t) for t in targets[val_index]))
            log.info(f"held-out known-class images: {len(val_index)} from {given} of the {len(old)} "
                     f"old classes (up to {val_per_class} each); after the long-tail subsampling "
                     + ", ".join(f"class {k!r} has {v} left" for k, v in short.items()))
        val = remapped(train.subset(val_index, f"{name}/val"))
    phase_ids = [list(range(len(old)))]
    if phases is None and distractor_fraction == 0:
        stream_index = np.concatenate([second[c] for c in all_classes]) if halve else np.array([], int)
        stream_index = rng.permutation(stream_index)
        stream = remapped(train.subset(stream_index, f"{name}/stream"))
        phase_ids.append(list(range(len(old), len(order))))
        segment_ends = [len(stream)]
    else:
        if not halve:
            raise ValueError("a phased stream or distractors need a stream: keep halve=True")
        phase_lists = [list(old), list(new)] if phases is None else [[int(c) for c in p] for p in phases]
        phase_ids += [[order.index(c) for c in p] for p in phase_lists[1:]]
        stream, segment_ends = _segments(train, second, phase_lists, remap, distractor_fraction,
                                         distractors, rng, names, f"{name}/stream")
    keep_test = torch.isin(test.targets, torch.tensor(order))
    return ProtocolData(
        labeled=remapped(train.subset(labeled_index, f"{name}/labeled")),
        stream=stream,
        test=remapped(test.subset(torch.nonzero(keep_test).squeeze(1), f"{name}/test")),
        class_names=names,
        n_old=len(old),
        n_new=len(new),
        train_counts=counts,
        name=name,
        val=val,
        phases=phase_ids,
        segment_ends=segment_ends,
    )


def _named(ids: list[int], names: Sequence[str]) -> str:
    """``[9 ('boot')]``: class ids with their names where the source has one."""
    return "[" + ", ".join(f"{c} ({names[c]!r})" if 0 <= c < len(names) else str(c) for c in ids) + "]"


def _drawn_split(split_seed: int, all_classes: list[int], phases, new_classes, new_superclasses,
                 n_new: int | None) -> tuple[list[int], list[int], list[list[int]] | None]:
    """``(old, new, phases)`` drawn by ``split_seed`` (see :func:`make_protocol`): the old
    classes in a drawn rank order, the new ones, and phases of the given sizes (or None)."""
    if list(new_superclasses):
        raise ValueError("make_protocol.split_seed draws classes, new_superclasses names them: give one")
    drawn = [int(c) for c in np.random.default_rng(split_seed).permutation(all_classes)]
    if phases is not None:
        sizes = [len(p) for p in phases]
    else:
        count = len(list(new_classes)) if n_new is None else n_new
        if not 1 <= count < len(all_classes):
            raise ValueError(f"make_protocol.n_new must be between 1 and {len(all_classes) - 1} (the "
                             f"classes there are, minus one old), got {count}")
        sizes = [len(all_classes) - count, count]
    if sum(sizes) > len(all_classes):
        raise ValueError(f"the phases ask {sum(sizes)} classes, the data has {len(all_classes)}")
    ends = np.cumsum(sizes)
    lists = [drawn[e - n:e] for n, e in zip(sizes, ends, strict=True)]
    old, new = lists[0], [c for p in lists[1:] for c in p]
    return old, (new if phases is not None else sorted(new)), (lists if phases is not None else None)


def _phase_classes(phases, new_classes, new_superclasses, all_classes: list[int],
                   source: str) -> tuple[list[int], list[int]]:
    """The old classes (phase 0, in the order given) and the new ones (phases 1.., in order)."""
    if list(new_classes) or list(new_superclasses):
        raise ValueError("give either make_protocol.phases or new_classes / new_superclasses, not both "
                         "(phases already says which classes are new)")
    lists = [[int(c) for c in p] for p in phases]
    if len(lists) < 2 or not all(lists):
        raise ValueError(f"phases must be [old, P1, ...] with at least one phase of new classes and no "
                         f"empty phase, got {lists}")
    flat = [c for p in lists for c in p]
    repeated = sorted({c for c in flat if flat.count(c) > 1})
    if repeated:
        raise ValueError(f"classes {repeated} are in more than one phase: each class has one phase")
    unknown = [c for c in flat if c not in all_classes]
    if unknown:
        raise ValueError(f"phase classes {unknown} do not occur in {source} (has {all_classes})")
    return lists[0], flat[len(lists[0]):]


def _segments(train: ImageSet, second: dict[int, np.ndarray], phase_lists: list[list[int]],
              remap: torch.Tensor, fraction: float, distractors, rng: np.random.Generator,
              names: list[str], name: str) -> tuple[ImageSet, list[int]]:
    """The phased stream (see :func:`make_protocol`) and where each segment ends."""
    if fraction > 0 and distractors is None:
        from components.data.distractors import Distractors

        distractors = Distractors()
    n_segments = len(phase_lists) - 1
    start = {c: max(p, 1) for p, classes in enumerate(phase_lists) for c in classes}
    images, targets, ends = [], [], []
    for segment in range(1, n_segments + 1):
        index = np.concatenate([np.array_split(second[c], n_segments - s + 1)[segment - s]
                                for c, s in start.items() if s <= segment] or [np.array([], int)])
        segment = train.subset(index)  # rows of the file when train is a store (see ImageSet.subset)
        seg_images, seg_targets = segment.images, remap[segment.targets]
        n_noise = int(round(fraction * len(index) / (1 - fraction)))
        if n_noise:
            shape = tuple(train.images.shape[1:])
            seg_images = concat_images([seg_images, distractors(n_noise, shape, rng)])
            seg_targets = torch.cat([seg_targets, torch.full((n_noise,), -1, dtype=torch.long)])
        order = torch.from_numpy(rng.permutation(len(seg_targets)))
        images.append(take_images(seg_images, order))
        targets.append(seg_targets[order])
        ends.append((ends[-1] if ends else 0) + len(order))
    return ImageSet(concat_images(images), torch.cat(targets), names, name), ends
