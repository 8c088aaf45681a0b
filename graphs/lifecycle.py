"""The whole loop: train → encode → online → discover → distill → evaluate.

Every piece arrives as an argument (bound in gin); this module only says how they flow.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import gin
import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from ignite.utils import manual_seed
from torch import nn

from components.acceptance import PromotionGate
from components.cache import FeatureCache
from components.data import ImageSet, ProtocolData, concat_images, take_images
from components.kmeans import confident
from components.metrics import cluster_truth, clustering_accuracy, novelty_metrics, pool_quality
from components.pool import SamplePool
from components.recalibration import discovered_offset, known_prior_adjustment
from components.scores import Score
from components.thresholds import FalseAlarmRate
from graphs.consolidate import consolidate as relabel_discovered
from graphs.consolidate import left_to_labeled
from graphs.encode import encode
from graphs.evaluate import evaluate
from graphs.handlers import RunDir, describe, log, rank_zero, save_checkpoint
from graphs.novelty import TEN_PERCENT_FALSE_ALARMS, assess, scaled, temperature_of
from graphs.online import online, score_outputs
from graphs.report import write_lifecycle_report
from graphs.train import adapt, distill, train

# the pool's clustering metrics when nothing was clustered (empty or refused pool)
NOTHING_CLUSTERED = dict.fromkeys(("all", "old", "new", "all_balanced", "old_balanced", "new_balanced",
                                   "nmi", "ari"), float("nan"))


class PoolRefused(Exception):
    """The labeler could not cluster the pool (its message says why); the pool is kept."""


@gin.configurable(denylist=["run_dir"])
def lifecycle(
    run_dir: RunDir,
    data: Callable[[], ProtocolData] = gin.REQUIRED,
    model: Callable[..., nn.Module] = gin.REQUIRED,
    augment: nn.Module = gin.REQUIRED,
    score: Score | Callable[[torch.Tensor], torch.Tensor] = gin.REQUIRED,
    pool: SamplePool = gin.REQUIRED,
    labeler: Callable = gin.REQUIRED,
    cache: FeatureCache = gin.REQUIRED,
    threshold: Callable = TEN_PERCENT_FALSE_ALARMS,
    temperature_scaling: bool = True,
    representation: Callable[..., object] | None = adapt,
    cluster_on: str = "projected",
    keep_fraction: float = 1.0,
    margin: float | None = None,
    refine: str | None = "new",
    consolidate: bool = False,
    gate: PromotionGate | None = None,
    logit_adjustment: bool = True,
    claim_rate: float | None = None,
    claim_per_output: bool = False,
    embedding: str = "pca",
    seed: int = 0,
) -> dict:
    """Run the loop once on ``data()`` and return (and write) its metrics.

    The pool threshold comes from ``pool.threshold`` when given, else from the ``threshold``
    rule on held-out known-class images (``make_protocol.val_per_class``), after temperature
    scaling fitted on the same images when ``temperature_scaling``; by default the threshold
    lets 10 % of those images in (chosen on the digits and Fashion-MNIST suites, docs/suite.md).

    Writes ``metrics.json`` and ``report.md`` with its plots (``embedding``: ``"pca"`` or
    ``"tsne"`` for the 2-D view of the pool).

    Only the ``keep_fraction`` of each cluster nearest its centroid becomes pseudo-labels for
    distillation (:func:`components.kmeans.confident`); the rest stay in the pool for the next
    trigger. ``margin``: moreover only the samples at most ``margin`` times as far (squared
    distance) from their centroid as from the nearest other one (``confident``'s margin). A
    labeler that refuses the pool (too few samples for its clusters, NaN features,
    nothing to estimate k against) leaves the pool as it was, and the run reports the teacher.

    ``refine``: after clustering the pool, run the labeler's k-means again on every stream sample
    seen so far, started from the pool's clusters (:meth:`SemiSupervisedKMeans.refine`): the
    pool says what is new, the seen stream where it lies. The pseudo-labels are then, with
    ``"new"``, the seen samples in new clusters and the pooled ones in old clusters; with
    ``"all"``, the seen samples in every cluster (the labeled classes gain stream samples too).
    ``None``: the pool's clusters and samples only. ``keep_fraction`` applies in every case, and
    the pool's clustering accuracy in ``metrics.json`` is that of the clusters its samples end in.

    ``consolidate``: after distillation, label the discovered classes again from every stream
    sample seen that the student assigns to them (:func:`graphs.consolidate.consolidate`); the
    relabeled student replaces the first one if ``gate`` (a :class:`PromotionGate` on the
    held-out known-class images) lets it.

    ``logit_adjustment``: after distillation (and consolidation), shift the known classes' logits
    by ``τ · centred log-prior`` of their labeled counts, τ in 0, 0.1, …, 1 chosen on the held-out
    known-class images (:func:`components.recalibration.known_prior_adjustment`, Menon et al.'s
    post-hoc logit adjustment): the class-balanced distillation leaves a tail class of a few
    dozen images under-predicted. ``False``: the student as distilled.

    ``claim_rate``: last, lower the discovered classes' logits by the one offset that leaves at
    most this share of the held-out known-class images predicted as a discovered class
    (:func:`components.recalibration.discovered_offset`; never raises them). Pseudo-labels
    that took stream samples of a known look-alike (sandals taught as "sneaker") teach the
    student to claim that class's images too; the held-out images show how many it claims.
    ``None``: the student as distilled. ``claim_per_output``: lower the output that claims the
    most, image by image, instead of all of them by one offset.
    """
    if cluster_on not in ("features", "projected"):
        raise ValueError(f"cluster_on must be 'features' or 'projected', got {cluster_on!r}")
    if refine not in (None, "new", "all"):
        raise ValueError(f"lifecycle.refine must be None, 'new' or 'all', got {refine!r}")
    if refine and not callable(getattr(labeler, "refine", None)):
        raise ValueError(f"lifecycle.refine = {refine!r} needs a labeler with a refine() method "
                         f"(SemiSupervisedKMeans has one); {labeler!r} has none: set refine = None")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if claim_rate is not None and not 0 <= claim_rate < 1:
        raise ValueError(f"lifecycle.claim_rate must be in [0, 1) (a share of held-out known-class "
                         f"images) or None, got {claim_rate}")
    if margin is not None and not 0 < margin <= 1:
        raise ValueError(f"lifecycle.margin must be in (0, 1] (a ratio of squared distances) or None, "
                         f"got {margin}")
    if embedding not in ("pca", "tsne"):
        raise ValueError(f"embedding must be 'pca' or 'tsne', got {embedding!r}")
    started = time.perf_counter()
    # in a distributed run each process draws its own augmentations (seed + rank); the training
    # graphs start every process from process 0's weights
    manual_seed(seed + idist.get_rank())
    device = idist.device()
    protocol = data()
    log.info(
        f"[bold]{protocol.name}[/]: {protocol.n_old} old classes ({len(protocol.labeled)} labeled "
        f"images), {protocol.n_new} new; stream {len(protocol.stream)}, test {len(protocol.test)}; "
        f"device {device}"
    )
    if len(protocol.stream) == 0:
        raise ValueError(f"{protocol.name} has no stream: give the protocol new classes")

    # 1. train the first model on the long-tailed labeled classes
    teacher = model(num_classes=protocol.n_old)
    log.info(describe(teacher))
    trainer = train(teacher, protocol.labeled, augment, device,
                    on_first_step=run_dir.save_operative_config)
    save_checkpoint(run_dir, teacher, trainer, "teacher")

    # 2. online: score the stream, pool low-confidence samples
    cached = {s: encode(teacher, getattr(protocol, s), augment, cache, device)
              for s in ("labeled", "stream", "test")}
    cached["val"] = encode(teacher, protocol.val, augment, cache, device) if protocol.val else None
    notes: list[str] = []
    temperature = 1.0
    if temperature_scaling:
        temperature, why = temperature_of(cached["val"])
        notes += [why] if why else []
    stream, val = scaled(cached["stream"], temperature), scaled(cached["val"], temperature)
    if pool.threshold is None:
        pool.threshold = _pool_threshold(score, scaled(cached["labeled"], temperature), val, stream,
                                         protocol.n_old, threshold, notes)
    elif isinstance(score, Score):
        score.fit(cached["labeled"])
    for note in notes:
        log.warning(f"[yellow]{note}[/]")
    threshold = pool.threshold
    trace: list[tuple[int, int]] = []
    position, scores = online(stream, score, pool, trace=trace)
    stream_targets = cached["stream"]["targets"]
    seen_new = stream_targets[:position] >= protocol.n_old
    pooled = np.isin(np.arange(position), pool.ids)
    if pool.ready:
        log.info(f"pool fired: {len(pool)} of the first {position} stream samples pooled "
                 f"(threshold {threshold:.4f})")
    else:
        log.info(f"stream ended before the pool reached {pool.trigger_size}: discovering on "
                 f"the {len(pool)} pooled of {position} (threshold {threshold:.4f})")

    # 3-4. discover new classes in the pool, then distill into a grown student
    if len(pool) == 0:
        notes.append(f"the pool is empty after {position} stream samples (the threshold "
                     f"{threshold:.4g} let none in): nothing to discover, the teacher is reported "
                     "as it is; raise the threshold rule's rate or use another score")
        log.warning(f"[yellow]{notes[-1]}[/]")
        student, k_new, extras, pool_clusters = None, 0, {}, dict(NOTHING_CLUSTERED)
    else:
        try:
            student, k_new, pool_clusters, extras = _discover_and_distill(
                run_dir, protocol, teacher, pool, position, cached, augment, cache, device, labeler,
                representation, cluster_on, keep_fraction, refine, margin)
        except PoolRefused as error:  # the labeler refused the pool: keep it for the next trigger
            notes.append(f"discovery refused the pool ({error}); its {len(pool)} samples stay "
                         "pooled for the next trigger and the teacher is reported as it is")
            log.warning(f"[yellow]{notes[-1]}[/]")
            student, k_new, extras, pool_clusters = None, 0, {}, dict(NOTHING_CLUSTERED)
    consolidation = None
    if consolidate and student is not None and k_new > 0:
        student, consolidation = _consolidate(run_dir, student, teacher, protocol, position, augment, cache,
                                              device, labeler, representation, cluster_on, keep_fraction,
                                              PromotionGate() if gate is None else gate)
    adjusted = None
    if logit_adjustment and student is not None and k_new > 0:
        adjusted = _adjust_known(run_dir, student, protocol, augment, cache, device, notes)
    offset = None
    if claim_rate is not None and student is not None and k_new > 0:
        offset = _lower_discovered(run_dir, student, protocol, augment, cache, device, claim_rate,
                                   claim_per_output, notes)

    # 5. evaluate both models on held-out test images
    before = evaluate(_my_rows(cached["test"]), protocol.n_old, protocol.train_counts)
    tested = cached["test"] if student is None else encode(student, protocol.test, augment, cache, device)
    after = before if student is None else evaluate(_my_rows(tested), protocol.n_old, protocol.train_counts)
    metrics = {
        "protocol": protocol.name,
        "seed": seed,
        "test": after["accuracy"],
        "shots": after["shots"],
        "teacher_old_accuracy": before["accuracy"]["old"],
        "novelty": novelty_metrics(scores, seen_new),
        "pool": pool_quality(pooled, seen_new) | {"threshold": threshold},
        "temperature": temperature,
        "notes": notes,
        "pool_clustering": pool_clusters,
        "k_new": k_new,
        "k_scores": extras.pop("k_scores", {}),  # each candidate's score when k_new was estimated
        "pseudo_labels": extras.pop("pseudo_labels", _taught_counts([], [], [], protocol.n_old)),
        "consolidation": consolidation,
        "logit_adjustment": adjusted,
        "offset": offset,
        "seconds": time.perf_counter() - started,
    }
    if run_dir.writes:  # process 0 (or the only one) writes; the others wait at the barrier
        run_dir.save_operative_config()
        run_dir.write_json("metrics.json", metrics)
        histories = {"train": trainer.state.history, **extras.pop("histories", {})}
        write_lifecycle_report(run_dir, metrics, protocol, histories, cached["test"], tested, scores,
                               seen_new, trace, pool.trigger_size, extras, embedding=embedding)
    if idist.get_world_size() > 1:
        idist.barrier()
    return metrics


def _consolidate(run_dir, student, teacher, protocol, position, augment, cache, device, labeler,
                 representation, cluster_on, keep_fraction, gate):
    """Relabel the student's discovered classes from the stream seen so far and keep the
    relabeled student if the gate lets it (held-out known-class images, never the test set).
    Returns the model to report and what happened (for metrics.json)."""
    seen = protocol.stream.subset(np.arange(position), f"{protocol.name}/seen")
    relabeled, entry, distiller = relabel_discovered(
        student, teacher, protocol.labeled, seen, protocol.n_old, protocol.class_names, augment, cache,
        device, labeler, representation, cluster_on, keep_fraction)
    if relabeled is None:
        return student, entry
    left_to_labeled(entry, seen.targets.numpy())
    truth = seen.targets.numpy()[entry.pop("ids")]  # for the report only
    targets = entry.pop("targets")
    entry["outputs"] = [cluster_truth(truth[targets == c]) | {"id": int(c), "size": int((targets == c).sum())}
                        for c in np.unique(targets)]
    if protocol.val is None or len(protocol.val) == 0:
        entry["decision"], entry["why"] = "kept", "no held-out known-class images to gate it on"
        return student, entry

    def correct(model):
        val = encode(model, protocol.val, augment, cache, device)
        return val["logits"].argmax(1) == val["targets"]

    promoted, why = gate(correct(student), correct(relabeled))
    entry["decision"], entry["why"] = ("promoted" if promoted else "kept"), why
    log.info(f"consolidation: {entry['candidates']} stream samples relabeled; {entry['decision']} ({why})")
    if not promoted:
        return student, entry
    save_checkpoint(run_dir, relabeled, distiller, "consolidated")
    return relabeled, entry


def _adjust_known(run_dir, student, protocol, augment, cache, device, notes: list[str]) -> dict | None:
    """Post-hoc logit adjustment of the student's known classes, τ chosen on the held-out
    known-class images (in place; saved as the ``adjusted`` checkpoint when τ > 0). Returns what
    was measured, or ``None`` (and a note) without held-out images."""
    if protocol.val is None or len(protocol.val) == 0:
        notes.append("lifecycle.logit_adjustment: no held-out known-class images to choose τ on "
                     "(make_protocol.val_per_class); the student is reported as distilled")
        log.warning(f"[yellow]{notes[-1]}[/]")
        return None
    val = encode(student, protocol.val, augment, cache, device)
    n_old = protocol.n_old
    offsets, entry = known_prior_adjustment(val["logits"], val["targets"], protocol.train_counts[:n_old])
    if entry["tau"] > 0:  # shift the known outputs, leave the discovered ones
        discovered = np.zeros(student.classifier.out_features - n_old, np.float32)
        student.classifier.lower(0, np.concatenate([offsets, discovered]))
        save_checkpoint(run_dir, student, Engine(lambda *_: None), "adjusted")
    log.info(f"known classes' logits adjusted with τ = {entry['tau']:g}: held-out known-class "
             f"accuracy {entry['held_out_before']:.1%} → {max(entry['held_out']):.1%} (mean per class)")
    return entry


def _lower_discovered(run_dir, student, protocol, augment, cache, device, rate: float, per_output: bool,
                      notes: list[str]) -> dict | None:
    """Lower the student's discovered outputs so that they claim at most ``rate`` of the held-out
    known-class images (in place; saved as the ``offset`` checkpoint). Returns what it did, or
    ``None`` (and a note) without held-out images."""
    if protocol.val is None or len(protocol.val) == 0:
        notes.append("lifecycle.claim_rate: no held-out known-class images to fit the discovered "
                     "classes' offset on (make_protocol.val_per_class); the student is reported as "
                     "distilled")
        log.warning(f"[yellow]{notes[-1]}[/]")
        return None
    val = encode(student, protocol.val, augment, cache, device)
    offsets, entry = discovered_offset(torch.as_tensor(val["logits"]), protocol.n_old, rate, per_output)
    if offsets.any():
        student.classifier.lower(protocol.n_old, offsets)
        save_checkpoint(run_dir, student, Engine(lambda *_: None), "offset")
    lowered = ", ".join(f"{x:.3g}" for x in offsets)
    log.info(f"discovered outputs lowered by {lowered}: they claimed {entry['claimed_before']:.1%} "
             f"of {entry['images']} held-out known-class images, now {entry['claimed_after']:.1%} "
             f"(claim_rate {rate})")
    return entry


def _my_rows(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of the rows (every ``world_size``-th from its rank): the evaluation
    metrics gather the shares (:mod:`components.metrics`). In one process, all of them."""
    world = idist.get_world_size()
    if world == 1:
        return outputs
    return {name: array[idist.get_rank()::world] for name, array in outputs.items()}


def _pool_threshold(score, labeled, val, stream, n_old: int, rule: Callable, notes: list[str]) -> float:
    """The pool threshold by ``rule`` (fits ``score`` on the labeled outputs). Without held-out
    images, or when the rule cannot be met, fall back to the labeled images' scores at the rule's
    false-alarm rate (5 % for another rule), and say so in ``notes``: the run goes on and
    reports it."""
    chosen = assess(score, labeled, val, stream, n_old, rule)
    if "threshold_error" not in chosen:
        return chosen["pool"]["threshold"]
    fallback = rule if isinstance(rule, FalseAlarmRate) else FalseAlarmRate(0.05)
    notes.append(f"{chosen['threshold_error']} -- falling back to {fallback!r} on the labeled "
                 "training images, whose scores are more confident than unseen images' (more "
                 "samples of old classes will enter the pool)")
    return fallback(score_outputs(score, labeled).numpy())


def _taught_counts(rows, labels, pooled, n_old: int) -> dict:
    """How many stream samples were taught: from the pool, and from outside it by the kind of
    cluster they were given (old = a labeled class, new = a discovered one)."""
    outside = ~np.isin(rows, pooled)
    labels = np.asarray(labels)
    return {"pooled": int((~outside).sum()),
            "not_pooled": {"old": int((outside & (labels < n_old)).sum()),
                           "new": int((outside & (labels >= n_old)).sum())}}


def _discover_and_distill(run_dir, protocol, teacher, pool, position, cached, augment, cache, device,
                          labeler, representation, cluster_on, keep_fraction, refine=None, margin=None):
    """Learn a representation on the labeled images and everything the stream has shown so far
    (optional), cluster the pool with the labeler (semi-supervised k-means anchored by the
    labeled set), grow a student by the discovered classes and distill into it on the confident
    pseudo-labels, which leave the pool. Returns the student, the number of discovered classes,
    the pool's clustering accuracy and what the report shows (training histories, the pool's
    clustered features, true classes and clusters). Raises :class:`PoolRefused`, with the pool
    untouched, when the labeler refuses it. ``refine``, ``margin``: see :func:`lifecycle`."""
    ids = pool.ids
    pool_images = protocol.stream.subset(ids, f"{protocol.name}/pool")
    seen = protocol.stream.subset(np.arange(position), f"{protocol.name}/seen")
    learner = copy.deepcopy(teacher)
    histories = {}
    if representation is not None:
        adapted = representation(learner, protocol.labeled, seen, augment, device)
        histories["representation"] = getattr(getattr(adapted, "state", None), "history", [])
        cached_pool = encode(learner, pool_images, augment, cache, device)
        cached_labeled = encode(learner, protocol.labeled, augment, cache, device)
        cached_seen = encode(learner, seen, augment, cache, device) if refine else None
    else:
        cached_pool = {k: v[ids] for k, v in cached["stream"].items()}
        cached_labeled = cached["labeled"]
        cached_seen = {k: v[:position] for k, v in cached["stream"].items()}
    labeled_on = (cached_labeled[cluster_on], cached_labeled["targets"], protocol.n_old)
    try:  # once, in process 0: every process gets its clusters
        result = rank_zero(labeler, cached_pool[cluster_on], *labeled_on)
    except ValueError as error:
        raise PoolRefused(str(error)) from error
    k_new = len(result.centroids) - protocol.n_old
    # the stream rows that may be taught, their clusters and features: the pool's, or with
    # ``refine`` the seen stream's
    rows, clusters, on = ids, result, cached_pool
    if refine and k_new > 0:  # the same clusters, moved to where the seen stream puts them
        rows, on = np.arange(position), cached_seen
        clusters = rank_zero(labeler.refine, result, cached_seen[cluster_on], *labeled_on)
        runner_up = None if clusters.runner_up is None else clusters.runner_up[ids]
        result = dataclasses.replace(clusters, labels=clusters.labels[ids], distances=clusters.distances[ids],
                                     runner_up=runner_up, k_scores=result.k_scores,
                                     k_estimate=result.k_estimate)
    pool_truth = cached["stream"]["targets"][ids]
    pool_clusters = clustering_accuracy(pool_truth, result.labels, pool_truth < protocol.n_old)

    # distill into a student whose classifier grew by the discovered classes
    student = learner
    means = [on["features"][clusters.labels == protocol.n_old + j].mean(0) for j in range(k_new)]
    student.grow(k_new, torch.from_numpy(np.stack(means)).to(device))
    keep = confident(clusters, keep_fraction, margin=margin)
    if refine == "new":
        keep &= (clusters.labels >= protocol.n_old) | np.isin(rows, ids)
    taught = ImageSet(
        concat_images([protocol.labeled.images, take_images(protocol.stream.images, rows[keep])]),
        torch.cat([protocol.labeled.targets, torch.as_tensor(clusters.labels[keep])]),
        protocol.class_names, f"{protocol.name}/labeled+pseudo",
    )
    distiller = distill(student, teacher, taught, augment, device)
    pool.remove(np.intersect1d(ids, rows[keep]))
    save_checkpoint(run_dir, student, distiller, "student")
    histories["distill"] = distiller.state.history
    extras = {"histories": histories, "pool_features": cached_pool[cluster_on], "pool_truth": pool_truth,
              "pool_clusters": result.labels, "cluster_on": cluster_on,
              "k_scores": {str(k): v for k, v in (result.k_scores or {}).items()},
              "pseudo_labels": _taught_counts(rows[keep], clusters.labels[keep], ids, protocol.n_old)}
    return student, k_new, pool_clusters, extras
