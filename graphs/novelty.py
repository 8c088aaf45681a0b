"""The novelty graph: how well does each score tell new-class stream samples from old ones?

``novelty`` trains one model on the labeled old classes (with an evidential head when the model
has one), caches the labeled, held-out (``ProtocolData.val``), stream and test splits, and then
scores the whole stream with every score it is given. For each score it reports AUROC,
FPR at 95 % TPR and AUPR (new = positive; :func:`components.metrics.novelty_metrics`), and the
precision and recall of the pool a threshold rule picks (:mod:`components.thresholds`), and
writes a histogram of the scores of old- and new-class stream samples.

:func:`assess` is the per-score step, also used by the lifecycle graph: a score that cannot be
computed, or a threshold that cannot be chosen, raises a ``ValueError`` that says why; the
graph records the message and reports everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import gin
import ignite.distributed as idist
import numpy as np
from ignite.utils import manual_seed
from torch import nn

from components.cache import FeatureCache
from components.data import ProtocolData
from components.metrics import longtail_accuracy, novelty_metrics, pool_quality
from components.scores import Score
from components.thresholds import FalseAlarmRate, fit_temperature
from graphs.encode import encode
from graphs.handlers import RunDir, describe, log, save_checkpoint
from graphs.online import score_outputs
from graphs.plots import score_histogram
from graphs.train import train

Arrays = Mapping[str, np.ndarray]
NAN = float("nan")
FIVE_PERCENT_FALSE_ALARMS = FalseAlarmRate(0.05)  # the novelty graph's rule (immutable, safe to share)
# the loops' pool threshold, chosen on the suites (docs/suite.md): 5 % pooled too few of the new
# samples on the single-round and continual suites, on digits and on Fashion-MNIST
TEN_PERCENT_FALSE_ALARMS = FalseAlarmRate(0.1)


def scaled(outputs: Arrays | None, temperature: float) -> dict[str, np.ndarray] | None:
    """``outputs`` with logits divided by ``temperature`` (features and evidence untouched)."""
    if outputs is None or temperature == 1.0:
        return None if outputs is None else dict(outputs)
    return {**outputs, "logits": np.asarray(outputs["logits"]) / temperature}


def temperature_of(val: Arrays | None) -> tuple[float, str | None]:
    """Temperature scaling fitted on held-out known-class logits, or 1 and why not."""
    if val is None or len(val["targets"]) == 0:
        return 1.0, ("temperature scaling needs held-out known-class images and the protocol has "
                     "none (set make_protocol.val_per_class): logits are left unscaled")
    return fit_temperature(val["logits"], val["targets"]), None


def assess(score: Score | Callable, train_outputs: Arrays | None, val: Arrays | None,
           stream: Arrays, n_old: int, threshold: Callable = FIVE_PERCENT_FALSE_ALARMS) -> dict:
    """Fit ``score`` on the labeled outputs, score the held-out and stream outputs, pick the
    pool threshold with ``threshold`` and measure. Returns the novelty metrics, the pool's
    precision / recall / size at the threshold and the stream scores (``"scores"``).

    A score that cannot run raises ``ValueError``; a threshold that cannot be chosen leaves
    the pool columns NaN and says why under ``"threshold_error"``.
    """
    if isinstance(score, Score):
        if train_outputs is None:
            train_outputs = {}
        score.fit(train_outputs)
    stream_scores = score_outputs(score, stream).numpy()
    is_new = np.asarray(stream["targets"]) >= n_old
    out: dict = {"novelty": novelty_metrics(stream_scores, is_new), "scores": stream_scores}
    if is_new.all() or not is_new.any():
        out["novelty_error"] = (f"the stream has {'no old' if is_new.any() else 'no new'}-class "
                                "samples: AUROC, FPR95 and AUPR are undefined (NaN)")
    has_val = val is not None and len(val["targets"]) > 0
    known = score_outputs(score, val).numpy() if has_val else np.array([])
    try:
        cut = float(threshold(known, stream_scores, is_new))
    except ValueError as error:
        out["pool"] = {"precision": NAN, "recall": NAN, "size": 0, "threshold": NAN}
        out["threshold_error"] = str(error)
        return out
    out["pool"] = pool_quality(stream_scores > cut, is_new) | {"threshold": cut}
    return out


def _name(score: Score | Callable) -> str:
    return score.name if isinstance(score, Score) else getattr(score, "__name__", repr(score))


@gin.configurable(denylist=["run_dir"])
def novelty(
    run_dir: RunDir,
    data: Callable[[], ProtocolData] = gin.REQUIRED,
    model: Callable[..., nn.Module] = gin.REQUIRED,
    augment: nn.Module = gin.REQUIRED,
    cache: FeatureCache = gin.REQUIRED,
    scores: Sequence[Score | Callable] = gin.REQUIRED,
    threshold: Callable = FIVE_PERCENT_FALSE_ALARMS,
    temperature_scaling: bool = True,
    seed: int = 0,
) -> dict:
    """Train on ``data().labeled``, then measure every score in ``scores`` on the whole stream
    (see the module docstring). Writes ``metrics.json`` and ``scores_<name>.png`` per score."""
    started = time.perf_counter()
    manual_seed(seed)
    device = idist.device()
    protocol = data()
    if len(protocol.stream) == 0:
        raise ValueError(f"{protocol.name} has no stream to score: give the protocol new classes")
    if not scores:
        raise ValueError("novelty.scores is empty: bind a list, e.g. [@MaxSoftmax(), @KNNDistance()]")
    log.info(f"[bold]{protocol.name}[/]: {protocol.n_old} old classes ({len(protocol.labeled)} "
             f"labeled, {len(protocol.val) if protocol.val is not None else 0} held out), "
             f"stream {len(protocol.stream)}; device {device}")

    net = model(num_classes=protocol.n_old)
    log.info(describe(net))
    trainer = train(net, protocol.labeled, augment, device, on_first_step=run_dir.save_operative_config)
    save_checkpoint(run_dir, net, trainer, "model")
    splits = {"labeled": protocol.labeled, "val": protocol.val, "stream": protocol.stream,
              "test": protocol.test}
    cached = {k: encode(net, v, augment, cache, device) if v is not None else None
              for k, v in splits.items()}

    notes: list[str] = []
    temperature = 1.0
    if temperature_scaling:
        temperature, why = temperature_of(cached["val"])
        if why:
            notes.append(why)
    stream, val = scaled(cached["stream"], temperature), scaled(cached["val"], temperature)
    is_new = np.asarray(stream["targets"]) >= protocol.n_old

    results: dict[str, dict] = {}
    for score in scores:
        name = _name(score)
        try:
            row = assess(score, cached["labeled"], val, stream, protocol.n_old, threshold)
        except (ValueError, RuntimeError) as error:
            results[name] = {"error": str(error)}
            log.warning(f"[yellow]{name}: not measured[/]: {error}")
            continue
        for key in ("threshold_error", "novelty_error"):
            if key in row:
                log.warning(f"[yellow]{name}[/]: {row[key]}")
        score_histogram(run_dir.file(f"scores_{name}.png"), row.pop("scores"), is_new,
                        f"{protocol.name}, seed {seed}: {name} (AUROC {row['novelty']['auroc']:.3f})")
        results[name] = row

    test = cached["test"]
    old = test["targets"] < protocol.n_old
    accuracy = longtail_accuracy(test["targets"][old], test["logits"][old].argmax(1), protocol.train_counts)
    for note in notes:
        log.warning(f"[yellow]{note}[/]")
    metrics = {
        "protocol": protocol.name, "seed": seed, "old_accuracy": accuracy,
        "temperature": temperature, "threshold_rule": repr(threshold), "scores": results,
        "notes": notes, "seconds": time.perf_counter() - started,
    }
    run_dir.save_operative_config()
    run_dir.write_json("metrics.json", metrics)
    return metrics

