"""A parametric pseudo-labeler: SimGCD's self-distilled cosine classifier, on cached features.

SimGCD (Wen et al., "Parametric Classification for Generalized Category Discovery", ICCV 2023)
replaces GCD's k-means by a classifier over the old and the new classes, trained on the labeled
and the unlabeled samples together: cross-entropy on the labeled ones; self-distillation on all
of them (each view's prediction, sharpened by a lower teacher temperature, is the target of the
other view's); and a mean-entropy regularizer that keeps the batch's average prediction spread
over the classes (without it the unlabeled samples collapse into the classes the labels made
strong, and k-means' failure of two classes merged into one while a third is split is not
penalized either).

:class:`SelfDistillationLabeler` does that on the features a k-means labeler sees (its
:meth:`~components.kmeans.SemiSupervisedKMeans.geometry`), with the k-means labeler on the
same interface, so it drops in wherever ``SemiSupervisedKMeans`` is bound. What differs from
the paper, and why:

* the classifier is a set of cosine prototypes on cached features, not a head on a backbone
  fine-tuned with it (the loop's representation step, ``lifecycle.representation``, has already
  adapted the backbone; fine-tuning it again per labeler call would cost minutes, not seconds);
* the two views are two feature-space perturbations of the same sample (dropout, then Gaussian
  noise scaled by the features' spread), since cached features have no image to augment;
* the prototypes start at the k-means labeler's centroids rather than at random, which also
  gives k: the number of new classes is the k-means labeler's (given, or estimated as it
  estimates it);
* the labeled half of each batch is drawn class-balanced: the old classes are long-tailed, and
  the mean-entropy term assumes every class equally likely (SimGCD samples labeled and unlabeled
  halves equally, as here, but the labeled half by instance).
"""

from __future__ import annotations

import copy
import math

import gin
import numpy as np
import torch
import torch.nn.functional as F

from components.kmeans import KMeansResult, SemiSupervisedKMeans, _check, _means


@gin.configurable
class SelfDistillationLabeler:
    """Pseudo-labels from SimGCD's parametric classifier, started from a k-means labeler.

    ``init`` clusters first (and estimates k when its ``k_new`` is None); its centroids start
    the prototypes. Then ``steps`` SGD steps (momentum 0.9, cosine-annealed ``lr``) on batches
    of ``batch_size`` samples, half labeled (class-balanced) and half unlabeled, minimize
    SimGCD's loss ``(1 - λ) (L_distill + w · L_memax) + λ L_sup`` with ``λ = supervised_weight``,
    ``w = memax_weight``, logits = cosine / ``student_temperature``, and the teacher temperature
    going linearly from ``warmup_teacher_temperature`` to ``teacher_temperature`` over the first
    ``warmup_fraction`` of the steps (SimGCD's defaults: 0.35, 2, 0.1, 0.07 → 0.04 over 30 of 200
    epochs; its scripts set the mean-entropy weight between 1 and 4 per dataset). A view of a
    sample is its features with ``dropout`` applied and Gaussian noise of ``noise`` times the
    features' per-dimension standard deviation added.

    Each unlabeled sample's label is the classifier's argmax; its distance is the squared
    distance between its normalized features and its prototype (``2 - 2 cos``, as k-means on
    normalized features measures it), ``runner_up`` the same to the next prototype; the
    centroids are the clusters' means in the geometry, labeled samples included, as a k-means
    update makes them. A new class that ends with no sample takes the unlabeled sample most
    similar to its prototype, as k-means re-seeds an empty cluster, so every discovered class
    has members. :meth:`refine` is the k-means labeler's, started from those means.
    """

    def __init__(self, init: SemiSupervisedKMeans = gin.REQUIRED, steps: int = 600, batch_size: int = 256,
                 lr: float = 0.1, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 warmup_teacher_temperature: float = 0.07, warmup_fraction: float = 0.15,
                 supervised_weight: float = 0.35, memax_weight: float = 2.0, dropout: float = 0.2,
                 noise: float = 0.1, seed: int = 0, refine_with: str = "kmeans",
                 refine_memax_weight: float = 0.0) -> None:
        if steps < 1 or batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
        if not 0 <= supervised_weight <= 1 or memax_weight < 0:
            raise ValueError(f"need 0 <= supervised_weight <= 1 and memax_weight >= 0, got "
                             f"{supervised_weight} and {memax_weight}")
        if min(student_temperature, teacher_temperature, warmup_teacher_temperature) <= 0:
            raise ValueError("temperatures must be > 0")
        if not 0 <= dropout < 1 or noise < 0 or not 0 <= warmup_fraction <= 1:
            raise ValueError(f"need 0 <= dropout < 1, noise >= 0 and 0 <= warmup_fraction <= 1, got "
                             f"{dropout}, {noise} and {warmup_fraction}")
        self.init, self.steps, self.batch_size, self.lr = init, steps, batch_size, lr
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.warmup_teacher_temperature, self.warmup_fraction = warmup_teacher_temperature, warmup_fraction
        self.supervised_weight, self.memax_weight = supervised_weight, memax_weight
        self.dropout, self.noise, self.seed = dropout, noise, seed
        if refine_with not in ("kmeans", "classifier") or refine_memax_weight < 0:
            raise ValueError(f"refine_with must be 'kmeans' or 'classifier' and refine_memax_weight >= 0, "
                             f"got {refine_with!r} and {refine_memax_weight}")
        self.refine_with, self.refine_memax_weight = refine_with, refine_memax_weight

    # the k-means labeler's settings that callers set (consolidation fixes k this way)
    @property
    def k_new(self) -> int | None:
        return self.init.k_new

    @k_new.setter
    def k_new(self, value: int | None) -> None:
        self.init.k_new = value

    @property
    def overcluster(self) -> int:
        return self.init.overcluster

    @overcluster.setter
    def overcluster(self, value: int) -> None:
        self.init.overcluster = value

    def __copy__(self) -> SelfDistillationLabeler:
        """A copy whose k-means labeler is a copy too: setting ``k_new`` on it leaves this one's."""
        other = object.__new__(SelfDistillationLabeler)
        other.__dict__.update(self.__dict__)
        other.init = copy.copy(self.init)
        return other

    def geometry(self, x_u, x_l, y_l, n_old: int) -> tuple[np.ndarray, np.ndarray]:
        """The features the classifier sees: the k-means labeler's."""
        return self.init.geometry(x_u, x_l, y_l, n_old)

    def __call__(self, unlabeled: np.ndarray, labeled: np.ndarray, labeled_targets: np.ndarray,
                 n_old: int) -> KMeansResult:
        """Cluster ``unlabeled`` with k-means (which checks the input and sets k), then train
        the classifier from its centroids and label by it."""
        start = self.init(unlabeled, labeled, labeled_targets, n_old)
        y_l = np.asarray(labeled_targets, dtype=np.int64)
        x_u, x_l = self.geometry(_check(unlabeled, "unlabeled"), _check(labeled, "labeled"), y_l, n_old)
        result = self._train(x_u, x_l, y_l, n_old, start.centroids)
        result.k_scores, result.k_estimate = start.k_scores, start.k_estimate
        return result

    def refine(self, result: KMeansResult, unlabeled: np.ndarray, labeled: np.ndarray,
               labeled_targets: np.ndarray, n_old: int) -> KMeansResult:
        """Move ``result``'s clusters to where other ``unlabeled`` samples (e.g. the whole
        stream seen so far) put them; k stays ``result``'s. ``refine_with='kmeans'``: the
        k-means labeler's refine, started from ``result``'s cluster means;
        ``'classifier'``: the classifier trained again on them from those means, with the
        mean-entropy term weighted ``refine_memax_weight`` (on a set that is mostly old classes,
        as the seen stream is, a term that takes every class as equally likely pushes old
        samples into the new classes)."""
        if self.refine_with == "kmeans":
            return self.init.refine(result, unlabeled, labeled, labeled_targets, n_old)
        if len(result.centroids) - n_old < 1:
            raise ValueError(f"nothing to refine: the result has no new cluster ({len(result.centroids)} "
                             f"centroids for {n_old} old classes)")
        y_l = np.asarray(labeled_targets, dtype=np.int64)
        x_u, x_l = self.geometry(_check(unlabeled, "unlabeled"), _check(labeled, "labeled"), y_l, n_old)
        if len(x_u) < len(result.centroids) - n_old:
            raise ValueError(f"cannot refine {len(result.centroids) - n_old} new clusters on {len(x_u)} "
                             "unlabeled samples")
        return self._train(x_u, x_l, y_l, n_old, result.centroids, self.refine_memax_weight)

    def _view(self, x: torch.Tensor, spread: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.dropout > 0:
            keep = torch.rand(x.shape, generator=generator) >= self.dropout
            x = x * keep / (1 - self.dropout)
        if self.noise > 0:
            x = x + self.noise * spread * torch.randn(x.shape, generator=generator)
        return x

    def teacher_temperature_at(self, step: int) -> float:
        """SimGCD's schedule: linear from the warm-up temperature to the final one."""
        warmup = int(self.warmup_fraction * self.steps)
        if step >= warmup:
            return self.teacher_temperature
        start, end = self.warmup_teacher_temperature, self.teacher_temperature
        return start + (end - start) * step / warmup

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, n_labeled: int, step: int,
             memax_weight: float | None = None) -> torch.Tensor:
        """SimGCD's loss on the cosine similarities ``logits`` ``[2, B, C]`` of two views of a
        batch whose first ``n_labeled`` rows have ``labels`` (``memax_weight``: this labeler's
        unless given)."""
        memax_weight = self.memax_weight if memax_weight is None else memax_weight
        student = logits / self.student_temperature
        teacher = F.softmax(logits.detach() / self.teacher_temperature_at(step), dim=-1)
        # each view's sharpened prediction teaches the other view
        distill = 0.5 * sum(-(teacher[1 - v] * F.log_softmax(student[v], dim=-1)).sum(-1).mean()
                            for v in (0, 1))
        n_classes = student.shape[-1]
        mean = F.softmax(student, dim=-1).reshape(-1, n_classes).mean(0)
        memax = (mean * torch.log(mean.clamp_min(1e-12))).sum() + math.log(n_classes)  # log C - H(mean)
        supervised = student.new_zeros(())
        if n_labeled:
            supervised = F.cross_entropy(student[:, :n_labeled].reshape(-1, n_classes), labels.repeat(2))
        return (1 - self.supervised_weight) * (distill + memax_weight * memax) \
            + self.supervised_weight * supervised

    def _train(self, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray, n_old: int,
               centroids: np.ndarray, memax_weight: float | None = None) -> KMeansResult:
        generator = torch.Generator().manual_seed(self.seed)
        xu, xl = torch.from_numpy(np.ascontiguousarray(x_u)), torch.from_numpy(np.ascontiguousarray(x_l))
        yl = torch.from_numpy(y_l)
        spread = torch.cat([xl, xu]).std(0, keepdim=True)
        prototypes = torch.nn.Parameter(F.normalize(torch.as_tensor(centroids, dtype=torch.float32), dim=1))
        optimizer = torch.optim.SGD([prototypes], lr=self.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        # class-balanced draws of the labeled half
        balance = (1.0 / torch.bincount(yl, minlength=n_old).clamp_min(1).double())[yl]
        half = self.batch_size // 2
        for step in range(self.steps):
            il = torch.multinomial(balance, half, replacement=True, generator=generator)
            iu = torch.randint(len(xu), (self.batch_size - half,), generator=generator)
            x = torch.cat([xl[il], xu[iu]])
            weights = F.normalize(prototypes, dim=1)
            logits = torch.stack([F.normalize(self._view(x, spread, generator), dim=1) @ weights.T
                                  for _ in range(2)])
            loss = self.loss(logits, yl[il], half, step, memax_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            weights = F.normalize(prototypes, dim=1)
            cosine = F.normalize(xu, dim=1) @ weights.T
            top = cosine.topk(min(2, cosine.shape[1]), dim=1)
        labels = top.indices[:, 0].numpy().copy()
        best = top.values[:, 0].numpy().copy()
        second = np.full(len(xu), -1.0, np.float32)  # cosine to the next prototype (-1: none)
        if cosine.shape[1] > 1:
            second = top.values[:, 1].numpy().copy()
        for empty in sorted(set(range(n_old, len(weights))) - set(labels.tolist())):
            # the sample most like the empty class's prototype, among those whose cluster keeps one
            crowded = np.flatnonzero(np.bincount(labels, minlength=len(weights)) > 1)
            taken = np.flatnonzero(np.isin(labels, crowded))
            if len(taken) == 0:
                break  # every sample is alone in its cluster already
            nearest = taken[int(np.argmax(cosine[taken, empty].numpy()))]
            second[nearest], best[nearest] = best[nearest], float(cosine[nearest, empty])
            labels[nearest] = empty
        distances = (2 - 2 * best).clip(0).astype(np.float32)
        runner_up = (2 - 2 * second).clip(0).astype(np.float32)
        # the centroids are the clusters' means, labeled samples included (as a k-means update
        # makes them): k-means' refine starts from them
        sums, counts = _means(np.concatenate([x_l, x_u]), np.concatenate([y_l, labels]), len(weights))
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        return KMeansResult(labels, distances, centroids, float(distances.sum()), self.steps,
                            runner_up=runner_up)
