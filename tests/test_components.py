"""Scores, losses, semi-supervised k-means, the sample pool, the feature cache and the metrics.

Reference values are hand-computed or come from an explicit loop / brute force / scikit-learn.
"""

from __future__ import annotations

import itertools
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from components.cache import FeatureCache, data_fingerprint, fingerprint, model_fingerprint
from components.kmeans import SemiSupervisedKMeans
from components.losses import DistillLoss, GCDContrastive, SupConLoss
from components.metrics import (
    ClusteringAccuracy,
    ShotAccuracy,
    clustering_accuracy,
    hungarian_mapping,
    novelty_metrics,
    pool_quality,
    shot_accuracy,
)
from components.models import SmallConvNet
from components.pool import SamplePool
from components.scores import energy, max_softmax

# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------

LOGITS = torch.tensor([[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_max_softmax_hand_computed():
    # softmax of [ln 3, 0, 0] = [3/5, 1/5, 1/5]; uniform = 1/3 each
    assert torch.allclose(max_softmax(LOGITS), torch.tensor([1 - 3 / 5, 1 - 1 / 3]))


def test_energy_hand_computed():
    # -logsumexp: -ln(3 + 1 + 1), -ln 3; at T = 2: -2 ln(sqrt(3) + 2), -2 ln 3
    assert torch.allclose(energy(LOGITS), torch.tensor([-math.log(5.0), -math.log(3.0)]))
    expected_t2 = torch.tensor([-2 * math.log(math.sqrt(3) + 2), -2 * math.log(3.0)])
    assert torch.allclose(energy(LOGITS, temperature=2.0), expected_t2)
    with pytest.raises(ValueError, match="temperature"):
        energy(LOGITS, temperature=0.0)


@pytest.mark.parametrize("score", [max_softmax, energy])
def test_scores_higher_means_more_uncertain(score):
    confident, unsure = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.9, 1.1]])
    assert score(unsure) > score(confident)
    assert score(torch.zeros(4, 5)).shape == (4,)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def test_distill_loss_without_kd_is_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 3)
    targets = torch.tensor([0, 4, 2, 3, 1, 4])
    loss = DistillLoss(temperature=2.0, kd_weight=0.0)(student, targets, teacher)
    assert torch.allclose(loss, F.cross_entropy(student, targets))


def test_distill_kd_term_is_zero_when_student_matches_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(4, 3)
    student = torch.cat([teacher, torch.randn(4, 2)], 1)
    targets = torch.tensor([0, 1, 3, 4])
    loss = DistillLoss(temperature=3.0, kd_weight=5.0)(student, targets, teacher)
    assert torch.allclose(loss, F.cross_entropy(student, targets), atol=1e-6)


def test_distill_kd_term_hand_computed_and_teacher_detached():
    torch.manual_seed(1)
    teacher = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 5, requires_grad=True)
    targets = torch.tensor([0, 1, 3, 4])
    t, w = 2.0, 0.5
    loss = DistillLoss(temperature=t, kd_weight=w)(student, targets, teacher)
    p_t = (teacher.detach() / t).softmax(1)
    log_p_s = (student.detach()[:, :3] / t).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()  # KL(teacher || student), batch mean
    expected = F.cross_entropy(student.detach(), targets) + w * t * t * kl
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_distill_rejects_student_smaller_than_teacher():
    with pytest.raises(ValueError, match="fewer"):
        DistillLoss()(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4))


def _nt_xent_reference(view1: torch.Tensor, view2: torch.Tensor, tau: float) -> float:
    """SimCLR's NT-Xent written out: anchor a, positive = the other view of the same image,
    denominator = every other embedding."""
    z = [F.normalize(v, dim=0) for v in torch.cat([view1, view2])]
    n2 = len(z)
    total = 0.0
    for a in range(n2):
        positive = (a + n2 // 2) % n2
        denominator = sum(math.exp(float(z[a] @ z[k]) / tau) for k in range(n2) if k != a)
        total += -math.log(math.exp(float(z[a] @ z[positive]) / tau) / denominator)
    return total / n2


def _supcon_reference(view1, view2, labels, tau: float) -> float:
    """Khosla et al.'s L_out written out: mean over positives of -log softmax, mean over anchors."""
    z = [F.normalize(v, dim=0) for v in torch.cat([view1, view2])]
    y = torch.cat([labels, labels]).tolist()
    total = 0.0
    for a in range(len(z)):
        denominator = sum(math.exp(float(z[a] @ z[k]) / tau) for k in range(len(z)) if k != a)
        positives = [p for p in range(len(z)) if p != a and y[p] == y[a]]
        total += -sum(math.log(math.exp(float(z[a] @ z[p]) / tau) / denominator)
                      for p in positives) / len(positives)
    return total / len(z)


def test_supcon_without_labels_is_nt_xent():
    torch.manual_seed(0)
    v1, v2 = torch.randn(4, 3), torch.randn(4, 3)
    loss = SupConLoss(temperature=0.5)(v1, v2)
    assert loss.item() == pytest.approx(_nt_xent_reference(v1, v2, 0.5), rel=1e-5)


def test_supcon_with_labels_matches_reference():
    torch.manual_seed(1)
    v1, v2 = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 1, 0, 2, 1])
    loss = SupConLoss(temperature=0.3)(v1, v2, labels)
    assert loss.item() == pytest.approx(_supcon_reference(v1, v2, labels, 0.3), rel=1e-5)


def test_supcon_same_label_samples_are_positives():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    jitter = torch.tensor([[0.0, 0.05], [0.05, 0.0], [0.0, -0.05], [-0.05, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    together = torch.stack([e1, e1, e2, e2]) + jitter  # same-label images close
    apart = together[[0, 2, 1, 3]]  # the same points, same-label images now far apart
    loss = SupConLoss(temperature=0.1)
    assert loss(together, together, labels) < loss(apart, apart, labels) - 1.0
    # without labels the two layouts differ only by the order of images: equal loss
    assert loss(together, together).item() == pytest.approx(loss(apart, apart).item(), rel=1e-4)


def test_gcd_contrastive_weights_the_two_terms():
    torch.manual_seed(2)
    v1, v2 = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    labeled = torch.tensor([True, True, True, True, False, False])
    supcon = SupConLoss(0.1)
    expected = 0.6 * supcon(v1, v2) + 0.4 * supcon(v1[:4], v2[:4], labels[:4])
    gcd = GCDContrastive(supervised_weight=0.4, temperature=0.1)
    assert torch.allclose(gcd(v1, v2, labels, labeled), expected)
    none = torch.zeros(6, dtype=torch.bool)
    assert torch.allclose(gcd(v1, v2, labels, none), 0.6 * supcon(v1, v2))


# --------------------------------------------------------------------------------------------
# SemiSupervisedKMeans
# --------------------------------------------------------------------------------------------


def _blobs(seed: int = 0):
    """Five well-separated blobs in 8-D (along different axes, so cosine geometry separates them
    too): old classes 0, 1, 2 have labeled and unlabeled points, classes 3 and 4 only unlabeled."""
    rng = np.random.default_rng(seed)
    centers = 10.0 * np.eye(8)[:5] + 1.0

    def draw(c, n):
        return centers[c] + 0.3 * rng.standard_normal((n, 8))

    labeled = np.concatenate([draw(c, 10) for c in range(3)])
    labeled_y = np.repeat(np.arange(3), 10)
    sizes = [8, 8, 8, 15, 12]
    unlabeled = np.concatenate([draw(c, n) for c, n in enumerate(sizes)])
    unlabeled_y = np.repeat(np.arange(5), sizes)
    order = rng.permutation(len(unlabeled))
    return labeled, labeled_y, unlabeled[order], unlabeled_y[order]


def test_kmeans_recovers_old_and_new_blobs():
    labeled, labeled_y, unlabeled, truth = _blobs()
    result = SemiSupervisedKMeans(k_new=2, seed=0)(unlabeled, labeled, labeled_y, n_old=3)
    old = truth < 3
    assert (result.labels[old] == truth[old]).all()  # old points keep their class id
    assert set(result.labels[~old].tolist()) == {3, 4}
    acc = clustering_accuracy(truth, result.labels, old)
    assert acc["all"] == 1.0 and acc["new"] == 1.0 and acc["old"] == 1.0
    assert result.centroids.shape == (5, 8) and result.labels.shape == truth.shape
    assert (result.distances >= -1e-5).all() and np.isfinite(result.inertia)


def test_kmeans_is_deterministic_in_seed():
    labeled, labeled_y, unlabeled, _ = _blobs(1)
    a = SemiSupervisedKMeans(k_new=3, seed=7, n_init=2)(unlabeled, labeled, labeled_y, 3)
    b = SemiSupervisedKMeans(k_new=3, seed=7, n_init=2)(unlabeled, labeled, labeled_y, 3)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.centroids, b.centroids) and a.inertia == b.inertia


def test_kmeans_rejects_bad_input():
    labeled, labeled_y, unlabeled, _ = _blobs()
    with pytest.raises(ValueError, match="3 new clusters in 2 unlabeled"):
        SemiSupervisedKMeans(k_new=3)(unlabeled[:2], labeled, labeled_y, 3)
    bad = unlabeled.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SemiSupervisedKMeans(k_new=2)(bad, labeled, labeled_y, 3)
    bad_labeled = labeled.copy()
    bad_labeled[0, 0] = np.inf
    with pytest.raises(ValueError, match="labeled features: 1 rows contain NaN or inf"):
        SemiSupervisedKMeans(k_new=2)(unlabeled, bad_labeled, labeled_y, 3)
    keep = labeled_y != 1
    with pytest.raises(ValueError, match=r"\[1\]"):  # old class 1 has no labeled sample
        SemiSupervisedKMeans(k_new=2)(unlabeled, labeled[keep], labeled_y[keep], 3)
    with pytest.raises(ValueError, match="k_new"):
        SemiSupervisedKMeans(k_new=0)
    with pytest.raises(ValueError, match="widths"):
        SemiSupervisedKMeans(k_new=2)(unlabeled[:, :5], labeled, labeled_y, 3)


def test_kmeans_handles_empty_clusters_from_duplicate_points():
    """Eight unlabeled samples at only two distinct places, three new clusters asked: seeding
    must pick a duplicate, so a new cluster starts empty and has to be re-seeded."""
    labeled = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    labeled_y = np.array([0, 0])
    a, b = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
    unlabeled = np.stack([a] * 4 + [b] * 4)
    result = SemiSupervisedKMeans(k_new=3, seed=0)(unlabeled, labeled, labeled_y, n_old=1)
    assert np.isfinite(result.centroids).all()
    assert ((result.labels >= 1) & (result.labels <= 3)).all()  # never the old class
    assert set(result.labels.tolist()) == {1, 2, 3}  # every new cluster holds a sample
    # no cluster mixes the two places
    assert not set(result.labels[:4].tolist()) & set(result.labels[4:].tolist())


# --------------------------------------------------------------------------------------------
# SamplePool
# --------------------------------------------------------------------------------------------


def test_pool_threshold_add_ready_remove():
    pool = SamplePool(trigger_size=3, threshold=0.5)
    assert pool.add(np.array([10, 11, 12, 13]), np.array([0.1, 0.6, 0.5, 0.9])) == 2
    assert pool.ids.tolist() == [11, 13] and len(pool) == 2 and not pool.ready
    assert pool.add(torch.tensor([20, 21]), torch.tensor([0.51, -1.0])) == 1  # tensors work
    assert len(pool) == 3 and pool.ready
    pool.remove(np.array([11, 20]))
    assert pool.ids.tolist() == [13] and pool.ready  # 3 arrived since the pool was made
    pool.new_round(1)  # a round ran: the next trigger counts new arrivals only
    assert not pool.ready and len(pool) == 1


def test_pool_keeps_arrival_order_ages_out_and_round_trips():
    pool = SamplePool(trigger_size=2, threshold=0.0)
    pool.add(np.array([30, 4, 17]), np.ones(3))
    pool.new_round(1)
    pool.add(np.array([2, 25]), np.ones(2))
    pool.remove(np.array([4]))
    assert pool.ids.tolist() == [30, 17, 2, 25]  # arrival order, not sorted
    restored = SamplePool(trigger_size=99)
    restored.load_state_dict(pool.state_dict())
    assert restored.ids.tolist() == [30, 17, 2, 25] and restored.trigger_size == 2 and restored.ready
    pool.new_round(2)
    assert pool.age_out(2).tolist() == [30, 17]  # entered in round 0: waited through two rounds
    assert pool.ids.tolist() == [2, 25]


def test_pool_without_threshold_raises():
    with pytest.raises(RuntimeError, match="has no threshold"):
        SamplePool(trigger_size=2).add(np.array([1]), np.array([0.3]))
    with pytest.raises(ValueError):
        SamplePool(trigger_size=0)


# --------------------------------------------------------------------------------------------
# FeatureCache
# --------------------------------------------------------------------------------------------


class _Encoder:
    def __init__(self, value: float = 1.0):
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return {"features": np.full((3, 2), self.value, np.float32), "labels": np.arange(3)}


def test_cache_encodes_once_then_hits(tmp_dir):
    cache, encode = FeatureCache(tmp_dir), _Encoder()
    first = cache.get("k1", encode, split="train")
    second = cache.get("k1", encode)
    assert encode.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(first["features"], second["features"])
    assert np.array_equal(second["labels"], [0, 1, 2])
    assert FeatureCache(tmp_dir).load("k1") is not None  # persisted across instances
    with h5py.File(cache.path("k1")) as f:
        assert f.attrs["split"] == "train"
    cache.get("k2", encode)  # a different key misses
    assert encode.calls == 2 and cache.misses == 2
    assert sorted(p.name for p in tmp_dir.iterdir()) == ["k1.h5", "k2.h5"]  # no temp left over


def test_cache_ignores_half_written_temp_file(tmp_dir):
    cache = FeatureCache(tmp_dir)
    tmp = tmp_dir / ".k.h5.12345.tmp"  # what save() leaves only if the process dies mid-write
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 2)))
    assert cache.load("k") is None
    encode = _Encoder(7.0)
    assert cache.get("k", encode)["features"][0, 0] == 7.0 and encode.calls == 1


def test_cache_ignores_incomplete_or_foreign_file(tmp_dir):
    cache = FeatureCache(tmp_dir)
    with h5py.File(cache.path("k"), "w") as f:
        f.create_dataset("features", data=np.zeros((3, 2)))
        f.attrs["fingerprint"] = "k"
        f.attrs["complete"] = False
    assert cache.load("k") is None
    encode = _Encoder(2.0)
    assert cache.get("k", encode)["features"][0, 0] == 2.0 and encode.calls == 1
    assert cache.load("k")["features"][0, 0] == 2.0  # rewritten as complete
    # a complete file renamed to another key is not that key's features
    cache.path("k").rename(cache.path("other"))
    assert cache.load("other") is None


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_cache_treats_truncated_file_as_absent(tmp_dir, keep):
    cache, encode = FeatureCache(tmp_dir), _Encoder()
    cache.get("k", encode)
    path = cache.path("k")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert cache.load("k") is None
    cache.get("k", encode)
    assert encode.calls == 2 and cache.load("k") is not None


def test_cache_treats_foreign_file_as_absent(tmp_dir):
    cache = FeatureCache(tmp_dir)
    cache.path("k").parent.mkdir(exist_ok=True)
    cache.path("k").write_bytes(b"not an hdf5 file at all" * 10)
    assert cache.load("k") is None


def test_cache_rejects_unequal_lengths(tmp_dir):
    with pytest.raises(ValueError, match="equal length"):
        FeatureCache(tmp_dir).save("k", {"a": np.zeros(3), "b": np.zeros(4)})
    assert not any(tmp_dir.iterdir())


def test_model_fingerprint_changes_with_one_weight():
    torch.manual_seed(0)
    net = SmallConvNet(1, width=2)
    before = model_fingerprint(net)
    assert model_fingerprint(net) == before
    weight = net.body[0][0].weight
    with torch.no_grad():
        weight[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(net) != before
    with torch.no_grad():
        weight[0, 0, 0, 0] -= 1e-3
    restored = model_fingerprint(net)
    # (x + 1e-3) - 1e-3 may differ from x in the last bit; compare to an exact copy instead
    torch.manual_seed(0)
    assert model_fingerprint(SmallConvNet(1, width=2)) == before
    assert isinstance(restored, str) and len(before) == 40
    net.body[1][1].running_mean.add_(1.0)  # buffers count too (BN statistics change outputs)
    assert model_fingerprint(net) != restored


def test_data_fingerprint_changes_with_images_labels_and_name():
    images = torch.zeros(4, 1, 3, 3, dtype=torch.uint8)
    targets = torch.tensor([0, 1, 0, 1])
    base = data_fingerprint(images, targets, "train")
    assert data_fingerprint(images.clone(), targets.clone(), "train") == base
    changed = images.clone()
    changed[2, 0, 1, 1] = 1
    assert data_fingerprint(changed, targets, "train") != base
    assert data_fingerprint(images, torch.tensor([0, 1, 1, 1]), "train") != base
    assert data_fingerprint(images, targets, "test") != base
    assert fingerprint(model="a", data="b") == fingerprint(data="b", model="a")
    assert fingerprint(model="a", data="b") != fingerprint(model="a", data="c")


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def test_clustering_accuracy_of_a_permuted_labeling_is_one():
    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    permutation = np.array([2, 3, 0, 1])
    y_pred = permutation[y_true]
    mapping = hungarian_mapping(y_true, y_pred)
    assert all(mapping[int(permutation[c])] == c for c in range(4))
    acc = clustering_accuracy(y_true, y_pred, y_true < 2)
    for key in ("all", "old", "new", "all_balanced", "old_balanced", "new_balanced", "nmi", "ari"):
        assert acc[key] == pytest.approx(1.0), key


def _brute_force_accuracy(y_true, y_pred) -> float:
    size = max(y_true.max(), y_pred.max()) + 1
    return max(np.mean(np.array(p)[y_pred] == y_true) for p in itertools.permutations(range(size)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_accuracy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 25)
    y_pred = np.where(rng.random(25) < 0.6, (y_true + 1) % 5, rng.integers(0, 5, 25))
    acc = clustering_accuracy(y_true, y_pred, y_true < 2)
    assert acc["all"] == pytest.approx(_brute_force_accuracy(y_true, y_pred))
    assert acc["nmi"] == pytest.approx(skm.normalized_mutual_info_score(y_true, y_pred))
    assert acc["ari"] == pytest.approx(skm.adjusted_rand_score(y_true, y_pred))


def test_clustering_accuracy_one_assignment_then_subsets():
    # clusters: 5 -> class 0 (3 of 4), 6 -> class 1, 7 -> class 2 (new) ; one new sample wrong
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([5, 5, 5, 6, 6, 6, 7, 7, 7, 5])
    acc = clustering_accuracy(y_true, y_pred, y_true < 2)
    assert acc["all"] == pytest.approx(8 / 10)
    assert acc["old"] == pytest.approx(5 / 6)
    assert acc["new"] == pytest.approx(3 / 4)
    assert acc["old_balanced"] == pytest.approx((3 / 4 + 2 / 2) / 2)
    assert acc["all_balanced"] == pytest.approx((3 / 4 + 1 + 3 / 4) / 3)


def test_shot_accuracy_groups_exactly():
    counts = [101, 100, 20, 19, 150]  # many: 0, 4 ; medium: 1, 2 ; few: 3
    y_true = np.array([0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4])
    y_pred = np.array([0, 0, 1, 0, 0, 3, 0, 0, 0, 4, 4, 0, 0])
    # per class: 0 -> 1.0, 1 -> 0.5, 2 -> 0.0, 3 -> 0.25, 4 -> 0.5
    acc = shot_accuracy(y_true, y_pred, counts)
    assert acc["many"] == pytest.approx(0.75)  # mean of classes, not of samples (4/6)
    assert acc["medium"] == pytest.approx(0.25)
    assert acc["few"] == pytest.approx(0.25)
    only_many = shot_accuracy(np.array([0, 1]), np.array([0, 1]), [500, 200])
    assert only_many["many"] == 1.0
    assert math.isnan(only_many["medium"]) and math.isnan(only_many["few"])


def test_novelty_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    is_new = rng.random(60) < 0.3
    scores = rng.normal(size=60) + is_new
    out = novelty_metrics(scores, is_new)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(is_new, scores))
    assert out["aupr_new"] == pytest.approx(skm.average_precision_score(is_new, scores))
    assert out["aupr_old"] == pytest.approx(skm.average_precision_score(~is_new, -scores))


def test_novelty_fpr95_hand_checked():
    positives = np.arange(10.0, 30.0)  # 20 new samples; 95 % TPR keeps 19 of them: score >= 11
    negatives = np.array([0.0, 1.0, 2.0, 10.5, 11.5, 30.0])  # 11.5 and 30 pass that threshold
    scores = np.concatenate([positives, negatives])
    is_new = np.r_[np.ones(20, bool), np.zeros(6, bool)]
    assert novelty_metrics(scores, is_new)["fpr95"] == pytest.approx(2 / 6)
    separated = novelty_metrics(np.r_[positives, negatives - 100], is_new)
    assert separated["fpr95"] == 0.0 and separated["auroc"] == 1.0
    assert all(math.isnan(v) for v in novelty_metrics(scores[:20], is_new[:20]).values())


def test_pool_quality_hand_computed():
    pooled = np.array([True, True, False, True, False, False])
    is_new = np.array([True, False, True, True, False, True])
    out = pool_quality(pooled, is_new)
    assert out["precision"] == pytest.approx(2 / 3)  # 2 of the 3 pooled are new
    assert out["recall"] == pytest.approx(2 / 4)  # 2 of the 4 new were pooled
    assert out["size"] == 3


def test_ignite_metrics_match_plain_functions():
    from ignite.engine import Engine

    torch.manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, 3, 3, 1, 0, 2, 2, 3, 1])
    logits = torch.randn(12, 4)
    logits[torch.arange(12), (y + 1) % 4] += 3.0  # mostly a permuted labeling
    batches = [(logits[:7], y[:7]), (logits[7:], y[7:])]
    counts = [150, 40]

    engine = Engine(lambda e, batch: batch)
    ClusteringAccuracy(n_old=2).attach(engine, "clustering")
    ShotAccuracy(counts).attach(engine, "shot")
    for _ in range(2):  # a second run starts from reset state
        state = engine.run(batches, max_epochs=1)
        pred, truth = logits.argmax(1).numpy(), y.numpy()
        assert state.metrics["clustering"] == clustering_accuracy(truth, pred, truth < 2)
        old = truth < 2
        expected = shot_accuracy(truth[old], pred[old], counts)
        got = state.metrics["shot"]
        assert got["many"] == expected["many"] and got["medium"] == expected["medium"]
        assert math.isnan(got["few"]) and math.isnan(expected["few"])
