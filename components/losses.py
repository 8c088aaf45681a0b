"""Losses: distillation into a grown classifier, contrastive representation learning, and
balanced losses for long-tailed training."""

from __future__ import annotations

import math

import gin
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from components.models.network import side_group


@gin.configurable
class DistillLoss(nn.Module):
    """Cross-entropy on labels and pseudo-labels plus knowledge distillation on the old classes.

    ``KL(softmax(teacher / T) || softmax(student[:, :n_old] / T)) · T²`` (Hinton et al. 2015),
    applied to every sample as in Learning without Forgetting (Li & Hoiem, 2017). ``n_old`` is
    the teacher's number of outputs.
    """

    def __init__(self, temperature: float = 2.0, kd_weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DistillLoss temperature must be > 0, got {temperature}")
        self.temperature, self.kd_weight = temperature, kd_weight

    def forward(
        self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        n_old = teacher_logits.shape[1]
        if student_logits.shape[1] < n_old:
            raise ValueError(
                f"student has {student_logits.shape[1]} outputs, fewer than the teacher's {n_old}"
            )
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(student_logits[:, :n_old] / t, dim=1),
            F.log_softmax(teacher_logits.detach() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return F.cross_entropy(student_logits, targets) + self.kd_weight * t * t * kd


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward hands each process the sum of every process's gradient for
    its own slice (lightly's ``GatherLayer``): a loss on the gathered batch then trains every
    process's embeddings as one loss over the whole batch would. torch's differentiable
    ``all_gather`` needs ``all_to_all`` in its backward, which gloo lacks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous(), group=side_group())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        summed = torch.stack(grads)
        dist.all_reduce(summed, group=side_group())
        return summed[dist.get_rank()]


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` (same shape everywhere), concatenated in rank order; no gradient."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous(), group=side_group())
    return torch.cat(out)


def _gathered_supcon(view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None,
                     keep: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """:class:`SupConLoss` across processes: this process's anchors against the views of every
    process's batch (the other processes' embeddings are the extra negatives and positives),
    only the ``keep`` samples taking part (as anchors and as candidates). Returns
    ``world_size · (sum over local anchors) / (anchors in all processes)``, whose mean over the
    processes (DistributedDataParallel averages the gradients) is the loss of one process on
    the concatenated batches. Every process's batch must be as large."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = len(view1)
    z = F.normalize(torch.cat([view1, view2]), dim=1)
    ids = torch.arange(n, device=z.device) + rank * n if labels is None else labels
    ids = torch.cat([ids, ids])
    keep = torch.ones(n, dtype=torch.bool, device=z.device) if keep is None else keep
    keep = torch.cat([keep, keep])
    total = _gather(keep.sum().reshape(1)).sum()
    if total == 0:  # no process has an anchor (every process sees the same total)
        return z.sum() * 0.0
    z_all = torch.cat(_GatherWithGrad.apply(z))
    ids_all, keep_all = _gather(ids), _gather(keep)
    logits = z @ z_all.T / temperature  # [2n local anchors, 2n * world candidates]
    rows = torch.arange(2 * n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rank * 2 * n + rows] = True
    excluded = self_mask | ~keep_all[None, :]
    logits = logits.masked_fill(excluded, float("-inf"))
    positive = (ids[:, None] == ids_all[None, :]) & ~excluded
    log_prob = logits.log_softmax(dim=1).masked_fill(excluded, 0.0)
    per_anchor = (log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)
    return -per_anchor[keep].sum() * world / total


@gin.configurable
class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020) on two views ``[B, D]`` each.

    With ``labels=None`` the only positive of a view is the other view of the same image, which
    is SimCLR's NT-Xent (Chen et al., ICML 2020).

    In a distributed run (``torch.distributed`` initialized, more than one process) the views of
    every process's batch take part, as lightly's ``NTXentLoss(gather_distributed=True)`` does:
    the loss then equals the one-process loss on the whole global batch
    (``gather_distributed=False``: each process's batch alone).
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.gather_distributed and _world_size() > 1:
            return _gathered_supcon(view1, view2, labels, None, self.temperature)
        n = len(view1)
        z = F.normalize(torch.cat([view1, view2]), dim=1)
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        ids = torch.arange(n, device=z.device) if labels is None else labels
        ids = torch.cat([ids, ids])
        positive = (ids[:, None] == ids[None, :]) & ~self_mask
        log_prob = logits.log_softmax(dim=1).masked_fill(self_mask, 0.0)
        per_anchor = (log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)
        return -per_anchor.mean()


@gin.configurable
class GCDContrastive(nn.Module):
    """GCD's representation loss (Vaze et al., CVPR 2022): ``(1 - λ)`` · SimCLR on every image
    plus ``λ`` · SupCon on the labeled ones, on projected features of two augmented views.
    Across processes both terms gather every process's views (see :class:`SupConLoss`).

    λ = 0.35 is the paper's. GCD's code gives SimCLR a temperature of 1.0 and SupCon 0.07; one
    temperature serves both here, 0.5, chosen on the single-round digits suite, where 0.1, 0.3
    and 1.0 fall from 84.9 to 70.1 (with λ = 0.35), 76.4 and 70.8 % new-class accuracy, and
    λ = 0.35 beats 0.2 on four sets of ten random splits (docs/suite.md)."""

    def __init__(self, supervised_weight: float = 0.35, temperature: float = 0.5,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        self.supervised_weight = supervised_weight
        self.loss = SupConLoss(temperature, gather_distributed)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor
    ) -> torch.Tensor:
        loss = (1 - self.supervised_weight) * self.loss(view1, view2)
        if self.loss.gather_distributed and _world_size() > 1:
            # every process calls it (it gathers), also one whose batch holds no labeled image
            supervised = _gathered_supcon(view1, view2, labels, labeled, self.loss.temperature)
            return loss + self.supervised_weight * supervised
        if labeled.any():
            loss = loss + self.supervised_weight * self.loss(
                view1[labeled], view2[labeled], labels[labeled]
            )
        return loss


# --- Long-tail losses. Class counts come from the training split: the graphs call a loss
# --- factory (the class, bound in gin without "()") with ``class_counts``.


def _counts(class_counts) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"class_counts must be a non-empty 1-d sequence, got shape {tuple(counts.shape)}")
    if (counts <= 0).any():
        empty = torch.nonzero(counts <= 0).squeeze(1).tolist()
        raise ValueError(f"classes {empty} have no training images: a balanced loss needs every "
                         "class at least once (drop the class or give it an image)")
    return counts


def log_prior(class_counts) -> torch.Tensor:
    """``log π_c = log(n_c / N)`` of the training split, float32; refuses an empty class."""
    counts = _counts(class_counts)
    return torch.log(counts / counts.sum()).float()


def effective_number_weights(class_counts, beta: float) -> torch.Tensor:
    """Class-balanced weights by effective number (Cui et al., CVPR 2019):
    ``w_c ∝ (1 - β) / (1 - β^n_c)``, normalized to sum to the number of classes."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = _counts(class_counts)
    weights = (1 - beta) / (1 - beta ** counts)
    return (weights / weights.sum() * len(counts)).float()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax focal loss (Lin et al., ICCV 2017), ``-(1 - p_t)^γ log p_t``, optionally times
    ``weight[target]``; mean over the batch (not over the weights, as Cui et al. define it)."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    loss = -log_p if gamma == 0 else -((1 - log_p.exp()) ** gamma) * log_p
    if weight is not None:
        loss = loss * weight[targets]
    return loss.mean()


@gin.configurable
class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021): ``CE(z + τ · log π, y)`` with
    ``π`` the training class prior, so rare classes must win by a larger margin."""

    def __init__(self, class_counts, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau
        self.register_buffer("offset", tau * log_prior(class_counts))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.offset, targets)


@gin.configurable
class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced Softmax (Ren et al., NeurIPS 2020): ``CE(z + log n_c, y)``, which is logit
    adjustment with ``τ = 1`` (``log n_c`` and ``log π_c`` differ by a constant)."""

    def __init__(self, class_counts) -> None:
        super().__init__(class_counts, tau=1.0)


@gin.configurable
class LDAMLoss(nn.Module):
    """LDAM with deferred re-weighting (Cao et al., NeurIPS 2019).

    The target logit is lowered by ``Δ_y ∝ n_y^(-1/4)`` (the largest margin is ``max_margin``)
    and the logits are scaled by ``s``: ``CE(s · (z - Δ_y 1_y), y)``. Cao et al. use it with a
    cosine classifier (``Network.classifier = @CosineLinear``). DRW: from epoch
    ``drw_start · T`` on, classes are weighted by effective number with ``β`` (the graph calls
    :meth:`set_epoch`); before that all weights are 1.
    """

    def __init__(self, class_counts, max_margin: float = 0.5, scale: float = 30.0,
                 drw_start: float | None = 0.8, beta: float = 0.9999) -> None:
        super().__init__()
        counts = _counts(class_counts)
        margins = counts ** -0.25
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("drw_weights", effective_number_weights(counts, beta))
        self.scale, self.drw_start = scale, drw_start
        self.reweighting = False

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """``epoch`` counts from 0 of ``epochs``; re-weighting starts at ``int(drw_start · epochs)``."""
        self.reweighting = self.drw_start is not None and epoch >= int(self.drw_start * epochs)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        margin = torch.zeros_like(logits).scatter_(1, targets[:, None], self.margins[targets, None])
        weight = self.drw_weights if self.reweighting else None
        return F.cross_entropy(self.scale * (logits - margin), targets, weight=weight)


@gin.configurable
class ClassBalancedLoss(nn.Module):
    """Class-balanced loss (Cui et al., CVPR 2019): each sample's loss times the effective-number
    weight of its class; softmax cross-entropy, or softmax focal loss when ``gamma > 0``."""

    def __init__(self, class_counts, beta: float = 0.9999, gamma: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weights", effective_number_weights(class_counts, beta))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.weights)


@gin.configurable
class FocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017), softmax form: ``-(1 - p_t)^γ log p_t``; ``γ = 0`` is
    cross-entropy. Needs no class counts: bind it with ``()``."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma)


EVIDENCE = {
    "relu": torch.relu,
    "softplus": F.softplus,
    "exp": lambda z: torch.exp(z.clamp(-10, 10)),
}


def evidence_of(z: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Non-negative evidence from raw outputs, with the activations of Sensoy et al.'s code:
    ``relu`` (the paper's), ``softplus`` or ``exp`` (clamped to ±10, as their code does)."""
    if activation not in EVIDENCE:
        raise ValueError(f"unknown evidence activation {activation!r}: use one of {sorted(EVIDENCE)}")
    return EVIDENCE[activation](z)


@gin.configurable
class EvidentialLoss(nn.Module):
    """Evidential classification loss (Sensoy et al., NeurIPS 2018, eq. 5 and 9).

    Evidence ``e = act(z)`` (``activation``: relu as in the paper, or softplus / exp, see
    :func:`evidence_of`), Dirichlet ``α = e + 1``, ``S = Σ α``, ``p = α / S``. The loss is the
    Bayes risk of the squared error, ``Σ_j (y_j - p_j)² + p_j (1 - p_j) / (S + 1)``, plus
    ``λ_t · KL(Dir(α̃) ‖ Dir(1))`` on the misleading evidence ``α̃ = y + (1 - y) ⊙ α``, with
    ``λ_t = min(1, t / anneal_epochs)`` (the graph calls :meth:`set_epoch`). Score the trained
    model with :class:`components.scores.EvidentialUncertainty` (``K / S``).
    """

    def __init__(self, anneal_epochs: int = 10, activation: str = "relu") -> None:
        super().__init__()
        if anneal_epochs < 1:
            raise ValueError(f"anneal_epochs must be >= 1, got {anneal_epochs}")
        evidence_of(torch.zeros(1), activation)  # fail early on an unknown name
        self.anneal_epochs, self.activation = anneal_epochs, activation
        self.kl_weight = 0.0

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.kl_weight = min(1.0, epoch / self.anneal_epochs)

    @staticmethod
    def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
        """``KL(Dir(α) ‖ Dir(1, …, 1))`` per row."""
        k = alpha.shape[1]
        total = alpha.sum(1)
        return (torch.lgamma(total) - math.lgamma(k) - torch.lgamma(alpha).sum(1)
                + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(total)[:, None])).sum(1))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        alpha = evidence_of(logits, self.activation) + 1
        total = alpha.sum(1, keepdim=True)
        p = alpha / total
        y = F.one_hot(targets, logits.shape[1]).to(p.dtype)
        risk = ((y - p) ** 2 + p * (1 - p) / (total + 1)).sum(1)
        if self.kl_weight:
            risk = risk + self.kl_weight * self.kl_to_uniform(y + (1 - y) * alpha)
        return risk.mean()
