"""Which discovered clusters become classes: the continual loop's accept / reject rule.

A clustering of the pool always returns clusters; not every cluster is a class. Growing the
classifier by a cluster of old-class look-alikes, of a split class, or of distractors cannot
be undone, so :class:`ClusterAcceptance` keeps a cluster only when it is

* **big enough**: at least ``min_size`` pooled samples;
* **stable**: its clusterwise Jaccard stability (Hennig, *Cluster-wise assessment of cluster
  stability*, CSDA 2007) is at least ``min_stability``: the pool is subsampled (``fraction``,
  ``resamples`` times) and each subsample is clustered again by the caller's ``recluster`` (the
  continual loop runs the whole procedure again: k estimated anew, seeded anew); in each, the
  cluster's best Jaccard overlap with a cluster of the new clustering is taken, and the mean is
  its stability (Hennig: below 0.5 the cluster "dissolves", above 0.75 it is stable);
* **apart from the known classes**: its centroid lies farther from the nearest known-class
  mean than ``min_separation`` times that class's radius (the mean distance of its labeled
  samples to their mean; the median radius for a class with fewer than ``min_size`` of them,
  whose own radius is noise), so it is not the fringe of a class the model already has;
* **not inside a known class's territory**, when ``min_spread`` is set: that distance is at least
  ``min_spread`` times the median distance between neighbouring known-class means. A class
  with a handful of labeled images has a radius measured on images the model was trained on,
  so its radius understates how far its unseen samples spread; the stream samples the model is
  unsure of then form a cluster one or two of those radii away, which the test above accepts.
  The distance between known classes does not shrink with a class's label count;
* **in the known classes' domain**, when ``max_separation`` is set: not farther than
  ``max_separation`` times the median distance between neighbouring known-class means, so a
  cloud of noise or of another dataset's images, far from everything known, is not a class;
* **varied**: its own radius at least ``min_tightness`` times the median known-class radius; a
  class has the variation of a class, a cluster of near copies (a flat frame, a frozen sensor)
  does not;
* **made of images of the domain**, when ``max_off_domain`` is set and the caller says which
  samples are off the domain (``off_domain``, e.g. :class:`components.domain.InputComplexity`:
  an input complexity outside the band of held-out known-class images): at most that fraction
  of its members are. A test on the pixels, not on distances in the features, where noise and
  flat frames can lie as near the known classes as a new class does.

A cluster that passes but lies within ``min_separation`` radii of a bigger cluster that passed is
**merged** into it (one class found as two clusters in one round is one class). Rejected
clusters' samples stay in the pool (and can age out there). All distances are taken in the
geometry the labeler clustered in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gin
import numpy as np

from components.kmeans import KMeansResult


@dataclasses.dataclass
class Verdict:
    """One cluster's measurements and whether it becomes a class (``reasons`` says why not)."""

    cluster: int  # its id in the clustering: n_old + j
    size: int
    stability: float
    separation: float  # distance to the nearest known-class mean / that class's radius
    spread: float  # that distance / the median distance between neighbouring known-class means
    tightness: float  # its radius / the median known-class radius
    accepted: bool
    reasons: list[str]
    merged_into: int | None = None  # the bigger accepted cluster it joins, if any
    off_domain: float | None = None  # the fraction of its members off the domain, when measured
    # distance to the nearest other accepted cluster of the round, in the spacing units of
    # ``spread`` (None when no other cluster was accepted); recorded, not tested: no distance told
    # one class found twice from two classes (docs/loop.md#round-by-round-where-the-new-classes-go)
    nearest_accepted: float | None = None
    nearest_cluster: int | None = None  # that cluster's id

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def jaccard_stability(labels: np.ndarray, clusters: list[int], recluster: Callable[[np.ndarray], np.ndarray],
                      resamples: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Hennig's clusterwise Jaccard stability of each cluster id in ``clusters``: the mean, over
    ``resamples`` subsamples of ``fraction`` of the samples re-clustered by ``recluster(index)``,
    of its best Jaccard overlap with a cluster of the re-clustering."""
    n = len(labels)
    total = np.zeros(len(clusters))
    if n < 2:
        return total  # nothing to resample: no evidence of stability
    for _ in range(resamples):
        index = np.sort(rng.choice(n, max(2, int(round(fraction * n))), replace=False))
        again = np.asarray(recluster(index))
        mine = labels[index]
        for i, c in enumerate(clusters):
            members = mine == c
            if not members.any():
                continue  # the cluster left the subsample: counts as 0 this time
            best = 0.0
            for other in np.unique(again[members]):
                theirs = again == other
                best = max(best, (members & theirs).sum() / (members | theirs).sum())
            total[i] += best
    return total / resamples


def neighbour_spacing(means: np.ndarray) -> float:
    """The median distance from each class mean ``[n, D]`` (n >= 2) to its nearest other one: the
    scale the territory tests measure distances in."""
    between = np.linalg.norm(means[:, None] - means[None], axis=2)
    np.fill_diagonal(between, np.inf)
    return float(np.median(between.min(1)))


@gin.configurable
class ClusterAcceptance:
    """The rule of the module docstring. Call it with the clustering, the unlabeled (pool) and
    labeled features in the labeler's geometry, and ``recluster(index) -> labels`` that clusters
    ``x_u[index]`` again (the same procedure, or the same number of clusters); ``off_domain``
    (a boolean per pooled sample) for ``max_off_domain``."""

    def __init__(self, min_size: int = 10, min_stability: float = 0.5, min_separation: float = 1.0,
                 max_separation: float | None = None, min_tightness: float = 0.0, min_spread: float = 0.0,
                 max_off_domain: float | None = None, merge: bool = True, resamples: int = 5,
                 fraction: float = 0.8, seed: int = 0) -> None:
        if min_size < 1 or not 0 <= min_stability <= 1 or min_separation < 0 or resamples < 1:
            raise ValueError(f"need min_size >= 1, 0 <= min_stability <= 1, min_separation >= 0 and "
                             f"resamples >= 1, got {min_size}, {min_stability}, {min_separation}, "
                             f"{resamples}")
        if min_spread < 0 or (max_separation is not None and max_separation <= min_spread):
            raise ValueError(f"need 0 <= min_spread < max_separation, got {min_spread} and {max_separation}")
        if not 0 < fraction < 1:
            raise ValueError(f"the subsample fraction must be in (0, 1), got {fraction}")
        if max_off_domain is not None and not 0 <= max_off_domain < 1:
            raise ValueError(f"max_off_domain must be a fraction in [0, 1) or None, got {max_off_domain}")
        self.min_size, self.min_stability = min_size, min_stability
        self.min_separation, self.max_separation = min_separation, max_separation
        self.min_tightness, self.min_spread, self.merge = min_tightness, min_spread, merge
        self.max_off_domain = max_off_domain
        self.resamples, self.fraction, self.seed = resamples, fraction, seed

    def __call__(self, result: KMeansResult, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray,
                 n_old: int, recluster: Callable[[np.ndarray], np.ndarray],
                 off_domain: np.ndarray | None = None) -> list[Verdict]:
        if self.max_off_domain is not None and off_domain is None:
            raise ValueError("ClusterAcceptance.max_off_domain needs each pooled sample's off-domain flag: "
                             "give the loop a domain test (continual.domain = @InputComplexity()) or set "
                             "max_off_domain = None")
        if off_domain is not None and len(off_domain) != len(result.labels):
            raise ValueError(f"off_domain has {len(off_domain)} flags for {len(result.labels)} samples")
        clusters = list(range(n_old, len(result.centroids)))
        if not clusters:
            return []
        means = np.stack([x_l[y_l == c].mean(0) for c in range(n_old)])
        radius = np.array([np.linalg.norm(x_l[y_l == c] - means[c], axis=1).mean() for c in range(n_old)])
        counts = np.bincount(y_l, minlength=n_old)
        reliable = (counts >= self.min_size) & (radius > 0)
        typical_radius = float(np.median(radius[reliable])) if reliable.any() else float(radius.max() or 1.0)
        # a radius measured on fewer than min_size samples is noise: such a class gets the median
        radius = np.where(reliable, radius, typical_radius)
        typical = neighbour_spacing(means) if n_old > 1 else float(radius.mean())
        stability = jaccard_stability(result.labels, clusters, recluster, self.resamples, self.fraction,
                                      np.random.default_rng(self.seed))
        verdicts = []
        for i, c in enumerate(clusters):
            members = result.labels == c
            size = int(members.sum())
            gaps = np.linalg.norm(means - result.centroids[c], axis=1)
            nearest = int(np.argmin(gaps))
            separation, spread = float(gaps[nearest] / radius[nearest]), float(gaps[nearest] / typical)
            own = float(np.linalg.norm(x_u[members] - result.centroids[c], axis=1).mean()) if size else 0.0
            tightness = own / typical_radius
            reasons = []
            if size < self.min_size:
                reasons.append(f"{size} samples, fewer than {self.min_size}")
            if stability[i] < self.min_stability:
                reasons.append(f"stability {stability[i]:.2f} below {self.min_stability}")
            if separation < self.min_separation:
                reasons.append(f"within {separation:.2f} radii of known class {nearest}")
            if spread < self.min_spread:
                reasons.append(f"{spread:.2f} of the distance between neighbouring known classes from known "
                               f"class {nearest}: inside its territory")
            if self.max_separation is not None and spread > self.max_separation:
                reasons.append(f"{spread:.1f} times farther than known classes are from each other: "
                               "outside their domain")
            if tightness < self.min_tightness:
                reasons.append(f"its samples are near copies of one another (radius {tightness:.2f} of a "
                               "known class's)")
            off = float(np.asarray(off_domain)[members].mean()) if off_domain is not None and size else None
            if self.max_off_domain is not None and off is not None and off > self.max_off_domain:
                reasons.append(f"{100 * off:.0f} % of its samples are off the domain (their input complexity "
                               "lies outside the held-out known-class images')")
            verdicts.append(Verdict(c, size, float(stability[i]), separation, spread, tightness,
                                    not reasons, reasons, off_domain=off))
        accepted = [v for v in verdicts if v.accepted]
        for v in accepted:
            here = result.centroids[v.cluster]
            gaps = {o.cluster: np.linalg.norm(here - result.centroids[o.cluster]) / typical
                    for o in accepted if o is not v}
            if gaps:
                v.nearest_cluster = min(gaps, key=gaps.get)
                v.nearest_accepted = float(gaps[v.nearest_cluster])
        if self.merge:
            self._merge(verdicts, result, x_u)
        return verdicts

    def _merge(self, verdicts: list[Verdict], result: KMeansResult, x_u: np.ndarray) -> None:
        """Merge each accepted cluster into a bigger accepted one it lies within
        ``min_separation`` radii of (biggest first)."""
        kept: list[Verdict] = []
        for v in sorted((v for v in verdicts if v.accepted), key=lambda v: -v.size):
            for k in kept:
                members = result.labels == k.cluster
                own = np.linalg.norm(x_u[members] - result.centroids[k.cluster], axis=1).mean()
                gap = np.linalg.norm(result.centroids[v.cluster] - result.centroids[k.cluster])
                if gap < self.min_separation * own:
                    v.merged_into = k.cluster
                    break
            else:
                kept.append(v)


@gin.configurable
class PromotionGate:
    """Whether a student replaces the current model, judged on the held-out known-class images
    (never the test set) with plain accuracy: output ``c`` must be class ``c`` (a Hungarian
    remap could hide a student that swapped two old classes).

    The student is refused when its drop in accuracy exceeds ``max_drop`` by more than the
    noise of a paired measurement (McNemar's test; the two models see the same images): with
    ``b`` images only the current model gets right and ``c`` only the student, it is refused
    when ``(b - c) / n > max_drop + z · sqrt(b + c) / n``. On a few dozen held-out images one
    image is more than a point, so a plain bound would refuse students for noise.

    A student that grew by several outputs can fail because of one of them: a cluster of
    old-class look-alikes becomes an output that takes that class's images. With
    ``drop_outputs`` (:meth:`select`), a refused student loses its new outputs one at a time,
    the one that took the most held-out images the current model got right first, until it
    passes or no new output takes any; the round keeps the outputs that did no harm instead of
    losing them all.
    """

    def __init__(self, max_drop: float = 0.02, z: float = 1.64, drop_outputs: bool = True) -> None:
        if not 0 <= max_drop <= 1 or z < 0:
            raise ValueError(f"need 0 <= max_drop <= 1 (a fraction of accuracy) and z >= 0, "
                             f"got {max_drop}, {z}")
        self.max_drop, self.z, self.drop_outputs = max_drop, z, drop_outputs

    def select(self, current_correct: np.ndarray, student_logits: np.ndarray, targets: np.ndarray,
               n_known: int) -> tuple[list[int], bool, str]:
        """The gate on a student that grew by the outputs ``n_known`` and up, given its logits
        on the held-out images (``targets`` are their classes, all below ``n_known``).

        Returns ``(kept, promoted, why)``: the new output ids the student keeps (all of them
        when it passes as it is) and the verdict on the student without the others. Dropping
        an output is masking its logit: each output of the classifiers here depends on its own
        row only, so the other outputs' logits do not change (``Network.keep_outputs`` then
        drops the rows from the model)."""
        logits = np.array(student_logits, dtype=np.float64)
        targets = np.asarray(targets)
        current_correct = np.asarray(current_correct, bool)
        if logits.ndim != 2 or len(logits) != len(targets) or not 0 < n_known <= logits.shape[1]:
            raise ValueError(f"need [n, outputs] logits for n targets and 0 < n_known <= outputs, got "
                             f"{logits.shape}, {len(targets)} targets, n_known={n_known}")
        kept = list(range(n_known, logits.shape[1]))
        dropped: list[str] = []
        while True:
            predicted = logits.argmax(1)
            promoted, why = self(current_correct, predicted == targets)
            if promoted or not self.drop_outputs or not kept:
                break
            lost = current_correct & (predicted != targets)  # images the student took away
            took = {o: int((lost & (predicted == o)).sum()) for o in kept}
            worst = max(kept, key=lambda o: (took[o], -o))
            if took[worst] == 0:  # the loss is not any new output's doing
                break
            kept.remove(worst)
            logits[:, worst] = -np.inf
            dropped.append(f"output {worst} (took {took[worst]})")
        if dropped:
            why = f"dropped {', '.join(dropped)}; without them: {why}"
        return kept, promoted, why

    def __call__(self, current_correct: np.ndarray, student_correct: np.ndarray) -> tuple[bool, str]:
        current_correct = np.asarray(current_correct, bool)
        student_correct = np.asarray(student_correct, bool)
        n = len(current_correct)
        if n == 0 or len(student_correct) != n:
            raise ValueError(f"the gate needs both models' results on the same held-out images, got "
                             f"{n} and {len(student_correct)}")
        b = int((current_correct & ~student_correct).sum())
        c = int((~current_correct & student_correct).sum())
        before, after = current_correct.mean(), student_correct.mean()
        allowed = self.max_drop + self.z * np.sqrt(b + c) / n
        verdict = (f"held-out known-class accuracy {100 * before:.1f} % (current) -> {100 * after:.1f} % "
                   f"(student), {b} images lost and {c} gained of {n}; allowed drop "
                   f"{100 * allowed:.1f} points")
        if (b - c) / n <= allowed:
            return True, verdict
        return False, verdict + ": the current model stays and the pool is kept"
