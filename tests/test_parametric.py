"""SimGCD's parametric labeler on cached features: what makes it SimGCD (the mean-entropy term
undoes a merge the self-distillation alone keeps; the labels pin the old classes), and what
makes it a drop-in for the k-means labeler (k, copies, refine, no empty class)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from components.kmeans import KMeansResult, SemiSupervisedKMeans, confident
from components.parametric import SelfDistillationLabeler

D = 8


def _accuracy(truth: np.ndarray, labels: np.ndarray) -> float:
    counts = np.zeros((truth.max() + 1, max(truth.max(), labels.max()) + 1))
    np.add.at(counts, (truth, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return counts[rows, cols].sum() / len(truth)


def _data(seed: int, angle: float = 0.8, noise: float = 0.3):
    """Old classes 0, 1 (labeled); new classes 2, 3, 4 unlabeled with 0 and 1; classes 3 and 4
    lie ``angle`` radians apart."""
    rng = np.random.default_rng(seed)
    means = np.eye(D)[:5] * 4
    means[4] = 4 * (np.cos(angle) * np.eye(D)[3] + np.sin(angle) * np.eye(D)[4])

    def blob(c, n):
        return (means[c] + rng.normal(0, noise, (n, D))).astype(np.float32)

    x_l, y_l = np.concatenate([blob(0, 30), blob(1, 30)]), np.repeat([0, 1], 30)
    x_u, y_u = np.concatenate([blob(c, 60) for c in range(5)]), np.repeat(np.arange(5), 60)
    return means, x_l, y_l, x_u, y_u


class _MergedStart:
    """A k-means result gone wrong the usual way: two centroids share class 2, one sits between
    classes 3 and 4 (on the unit sphere, as the labeler's geometry puts features)."""

    k_new, overcluster = 3, 1

    def __init__(self, means):
        self.means = means

    def geometry(self, x_u, x_l, y_l, n_old):
        return (x_u / np.linalg.norm(x_u, axis=1, keepdims=True),
                x_l / np.linalg.norm(x_l, axis=1, keepdims=True))

    def __call__(self, x_u, x_l, y_l, n_old):
        m = self.means
        c = np.stack([m[0], m[1], m[2] + 0.5 * m[0] / 4, m[2] - 0.5 * m[0] / 4, (m[3] + m[4]) / 2])
        c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        return KMeansResult(np.zeros(len(x_u), np.int64), np.zeros(len(x_u)), c, 0.0, 0, k_scores={3: 1.0},
                            k_estimate=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_mean_entropy_term_splits_two_classes_the_start_merged(seed):
    means, x_l, y_l, x_u, y_u = _data(seed)
    without = SelfDistillationLabeler(init=_MergedStart(means), memax_weight=0.0, seed=seed)(x_u, x_l, y_l, 2)
    simgcd = SelfDistillationLabeler(init=_MergedStart(means), seed=seed)(x_u, x_l, y_l, 2)
    # self-distillation alone sharpens whatever the start said: 3 and 4 stay one class
    assert _accuracy(y_u, without.labels) < 0.85
    assert np.bincount(without.labels[(y_u == 3) | (y_u == 4)]).max() >= 110
    # the mean-entropy term spreads the average prediction, so the merged pair is split
    assert _accuracy(y_u, simgcd.labels) >= 0.98
    # and the k-means labeler's k estimate travels with the result
    assert simgcd.k_estimate == 3 and simgcd.k_scores == {3: 1.0}


def test_labeled_classes_keep_their_outputs_and_new_ones_get_the_rest():
    _, x_l, y_l, x_u, y_u = _data(0, angle=np.pi / 2)
    labeler = SelfDistillationLabeler(init=SemiSupervisedKMeans(k_new=3, n_init=3))
    result = labeler(x_u, x_l, y_l, 2)
    # old classes' unlabeled samples land on the labeled outputs, with no remap
    assert (result.labels[y_u == 0] == 0).all() and (result.labels[y_u == 1] == 1).all()
    new = y_u >= 2
    assert (result.labels[new] >= 2).all() and _accuracy(y_u[new] - 2, result.labels[new] - 2) == 1.0
    # k-means' conventions: squared distance between unit vectors, the runner-up farther
    assert (result.runner_up >= result.distances).all() and (result.distances <= 4).all()
    # the centroids are the clusters' means in the labeler's geometry, labeled samples included
    u, lab = labeler.geometry(x_u, x_l, y_l, 2)
    members = np.concatenate([u[result.labels == 3], lab[y_l == 3]])
    np.testing.assert_allclose(result.centroids[3], members.mean(0), atol=1e-5)
    old = np.concatenate([u[result.labels == 0], lab[y_l == 0]])
    np.testing.assert_allclose(result.centroids[0], old.mean(0), atol=1e-5)
    assert confident(result, 0.5, margin=0.7).sum() > 0  # the pseudo-label filters read it


def test_simgcd_loss_terms():
    labeler = SelfDistillationLabeler(init=_MergedStart(np.eye(5)), steps=100, warmup_fraction=0.3)
    # the teacher's temperature warms from 0.07 to 0.04 over the first 30 steps, then stays
    assert labeler.teacher_temperature_at(0) == pytest.approx(0.07)
    assert labeler.teacher_temperature_at(15) == pytest.approx(0.055)
    assert labeler.teacher_temperature_at(30) == labeler.teacher_temperature_at(99) == 0.04
    # a batch whose mean prediction is uniform pays no mean-entropy penalty; a collapsed one does
    spread = torch.eye(4).repeat(2, 1, 1)  # each sample sure of its own class: mean is uniform
    collapsed = torch.zeros(2, 4, 4)
    collapsed[..., 0] = 1.0
    only_memax = SelfDistillationLabeler(init=None, supervised_weight=0.0, memax_weight=1.0)
    no_memax = SelfDistillationLabeler(init=None, supervised_weight=0.0, memax_weight=0.0)

    def memax(logits):
        return (only_memax.loss(logits, torch.empty(0, dtype=torch.long), 0, 1000)
                - no_memax.loss(logits, torch.empty(0, dtype=torch.long), 0, 1000)).item()

    assert memax(spread) == pytest.approx(0.0, abs=1e-3)
    assert memax(collapsed) > 0.5
    # the supervised term is the cross-entropy of both views' student logits on the labels
    sup = SelfDistillationLabeler(init=None, supervised_weight=1.0)
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([0, 2, 1])
    expected = torch.nn.functional.cross_entropy((logits / 0.1).reshape(-1, 4), labels.repeat(2))
    assert sup.loss(logits, labels, 3, 0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_copy_takes_its_own_k_and_results_repeat_by_seed():
    _, x_l, y_l, x_u, _ = _data(0, angle=np.pi / 2)
    labeler = SelfDistillationLabeler(init=SemiSupervisedKMeans(k_new=None, n_init=2, k_max=4), steps=50)
    other = copy.copy(labeler)
    other.k_new, other.overcluster = 2, 1  # consolidation fixes k on a copy
    assert labeler.k_new is None and labeler.init.k_new is None and other.init.k_new == 2
    assert len(other(x_u, x_l, y_l, 2).centroids) == 4
    a, b = labeler(x_u, x_l, y_l, 2), labeler(x_u, x_l, y_l, 2)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.k_estimate is not None and len(a.centroids) == 2 + a.k_estimate


def test_no_new_class_ends_empty_and_refine_is_kmeans_from_the_cluster_means():
    means, x_l, y_l, x_u, y_u = _data(0)
    # a start with a fourth new prototype where no sample lies: it still ends with a member
    class Extra(_MergedStart):
        def __call__(self, *args):
            result = super().__call__(*args)
            far = -result.centroids[2:3]  # the antipode of class 2's prototype
            return dataclasses.replace(result, centroids=np.concatenate([result.centroids, far]))

    result = SelfDistillationLabeler(init=Extra(means), steps=100)(x_u, x_l, y_l, 2)
    assert len(result.centroids) == 6 and np.bincount(result.labels, minlength=6)[2:].min() >= 1
    # refine: the k-means labeler's, on another set, from this result's means; k stays
    labeler = SelfDistillationLabeler(init=SemiSupervisedKMeans(k_new=3, n_init=2), steps=100)
    result = labeler(x_u, x_l, y_l, 2)
    rest = np.isin(y_u, [0, 2, 3, 4])
    refined = labeler.refine(result, x_u[rest], x_l, y_l, 2)
    expected = labeler.init.refine(result, x_u[rest], x_l, y_l, 2)
    np.testing.assert_array_equal(refined.labels, expected.labels)
    assert len(refined.centroids) == 5 and len(refined.labels) == rest.sum()
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        SelfDistillationLabeler(init=None, teacher_temperature=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_classifier_refine_on_a_mostly_old_stream_needs_the_mean_entropy_term_off(seed):
    """``refine_with='classifier'`` trains again on the seen stream; there the old classes are
    most samples, and a term that wants every class equally likely moves old samples into the
    new outputs (why ``refine_memax_weight`` is its own setting, 0 by default)."""
    _, x_l, y_l, x_u, y_u = _data(seed, angle=np.pi / 2, noise=1.2)
    rng = np.random.default_rng(seed)
    counts = {0: 300, 1: 300, 2: 20, 3: 20, 4: 20}
    seen = np.concatenate([x_u[rng.choice(np.flatnonzero(y_u == c), n)] for c, n in counts.items()])
    old = np.repeat(list(counts), list(counts.values())) < 2

    def old_taken_as_new(weight):
        labeler = SelfDistillationLabeler(init=SemiSupervisedKMeans(k_new=3, n_init=2), steps=200, seed=seed,
                                          refine_with="classifier", refine_memax_weight=weight)
        refined = labeler.refine(labeler(x_u, x_l, y_l, 2), seen, x_l, y_l, 2)
        assert len(refined.centroids) == 5 and len(refined.labels) == len(seen)
        return int((refined.labels[old] >= 2).sum())

    assert old_taken_as_new(0.0) <= 10
    assert old_taken_as_new(2.0) >= 40
