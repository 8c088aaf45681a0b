"""The long-tail graphs: train on a long-tailed labeled set, cache features, recalibrate.

``longtail`` trains once (the loss and sampler are bound in gin), encodes the labeled,
validation and test splits into the HDF5 cache, writes ``manifest.json`` (the checkpoint, the
cache files and their fingerprints) and runs the recalibrate graph on the cache.
``recalibrate_run`` re-runs recalibration from an earlier run's manifest in seconds: it loads
the checkpoint and the cache, never the images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import gin
import ignite.distributed as idist
from ignite.handlers import Checkpoint
from ignite.utils import manual_seed
from torch import nn

from components.cache import FeatureCache, model_fingerprint
from components.data import ProtocolData
from graphs.encode import encode_entry
from graphs.handlers import RunDir, describe, load_checkpoint, log, save_checkpoint
from graphs.plots import per_class_accuracy_plot
from graphs.recalibrate import recalibrate
from graphs.train import train


def _report(run_dir: RunDir, name: str, seed: int, counts, class_names, results: dict,
            started: float) -> dict:
    metrics = {
        "protocol": name, "seed": seed, "train_counts": list(counts), "class_names": list(class_names),
        "methods": results, "seconds": time.perf_counter() - started,
    }
    run_dir.write_json("metrics.json", metrics)
    per_class_accuracy_plot(run_dir.file("per_class_accuracy.png"), counts,
                            {k: v["per_class"] for k, v in results.items()}, class_names,
                            f"{name}, seed {seed}: per-class test accuracy")
    return metrics


@gin.configurable(denylist=["run_dir"])
def longtail(
    run_dir: RunDir,
    data: Callable[[], ProtocolData] = gin.REQUIRED,
    model: Callable[..., nn.Module] = gin.REQUIRED,
    augment: nn.Module = gin.REQUIRED,
    cache: FeatureCache = gin.REQUIRED,
    views: int = 0,
    seed: int = 0,
) -> dict:
    """Train on ``data().labeled`` (all classes old, no stream), cache features of the labeled
    (``views`` augmented views each, or one eval-mode view when 0), validation and test splits,
    then recalibrate (methods bound on ``recalibrate.methods``)."""
    started = time.perf_counter()
    manual_seed(seed)
    device = idist.device()
    protocol = data()
    counts = protocol.train_counts
    log.info(f"[bold]{protocol.name}[/]: {protocol.n_old} classes, {len(protocol.labeled)} labeled "
             f"images (head {max(counts)}, tail {min(counts)}), validation "
             f"{len(protocol.val) if protocol.val is not None else 0}, test {len(protocol.test)}; "
             f"device {device}")
    net = model(num_classes=protocol.n_old)
    log.info(describe(net))
    trainer = train(net, protocol.labeled, augment, device, on_first_step=run_dir.save_operative_config)
    checkpoint = save_checkpoint(run_dir, net, trainer, "model")

    splits = {"train": (protocol.labeled, views), "test": (protocol.test, 0)}
    if protocol.val is not None:
        splits["val"] = (protocol.val, 0)
    manifest = {"checkpoint": str(checkpoint), "train_counts": list(counts),
                "class_names": protocol.class_names, "protocol": protocol.name, "caches": {}}
    for split, (images, n_views) in splits.items():
        _, key, parts = encode_entry(net, images, augment, cache, device, views=n_views, seed=seed)
        manifest["caches"][split] = {"path": str(cache.path(key)), **parts}
    run_dir.write_json("manifest.json", manifest)
    run_dir.save_operative_config()
    results = _recalibrate_from(manifest, net)
    return _report(run_dir, protocol.name, seed, counts, protocol.class_names, results, started)


def _recalibrate_from(manifest: dict, net: nn.Module) -> dict:
    """Recalibrate ``net``'s classifier on the caches listed in ``manifest``; every file must
    carry ``net``'s own fingerprint and the split fingerprint recorded at training time."""
    fp = model_fingerprint(net)
    caches = {split: entry["path"] for split, entry in manifest["caches"].items()}
    expected = {split: {"model": fp, "data": entry["data"]} for split, entry in manifest["caches"].items()}
    return recalibrate(net.classifier, caches, expected, manifest["train_counts"])


@gin.configurable(denylist=["run_dir"])
def recalibrate_run(
    run_dir: RunDir,
    source: str = gin.REQUIRED,
    model: Callable[..., nn.Module] = gin.REQUIRED,
    seed: int = 0,
) -> dict:
    """Recalibrate the model of an earlier ``longtail`` run (its folder is ``source``) from its
    cached features: builds ``model``, loads the checkpoint, checks the caches, reports."""
    started = time.perf_counter()
    path = Path(source) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: point recalibrate_run.source at the run folder "
                                "of a finished longtail run")
    manifest = json.loads(path.read_text())
    net = model(num_classes=len(manifest["train_counts"]))
    Checkpoint.load_objects({"model": net}, load_checkpoint(manifest["checkpoint"]))
    results = _recalibrate_from(manifest, net)
    return _report(run_dir, manifest["protocol"], seed, manifest["train_counts"],
                   manifest["class_names"], results, started)
