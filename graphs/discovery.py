"""The discovery graph: how well do pseudo-labels find the new classes of a whole stream?

``discovery`` trains a model on the labeled old classes, optionally learns a representation on
the labeled images and the whole stream together (``representation``, e.g. GCD's contrastive
:func:`graphs.train.adapt`), encodes both, and clusters the stream with the labeler
(semi-supervised k-means anchored by the labeled set, with a known or an estimated number of
new classes). It reports, on the stream:

* clustering accuracy (one Hungarian assignment over all stream samples, then on old / new /
  all, their class-balanced variants, NMI and ARI: :func:`components.metrics.clustering_accuracy`);
* assigned-new precision (the share of samples put in a new cluster that are new) and recall
  (the share of new samples put in a new cluster);
* the number of new classes found, and each candidate's score when it was estimated.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import gin
import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint
from ignite.utils import manual_seed
from torch import nn

from components.cache import FeatureCache
from components.data import ImageSet, ProtocolData, concat_images
from components.gin_files import resolve
from components.metrics import clustering_accuracy, pool_quality
from graphs.encode import encode
from graphs.handlers import RunDir, describe, load_checkpoint, log, save_checkpoint
from graphs.train import train


@gin.configurable(denylist=["run_dir"])
def discovery(
    run_dir: RunDir,
    data: Callable[[], ProtocolData] = gin.REQUIRED,
    model: Callable[..., nn.Module] = gin.REQUIRED,
    augment: nn.Module = gin.REQUIRED,
    cache: FeatureCache = gin.REQUIRED,
    labeler: Callable = gin.REQUIRED,
    representation: Callable[..., object] | None = None,
    cluster_on: str = "features",
    estimator: Callable | None = None,
    pretrain: Callable[..., object] | None = None,
    seed: int = 0,
) -> dict:
    """Train, (optionally) learn a representation on labeled + stream, cluster the stream and
    measure (see the module docstring). ``estimator`` (a labeler with ``k_new=None``) also
    estimates the number of new classes on the same features, reported as ``k_estimated``
    beside the labeler's clustering. ``pretrain`` (e.g. :func:`graphs.train.pretrain`, SimCLR)
    first trains the fresh model self-supervised on the labeled images and the stream together.
    Writes ``metrics.json``."""
    if cluster_on not in ("features", "projected"):
        raise ValueError(f"cluster_on must be 'features' or 'projected', got {cluster_on!r}")
    started = time.perf_counter()
    manual_seed(seed)
    device = idist.device()
    protocol = data()
    if len(protocol.stream) == 0:
        raise ValueError(f"{protocol.name} has no stream to cluster: give the protocol new classes")
    log.info(f"[bold]{protocol.name}[/]: {protocol.n_old} old classes ({len(protocol.labeled)} "
             f"labeled), {protocol.n_new} new; stream {len(protocol.stream)}; device {device}")

    net = model(num_classes=protocol.n_old)
    log.info(describe(net))
    if pretrain is not None:
        everything = ImageSet(concat_images([protocol.labeled.images, protocol.stream.images]),
                              torch.cat([protocol.labeled.targets, protocol.stream.targets]),
                              protocol.class_names, f"{protocol.name}/labeled+stream")
        pretrain(net, everything, augment, device)  # labels are not used
    trainer = train(net, protocol.labeled, augment, device, on_first_step=run_dir.save_operative_config)
    save_checkpoint(run_dir, net, trainer, "model")
    if representation is not None:
        net = copy.deepcopy(net)
        learner = representation(net, protocol.labeled, protocol.stream, augment, device)
        save_checkpoint(run_dir, net, learner, "representation")
    metrics = _cluster_and_measure(net, protocol, augment, cache, device, labeler, estimator,
                                   cluster_on, seed, started)
    run_dir.save_operative_config()
    run_dir.write_json("metrics.json", metrics)
    return metrics


def _cluster_and_measure(net, protocol, augment, cache, device, labeler, estimator, cluster_on: str,
                         seed: int, started: float) -> dict:
    """Encode (or read from the cache) the labeled set and the stream, cluster the stream and
    measure it (the module docstring lists what)."""
    labeled = encode(net, protocol.labeled, augment, cache, device)
    stream = encode(net, protocol.stream, augment, cache, device)
    clustered = time.perf_counter()
    result = labeler(stream[cluster_on], labeled[cluster_on], labeled["targets"], protocol.n_old)
    truth = stream["targets"]
    cluster_seconds = time.perf_counter() - clustered
    estimate = result
    if estimator is not None:
        estimate = estimator(stream[cluster_on], labeled[cluster_on], labeled["targets"], protocol.n_old)
    return {
        "protocol": protocol.name,
        "seed": seed,
        "stream": clustering_accuracy(truth, result.labels, truth < protocol.n_old),
        # assigned-new precision / recall: "put in a new cluster" read as a pool of the new
        "assigned_new": pool_quality(result.labels >= protocol.n_old, truth >= protocol.n_old),
        "k_new": int(len(result.centroids) - protocol.n_old),
        "k_new_true": protocol.n_new,
        "k_estimated": estimate.k_estimate,
        "k_scores": {str(k): v for k, v in (estimate.k_scores or {}).items()},
        "cluster_seconds": cluster_seconds,
        "seconds": time.perf_counter() - started,
    }


@gin.configurable(denylist=["run_dir"])
def recluster_run(
    run_dir: RunDir,
    source: str = gin.REQUIRED,
    cluster_on: str | None = None,
) -> dict:
    """Cluster the stream of an earlier ``discovery`` run (its folder is ``source``) again: loads
    the run's last checkpoint (the learned representation if there is one) and reads the
    features from the cache, so it takes seconds. Data, model, augmentation, cache, labeler,
    estimator and seed are the ``discovery.*`` bindings of the config parsed with it (the
    earlier run's ``operative_config.gin``) with any binding given after it, e.g.::

        python -m components.run --gin runs/X/operative_config.gin \
          --gin-bindings 'run.graph = @recluster_run' --gin-bindings "recluster_run.source = 'runs/X'" \
          --gin-bindings 'SemiSupervisedKMeans.whiten = True'
    """
    started = time.perf_counter()
    data, model, augment, cache, labeler = (_discovery_binding(k) for k in
                                            ("data", "model", "augment", "cache", "labeler"))
    estimator, seed = _discovery_binding("estimator", None), _discovery_binding("seed", 0)
    cluster_on = cluster_on or _discovery_binding("cluster_on", "features")
    folder = Path(source)
    checkpoints = {p.name.split("_")[0]: p for p in sorted((folder / "checkpoints").glob("*.pt"))}
    name = "representation" if "representation" in checkpoints else "model"
    if name not in checkpoints:
        raise FileNotFoundError(f"{folder / 'checkpoints'} holds no model_*.pt or representation_*.pt: "
                                "give recluster_run.source the folder of a discovery run")
    protocol = data()
    net = model(num_classes=protocol.n_old)
    Checkpoint.load_objects({"model": net}, load_checkpoint(checkpoints[name]))
    log.info(f"reclustering {folder} with its {name} checkpoint ({cluster_on})")
    metrics = _cluster_and_measure(net, protocol, augment, cache, idist.device(), labeler, estimator,
                                   cluster_on, seed, started)
    metrics["source"] = str(folder)
    run_dir.save_operative_config()
    run_dir.write_json("metrics.json", metrics)
    return metrics


def _discovery_binding(name: str, default=gin.REQUIRED):
    """What ``discovery.<name>`` is bound to in the parsed config, references resolved
    (``@X`` is the callable, ``@X()`` calls it)."""
    try:
        value = gin.query_parameter(f"discovery.{name}")
    except ValueError:
        if default is gin.REQUIRED:
            raise ValueError(f"recluster_run needs discovery.{name} bound: parse the earlier run's "
                             "operative_config.gin first (--gin runs/X/operative_config.gin)") from None
        return default
    return resolve(value)
