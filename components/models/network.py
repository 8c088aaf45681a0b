"""The model: feature extractor → (projector, growing classifier)."""

from __future__ import annotations

from collections.abc import Callable

import gin
import torch
from torch import nn

from components.models.heads import GrowingLinear, MLPProjector


@gin.configurable
class Network(nn.Module):
    """``backbone`` features feed a linear classifier over the known classes and a projector
    (the space for contrastive learning and clustering).

    ``projector`` is a factory taking the feature width, so its sizes can be bound in gin;
    ``classifier`` one taking (width, classes): :class:`GrowingLinear`, :class:`CosineLinear`
    or :class:`CausalNormClassifier`; ``confidence`` an optional second head of the same shape
    (:class:`EvidentialHead`) that scores how sure the model is.
    ``forward`` returns logits; :meth:`encode` returns features, projections and logits, and the
    confidence head's output as ``evidence`` when there is one.
    """

    def __init__(
        self,
        backbone: nn.Module = gin.REQUIRED,
        num_classes: int = gin.REQUIRED,
        projector: Callable[[int], nn.Module] = MLPProjector,
        classifier: Callable[[int, int], GrowingLinear] = GrowingLinear,
        confidence: Callable[[int, int], GrowingLinear] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.projector = projector(backbone.out_dim)
        self.classifier = classifier(backbone.out_dim, num_classes)
        self.confidence = confidence(backbone.out_dim, num_classes) if confidence else None

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        out = {
            "features": features,
            "projected": self.projector(features),
            "logits": self.classifier(features),
        }
        if self.confidence is not None:
            out["evidence"] = self.confidence(features)
        return out

    def grow(self, k: int, rows: torch.Tensor | None = None) -> Network:
        """Grow the classifier by ``k`` classes (``rows`` initialize them, see
        :meth:`GrowingLinear.grow`) and the confidence head with it (default init)."""
        self.classifier.grow(k, rows)
        if self.confidence is not None:
            self.confidence.grow(k)
        return self
