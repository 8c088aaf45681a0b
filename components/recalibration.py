"""Classifier recalibration for long-tailed data: heads that map cached features to logits.

Each head wraps a trained classifier (a :class:`~components.models.GrowingLinear` or one of its
subclasses) and changes only how its logits are formed, so it runs on features read from the
HDF5 cache without touching images:

* :class:`TauNormalized` — τ-normalization (Kang et al., ICLR 2020);
* :class:`WeightScaled` — learnable weight scaling, LWS (Kang et al., ICLR 2020);
* :class:`PriorAdjusted` — post-hoc logit adjustment (Menon et al., ICLR 2021);
* :func:`counterfactual` — causal TDE at inference (Tang et al., NeurIPS 2020);
* :func:`discovered_offset` — after discovery, how far to lower the discovered classes' logits
  so that they claim at most a given share of held-out known-class images;
* :func:`known_prior_adjustment` — after discovery, post-hoc logit adjustment of the known
  classes only, τ chosen on held-out known-class images (the tail's fix for a grown classifier).

cRT (re-training the classifier on features with class-balanced sampling) and the choice of
τ or α on a validation split need a training loop or a search; they live in
``graphs/recalibrate.py``, which uses :func:`select_on_validation` from here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from components.losses import log_prior
from components.metrics import per_class_accuracy
from components.models.heads import CausalNormClassifier, GrowingLinear


class TauNormalized(nn.Module):
    """τ-normalized classifier: each weight row divided by its norm to the power τ,
    ``w_c / ||w_c||^τ`` (Kang et al., ICLR 2020). ``τ = 0`` is the plain classifier without
    bias, ``τ = 1`` a cosine-like classifier. The bias is dropped, as in Kang et al.'s τ-norm
    evaluation: it is learned under the imbalanced prior and would bring the imbalance back."""

    def __init__(self, classifier: GrowingLinear, tau: float) -> None:
        super().__init__()
        weight = classifier.weight.detach()
        self.tau = tau
        self.register_buffer("weight", weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12) ** tau)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T


class WeightScaled(nn.Module):
    """Learnable weight scaling, LWS (Kang et al., ICLR 2020): the classifier is frozen and one
    scale per class is learned (with class-balanced sampling), ``logit_c = f_c · (w_c·x + b_c)``.
    The scales start at 1, so an untrained head equals the classifier."""

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.classifier = copy.deepcopy(classifier).eval().requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def train(self, mode: bool = True) -> WeightScaled:  # the wrapped classifier stays in eval mode
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features) * self.scales


class PriorAdjusted(nn.Module):
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): ``z_c - τ · log π_c`` with ``π`` the
    training class prior; ``τ = 1`` is the Bayes-optimal correction for a balanced test set."""

    def __init__(self, classifier: nn.Module, class_counts: Sequence[int], tau: float = 1.0) -> None:
        super().__init__()
        self.classifier = copy.deepcopy(classifier).eval().requires_grad_(False)
        self.tau = tau
        self.register_buffer("offset", tau * log_prior(class_counts))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features) - self.offset


def counterfactual(classifier: nn.Module, alpha: float) -> CausalNormClassifier:
    """Causal TDE (Tang et al., NeurIPS 2020): a copy of a trained :class:`CausalNormClassifier`
    that, in eval mode, removes ``alpha`` times the feature's projection on the moving-average
    direction learned in training. ``alpha = 0`` is the plain classifier."""
    if not isinstance(classifier, CausalNormClassifier):
        raise TypeError(
            f"TDE needs a classifier trained as CausalNormClassifier (it learns the moving-average "
            f"feature direction), got {type(classifier).__name__}: bind "
            "'Network.classifier = @CausalNormClassifier' for training"
        )
    if not classifier.direction.any():
        raise ValueError("the CausalNormClassifier has no moving-average direction: it was never "
                         "run in training mode")
    head = copy.deepcopy(classifier).eval().requires_grad_(False)
    head.alpha = alpha
    return head


def discovered_offset(logits: torch.Tensor, n_old: int, rate: float,
                      per_output: bool = False) -> tuple[np.ndarray, dict]:
    """How far to lower the discovered outputs' logits (outputs ``n_old`` and up) so that at most
    ``rate`` of the held-out known-class images whose ``logits`` [n, classes] are given are
    predicted as a discovered class (⌊rate · n⌋ images; ties go to the known class, as
    ``argmax`` gives them). The held-out images are known-class images the student never
    trained on, so this bounds the rate at which the grown classifier calls a known class new —
    the false-alarm rate the pool threshold bounds for the score — without reading any test
    image. Offsets only lower, never raise.

    ``per_output=False``: one offset for every discovered output, the smallest that meets the
    bound. ``True``: the output that claims the most images is lowered until it lets one go,
    and again, until the bound is met, so an output that claims nothing keeps its logits.

    Returns the offsets ``[classes − n_old]`` and what they did (``claimed_before`` /
    ``claimed_after``: the shares of the images predicted as discovered, the latter with the
    offsets applied in the logits' own precision)."""
    if logits.ndim != 2 or not 0 < n_old < logits.shape[1]:
        raise ValueError(f"need logits [n, classes] with 0 < n_old < classes, got shape "
                         f"{tuple(logits.shape)} and n_old {n_old}")
    if len(logits) == 0:
        raise ValueError("no held-out known-class images to fit the offset on: hold some out "
                         "(make_protocol.val_per_class) or turn it off (lifecycle.claim_rate = None)")
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1) (a share of held-out known-class images), got {rate}")
    given = torch.as_tensor(logits)
    z = given.to(torch.float64)
    allowed = int(np.floor(rate * len(z)))
    offsets = torch.zeros(z.shape[1] - n_old, dtype=torch.float64)

    def nudge(value: torch.Tensor) -> torch.Tensor:  # a hair past a tie, in float32 too
        return value + 1e-5 * value.abs().clamp_min(1.0)

    if not per_output:
        margin = z[:, n_old:].max(1).values - z[:, :n_old].max(1).values
        ranked = torch.sort(margin, descending=True).values
        if ranked[allowed] > 0:
            offsets[:] = nudge(ranked[allowed])
    else:
        while True:
            lowered = z.clone()
            lowered[:, n_old:] -= offsets
            predicted = lowered.argmax(1)
            claimed = predicted >= n_old
            if int(claimed.sum()) <= allowed:
                break
            j = int(torch.bincount(predicted[claimed]).argmax())  # the output claiming the most
            rows = lowered[predicted == j]
            rival = torch.cat([rows[:, :j], rows[:, j + 1:]], 1).max(1).values
            # at least 1e-3 a step: an image that two discovered outputs both claim, nearly tied,
            # would otherwise pass between them a hair at a time (tens of thousands of steps)
            offsets[j - n_old] += torch.clamp_min(nudge((rows[:, j] - rival).min()), 1e-3)
    applied = given.clone()
    applied[:, n_old:] -= offsets.to(given.dtype)

    def share(x: torch.Tensor) -> float:
        return int((x.argmax(1) >= n_old).sum()) / len(x)

    return offsets.numpy(), {"rate": rate, "per_output": per_output, "offset": offsets.tolist(),
                             "images": len(z), "claimed_before": share(given),
                             "claimed_after": share(applied)}


TAUS = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, …, 1 (Menon et al.'s τ = 1 the last)


def known_prior_adjustment(logits, targets, class_counts: Sequence[int],
                           taus: Sequence[float] = TAUS) -> tuple[np.ndarray, dict]:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021) of a grown classifier's *known*
    classes, ``z_c - τ · (log n_c - mean_k log n_k)`` for the ``len(class_counts)`` first
    outputs, with τ chosen on held-out known-class images (``logits`` [n, classes] and their
    ``targets``): the τ of ``taus`` with the best mean per-class accuracy over the classes those
    images hold, predictions taken over *every* output (a held-out image a discovered class
    takes counts as wrong); ties go to the smaller τ, so τ = 0, the classifier as it is, wins
    unless a larger one helps.

    The log-prior is centred over the known classes: head classes go down and tail classes up by
    as much, so the discovered outputs (left as they are) keep about the share of images they
    had. Class-balanced training does not leave a tail class of a few dozen images balanced —
    its few images are learned by heart and its logits on new images stay low — which is why τ
    is measured rather than fixed at 0 (the prior a balanced sampler trains on) or 1 (the
    training split's).

    Returns the offsets to subtract from the known outputs' logits ``[len(class_counts)]`` and
    what was measured (``tau``; ``taus`` and the ``held_out`` accuracy at each; ``held_out_before``
    at τ = 0; ``images`` and ``classes`` held out)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = np.asarray(targets)
    counts = np.asarray(class_counts, dtype=np.float64)
    n_old = len(counts)
    if z.ndim != 2 or not 0 < n_old <= z.shape[1]:
        raise ValueError(f"need logits [n, classes] with 0 < len(class_counts) <= classes, got shape "
                         f"{tuple(z.shape)} and {n_old} class counts")
    if len(z) == 0 or len(y) != len(z):
        raise ValueError(f"need held-out known-class images with one target each to choose τ on, got "
                         f"{len(z)} rows and {len(y)} targets: hold some out (make_protocol.val_per_class) "
                         "or turn the adjustment off (lifecycle.logit_adjustment = False)")
    if (counts <= 0).any():
        raise ValueError(f"every known class needs a training count > 0 for its log-prior, "
                         f"got {counts.tolist()}")
    if y.min() < 0 or y.max() >= n_old:
        raise ValueError(f"held-out targets must be known classes 0..{n_old - 1}, got {y.min()}..{y.max()}")
    if len(taus) == 0 or min(taus) < 0:
        raise ValueError(f"taus must be a non-empty grid of τ ≥ 0, got {list(taus)}")
    prior = np.log(counts) - np.log(counts).mean()
    present = np.unique(y)

    def accuracy(tau: float) -> float:
        shifted = z.clone()
        shifted[:, :n_old] -= torch.as_tensor(tau * prior)
        return float(per_class_accuracy(y, shifted.argmax(1).numpy(), present).mean())

    grid = sorted(float(t) for t in taus)
    measured = [accuracy(t) for t in grid]
    best = int(np.argmax(measured))  # the smallest of equal scores
    return (grid[best] * prior).astype(np.float32), {
        "tau": grid[best], "taus": grid, "held_out": measured, "held_out_before": accuracy(0.0),
        "images": len(z), "classes": len(present)}


@torch.no_grad()
def accuracy_of(head: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean per-class accuracy of ``head`` on ``features`` (equal to accuracy on a balanced set)."""
    pred = head.eval()(features).argmax(1).numpy()
    y = targets.numpy()
    return float(per_class_accuracy(y, pred, np.unique(y)).mean())


def select_on_validation(
    make_head: Callable[[float], nn.Module], grid: Sequence[float], features: torch.Tensor,
    targets: torch.Tensor, num_classes: int,
) -> tuple[float, nn.Module, dict[float, float]]:
    """Build ``make_head(value)`` for each value of ``grid`` and keep the one with the best mean
    per-class accuracy on the validation ``features``; ties go to the earlier value.

    Returns ``(best value, its head, {value: validation accuracy})``. A validation split that
    lacks some class cannot rank heads for that class: it is refused.
    """
    if len(grid) == 0:
        raise ValueError("the search grid is empty")
    present = set(torch.unique(targets).tolist())
    missing = sorted(set(range(num_classes)) - present)
    if missing:
        raise ValueError(f"the validation split has no image of classes {missing}: hold out at "
                         "least one image of every class")
    heads = {float(v): make_head(v) for v in grid}
    scores = {v: accuracy_of(head, features, targets) for v, head in heads.items()}
    best = max(scores, key=scores.get)  # the first of equal scores
    return best, heads[best], scores
