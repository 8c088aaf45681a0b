"""Choosing the pool threshold, and temperature scaling of logits.

* :func:`false_alarm_threshold` — from held-out known-class scores, for a target false-alarm
  rate (the share of known-class samples that would enter the pool);
* :func:`precision_threshold` — when labels are known (a labeled stream for tuning), the
  largest pool whose precision reaches a target;
* :func:`conformal_fdr_threshold` — from held-out known-class scores *and* the stream's scores
  (no labels): conformal p-values and Benjamini-Hochberg, so the pool's share of known-class
  samples stays near a target while its size follows how separable the scores are;
* :func:`fit_temperature` — temperature scaling (Guo et al., ICML 2017) on held-out logits.

:class:`FalseAlarmRate`, :class:`ConformalFDR` and :class:`PoolPrecision` wrap them as rules a
graph is given (``lifecycle.threshold = @FalseAlarmRate()``); each is called with the held-out
known-class scores, the stream's scores and, for the precision rule alone, its labels.
The pool takes samples scoring strictly above the threshold (``SamplePool.add``).
"""

from __future__ import annotations

import logging

import gin
import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def false_alarm_threshold(known_scores, rate: float = 0.05) -> float:
    """The threshold above which a fraction ``rate`` of held-out known-class samples score."""
    scores = np.asarray(known_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("a threshold for a false-alarm rate needs held-out known-class scores and "
                         "got none: hold out known-class images (make_protocol.val_per_class) or "
                         "give the threshold directly")
    if not 0 < rate < 1:
        raise ValueError(f"false-alarm rate must be in (0, 1), got {rate}")
    return float(np.quantile(scores, 1 - rate))


def conformal_fdr_threshold(known_scores, stream_scores, fdr: float = 0.2,
                            storey_lambda: float | None = 0.5) -> float:
    """The pool threshold that controls the pool's false discovery rate (the expected share of
    known-class samples in it) at ``fdr``, from unlabeled stream scores.

    Each stream sample gets a conformal p-value against the held-out known-class scores,
    ``(1 + #{known >= s}) / (n + 1)`` (Bates, Candès, Lei, Romano & Sesia, "Testing for
    outliers with conformal p-values", Ann. Statist. 2023), and the Benjamini-Hochberg step-up
    procedure (scipy's ``false_discovery_control``) picks the samples to pool, with Storey's
    estimate of the share of known-class samples in the stream, ``(1 + #{p > λ}) / (m (1 - λ))``
    (Storey, Taylor & Siegmund 2004; ``storey_lambda=None``: plain BH, share 1). A fixed false-alarm
    rate pools the same share of known samples whatever the stream holds; this pools more when
    the new classes stand apart and less when they do not. Returns a threshold: the pool is
    ``stream score > threshold``; when nothing passes, the highest stream score (nothing pooled)."""
    from scipy.stats import false_discovery_control

    known = np.sort(np.asarray(known_scores, dtype=np.float64).reshape(-1))
    scores = np.asarray(stream_scores, dtype=np.float64).reshape(-1)
    if known.size == 0:
        raise ValueError("a conformal FDR threshold needs held-out known-class scores and got none: "
                         "hold out known-class images (make_protocol.val_per_class)")
    if scores.size == 0:
        raise ValueError("a conformal FDR threshold needs the stream's scores and got none")
    if not 0 < fdr < 1:
        raise ValueError(f"target false discovery rate must be in (0, 1), got {fdr}")
    if storey_lambda is not None and not 0 < storey_lambda < 1:
        raise ValueError(f"storey_lambda must be in (0, 1) or None, got {storey_lambda}")
    at_least = known.size - np.searchsorted(known, scores, side="left")  # known scores >= each
    p = (1 + at_least) / (known.size + 1)
    share = 1.0 if storey_lambda is None else \
        min(1.0, (1 + np.sum(p > storey_lambda)) / (p.size * (1 - storey_lambda)))
    pooled = false_discovery_control(p, method="bh") * share <= fdr
    if not pooled.any():
        return float(scores.max())
    if pooled.all():
        return float(np.nextafter(scores.min(), -np.inf))
    # p falls as the score rises, so the pooled samples are the highest scores
    return float((scores[pooled].min() + scores[~pooled].max()) / 2)


def precision_threshold(scores, is_new, precision: float) -> float:
    """The lowest threshold whose pool (``score > threshold``) has at least ``precision`` new
    samples among those pooled: the largest pool, so the best recall, at that precision."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_new = np.asarray(is_new, dtype=bool).reshape(-1)
    if not 0 < precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {precision}")
    if len(scores) != len(is_new):
        raise ValueError(f"{len(scores)} scores but {len(is_new)} labels")
    if not is_new.any():
        raise ValueError("a threshold for a target pool precision needs new-class samples among "
                         "the labeled ones, and there are none: use false_alarm_threshold instead")
    order = np.argsort(-scores, kind="stable")
    s, hit = scores[order], is_new[order]
    pooled = np.arange(1, len(s) + 1)
    prec = np.cumsum(hit) / pooled
    # a pool can only stop where the next score is strictly lower (ties enter together)
    cut = np.r_[s[1:] < s[:-1], True]
    ok = np.flatnonzero(cut & (prec >= precision))
    if ok.size == 0:
        best = float(prec[cut].max())
        raise ValueError(f"no threshold reaches pool precision {precision:.3f}; the best is {best:.3f}")
    k = ok[-1]
    return float((s[k] + s[k + 1]) / 2) if k + 1 < len(s) else float(np.nextafter(s[k], -np.inf))


def fit_temperature(logits, targets, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al., ICML 2017): the ``T > 0`` minimizing the negative
    log-likelihood of ``softmax(z / T)`` on held-out labeled logits (LBFGS on ``log T``)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(z) == 0:
        raise ValueError("temperature scaling needs held-out labeled logits and got none")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


@gin.configurable
class FalseAlarmRate:
    """Pool threshold letting a fraction ``rate`` of held-out known-class samples into the pool
    (:func:`false_alarm_threshold`); needs no new-class labels."""

    def __init__(self, rate: float = 0.05) -> None:
        if not 0 < rate < 1:
            raise ValueError(f"false-alarm rate must be in (0, 1), got {rate}")
        self.rate = rate

    def __call__(self, known_scores, stream_scores=None, is_new=None) -> float:
        return false_alarm_threshold(known_scores, self.rate)

    def __repr__(self) -> str:
        return f"FalseAlarmRate(rate={self.rate})"


@gin.configurable
class ConformalFDR:
    """Pool threshold that keeps the pool's expected share of known-class samples at ``fdr``
    (:func:`conformal_fdr_threshold`): it reads the held-out known-class scores and the stream's
    scores, never the stream's labels. It needs the stream's scores, so a graph that calls the
    rule with held-out scores alone (the continual loop) refuses it."""

    def __init__(self, fdr: float = 0.2, storey_lambda: float | None = 0.5) -> None:
        if not 0 < fdr < 1:
            raise ValueError(f"target false discovery rate must be in (0, 1), got {fdr}")
        self.fdr, self.storey_lambda = fdr, storey_lambda

    def __call__(self, known_scores, stream_scores=None, is_new=None) -> float:
        if stream_scores is None:
            raise ValueError("a conformal FDR threshold needs the stream's scores (not its labels): "
                             "use FalseAlarmRate where only held-out scores are given")
        return conformal_fdr_threshold(known_scores, stream_scores, self.fdr, self.storey_lambda)

    def __repr__(self) -> str:
        return f"ConformalFDR(fdr={self.fdr}, storey_lambda={self.storey_lambda})"


@gin.configurable
class PoolPrecision:
    """Pool threshold reaching pool precision ``precision`` on a stream whose labels are known
    (a labeled tuning stream; :func:`precision_threshold`).

    It reads the stream's true labels, which a deployed loop does not have: a tool for measuring
    how good a threshold could be, never a default. Every use says so in a warning, and the
    continual loop refuses it."""

    def __init__(self, precision: float = 0.9) -> None:
        if not 0 < precision <= 1:
            raise ValueError(f"target precision must be in (0, 1], got {precision}")
        self.precision = precision

    def __call__(self, known_scores, stream_scores=None, is_new=None) -> float:
        if stream_scores is None or is_new is None:
            raise ValueError("a threshold for a target pool precision needs the stream's scores and "
                             "which samples are new (labels known): use FalseAlarmRate otherwise")
        log.warning("PoolPrecision reads the stream's TRUE LABELS to place the pool threshold: "
                    "a tuning tool only, no result it gives is label-free; use "
                    "@FalseAlarmRate() (held-out known-class images) for a real run")
        return precision_threshold(stream_scores, is_new, self.precision)

    def __repr__(self) -> str:
        return f"PoolPrecision(precision={self.precision})"
