"""The continual loop's components: phased streams and distractors, the exemplar memory
(herding), the density estimate of k (0 included), the cluster acceptance rule, the promotion
gate, and the continual metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from components.acceptance import ClusterAcceptance, PromotionGate, jaccard_stability, neighbour_spacing
from components.data import Distractors, ImageSet, make_protocol
from components.kmeans import SemiSupervisedKMeans
from components.memory import ExemplarMemory, herding
from components.metrics import (
    cluster_truth,
    continual_summary,
    grouped_accuracy,
    own_output_accuracy,
    where_classes_go,
)

# ------------------------------------------------------------------------------- phased streams


def _indexed_set(sizes, seed=0) -> ImageSet:
    """Images that encode their own row (two bytes), classes interleaved."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    labels = np.random.default_rng(seed).permutation(labels)
    idx = np.arange(len(labels))
    images = np.zeros((len(labels), 1, 1, 2), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = idx // 256, idx % 256
    names = [f"c{c}" for c in range(len(sizes))]
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), names, "idx")


def _decode(images: torch.Tensor) -> np.ndarray:
    pixels = images.numpy().astype(np.int64)
    return pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1]


def test_phased_stream_follows_the_rule():
    train = _indexed_set([40, 41, 38, 39, 44, 37])
    test = _indexed_set([3] * 6, seed=1)
    p = make_protocol(source=None, phases=[[4, 0, 2], [1], [3, 5]], ratio=4, seed=0,
                      source_sets=(train, test))
    # remapped ids: old 4, 0, 2 -> 0, 1, 2 (rank order as given); phase 1: 1 -> 3; phase 2: 3, 5 -> 4, 5
    assert p.phases == [[0, 1, 2], [3], [4, 5]] and p.n_old == 3 and p.n_new == 3
    assert p.class_names == ["c4", "c0", "c2", "c1", "c3", "c5"]
    ends = [0, *p.segment_ends]
    assert ends[-1] == len(p.stream)
    seg = [p.stream.targets[a:b].numpy() for a, b in zip(ends[:-1], ends[1:], strict=True)]
    second_half = {c: int(n) - int(n) // 2 for c, n in enumerate([40, 41, 38, 39, 44, 37])}
    # old classes and phase-1 classes are split evenly over both segments; phase 2 only in segment 2
    for new_id, orig in ((0, 4), (1, 0), (2, 2), (3, 1)):
        counts = [int((s == new_id).sum()) for s in seg]
        assert sum(counts) == second_half[orig] and abs(counts[0] - counts[1]) <= 1
    for new_id, orig in ((4, 3), (5, 5)):
        assert (seg[0] == new_id).sum() == 0 and (seg[1] == new_id).sum() == second_half[orig]
    # every stream image is a second-half image of its class, none is labeled
    rows = _decode(p.stream.images)
    assert len(set(rows)) == len(rows) and not set(rows) & set(_decode(p.labeled.images))


def test_distractors_are_a_share_of_every_segment_with_target_minus_one():
    train = _indexed_set([60] * 4)
    p = make_protocol(source=None, phases=[[0, 1], [2], [3]], ratio=1, seed=0, distractor_fraction=0.1,
                      source_sets=(train, _indexed_set([2] * 4, 1)))
    ends = [0, *p.segment_ends]
    for a, b in zip(ends[:-1], ends[1:], strict=True):
        share = float((p.stream.targets[a:b] == -1).float().mean())
        assert share == pytest.approx(0.1, abs=0.02)
    assert p.stream.images.dtype == torch.uint8 and p.stream.images.shape[1:] == (1, 1, 2)


def test_distractor_kinds_look_like_their_name():
    rng = np.random.default_rng(0)
    images = Distractors(kinds=("noise", "blank", "saturated", "other"))(8, (1, 8, 8), rng)
    noise, blank, saturated, photo = images[0], images[1], images[2], images[3]
    assert noise.float().std() > 50  # uniform noise
    assert blank.max() < 16 and blank.float().std() == 0
    assert saturated.min() >= 240 and saturated.float().std() == 0
    assert photo.float().std() > 0  # a crop of a photograph
    with pytest.raises(ValueError, match="unknown distractor kinds"):
        Distractors(kinds=("static",))


def test_bad_phases_are_refused_with_the_reason():
    train = _indexed_set([20] * 4)
    sets = (train, train)
    with pytest.raises(ValueError, match="more than one phase"):
        make_protocol(source=None, phases=[[0, 1], [1, 2]], source_sets=sets)
    with pytest.raises(ValueError, match="not both"):
        make_protocol(source=None, phases=[[0, 1], [2]], new_classes=[2], source_sets=sets)
    with pytest.raises(ValueError, match="do not occur"):
        make_protocol(source=None, phases=[[0, 1], [9]], source_sets=sets)
    with pytest.raises(ValueError, match="distractor_fraction"):
        make_protocol(source=None, new_classes=[3], distractor_fraction=1.0, source_sets=sets)


# ------------------------------------------------------------------------------- memory


def test_herding_mean_tracks_the_class_mean_better_than_random():
    x = np.random.default_rng(0).normal(size=(300, 8)) + 3.0
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = herding(x, 10)
    herd_gap = np.linalg.norm(unit[order].mean(0) - unit.mean(0))
    rng = np.random.default_rng(1)
    random_gaps = [np.linalg.norm(unit[rng.choice(300, 10, replace=False)].mean(0) - unit.mean(0))
                   for _ in range(50)]
    assert len(set(order)) == 10 and herd_gap < np.percentile(random_gaps, 5)


def test_memory_shares_its_budget_and_shrinks_by_herding_order():
    memory = ExemplarMemory(budget=12)
    rng = np.random.default_rng(0)
    keys0 = np.stack([np.zeros(20, int), np.arange(20)], 1)
    memory.add_class(0, keys0, rng.normal(size=(20, 4)))
    first = memory.items()[0].copy()
    assert len(memory) == 12
    memory.add_class(1, np.stack([np.ones(3, int), np.arange(3)], 1), rng.normal(size=(3, 4)))  # fewer than 6
    keys, targets = memory.items()
    assert (targets == 0).sum() == 6 and (targets == 1).sum() == 3
    np.testing.assert_array_equal(keys[targets == 0], first[:6])  # the first six of the herding order
    restored = ExemplarMemory(budget=1)
    restored.load_state_dict(memory.state_dict())
    np.testing.assert_array_equal(restored.items()[0], keys)
    with pytest.raises(ValueError, match="no candidate"):
        memory.add_class(2, np.zeros((0, 2), int), np.zeros((0, 4)))
    # a classifier that dropped output 1 of three: class 2 becomes class 1, its exemplars kept
    memory.add_class(2, np.stack([np.ones(4, int), 10 + np.arange(4)], 1), rng.normal(size=(4, 4)))
    before = memory.items()
    memory.keep_classes([0, 2])
    keys, targets = memory.items()
    assert memory.classes() == [0, 1]
    np.testing.assert_array_equal(keys[targets == 1], before[0][before[1] == 2])
    np.testing.assert_array_equal(keys[targets == 0], before[0][before[1] == 0])
    with pytest.raises(ValueError, match="distinct stored classes"):
        memory.keep_classes([0, 5])


# ------------------------------------------------------------------------------- k by density


def _anchored_blobs(n_old=3, n_new=2, seed=0):
    x, y = make_blobs(n_samples=[60] * (n_old + n_new), n_features=8, cluster_std=0.6, random_state=seed,
                      center_box=(-12, 12))
    labeled = np.isin(y, range(n_old))
    return x[labeled].astype(np.float32), y[labeled], x[~labeled].astype(np.float32), y[~labeled]


def test_density_estimate_finds_the_new_groups_and_zero_when_there_are_none():
    x_l, y_l, x_new, y_new = _anchored_blobs()
    rng = np.random.default_rng(0)
    # a few old-class look-alikes (about 5 per class: fewer than a dense group needs)
    lookalikes = x_l[rng.choice(len(x_l), 15, replace=False)] + rng.normal(0, 0.1, (15, 8)).astype(np.float32)
    labeler = SemiSupervisedKMeans(k_new=None, estimate="density", normalize=False, min_cluster_size=10)
    result = labeler(np.concatenate([x_new, lookalikes]), x_l, y_l, n_old=3)
    assert result.k_estimate == 2 and len(result.centroids) == 5
    truth = np.concatenate([y_new, np.full(15, -1)])
    for c in (3, 4):  # each new group is one pure cluster
        assert len(set(truth[result.labels == c].tolist())) == 1
    # a pool of old-class look-alikes and scattered noise grows nothing
    noise = rng.uniform(-40, 40, (12, 8)).astype(np.float32)
    nothing = labeler(np.concatenate([lookalikes, noise]), x_l, y_l, n_old=3)
    assert nothing.k_estimate == 0 and len(nothing.centroids) == 3
    assert set(nothing.labels[:15].tolist()) <= {0, 1, 2}  # the look-alikes go to their classes
    # a pool of one new class is one group (HDBSCAN alone never returns a single group: the
    # labeled samples beside it give it the known classes to be told apart from)
    one = labeler(x_new[y_new == 3], x_l, y_l, n_old=3)
    assert one.k_estimate == 1 and (one.labels == 3).all()


def test_the_core_is_the_dense_group_not_the_sparse_samples_k_means_adds_to_its_cluster(monkeypatch):
    x_l, y_l, x_new, y_new = _anchored_blobs()
    group = x_new[y_new == 3]
    # the sparse side of the pool: 20 samples scattered about the group, nearer it than anything
    rng = np.random.default_rng(0)
    direction = rng.normal(0, 1, (20, 8)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    sparse = group.mean(0) + direction * rng.uniform(3.5, 5.0, (20, 1)).astype(np.float32)
    labeler = SemiSupervisedKMeans(k_new=None, estimate="density", normalize=False, min_cluster_size=10)
    # HDBSCAN's verdict (where its tree puts sparse samples depends on the other groups around):
    # the group is dense, the 20 around it are noise
    found = np.r_[np.zeros(60, np.int64), np.full(20, -1)]
    monkeypatch.setattr(labeler, "dense_groups", lambda x_u, x_l=None: found)
    result = labeler(np.concatenate([group, sparse]), x_l, y_l, n_old=3)
    assert result.k_estimate == 1
    assert (result.labels[60:] == 3).all()  # k-means gives the group's cluster the sparse samples ...
    np.testing.assert_array_equal(result.core, found == 0)  # ... its core is the group
    # a labeler that was told k has no groups, so no core
    assert SemiSupervisedKMeans(k_new=1, normalize=False)(group, x_l, y_l, n_old=3).core is None


def test_core_pseudo_labels_keep_the_group_and_a_cluster_without_one_keeps_its_members():
    from components.kmeans import KMeansResult
    from graphs.continual import pseudo_label_mask

    labels = np.array([0, 3, 3, 3, 3, 4, 4, 5])
    core = np.array([False, True, True, False, False, False, False, True])
    result = KMeansResult(labels, np.arange(8, dtype=np.float32), np.zeros((6, 2), np.float32), 0.0, 1,
                          core=core)
    everything = pseudo_label_mask(result, [3, 4], first=3)
    np.testing.assert_array_equal(everything, np.isin(labels, [3, 4]))  # cluster 5 was not accepted
    dense = pseudo_label_mask(result, [3, 4], first=3, core=True)
    # cluster 3: its two core samples; cluster 4 has no core sample, so it keeps both members
    np.testing.assert_array_equal(dense, [False, True, True, False, False, True, True, False])
    # with keep_fraction, the core of what is kept: cluster 3's nearest half is samples 1 and 2
    np.testing.assert_array_equal(pseudo_label_mask(result, [3], first=3, keep_fraction=0.5, core=True),
                                  [False, True, True, False, False, False, False, False])
    with pytest.raises(ValueError, match="estimate k by density"):
        pseudo_label_mask(KMeansResult(labels, np.zeros(8), np.zeros((6, 2)), 0.0, 1), [3], 3, core=True)


# ------------------------------------------------------------------------------- acceptance


def test_jaccard_stability_is_one_for_a_fixed_partition_and_low_for_a_random_one():
    labels = np.repeat([3, 4], 50)
    same = jaccard_stability(labels, [3, 4], lambda idx: labels[idx], 5, 0.8, np.random.default_rng(0))
    np.testing.assert_allclose(same, 1.0)
    rng = np.random.default_rng(1)
    shuffled = jaccard_stability(labels, [3, 4], lambda idx: rng.integers(3, 5, len(idx)), 5, 0.8, rng)
    assert (shuffled < 0.6).all()


def test_acceptance_keeps_a_new_class_and_rejects_small_unstable_and_known_clusters():
    x_l, y_l, x_new, y_new = _anchored_blobs()
    labeler = SemiSupervisedKMeans(k_new=3, normalize=False, n_init=3)
    # the pool: new class 3, the fringe of known class 0, and 6 stray points together
    rng = np.random.default_rng(0)
    offset = np.zeros(8, np.float32)
    offset[0] = 1.0  # about 0.6 of class 0's radius (blob std 0.6 in 8-d: mean distance ~1.7)
    fringe = x_l[y_l == 0].mean(0) + offset + rng.normal(0, 0.05, (30, 8)).astype(np.float32)
    stray = rng.normal(0, 0.5, (6, 8)).astype(np.float32) + 20.0  # a small group far away
    pool = np.concatenate([x_new[y_new == 3], fringe, stray])
    result = labeler.cluster(pool, x_l, y_l, 3, 3, seeds=np.stack([pool[:60].mean(0), fringe.mean(0),
                                                                    stray.mean(0)]))
    rule = ClusterAcceptance(min_size=10, min_stability=0.6, min_separation=1.0)
    verdicts = rule(result, pool, x_l, y_l, 3, lambda idx: labeler.cluster(pool[idx], x_l, y_l, 3, 3).labels)
    by_cluster = {v.cluster: v for v in verdicts}
    assert by_cluster[3].accepted and by_cluster[3].size >= 60
    assert not by_cluster[4].accepted and any("radii of known class 0" in r for r in by_cluster[4].reasons)
    assert not by_cluster[5].accepted and any("fewer than 10" in r for r in by_cluster[5].reasons)


def test_acceptance_rejects_near_copies_and_merges_a_class_found_twice():
    x_l, y_l, x_new, y_new = _anchored_blobs()
    rng = np.random.default_rng(0)
    blob = x_new[y_new == 3]
    halves = blob[np.argsort(blob[:, 0])]  # one class, cut in two along an axis
    frames = np.repeat(x_new[y_new == 4][:1], 20, axis=0) + rng.normal(0, 1e-3, (20, 8)).astype(np.float32)
    pool = np.concatenate([halves, frames])  # the last 20: near copies of one image (a flat frame)
    seeds = np.stack([halves[:30].mean(0), halves[30:].mean(0), frames.mean(0)])
    labeler = SemiSupervisedKMeans(k_new=3, normalize=False, n_init=2)
    result = labeler.cluster(pool, x_l, y_l, 3, 3, seeds=seeds)
    rule = ClusterAcceptance(min_size=10, min_stability=0.0, min_tightness=0.7)
    verdicts = {v.cluster: v for v in rule(result, pool, x_l, y_l, 3, lambda idx: result.labels[idx])}
    assert not verdicts[5].accepted and any("near copies" in r for r in verdicts[5].reasons)
    kept = [v for v in verdicts.values() if v.accepted and v.merged_into is None]
    merged = [v for v in verdicts.values() if v.merged_into is not None]
    assert len(kept) == 1 and len(merged) == 1 and merged[0].merged_into == kept[0].cluster
    # each accepted half records how far the other lies, in known-class spacings; the rejected none
    means = np.stack([x_l[y_l == c].mean(0) for c in range(3)])
    gap = np.linalg.norm(result.centroids[3] - result.centroids[4]) / neighbour_spacing(means)
    assert verdicts[3].nearest_accepted == pytest.approx(gap) == verdicts[4].nearest_accepted
    assert (verdicts[3].nearest_cluster, verdicts[4].nearest_cluster) == (4, 3)
    assert verdicts[5].nearest_accepted is None and verdicts[5].nearest_cluster is None
    assert not ClusterAcceptance(min_size=10, min_stability=0.0, merge=False)(
        result, pool, x_l, y_l, 3, lambda idx: result.labels[idx])[1].merged_into


def test_acceptance_rejects_an_off_domain_cloud_when_asked():
    x_l, y_l, x_new, y_new = _anchored_blobs()
    far = np.random.default_rng(0).normal(0, 0.5, (40, 8)).astype(np.float32) + 400.0
    pool = np.concatenate([x_new[y_new == 3], far])
    labeler = SemiSupervisedKMeans(k_new=2, normalize=False, n_init=2)
    result = labeler.cluster(pool, x_l, y_l, 3, 2, seeds=np.stack([pool[:60].mean(0), far.mean(0)]))
    recluster = lambda idx: labeler.cluster(pool[idx], x_l, y_l, 3, 2).labels  # noqa: E731
    verdicts = ClusterAcceptance(min_size=10, max_separation=5.0)(result, pool, x_l, y_l, 3, recluster)
    assert [v.accepted for v in verdicts] == [True, False]
    assert "outside their domain" in verdicts[1].reasons[-1]


def test_input_complexity_flags_flat_frames_and_noise_and_not_unseen_digits():
    """Serrà et al.'s input complexity (PNG length): fitted on known-class images, flat frames
    compress far below them and uniform noise far above, while images of classes the band was
    not fitted on, from the same dataset, lie inside."""
    from sklearn.datasets import load_digits

    from components.domain import InputComplexity, input_complexity

    digits = load_digits()
    pixels = torch.from_numpy((digits.images * 255 / 16).round().astype(np.uint8))[:, None]
    known, unseen = pixels[digits.target < 5], pixels[digits.target >= 5]
    domain = InputComplexity(coverage=0.98).fit(known[:300])
    rng = np.random.default_rng(0)
    blank = torch.full((20, 1, 8, 8), 7, dtype=torch.uint8)
    saturated = torch.full((20, 1, 8, 8), 250, dtype=torch.uint8)
    noise = torch.from_numpy(rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8))
    for frames in (blank, saturated, noise):
        assert domain.outside(frames).all()
    assert domain.outside(unseen).mean() < 0.2 and domain.outside(known[300:]).mean() < 0.1
    lengths = input_complexity(torch.cat([blank[:1], known[:1], noise[:1]]))
    assert lengths[0] < lengths[1] < lengths[2]  # flat < a digit < noise
    colour = input_complexity(torch.from_numpy(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)))
    assert (colour > lengths[2]).all()  # three channels of noise hold three times the information
    with pytest.raises(ValueError, match="uint8"):
        input_complexity(known[:2].float())
    with pytest.raises(RuntimeError, match="before fit"):
        InputComplexity().outside(known[:2])
    with pytest.raises(ValueError, match="coverage"):
        InputComplexity(coverage=1.0)


def test_acceptance_rejects_a_cluster_of_off_domain_samples_wherever_it_lies():
    """The domain test reads each pooled sample's flag, not distances: a cloud lying among the
    known classes, where the distance bound lets it in, is rejected when most of it is off the
    domain; a class with a few off-domain members is kept."""
    x_l, y_l, x_new, y_new = _anchored_blobs()
    cloud = x_new[y_new == 4][:40]  # as near the known classes as a new class is
    pool = np.concatenate([x_new[y_new == 3], cloud])
    labeler = SemiSupervisedKMeans(k_new=2, normalize=False, n_init=2)
    result = labeler.cluster(pool, x_l, y_l, 3, 2, seeds=np.stack([pool[:60].mean(0), cloud.mean(0)]))
    fixed = lambda idx: result.labels[idx]  # noqa: E731
    off = np.zeros(len(pool), bool)
    off[len(pool) - 40:] = True  # the cloud
    off[:5] = True  # and a few of the class (a sandal compresses well)
    rule = ClusterAcceptance(min_size=10, min_stability=0.0, max_off_domain=0.5)
    verdicts = rule(result, pool, x_l, y_l, 3, fixed, off_domain=off)
    by_cluster = {v.cluster: v for v in verdicts}
    class_cluster = result.labels[0]
    cloud_cluster = result.labels[-1]
    assert by_cluster[class_cluster].accepted and by_cluster[class_cluster].off_domain < 0.2
    assert not by_cluster[cloud_cluster].accepted and by_cluster[cloud_cluster].off_domain == 1.0
    assert "off the domain" in by_cluster[cloud_cluster].reasons[-1]
    # without the bound the fraction is still measured and recorded, and decides nothing
    loose = ClusterAcceptance(min_size=10, min_stability=0.0)
    loose_verdicts = loose(result, pool, x_l, y_l, 3, fixed, off_domain=off)
    assert all(v.accepted for v in loose_verdicts)
    assert [v.off_domain for v in loose_verdicts] == [v.off_domain for v in verdicts]
    with pytest.raises(ValueError, match="continual.domain"):
        rule(result, pool, x_l, y_l, 3, fixed)
    with pytest.raises(ValueError, match="flags"):
        rule(result, pool, x_l, y_l, 3, fixed, off_domain=off[:-1])
    with pytest.raises(ValueError, match="max_off_domain"):
        ClusterAcceptance(max_off_domain=1.0)


def test_acceptance_min_spread_rejects_a_rare_class_lookalike_that_its_tight_radius_lets_through():
    """A rare known class whose few labeled samples the model fits tightly has a small radius;
    its unseen samples form a cluster a few such radii away, yet deep inside its territory."""
    x_l, y_l, x_new, y_new = _anchored_blobs()
    rng = np.random.default_rng(0)
    centre = x_l[y_l == 0].mean(0)
    rare = centre + rng.normal(0, 0.05, (12, 8)).astype(np.float32)  # 12 tight labeled samples
    x_l = np.concatenate([rare, x_l[y_l != 0]])
    y_l = np.concatenate([np.zeros(12, y_l.dtype), y_l[y_l != 0]])
    offset = np.zeros(8, np.float32)
    offset[0] = 1.5  # ~10 of its radii away, well within the gap to the other classes
    lookalikes = centre + offset + rng.normal(0, 0.3, (30, 8)).astype(np.float32)
    pool = np.concatenate([x_new[y_new == 3], lookalikes])
    labeler = SemiSupervisedKMeans(k_new=2, normalize=False, n_init=2)
    result = labeler.cluster(pool, x_l, y_l, 3, 2, seeds=np.stack([pool[:60].mean(0), lookalikes.mean(0)]))
    fixed = lambda idx: result.labels[idx]  # noqa: E731
    loose = ClusterAcceptance(min_size=10, min_stability=0.0)(result, pool, x_l, y_l, 3, fixed)
    assert [v.accepted for v in loose] == [True, True]  # separation in radii alone lets it in
    assert loose[1].separation > 5 and loose[1].spread < 0.35 < loose[0].spread
    strict_rule = ClusterAcceptance(min_size=10, min_stability=0.0, min_spread=0.35)
    strict = strict_rule(result, pool, x_l, y_l, 3, fixed)
    assert [v.accepted for v in strict] == [True, False]
    assert "inside its territory" in strict[1].reasons[-1] and "known class 0" in strict[1].reasons[-1]
    with pytest.raises(ValueError, match="min_spread"):
        ClusterAcceptance(min_spread=2.0, max_separation=1.5)


def test_consolidation_stability_finds_the_outputs_that_split_a_class():
    """Consolidation clusters with k fixed at the number of outputs. With one output too many,
    k-means cuts the widest class in two, in a direction that changes with every subsample: both
    halves dissolve under resampling (Hennig), while a class that is one cluster stays."""
    from graphs.consolidate import output_stability

    x_l, y_l = _anchored_blobs()[:2]
    rng = np.random.default_rng(0)
    wide = rng.normal(0, 1.5, (120, 8)).astype(np.float32) + 30.0  # one class, round and wide
    tight = rng.normal(0, 0.5, (40, 8)).astype(np.float32) - 30.0
    x_new, y_new = np.concatenate([wide, tight]), np.r_[np.zeros(120, int), np.ones(40, int)]
    labeler = SemiSupervisedKMeans(k_new=3, normalize=False, n_init=2, seed=0)  # 3 outputs, 2 classes
    result = labeler(x_new, x_l, y_l, n_old=3)
    output = {3: 6, 4: 5, 5: 7}  # cluster -> output id (one-to-one, as consolidation's Hungarian)
    stability = output_stability(result.labels, output, x_new, x_l, y_l, 3, labeler, resamples=8)
    assert set(stability) == {5, 6, 7}
    whole = [output[c] for c in (3, 4, 5) if (y_new[result.labels == c] == 1).sum() == 40]
    halves = [o for o in output.values() if o not in whole]
    assert len(whole) == 1 and len(halves) == 2  # the tight class whole, the wide one cut in two
    assert stability[whole[0]] == 1.0
    assert all(stability[o] < 0.5 for o in halves)  # below the loop's bound: those outputs go



def test_consolidation_drops_the_weakest_output_and_clusters_again_so_a_cut_class_is_whole():
    """An output too many cuts a class in two and both halves dissolve; dropping them both (the
    old rule) lost the class. Consolidation drops only the least stable output and clusters
    again with one cluster fewer: the class is whole, stable, and keeps the other output."""
    from graphs.consolidate import stable_relabel

    x_l, y_l = _anchored_blobs()[:2]
    rng = np.random.default_rng(0)
    wide = rng.normal(0, 1.5, (120, 8)).astype(np.float32) + 30.0
    tight = rng.normal(0, 0.5, (40, 8)).astype(np.float32) - 30.0
    x_new = np.concatenate([wide, tight])
    # the model split the wide class over outputs 5 and 6 (by its first feature); 7 is the tight one
    predicted = np.r_[np.where(wide[:, 0] > 30.0, 5, 6), np.full(40, 7)]
    labeler = SemiSupervisedKMeans(k_new=3, normalize=False, n_init=2, seed=0)
    result, output, stability, passes = stable_relabel(labeler, x_new, x_l, y_l, 3, predicted, [5, 6, 7],
                                                       min_stability=0.5, resamples=8)
    dropped = [p["dropped"] for p in passes]
    assert len(dropped) == 1 and dropped[0] in (5, 6) and stability[dropped[0]] < 0.5
    assert sorted(output.values()) == sorted({5, 6, 7} - set(dropped))
    by_output = {o: result.labels == c for c, o in output.items()}
    kept_half = ({5, 6} - set(dropped)).pop()
    assert by_output[kept_half][:120].all() and not by_output[kept_half][120:].any()  # the class, whole
    assert by_output[7][120:].all()
    assert stability[kept_half] >= 0.75  # the half that dissolved is whole again, and clearly stable
    # without the bound nothing is measured or dropped, and every output keeps a cluster
    _, output, stability, passes = stable_relabel(labeler, x_new, x_l, y_l, 3, predicted, [5, 6, 7])
    assert sorted(output.values()) == [5, 6, 7] and stability == {} and passes == []


def test_consolidation_with_k_estimated_drops_a_duplicate_output_and_adds_a_group_no_output_held():
    """``k_new`` from the candidates (``estimate_k``: HDBSCAN's excess of mass) instead of one
    cluster per output: two outputs for one class leave one without a cluster, dropped at once;
    one output for two classes leaves a stable cluster no output matches, a fresh output."""
    from graphs.consolidate import estimate_k, stable_relabel

    x_l, y_l, x_new, y_new = _anchored_blobs()  # two new classes, 60 samples each
    labeler = SemiSupervisedKMeans(k_new=None, estimate="density", density_selection="leaf", normalize=False,
                                   min_cluster_size=10, n_init=2, seed=0)
    k = estimate_k(labeler, x_new, x_l, y_l, 3)
    assert k == 2 and labeler.k_new is None and labeler.density_selection == "leaf"  # the labeler untouched
    first = y_new == y_new.min()
    # a class written two ways (two lumps of 30, 3 apart): the leaves are 3 groups, the groups that
    # persist (excess of mass) are the 2 classes
    lumps = x_new.copy()
    lumps[np.flatnonzero(first)[:30], 0] += 1.5
    lumps[np.flatnonzero(first)[30:], 0] -= 1.5
    assert labeler(lumps, x_l, y_l, 3).k_estimate == 3 and estimate_k(labeler, lumps, x_l, y_l, 3) == 2
    # a class found twice (outputs 5 and 6 split it) beside one found once (7)
    predicted = np.where(first, np.where(x_new[:, 0] > np.median(x_new[first, 0]), 5, 6), 7)
    result, output, stability, passes = stable_relabel(copy.copy(labeler), x_new, x_l, y_l, 3, predicted,
                                                       [5, 6, 7], min_stability=0.5, k_new=k)
    dropped = passes[0]["dropped"]
    assert len(passes) == 1 and passes[0]["why"] == "no cluster" and dropped in (5, 6)
    assert stability[dropped] == 0.0 and sorted(output.values()) == sorted({5, 6, 7} - {dropped})
    for c in output:  # each kept output's cluster is one whole class
        members = result.labels == c
        assert len(set(y_new[members])) == 1 and members.sum() == 60
    # one output (5) for both classes: the second class becomes a fresh output, 6
    result, output, stability, passes = stable_relabel(copy.copy(labeler), x_new, x_l, y_l, 3,
                                                       np.full(len(x_new), 5), [5], min_stability=0.5,
                                                       k_new=k)
    assert passes == [] and sorted(output.values()) == [5, 6] and stability[6] >= 0.5
    assert {len(set(y_new[result.labels == c])) for c in output} == {1}


def test_consolidation_k_with_a_larger_group_floor_counts_a_class_written_two_ways_once():
    """``estimate_k(min_cluster_share=…)`` replaces the labeler's floor for the estimate alone: a
    class in two lumps of 30 of the 180 candidates (17 % each) is two groups at the labeler's 5 %
    and one when a group must hold 20 % (36 samples); the labeler is left as it was."""
    from graphs.consolidate import estimate_k

    x_l, y_l, x_new, y_new = _anchored_blobs(n_new=3)  # three new classes, 60 samples each
    third = np.flatnonzero(y_new == y_new.max())
    x_new[third[:30], 0] += 3.0
    x_new[third[30:], 0] -= 3.0
    labeler = SemiSupervisedKMeans(k_new=None, estimate="density", density_selection="leaf", normalize=False,
                                   min_cluster_size=10, n_init=2, seed=0)
    assert estimate_k(labeler, x_new, x_l, y_l, 3) == 4
    assert estimate_k(labeler, x_new, x_l, y_l, 3, min_cluster_share=0.2) == 3
    assert labeler.min_cluster_share == 0.05 and labeler.density_selection == "leaf"
    with pytest.raises(ValueError, match=r"min_cluster_share is a share of the candidates in \[0, 1\)"):
        estimate_k(labeler, x_new, x_l, y_l, 3, min_cluster_share=1.5)


def test_consolidation_inputs_saved_and_loaded_repeat_the_relabeling(tmp_path):
    """What consolidation clusters is written with its labeler's settings; loaded again (the
    labeler built anew from them) it gives the same clusters, stabilities and dropped outputs.
    A labeler whose settings are not plain values is refused with the way out."""
    from graphs.consolidate import labeler_arguments, load_inputs, save_inputs, stable_relabel

    x_l, y_l = _anchored_blobs()[:2]
    rng = np.random.default_rng(0)
    wide = rng.normal(0, 1.5, (120, 8)).astype(np.float32) + 30.0
    x_new = np.concatenate([wide, rng.normal(0, 0.5, (40, 8)).astype(np.float32) - 30.0])
    predicted = np.r_[np.where(x_new[:120, 0] > 30.0, 5, 6), np.full(40, 7)]
    labeler = SemiSupervisedKMeans(k_new=3, normalize=False, n_init=2, seed=0, fixed_old=True)
    settings = dict(min_stability=0.5, resamples=8, fraction=0.8, seed=0, territory=0.75, max_extra=0)
    path = tmp_path / "inputs.npz"
    save_inputs(path, labeler, x_new, x_l, y_l, 3, predicted, [5, 6, 7], settings, np.arange(160),
                np.r_[np.zeros(120, int), np.ones(40, int)])
    assert [p.name for p in tmp_path.iterdir()] == ["inputs.npz"]  # written under another name, then renamed
    d = load_inputs(path)
    assert d["settings"] == settings and d["outputs"] == [5, 6, 7] and d["labeler"].fixed_old
    first = stable_relabel(labeler, x_new, x_l, y_l, 3, predicted, [5, 6, 7], **settings)
    again = stable_relabel(d["labeler"], d["x_u"], d["x_l"], d["y_l"], d["n_old"], d["predicted"],
                           d["outputs"], **d["settings"])
    assert (first[0].labels == again[0].labels).all() and first[1:] == again[1:]
    assert first[3]  # an output was dropped in both: the replay covers the re-clustering too

    class Holding:
        def __init__(self):
            self.net = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="consolidation_inputs = False"):
        labeler_arguments(Holding())
    with pytest.raises(FileNotFoundError, match="consolidation_inputs = True"):
        load_inputs(tmp_path / "none.npz")


def test_a_group_given_to_a_far_labeled_centroid_gets_a_cluster_and_a_new_output_of_its_own():
    """Consolidation with fixed anchors and one output for two new classes: k-means puts the one
    free cluster on the far class and the other goes to the nearest labeled centroid, 0.7
    spacings from it, where only a class's fringe belongs (rare-class look-alikes lie at 0.2).
    With ``max_extra`` the group gets a cluster of its own, which no output matches: a fresh
    output, numbered after the given ones. The look-alikes stay with their class."""
    from graphs.consolidate import far_groups, stable_relabel

    rng = np.random.default_rng(0)
    blob = lambda centre, n: (rng.normal(0, 0.5, (n, 2)) + centre).astype(np.float32)  # noqa: E731
    x_l = np.concatenate([blob((0, 0), 30), blob((10, 0), 30), blob((0, 10), 30)])
    y_l = np.repeat([0, 1, 2], 30)  # neighbouring labeled classes 10 apart
    far_class, near_class, lookalikes = blob((20, 20), 100), blob((10, -7), 60), blob((0.5, 2), 20)
    x_new = np.concatenate([far_class, near_class, lookalikes])
    predicted = np.full(len(x_new), 3)  # the model has one discovered output for all of them
    labeler = SemiSupervisedKMeans(k_new=1, normalize=False, n_init=3, seed=0, fixed_old=True,
                                   min_cluster_size=10)
    result, output, _, _ = stable_relabel(labeler, x_new, x_l, y_l, 3, predicted, [3])
    assert output == {3: 3} and (result.labels[100:160] == 1).all()  # the near class: labeled 1's
    g_u, g_l = labeler.geometry(x_new, x_l, y_l, 3)
    assert far_groups(result.labels, g_u, g_l, y_l, 3, territory=0.5, smallest=10) == [1]
    assert far_groups(result.labels, g_u, g_l, y_l, 3, territory=0.75, smallest=10) == []  # 0.7 < 0.75
    assert far_groups(result.labels, g_u, g_l, y_l, 3, territory=0.5, smallest=61) == []  # 60 samples
    result, output, stability, _ = stable_relabel(labeler, x_new, x_l, y_l, 3, predicted, [3],
                                                  min_stability=0.5, resamples=3, territory=0.5, max_extra=2)
    assert sorted(output.values()) == [3, 4] and stability[4] >= 0.5
    by_output = {o: result.labels == c for c, o in output.items()}
    assert by_output[3][:100].all() and by_output[4][100:160].all()  # one output per class
    assert (result.labels[160:] == 0).all()  # the look-alikes stay with labeled class 0


@pytest.mark.parametrize("second_pass, kept", [(0.55, [5]), (0.93, [5, 6])])
def test_an_output_that_dissolved_once_must_come_back_clearly_stable(monkeypatch, second_pass, kept):
    """Output 6 dissolves beside a weaker 7 (0.49 and 0.37): 7 goes first. Clustered again, 6
    stays only if its cluster is now clearly stable (Hennig's 0.75): a class made whole jumps to
    0.93, leftovers that only wobble over the 0.5 line (0.55) go too."""
    import graphs.consolidate as consolidation

    passes = iter([{5: 0.9, 6: 0.49, 7: 0.37}, {5: 0.9, 6: second_pass}, {5: 0.9}])
    monkeypatch.setattr(consolidation, "output_stability", lambda labels, output, *a, **k: next(passes))
    x_l, y_l = _anchored_blobs()[:2]
    rng = np.random.default_rng(0)
    x_new = np.concatenate([rng.normal(c, 0.5, (30, 8)) for c in (30.0, -30.0, 60.0)]).astype(np.float32)
    predicted = np.repeat([5, 6, 7], 30)
    labeler = SemiSupervisedKMeans(k_new=3, normalize=False, n_init=2, seed=0)
    _, output, stability, record = consolidation.stable_relabel(labeler, x_new, x_l, y_l, 3, predicted,
                                                                [5, 6, 7], min_stability=0.5)
    assert sorted(output.values()) == kept
    assert [p["dropped"] for p in record] == [7] + ([6] if kept == [5] else [])
    assert record[0]["stability"] == {5: 0.9, 6: 0.49, 7: 0.37} and stability[6] == second_pass


# ------------------------------------------------------------------------------- the gate


def test_gate_refuses_a_significant_drop_and_lets_noise_through():
    gate = PromotionGate(max_drop=0.02, z=1.64)
    current = np.ones(200, bool)
    slightly = current.copy()
    slightly[:4] = False  # 2 points lower: 4 discordant images, well within the noise
    assert gate(current, slightly)[0]
    worse = current.copy()
    worse[:30] = False  # 15 points lower
    promoted, why = gate(current, worse)
    assert not promoted and "30 images lost" in why and "current model stays" in why
    better = current.copy()
    better[:10], current[10:20] = False, False  # as many lost as gained: no drop
    assert gate(current, better)[0]
    with pytest.raises(ValueError, match="same held-out images"):
        gate(current, current[:5])


def test_gate_drops_the_output_that_took_old_class_images_and_keeps_the_rest():
    """A student grown by outputs 3 and 4, where output 4 is a look-alike of class 0 that takes
    its held-out images: the whole student fails the gate; without output 4 it passes, and
    output 3 (which took nothing) is kept."""
    gate = PromotionGate(max_drop=0.02, z=1.64)
    targets = np.repeat([0, 1, 2], 20)
    logits = np.full((60, 5), -5.0)
    logits[np.arange(60), targets] = 1.0
    logits[:15, 4] = 3.0  # output 4 takes 15 of class 0's 20 images
    logits[:, 3] = 0.0  # output 3 is everyone's second choice, nobody's first
    current = np.ones(60, bool)
    assert not gate(current, logits.argmax(1) == targets)[0]
    kept, promoted, why = gate.select(current, logits, targets, n_known=3)
    assert promoted and kept == [3]
    assert why.startswith("dropped output 4 (took 15)") and "0 images lost" in why
    # without dropping, the whole student is refused, as the plain gate says
    kept, promoted, _ = PromotionGate(drop_outputs=False).select(current, logits, targets, n_known=3)
    assert not promoted and kept == [3, 4]
    # a loss no new output caused (class 1 read as class 2) is not blamed on one: refused as a whole
    confused = logits.copy()
    confused[:15, 4] = -5.0
    confused[20:40, 2] = 2.0
    kept, promoted, why = gate.select(current, confused, targets, n_known=3)
    assert not promoted and kept == [3, 4] and not why.startswith("dropped")
    with pytest.raises(ValueError, match="n_known"):
        gate.select(current, logits, targets, n_known=6)


# ------------------------------------------------------------------------------- metrics


def test_grouped_accuracy_uses_one_assignment_over_the_seen_classes():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    y_pred = np.array([0, 0, 1, 1, 7, 7, 2, 3])  # class 2 found as output 7; class 3 half right
    out = grouped_accuracy(y_true, y_pred, {"old": [0, 1], "phase 1": [2, 3]})
    assert out["all"] == pytest.approx(7 / 8) and out["old"] == 1.0 and out["phase 1"] == pytest.approx(3 / 4)
    unseen = grouped_accuracy(y_true, y_pred, {"old": [0, 1], "phase 2": [9]})
    assert unseen["phase 2"] is None and unseen["all"] == 1.0


def test_old_classes_by_their_own_outputs_are_not_permuted_by_a_new_class_without_an_output():
    # a new class (2) with no output of its own is predicted as old class 1's output, and more
    # often than class 1 itself: one Hungarian assignment gives output 1 to class 2
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 0, 1, 1, 1])
    hungarian = grouped_accuracy(y_true, y_pred, {"old": [0, 1], "phase 1": [2]})
    assert hungarian["old"] == pytest.approx(2 / 4)  # class 1's right answer now counts as wrong
    assert own_output_accuracy(y_true, y_pred, [0, 1]) == pytest.approx(3 / 4)
    assert own_output_accuracy(y_true, y_pred, [7]) is None
    rows = where_classes_go(y_true, y_pred, [0, 1, 2, 7], top=2)
    assert [r["class"] for r in rows] == [0, 1, 2]  # a class without a sample has no row
    assert rows[1] == {"class": 1, "samples": 2, "outputs": [[0, 0.5], [1, 0.5]]}
    assert rows[2]["outputs"] == [[1, 1.0]]  # the absorbed class: all of it in output 1


def test_continual_summary_final_average_and_forgetting():
    matrix = [{"all": 0.9, "old": 0.9, "phase 1": None},
              {"all": 0.8, "old": 0.95, "phase 1": 0.6},
              {"all": 0.85, "old": 0.92, "phase 1": 0.7}]
    out = continual_summary(matrix, ["old", "phase 1"])
    assert out["final"]["all"] == 0.85
    assert out["average_incremental"] == pytest.approx((0.9 + 0.8 + 0.85) / 3)
    assert out["forgetting"]["old"] == pytest.approx(3.0)  # best earlier 95 %, final 92 %
    assert out["forgetting"]["phase 1"] == pytest.approx(-10.0)  # it improved
    assert continual_summary(matrix[:1], ["old"])["forgetting"]["old"] is None


def test_cluster_truth_names_the_majority_and_the_distractor_share():
    out = cluster_truth(np.array([5, 5, 5, -1]))
    assert out == {"majority": 5, "purity": 0.75, "distractors": 0.25}


def test_consolidation_distills_under_its_own_gin_scope(tmp_path, monkeypatch):
    """`consolidate/distill.<arg>` binds consolidation's distillation alone; every other
    distillation (the rounds') keeps `distill.<arg>`."""
    import copy

    import gin

    import components.losses  # noqa: F401  (DistillLoss)
    import graphs.train as training
    from components.cache import FeatureCache
    from components.data.loading import BatchAugment
    from components.models import Network, SmallConvNet
    from graphs.consolidate import consolidate

    samplers = []
    real_loader = training._loader
    monkeypatch.setattr(training, "_loader", lambda images, batch_size, **kw:
                        samplers.append(kw["sampler"]) or real_loader(images, batch_size, **kw))
    g = torch.Generator().manual_seed(0)
    labeled = ImageSet(torch.randint(0, 255, (16, 1, 8, 8), generator=g, dtype=torch.uint8),
                       torch.arange(16) % 2, ["a", "b"], "labeled")
    stream = ImageSet(torch.randint(0, 255, (24, 1, 8, 8), generator=g, dtype=torch.uint8),
                      torch.full((24,), -1), ["a", "b"], "stream")
    torch.manual_seed(0)
    model = Network(SmallConvNet(in_channels=1, width=4), 2).grow(1)
    with torch.no_grad():
        model.classifier.bias[2] = 50.0  # every stream sample is a candidate of the discovered output
    with gin.unlock_config():
        gin.parse_config(["distill.loss = @DistillLoss()", "distill.epochs = 1", "distill.batch_size = 8",
                          "distill.sampler = 'instance'", "consolidate/distill.sampler = 'class_balanced'"])
        gin.bind_parameter("distill.optimizer", lambda params: torch.optim.SGD(params, lr=0.01))
    student, entry, _ = consolidate(model, model, labeled, stream, 2, ["a", "b", "new-1-0"], BatchAugment(),
                                    FeatureCache(str(tmp_path / "cache")), torch.device("cpu"),
                                    SemiSupervisedKMeans(k_new=1, normalize=False, seed=0), None, "features")
    assert student is not None and entry["candidates"] == 24
    assert samplers == ["class_balanced"]
    training.distill(copy.deepcopy(model), model, labeled, BatchAugment(), torch.device("cpu"))
    assert samplers == ["class_balanced", "instance"]  # outside the scope: the unscoped binding
