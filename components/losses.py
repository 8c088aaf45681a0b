"""Losses: distillation into a grown classifier, and contrastive representation learning."""

from __future__ import annotations

import gin
import torch
import torch.nn.functional as F
from torch import nn


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


@gin.configurable
class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020) on two views ``[B, D]`` each.

    With ``labels=None`` the only positive of a view is the other view of the same image, which
    is SimCLR's NT-Xent (Chen et al., ICML 2020).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
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
    plus ``λ`` · SupCon on the labeled ones, on projected features of two augmented views."""

    def __init__(self, supervised_weight: float = 0.35, temperature: float = 0.1) -> None:
        super().__init__()
        self.supervised_weight = supervised_weight
        self.loss = SupConLoss(temperature)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor
    ) -> torch.Tensor:
        loss = (1 - self.supervised_weight) * self.loss(view1, view2)
        if labeled.any():
            loss = loss + self.supervised_weight * self.loss(
                view1[labeled], view2[labeled], labels[labeled]
            )
        return loss
