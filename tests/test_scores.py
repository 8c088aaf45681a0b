"""Novelty scores, thresholds, temperature scaling and the evidential loss, against cases
computed by hand or by brute force."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from components.losses import EvidentialLoss, evidence_of
from components.pool import SamplePool
from components.scores import (
    Energy,
    Entropy,
    EvidentialUncertainty,
    KNNDistance,
    Mahalanobis,
    Margin,
    MaxLogit,
    MaxSoftmax,
    energy,
    max_softmax,
)
from components.thresholds import (
    ConformalFDR,
    FalseAlarmRate,
    PoolPrecision,
    conformal_fdr_threshold,
    false_alarm_threshold,
    fit_temperature,
    precision_threshold,
)
from graphs.online import online
from graphs.plots import score_histogram


def test_logit_scores_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    logits = probs.log()
    assert MaxSoftmax()(logits).item() == pytest.approx(0.5)
    assert Entropy()(logits).item() == pytest.approx(-(probs * probs.log()).sum().item())
    assert Entropy()(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert Margin()(logits).item() == pytest.approx(-0.2)
    assert MaxLogit()(torch.tensor([[1.0, 3.0, -2.0]])).item() == -3.0
    z = torch.randn(5, 3)
    assert torch.equal(Energy(2.0)(z), energy(z, 2.0))
    assert torch.equal(MaxSoftmax()({"logits": z}), max_softmax(z))
    # evidence relu(z), alpha = evidence + 1: [3, 1, 1] -> K / S = 3 / 5
    assert EvidentialUncertainty()(torch.tensor([[2.0, -1.0, 0.0]])).item() == pytest.approx(0.6)


def test_confident_outputs_score_lower_for_every_logit_score():
    sure, unsure = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.05]])
    for score in (MaxSoftmax(), Entropy(), Margin(), MaxLogit(), Energy(), EvidentialUncertainty()):
        assert score(sure).item() < score(unsure).item(), score


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(3).repeat_interleave(40)
    means = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    return means[targets] + torch.randn(len(targets), 4, generator=g), targets


def test_knn_distance_matches_brute_force():
    train, _ = _features()
    query, _ = _features(seed=1)
    score = KNNDistance(k=5).fit({"features": train})
    got = score({"features": query}).numpy()
    a = (train / train.norm(dim=1, keepdim=True)).numpy()
    b = (query / query.norm(dim=1, keepdim=True)).numpy()
    dist = np.sqrt(((b[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    expected = np.sort(dist, axis=1)[:, 4]
    assert np.allclose(got, expected, atol=1e-4)


def test_mahalanobis_matches_scipy_with_a_shared_covariance():
    train, targets = _features()
    query, _ = _features(seed=2)
    score = Mahalanobis().fit({"features": train, "targets": targets})
    got = score({"features": query[:5]}).numpy()
    means = [train[targets == c].mean(0).double().numpy() for c in range(3)]
    centered = np.concatenate([train[targets == c].double().numpy() - means[c] for c in range(3)])
    precision = np.linalg.inv(centered.T @ centered / len(train))
    expected = [min(mahalanobis(q, m, precision) ** 2 for m in means) for q in query[:5].double().numpy()]
    assert np.allclose(got, expected, rtol=1e-4)


def test_mahalanobis_feature_ensemble_flags_what_only_an_earlier_layer_sees():
    """Lee et al.'s feature ensemble: one Gaussian per layer, the standardized distances
    averaged. A sample that is ordinary in the last layer but far off in an earlier one is
    flagged by the ensemble, not by the last layer alone."""
    train, targets = _features()
    early, _ = _features(seed=4)
    fit = {"features": train, "tap3": early, "targets": targets}
    ensemble = Mahalanobis(keys=("tap3", "features")).fit(fit)
    last = Mahalanobis().fit(fit)
    query, query_early = train[:5].clone(), early[:5].clone()
    query_early[0] += torch.tensor([0.0, 0.0, 0.0, 12.0])  # off in the early layer only
    outputs = {"features": query, "tap3": query_early}
    got = ensemble(outputs)
    # by hand: each layer's single-layer score, standardized by its distances on the fitted samples
    expected = 0
    for key in ("tap3", "features"):
        single = Mahalanobis(keys=(key,)).fit(fit)
        on_fit = single({key: fit[key]}).double()
        expected = expected + (single(outputs).double() - on_fit.mean()) / on_fit.std()
    assert torch.allclose(got.double(), expected / 2, rtol=1e-4, atol=1e-5)
    assert got[0] > 3 * got[1:].abs().max()  # the ensemble sees it ...
    assert last(outputs)[0] < last({"features": train}).quantile(0.9)  # ... the last layer lets it by
    assert ensemble.name == "mahalanobis-tap3+features" and "keys" in repr(ensemble)
    with pytest.raises(ValueError, match="needs 'tap3'"):
        ensemble({"features": query})
    with pytest.raises(ValueError, match="at least one output"):
        Mahalanobis(keys=())


def test_feature_scores_say_what_they_are_missing():
    with pytest.raises(RuntimeError, match="needs cached training features"):
        KNNDistance(k=3)({"features": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="needs 'features'"):
        KNNDistance(k=3).fit({"logits": torch.randn(10, 4)})
    with pytest.raises(ValueError, match="bare tensor"):
        Mahalanobis().fit({"features": torch.randn(6, 2), "targets": torch.tensor([0, 0, 0, 1, 1, 1])})(
            torch.randn(2, 2))
    with pytest.raises(ValueError, match="at least 50 training features"):
        KNNDistance(k=50).fit({"features": torch.randn(10, 4)})


def test_false_alarm_threshold_lets_the_asked_share_of_known_samples_through():
    known = np.arange(1000, dtype=float)
    threshold = false_alarm_threshold(known, rate=0.05)
    assert (known > threshold).mean() == pytest.approx(0.05, abs=0.002)
    with pytest.raises(ValueError, match="needs held-out known-class scores"):
        false_alarm_threshold([], 0.05)


def test_precision_threshold_by_hand():
    scores = [5.0, 4.0, 3.0, 2.0, 1.0]
    is_new = [1, 1, 0, 1, 0]  # precision of the top k: 1, 1, 2/3, 3/4, 3/5
    assert precision_threshold(scores, is_new, 0.75) == 1.5  # pool {5, 4, 3, 2}
    assert precision_threshold(scores, is_new, 0.9) == 3.5  # pool {5, 4}
    assert precision_threshold(scores, is_new, 0.6) < 1.0  # everything
    with pytest.raises(ValueError, match="best is 0.667"):
        precision_threshold([5.0, 5.0, 1.0], [1, 0, 1], 1.0)  # the tie enters together
    with pytest.raises(ValueError, match="no new-class samples|there are none"):
        precision_threshold(scores, [0] * 5, 0.5)


def test_temperature_scaling_recovers_the_temperature_of_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 5, generator=g)
    targets = torch.multinomial((logits / 2.0).softmax(1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, targets) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="needs held-out labeled logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0))


def test_evidential_loss_by_hand():
    loss = EvidentialLoss(anneal_epochs=10)
    # alpha = [2, 1], S = 3, p = [2/3, 1/3]: (1/3)^2 + 2/9/4 + (1/3)^2 + 2/9/4 = 1/3
    assert loss(torch.tensor([[1.0, -1.0]]), torch.tensor([0])).item() == pytest.approx(1 / 3)
    # KL term on the misleading evidence: alpha~ = y + (1 - y) alpha = [1, 3]
    logits, target = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    alpha = torch.tensor([2.0, 3.0])
    p = alpha / alpha.sum()
    risk = ((torch.tensor([1.0, 0.0]) - p) ** 2 + p * (1 - p) / (alpha.sum() + 1)).sum()
    kl = torch.distributions.kl_divergence(torch.distributions.Dirichlet(torch.tensor([1.0, 3.0])),
                                           torch.distributions.Dirichlet(torch.ones(2)))
    loss.set_epoch(0, 20)
    assert loss(logits, target).item() == pytest.approx(risk.item(), rel=1e-5)
    loss.set_epoch(5, 20)  # lambda = 5 / 10
    assert loss(logits, target).item() == pytest.approx((risk + 0.5 * kl).item(), rel=1e-5)
    loss.set_epoch(15, 20)  # capped at 1
    assert loss(logits, target).item() == pytest.approx((risk + kl).item(), rel=1e-5)


def test_evidence_activations_of_the_loss_and_the_score_agree():
    z = torch.tensor([[0.0, math.log(3.0)]])  # exp evidence [1, 3]: alpha [2, 4], S = 6
    assert torch.allclose(evidence_of(z, "exp"), torch.tensor([[1.0, 3.0]]))
    assert torch.allclose(evidence_of(z, "softplus"), torch.nn.functional.softplus(z))
    assert EvidentialUncertainty(activation="exp")({"evidence": z}).item() == pytest.approx(2 / 6)
    p = torch.tensor([2 / 6, 4 / 6])  # target 1, no KL at epoch 0
    risk = ((torch.tensor([0.0, 1.0]) - p) ** 2 + p * (1 - p) / 7).sum()
    assert EvidentialLoss(activation="exp")(z, torch.tensor([1])).item() == pytest.approx(risk.item())
    with pytest.raises(ValueError, match="unknown evidence activation"):
        EvidentialUncertainty(activation="sigmoid")


def test_online_feeds_features_to_a_feature_score_and_logits_to_a_function():
    train, targets = _features()
    stream_x, stream_y = _features(seed=3)
    far = stream_x[:10] * -3  # ten samples far from every class
    stream = {"features": torch.cat([far, stream_x]).numpy(),
              "logits": torch.zeros(130, 3).numpy(), "ids": np.arange(130)}
    score = Mahalanobis().fit({"features": train, "targets": targets})
    pool = SamplePool(trigger_size=1000, threshold=50.0)
    position, scores = online(stream, score, pool, batch_size=16)
    assert position == 130 and len(scores) == 130
    assert set(range(10)) <= set(pool.ids.tolist()) and len(pool) < 20
    position, scores = online(stream, max_softmax, SamplePool(trigger_size=5, threshold=0.5), batch_size=16)
    assert position == 16  # every sample is maximally unsure: the first batch fires the pool


def test_score_histogram_is_written(tmp_path):
    path = score_histogram(tmp_path / "hist.png", np.r_[np.zeros(50), np.ones(20)],
                           np.r_[np.zeros(50, bool), np.ones(20, bool)], "energy")
    assert path.exists() and path.stat().st_size > 5_000


# --------------------------------------------------------------------------------------------
# threshold rules, approximate kNN, the evidential head, and assess (one score, measured)
# --------------------------------------------------------------------------------------------


def test_conformal_fdr_is_benjamini_hochberg_on_conformal_p_values():
    known = np.array([0.0, 1.0, 2.0, 3.0])  # p of a stream score: (1 + #known >= it) / 5
    stream = np.array([10.0, 9.0, 2.5, 0.5, -1.0])  # p = 0.2, 0.2, 0.4, 0.8, 1.0
    # plain BH at 0.5: sorted p 0.2, 0.2, 0.4, 0.8, 1.0 against 0.1, 0.2, 0.3, 0.4, 0.5 -> the
    # largest i with p_(i) <= i * 0.5 / 5 is 2: the two top scores are pooled
    cut = conformal_fdr_threshold(known, stream, fdr=0.5, storey_lambda=None)
    assert (stream > cut).tolist() == [True, True, False, False, False] and 2.5 < cut < 9.0
    # Storey: share of known-like samples (1 + #{p > 0.5}) / (5 * 0.5) = 1.2 -> capped at 1
    assert conformal_fdr_threshold(known, stream, 0.5) == cut
    with pytest.raises(ValueError, match="stream's scores"):
        ConformalFDR(0.2)(known)  # held-out scores alone are not enough for it
    assert ConformalFDR(0.5, None)(known, stream, None) == cut  # never needs labels


def test_conformal_fdr_keeps_the_pool_pure_and_grows_it_with_separation():
    rng = np.random.default_rng(0)
    fdp, pooled, false_alarm_pools = {}, {}, {}
    for gap in (2.0, 4.0):
        rates, sizes, fixed = [], [], []
        for _ in range(40):
            known = rng.normal(size=200)  # held-out known-class scores
            stream = np.r_[rng.normal(size=500), rng.normal(gap, 1.0, size=100)]  # 100 new at the end
            pool = stream > conformal_fdr_threshold(known, stream, fdr=0.2)
            rates.append(pool[:500].sum() / max(pool.sum(), 1))
            sizes.append(pool.sum())
            fixed.append((stream > false_alarm_threshold(known, 0.05))[:500].sum())
        fdp[gap], pooled[gap], false_alarm_pools[gap] = np.mean(rates), np.mean(sizes), np.mean(fixed)
    # the share of known samples in the pool stays at the target on average (BH's guarantee,
    # with Monte-Carlo slack), where 5 % false alarms let in the same 25 known samples either way
    assert fdp[2.0] <= 0.25 and fdp[4.0] <= 0.25
    assert abs(false_alarm_pools[2.0] - false_alarm_pools[4.0]) < 5
    assert pooled[4.0] > 1.5 * pooled[2.0]  # a pool that follows how separable the scores are
    # a stream of known classes alone: BH pools nothing in most draws (P(any) <= fdr)
    empty = [not (s > conformal_fdr_threshold(rng.normal(size=200), s, 0.2)).any()
             for s in (rng.normal(size=600) for _ in range(40))]
    assert np.mean(empty) >= 0.7


def test_threshold_rules_call_the_functions_and_say_what_they_need(caplog):
    known = np.arange(1000, dtype=float)
    assert FalseAlarmRate(0.05)(known) == false_alarm_threshold(known, 0.05)
    scores, is_new = [5.0, 4.0, 3.0, 2.0, 1.0], [1, 1, 0, 1, 0]
    with caplog.at_level("WARNING", logger="components.thresholds"):
        assert PoolPrecision(0.75)(None, scores, is_new) == 1.5
    assert "TRUE LABELS" in caplog.text  # the rule that reads the stream's labels says so, loudly
    with pytest.raises(ValueError, match="labels known"):
        PoolPrecision(0.9)(known)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        FalseAlarmRate(1.5)


def test_ivf_knn_searching_every_cell_is_the_exact_knn(caplog):
    """With nprobe = nlist the inverted file visits the whole bank: exactly the flat search."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn(400, 8, generator=g) + 3 * torch.randn(8, 8, generator=g)[torch.arange(400) % 8]
    bank, stream = {"features": train}, {"features": torch.randn(100, 8, generator=g)}
    exact = KNNDistance(k=5).fit(bank)(stream)
    every_cell = KNNDistance(k=5, nlist=8, nprobe=8).fit(bank)(stream)
    assert torch.allclose(exact, every_cell, atol=1e-5)
    few_cells = KNNDistance(k=5, nlist=8, nprobe=1)
    few_cells.fit(bank)
    assert type(few_cells.index).__name__ == "IndexIVFFlat"
    assert (few_cells(stream) >= exact - 1e-5).all()  # fewer candidates: the k-th is never nearer
    assert KNNDistance(k=5, nlist=4).name == "knn-k5-ivf4"
    with pytest.raises(ValueError, match="nprobe"):
        KNNDistance(k=5, nlist=4, nprobe=8)
    with caplog.at_level(logging.INFO, logger="components"):
        small = KNNDistance(k=5, nlist=16, nprobe=1).fit(bank)  # 400 < 39 * 16
    assert "searched exactly" in caplog.text
    assert type(small.index).__name__ == "IndexFlatL2"
    assert torch.allclose(small(stream), exact)


def test_knn_goes_to_the_gpu_exactly_where_faiss_sees_one(monkeypatch):
    """The default follows faiss's GPU count; the index searched is the one copied to the GPU
    (a fake copy here, which delegates to the CPU index and counts its searches); asking for
    the GPU where faiss sees none says how to get one instead of failing inside faiss."""
    import faiss

    import components.kmeans as kmeans

    g = torch.Generator().manual_seed(0)
    bank = {"features": torch.randn(400, 8, generator=g)}
    stream = {"features": torch.randn(50, 8, generator=g)}
    exact = KNNDistance(k=5).fit(bank)(stream)
    if faiss.get_num_gpus() == 0:
        assert not KNNDistance(k=5).use_gpu
        with pytest.raises(ValueError, match=r"faiss sees no GPU.*\[gpu\]"):
            KNNDistance(k=5, use_gpu=True)
        with pytest.raises(ValueError, match="faiss sees no GPU"):
            kmeans.KMeans(k=2, use_gpu=True)

    class OnGpu:
        def __init__(self, index):
            self.index, self.searches = index, 0

        def search(self, x, k):
            self.searches += 1
            return self.index.search(x, k)

    copies = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(kmeans, "to_gpu", lambda index: copies.append(OnGpu(index)) or copies[-1])
    for score in (KNNDistance(k=5), KNNDistance(k=5, nlist=8, nprobe=8)):
        assert score.use_gpu and "use_gpu=True" in repr(score)
        assert torch.allclose(score.fit(bank)(stream), exact, atol=1e-5)
        assert score.index is copies[-1] and copies[-1].searches == 1
    assert type(copies[1].index).__name__ == "IndexIVFFlat" and copies[1].index.nprobe == 8
    assert not KNNDistance(k=5, use_gpu=False).use_gpu
    with pytest.raises(ValueError, match="at most 2048"):
        KNNDistance(k=4096)


def test_evidential_uncertainty_reads_the_head_and_says_how_to_get_one():
    evidence = torch.tensor([[2.0, -1.0, 0.0]])
    outputs = {"logits": torch.zeros(1, 3), "evidence": evidence}
    assert EvidentialUncertainty()(outputs).item() == pytest.approx(0.6)
    assert EvidentialUncertainty(key="logits")({"logits": evidence}).item() == pytest.approx(0.6)
    with pytest.raises(ValueError, match="Network.confidence = @EvidentialHead"):
        EvidentialUncertainty()({"logits": evidence})


def _tiny_protocol_outputs(with_val: bool = True, with_new: bool = True):
    """Cached-output dicts of a labeled set, held-out set and a stream: old classes are three
    blobs, new-class samples sit far from all of them; logits are distances to the old means."""
    train, targets = _features()
    means = torch.stack([train[targets == c].mean(0) for c in range(3)])

    def outputs(x, y):
        return {"features": x.numpy(), "logits": (-torch.cdist(x, means)).numpy(), "targets": y.numpy()}

    val_x, val_y = _features(seed=1)
    old_x, old_y = _features(seed=2)
    new_x = torch.randn(60, 4, generator=torch.Generator().manual_seed(3)) * 0.5 - 4.0
    stream_x = torch.cat([old_x, new_x]) if with_new else old_x
    stream_y = torch.cat([old_y, torch.full((60,), 3)]) if with_new else old_y
    return (outputs(train, targets), outputs(val_x, val_y) if with_val else None,
            outputs(stream_x, stream_y))


def test_assess_measures_against_sklearn_and_thresholds_on_held_out_data():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from graphs.novelty import assess

    labeled, val, stream = _tiny_protocol_outputs()
    row = assess(KNNDistance(k=5), labeled, val, stream, n_old=3, threshold=FalseAlarmRate(0.05))
    is_new = stream["targets"] >= 3
    assert row["novelty"]["auroc"] == pytest.approx(roc_auc_score(is_new, row["scores"]))
    assert row["novelty"]["aupr_new"] == pytest.approx(average_precision_score(is_new, row["scores"]))
    assert row["novelty"]["auroc"] > 0.95  # far blobs are easy
    val_scores = KNNDistance(k=5).fit(labeled)(val).numpy()
    assert row["pool"]["threshold"] == pytest.approx(np.quantile(val_scores, 0.95))
    pooled = row["scores"] > row["pool"]["threshold"]
    assert row["pool"]["precision"] == pytest.approx(is_new[pooled].mean())
    assert row["pool"]["recall"] == pytest.approx(pooled[is_new].mean())


def test_assess_reports_what_it_can_on_bad_input():
    from graphs.novelty import assess

    labeled, _, stream = _tiny_protocol_outputs(with_val=False)
    row = assess(MaxSoftmax(), labeled, None, stream, n_old=3, threshold=FalseAlarmRate())
    assert "held-out known-class" in row["threshold_error"] and "val_per_class" in row["threshold_error"]
    assert row["novelty"]["auroc"] > 0.9 and math.isnan(row["pool"]["precision"])

    labeled, val, old_only = _tiny_protocol_outputs(with_new=False)
    row = assess(Energy(), labeled, val, old_only, n_old=3, threshold=PoolPrecision(0.9))
    assert "needs new-class samples" in row["threshold_error"]
    assert "no new" in row["novelty_error"] and math.isnan(row["novelty"]["auroc"])

    with pytest.raises(ValueError, match="needs 'features'"):
        assess(KNNDistance(k=5), None, val, stream, n_old=3)
