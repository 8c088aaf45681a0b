"""Consolidation: label the discovered classes again, from everything the stream showed.

A model that has grown by discovered classes learned them from a pool: the samples the first
model was unsure of, clustered once. Consolidation asks the grown model which stream samples
belong to its discovered classes, clusters all of those afresh (semi-supervised k-means anchored
by the labeled classes, in a representation learned on the labeled images and the stream; k = the
number of discovered outputs, or with ``k_from="density"`` the number of groups the candidates
hold, :func:`estimate_k`), gives each new cluster the discovered output it shares most samples
with (Hungarian; an output no cluster matches is dropped, a stable cluster no output matches is
added), and distills a student on the labeled images plus these labels. The
student's teacher speaks for the labeled classes only: its discovered outputs are what is being
relabeled, and distilling them would teach the old labels again.

With ``min_stability`` > 0 each new cluster's clusterwise Jaccard stability (Hennig 2007, the
rounds' acceptance test: the candidates subsampled and relabeled again, same k) is measured,
and while one dissolves (below ``min_stability``) the least stable output is dropped and the
candidates are clustered again with one cluster fewer (an output whose cluster dissolved once
must then be clearly stable, :func:`stable_relabel`): with k fixed at the number of outputs,
an output that duplicates a class or holds a rare old class's look-alikes leaves a cluster of
leftovers (distractors, a class's fringe) that no resampling finds again, and a class cut in
two by one output too many is whole again once that output has gone.

With ``inputs_to`` the clustering's inputs are written to a file (:func:`save_inputs`), so that
the relabeling can be replayed offline in seconds under other settings
(``scripts/consolidation_replay.py``) instead of running the loop again.

The continual loop runs it once at the stream's end (``continual.consolidate``), the
single-round loop after its distillation (``lifecycle.consolidate``); docs/loop.md and
docs/suite.md measure both.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import gin
import numpy as np
import torch
from ignite.engine import Engine
from scipy.optimize import linear_sum_assignment
from torch import nn

from components.acceptance import jaccard_stability, neighbour_spacing
from components.cache import FeatureCache
from components.data import ImageSet, concat_images, take_images
from components.kmeans import KMeansResult, confident
from components.metrics import cluster_truth
from graphs.encode import encode
from graphs.handlers import rank_zero
from graphs.train import distill


class FirstOutputs(nn.Module):
    """``model``'s first ``n`` logits: a teacher that speaks only for those classes."""

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        self.model, self.n = model, n

    @property
    def num_classes(self) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, :self.n]


def consolidate(model: nn.Module, teacher: nn.Module, labeled: ImageSet, stream: ImageSet, n_old: int,
                names: list[str], augment: nn.Module, cache: FeatureCache, device: torch.device,
                labeler: Callable, representation: Callable | None, cluster_on: str,
                keep_fraction: float = 1.0, min_stability: float = 0.0, resamples: int = 5,
                fraction: float = 0.8, seed: int = 0, fixed_anchors: bool = False,
                territory: float | None = None, max_added: int = 0,
                inputs_to: Path | None = None,
                k_from: str = "outputs") -> tuple[nn.Module | None, dict, Engine | None]:
    """Relabel ``model``'s discovered outputs (``n_old`` and up, named by ``names``) from the
    ``stream`` samples it assigns to them and distill a student on ``labeled`` (classes below
    ``n_old``) plus those labels, with ``teacher`` (first ``n_old`` outputs) for the labeled
    classes.

    Returns ``(student, entry, engine)``: ``entry`` has the number of candidates and, when a
    student was made, ``ids`` (stream rows) and ``targets`` (their outputs, numbered as in the
    student); ``engine`` is the distillation's (for a checkpoint). With ``min_stability`` > 0,
    ``entry["stability"]`` maps each discovered output to its cluster's stability, and
    ``entry["kept"]`` lists the outputs the student keeps (output ``kept[j]`` is its output
    ``n_old + j``; the others are dropped, one at a time, each followed by a new clustering with
    one cluster fewer: ``entry["reclustered"]`` lists them in order with every output's stability
    in that pass); ``labeled_ids`` / ``labeled_clusters`` are the candidates the clustering gave
    a labeled class (:func:`left_to_labeled` turns them into a report).
    With fewer than two candidates per discovered class, or no stable cluster, the student and
    engine are None and ``entry["decision"]`` says why. ``fixed_anchors`` keeps the labeled
    classes' centroids at their labeled samples' means (``SemiSupervisedKMeans.fixed_old``; the
    labeler must have that attribute). With ``max_added`` > 0, a group of candidates that the
    clustering gives a labeled class but that lies beyond ``territory`` (:func:`far_groups`)
    gets a cluster of its own, up to ``max_added`` of them, and a cluster no output matches
    becomes a new output when it is stable: ``entry["added"]`` lists them (``name``
    ``new-c-<j>``, ``stability``), the student's outputs after the kept ones. ``inputs_to``: a
    file to write the clustering's inputs to (:func:`save_inputs`).

    ``k_from="outputs"`` makes one cluster per discovered output. ``"density"`` lets the
    candidates say how many groups they hold (:func:`estimate_k`): an output no cluster matches
    is dropped (``entry["unmatched"]``), and a stable cluster no output matches becomes an
    output as with ``max_added``; ``entry["k_estimate"]`` records the estimate."""
    if k_from not in ("outputs", "density"):
        raise ValueError(f"k_from must be 'outputs' or 'density', got {k_from!r}")
    if k_from == "density" and max_added > 0:
        raise ValueError("consolidation's k estimated by density already adds a cluster for every group it "
                         "finds: set continual.consolidation_added = 0 with consolidation_k = 'density'")
    logits = encode(model, stream, augment, cache, device)["logits"]
    predicted, k = logits.argmax(1), logits.shape[1] - n_old  # k: the discovered outputs
    ids = np.flatnonzero(predicted >= n_old)
    entry: dict = {"candidates": int(len(ids))}
    if k < 1 or len(ids) < 2 * k:
        entry["decision"] = "no discovered classes" if k < 1 else "too few samples"
        return None, entry, None
    images = stream.subset(ids, f"{stream.name}/assigned-new")
    learner = copy.deepcopy(model)
    if representation is not None:
        representation(learner, labeled, stream, augment, device)
    on_u = encode(learner, images, augment, cache, device)
    on_l = encode(learner, labeled, augment, cache, device)
    relabeler = copy.copy(labeler)
    if hasattr(relabeler, "overcluster"):  # one cluster per output
        relabeler.overcluster = 1
    if fixed_anchors:  # the candidates are the model's new ones: they may not move a labeled class
        if not hasattr(relabeler, "fixed_old"):
            raise ValueError(f"fixed_anchors needs a labeler that can fix the labeled classes' centroids "
                             f"(SemiSupervisedKMeans.fixed_old); {type(labeler).__name__} cannot")
        relabeler.fixed_old = True
    settings = dict(min_stability=min_stability, resamples=resamples, fraction=fraction, seed=seed,
                    territory=territory, max_extra=max_added)
    if k_from == "density":
        settings["k_new"] = entry["k_estimate"] = estimate_k(relabeler, on_u[cluster_on], on_l[cluster_on],
                                                             on_l["targets"], n_old)
    if inputs_to is not None:
        save_inputs(inputs_to, relabeler, on_u[cluster_on], on_l[cluster_on], on_l["targets"], n_old,
                    predicted[ids], list(range(n_old, n_old + k)), settings, ids,
                    stream.targets.numpy()[ids])
    result, output, stability, passes = stable_relabel(
        relabeler, on_u[cluster_on], on_l[cluster_on], on_l["targets"], n_old, predicted[ids],
        list(range(n_old, n_old + k)), **settings)
    dropped = [p["dropped"] for p in passes]
    kept = [o for o in range(n_old, n_old + k) if o not in dropped]
    added = sorted(o for o in set(output.values()) if o >= n_old + k)  # clusters no output matched
    if k_from == "density":
        entry["unmatched"] = [p["dropped"] for p in passes if p.get("why") == "no cluster"]
    if max_added > 0 or k_from == "density":
        entry["added"] = [{"name": f"new-c-{j}", "stability": stability.get(o)} for j, o in enumerate(added)]
    if min_stability > 0:
        entry["stability"], entry["kept"] = stability, kept
        if passes:
            entry["reclustered"] = passes
        if not kept and not added:
            entry["decision"] = f"every relabeled cluster dissolved (stability below {min_stability})"
            return None, entry, None
    if not kept and not added:  # every output unmatched, and nothing stable to add
        entry["decision"] = "no cluster matched a discovered output"
        return None, entry, None
    new = result.labels >= n_old
    renumber = {o: n_old + j for j, o in enumerate(kept + added)}
    keep = confident(result, keep_fraction, first=n_old) & new
    keep[keep] = np.isin([output.get(c, -1) for c in result.labels[keep]], kept + added)
    entry["ids"] = ids[keep]
    entry["targets"] = np.array([renumber[output[c]] for c in result.labels[keep]], dtype=np.int64)
    entry["labeled_ids"], entry["labeled_clusters"] = ids[~new], result.labels[~new]  # for the report
    if len(kept) < k:  # the student has only the kept outputs (the teacher speaks for the labeled ones)
        learner.keep_outputs(list(range(n_old)) + kept)
    if added:
        learner.grow(len(added))
    new_names = [names[o] for o in kept] + [a["name"] for a in entry.get("added", [])]
    taught = ImageSet(concat_images([labeled.images, take_images(stream.images, entry["ids"])]),
                      torch.cat([labeled.targets, torch.from_numpy(entry["targets"])]),
                      [*names[:n_old], *new_names],
                      f"{stream.name}/labeled+relabeled")
    with gin.config_scope("consolidate"):  # `consolidate/distill.<arg>` binds this distillation alone
        engine = distill(learner, FirstOutputs(teacher, n_old), taught, augment, device)
    return learner, entry, engine


@gin.configurable(allowlist=["min_cluster_share"])
def estimate_k(labeler, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray, n_old: int,
               min_cluster_share: float | None = None) -> int:
    """How many groups the candidates ``x_u`` hold: HDBSCAN with excess-of-mass selection
    (``SemiSupervisedKMeans(estimate="density", density_selection="eom")``, the labeler's other
    settings kept), at least 1. A round's pool is small and its new classes are a few dozen
    samples, where leaf selection finds them; the candidates are everything the model gives its
    discovered outputs, where leaf selection cuts a class into its leaves and excess of mass keeps
    the groups that persist (docs/loop.md, "Consolidation's k"). ``min_cluster_share``: the
    smallest group as a share of the candidates, in place of the labeler's (None: the labeler's)."""
    if not hasattr(labeler, "estimate"):
        raise ValueError(f"consolidation's k by density needs SemiSupervisedKMeans, not "
                         f"{type(labeler).__name__}: set continual.consolidation_k = 'outputs'")
    estimator = copy.copy(labeler)
    estimator.k_new, estimator.estimate, estimator.density_selection = None, "density", "eom"
    if min_cluster_share is not None:
        if not 0 <= min_cluster_share < 1:
            raise ValueError(f"estimate_k.min_cluster_share is a share of the candidates in [0, 1), got "
                             f"{min_cluster_share}: bind e.g. 0.05, or None for the labeler's")
        estimator.min_cluster_share = min_cluster_share
    return max(1, int(rank_zero(estimator, x_u, x_l, y_l, n_old).k_estimate))


def save_inputs(path: Path, labeler, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray, n_old: int,
                predicted: np.ndarray, outputs: list[int], settings: dict, ids: np.ndarray,
                truth: np.ndarray) -> None:
    """Write what :func:`stable_relabel` is called with to ``path`` (``.npz``, written under a
    temporary name and renamed into place): the candidates' and the labeled anchors' features,
    the anchors' classes, the output each candidate was predicted as, the outputs, the keyword
    settings, the labeler (its class and constructor arguments), the candidates' stream rows and
    their true classes (for a report only: nothing replayed from the file decides anything)."""
    labeler_args = labeler_arguments(labeler)
    kind = f"{type(labeler).__module__}:{type(labeler).__qualname__}"
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, x_u=x_u, x_l=x_l, y_l=y_l, n_old=n_old, predicted=predicted, outputs=np.asarray(outputs),
             ids=ids, truth=truth, settings=json.dumps(settings),
             labeler=json.dumps({"kind": kind, "arguments": labeler_args}))
    os.replace(tmp, path)


def labeler_arguments(labeler) -> dict:
    """``labeler``'s attributes, which :func:`save_inputs` stores to build it again; refused
    with a message when one cannot be written as JSON (a labeler holding a network, say)."""
    arguments = dict(vars(labeler))
    try:
        json.dumps(arguments)
    except TypeError as error:
        raise ValueError(f"consolidation's inputs can be saved only for a labeler whose settings are "
                         f"plain values, and {type(labeler).__name__}'s are not ({error}): set "
                         "continual.consolidation_inputs = False") from error
    return arguments


def load_inputs(path: Path) -> dict:
    """What :func:`save_inputs` wrote, with the labeler built again from its class and arguments:
    ``stable_relabel(d["labeler"], d["x_u"], d["x_l"], d["y_l"], d["n_old"], d["predicted"],
    d["outputs"], **d["settings"])`` repeats the run's relabeling."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: run the loop with "
                                "continual.consolidation_inputs = True to write it")
    with np.load(path) as f:
        d = {key: f[key] for key in f.files}
    spec = json.loads(str(d.pop("labeler")))
    module, name = spec["kind"].split(":")
    cls = getattr(importlib.import_module(module), name)
    if "use_gpu" in spec["arguments"]:  # as this machine allows, not as the writing one did
        spec["arguments"]["use_gpu"] = None
    try:
        d["labeler"] = cls(**spec["arguments"])
    except TypeError as error:
        raise ValueError(f"{path}: cannot build {name} again from its saved arguments ({error}); "
                         "the file was written by another version of it") from error
    d["settings"] = json.loads(str(d["settings"]))
    d["n_old"], d["outputs"] = int(d["n_old"]), [int(o) for o in d["outputs"]]
    return d


def left_to_labeled(entry: dict, truth: np.ndarray) -> None:
    """Replace ``entry``'s ``labeled_ids`` / ``labeled_clusters`` (the candidates the clustering
    gave a labeled class: they are not relabeled) by ``entry["to_labeled"]``, one row per labeled
    class with their number and what they really are (``truth``: the stream's targets, for the
    report only; a whole new class found here is one the discovered outputs had no cluster for)."""
    ids, clusters = entry.pop("labeled_ids"), entry.pop("labeled_clusters")
    entry["to_labeled"] = [{"class": int(c), "size": int((clusters == c).sum())}
                           | cluster_truth(truth[ids[clusters == c]]) for c in np.unique(clusters)]


def stable_relabel(labeler: Callable, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray, n_old: int,
                   predicted: np.ndarray, outputs: list[int], min_stability: float = 0.0, resamples: int = 5,
                   fraction: float = 0.8, seed: int = 0, regain: float = 0.75,
                   territory: float | None = None, max_extra: int = 0, k_new: int | None = None):
    """Cluster ``x_u`` (anchored by ``x_l`` / ``y_l``) with one new cluster per output in
    ``outputs``, each cluster taking the output its samples were most often ``predicted`` as.

    With ``min_stability`` > 0 each cluster's stability is measured (:func:`output_stability`);
    while one fails, the output of the least stable failing cluster is dropped and the samples
    are clustered again with one cluster fewer. A cluster fails below ``min_stability`` (it
    dissolves), and an output whose cluster dissolved in an earlier pass fails below ``regain``
    (Hennig's line for a stable cluster, 0.75): a class cut in two is whole again and clearly
    stable once the extra output has gone, where a cluster of leftovers only wobbles.

    With ``max_extra`` > 0, while the clustering gives a labeled class a group that lies beyond
    ``territory`` (:func:`far_groups`), it is run again with one cluster more, up to ``max_extra``
    more than the outputs. A cluster no output matches is then named as a fresh output, numbered
    after ``outputs`` (kept only when it is at least ``min_stability`` stable).

    With ``k_new`` the first clustering has ``k_new`` new clusters, not one per output: the
    outputs no cluster matches, or that share no sample with the cluster they would get, are
    dropped at once (``"why": "no cluster"`` in ``passes``, stability 0), the clusters no output
    matches are fresh outputs, and the passes go on from there with one cluster fewer for each
    output dropped.

    Returns ``(result, {cluster: output}, {output: stability}, passes)``: ``passes`` lists, for
    every dropped output in order, ``{"dropped": output, "stability": {output: stability}}`` of
    that pass; a dropped output's entry in the returned stability is the one it was dropped with.
    ``{cluster: output}`` is empty when every output was dropped."""
    outputs, stability, passes, dissolved = sorted(outputs), {}, [], set()
    fresh_from, extra = max(outputs, default=n_old - 1) + 1, 0
    result = clustered = None
    if k_new is not None:  # the number of clusters the candidates were estimated to hold
        result, output = _relabel(labeler, x_u, x_l, y_l, n_old, predicted, outputs, k_new - len(outputs),
                                  shared_only=True)
        for o in [o for o in outputs if o not in output.values()]:
            outputs.remove(o)
            stability[o] = 0.0
            passes.append({"dropped": o, "why": "no cluster", "stability": {}})
        extra, clustered = k_new - len(outputs), result  # the same k: the first pass matches it again
    geometry = labeler.geometry(x_u, x_l, y_l, n_old) if max_extra > 0 else None  # the same every pass
    while outputs:
        result, output = _relabel(labeler, x_u, x_l, y_l, n_old, predicted, outputs, extra, k_new is not None,
                                  clustered)
        clustered = None
        if extra < max_extra and far_groups(result.labels, *geometry, y_l, n_old, territory,
                                            getattr(labeler, "min_cluster_size", 2)):
            extra += 1
            continue
        fresh = [c for c in range(n_old, len(result.centroids)) if c not in output]
        output |= {c: fresh_from + j for j, c in enumerate(fresh)}
        if min_stability <= 0:
            return result, output, stability, passes
        measured = output_stability(result.labels, output, x_u, x_l, y_l, n_old, labeler, resamples,
                                    fraction, seed)
        now = {o: measured.get(o, 0.0) for o in outputs}  # an output no cluster took: 0
        stability.update(now)
        failing = [o for o in outputs if now[o] < (regain if o in dissolved else min_stability)]
        dissolved |= {o for o in outputs if now[o] < min_stability}
        if not failing:
            for c in fresh:  # a fresh output must be a stable cluster
                stability[output[c]] = measured.get(output[c], 0.0)
                if stability[output[c]] < min_stability:
                    del output[c]
            return result, output, stability, passes
        weakest = min(failing, key=now.get)
        outputs.remove(weakest)
        passes.append({"dropped": weakest, "stability": now})
    return result, {}, stability, passes


def far_groups(labels: np.ndarray, g_u: np.ndarray, g_l: np.ndarray, y_l: np.ndarray, n_old: int,
               territory: float | None, smallest: int = 2) -> list[int]:
    """The labeled classes whose share of the unlabeled samples ``g_u`` (``labels`` below
    ``n_old``; at least ``smallest`` of them) has its mean farther from the class's labeled mean
    (``g_l`` / ``y_l``) than ``territory`` times the spacing between neighbouring labeled classes
    (:func:`components.acceptance.neighbour_spacing`), both sets in the labeler's geometry: not
    that class's fringe but a group the clustering had no cluster for. (Measured: rare old
    digits' look-alikes lie at 0.2-0.6 of that spacing, Fashion-MNIST's bags given to the
    T-shirt's fixed centroid at 1.0-2.0; docs/loop.md.)"""
    if territory is None or n_old < 2:
        return []
    means = np.stack([g_l[y_l == c].mean(0) for c in range(n_old)])
    spacing = neighbour_spacing(means)
    return [c for c in range(n_old) if (labels == c).sum() >= smallest
            and np.linalg.norm(g_u[labels == c].mean(0) - means[c]) > territory * spacing]


def _relabel(labeler: Callable, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray, n_old: int,
             predicted: np.ndarray, outputs: list[int], extra: int = 0, shared_only: bool = False,
             clustered: KMeansResult | None = None):
    """Cluster ``x_u`` with one new cluster per output in ``outputs``, and ``extra`` more
    (anchored by the labeled classes; ``extra`` may be negative), and give each output the new
    cluster that holds most of the samples ``predicted`` as it (Hungarian; clusters or outputs
    left over stay unmatched, and with ``shared_only`` so does a pair that shares no sample).
    ``clustered``: that clustering, already made (only the matching is done again). Returns the
    clustering and ``{cluster: output}``."""
    labeler.k_new = len(outputs) + extra
    result = clustered if clustered is not None else rank_zero(labeler, x_u, x_l, y_l, n_old)
    outputs_ = np.asarray(outputs)  # ascending (stable_relabel sorts them)
    ours = (result.labels >= n_old) & np.isin(predicted, outputs_)  # an output dropped counts for none
    counts = np.zeros((len(outputs) + extra, len(outputs)))
    np.add.at(counts, (result.labels[ours] - n_old, np.searchsorted(outputs_, predicted[ours])), 1)
    rows, cols = linear_sum_assignment(-counts)
    return result, {int(r + n_old): outputs[c] for r, c in zip(rows, cols, strict=True)
                    if counts[r, c] > 0 or not shared_only}


def output_stability(labels: np.ndarray, output: dict[int, int], x_u: np.ndarray, x_l: np.ndarray,
                     y_l: np.ndarray, n_old: int, labeler: Callable, resamples: int = 5,
                     fraction: float = 0.8, seed: int = 0) -> dict[int, float]:
    """Each output's stability: the clusterwise Jaccard stability (Hennig 2007) of the new
    cluster ``c`` it was given (``output[c]``), ``labels`` being ``labeler``'s clustering of
    ``x_u`` anchored by ``x_l`` / ``y_l``, re-run on ``resamples`` subsamples of ``fraction``."""
    clusters = sorted(output)
    stability = jaccard_stability(labels, clusters, lambda index: labeler(x_u[index], x_l, y_l, n_old).labels,
                                  resamples, fraction, np.random.default_rng(seed))
    return {int(output[c]): float(v) for c, v in zip(clusters, stability, strict=True)}


__all__ = ["FirstOutputs", "consolidate", "estimate_k", "far_groups", "labeler_arguments", "left_to_labeled",
           "load_inputs", "output_stability", "save_inputs", "stable_relabel"]
