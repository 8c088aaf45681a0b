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

import gin
import ignite.distributed as idist
import numpy as np
import torch
from ignite.utils import manual_seed
from torch import nn

from components.cache import FeatureCache
from components.data import ImageSet, ProtocolData
from components.metrics import clustering_accuracy
from graphs.encode import encode
from graphs.handlers import RunDir, describe, log, save_checkpoint
from graphs.train import train


def assigned_new(truth: np.ndarray, labels: np.ndarray, n_old: int) -> dict[str, float]:
    """Precision and recall of "this sample is new" read off the clusters: a sample is
    assigned new when its cluster is not one of the ``n_old`` labeled ones."""
    is_new, put_new = np.asarray(truth) >= n_old, np.asarray(labels) >= n_old
    return {
        "precision": float(is_new[put_new].mean()) if put_new.any() else float("nan"),
        "recall": float(put_new[is_new].mean()) if is_new.any() else float("nan"),
    }


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
        everything = ImageSet(torch.cat([protocol.labeled.images, protocol.stream.images]),
                              torch.cat([protocol.labeled.targets, protocol.stream.targets]),
                              protocol.class_names, f"{protocol.name}/labeled+stream")
        pretrain(net, everything, augment, device)  # labels are not used
    trainer = train(net, protocol.labeled, augment, device, on_first_step=run_dir.save_operative_config)
    save_checkpoint(run_dir, net, trainer, "model")
    if representation is not None:
        net = copy.deepcopy(net)
        learner = representation(net, protocol.labeled, protocol.stream, augment, device)
        save_checkpoint(run_dir, net, learner, "representation")
    labeled = encode(net, protocol.labeled, augment, cache, device)
    stream = encode(net, protocol.stream, augment, cache, device)

    clustered = time.perf_counter()
    result = labeler(stream[cluster_on], labeled[cluster_on], labeled["targets"], protocol.n_old)
    truth = stream["targets"]
    cluster_seconds = time.perf_counter() - clustered
    estimate = result
    if estimator is not None:
        estimate = estimator(stream[cluster_on], labeled[cluster_on], labeled["targets"], protocol.n_old)
    scores, k_estimated = estimate.k_scores, estimate.k_estimate
    metrics = {
        "protocol": protocol.name,
        "seed": seed,
        "stream": clustering_accuracy(truth, result.labels, truth < protocol.n_old),
        "assigned_new": assigned_new(truth, result.labels, protocol.n_old),
        "k_new": int(len(result.centroids) - protocol.n_old),
        "k_new_true": protocol.n_new,
        "k_estimated": k_estimated,
        "k_scores": {str(k): v for k, v in (scores or {}).items()},
        "cluster_seconds": cluster_seconds,
        "seconds": time.perf_counter() - started,
    }
    run_dir.save_operative_config()
    run_dir.write_json("metrics.json", metrics)
    return metrics
