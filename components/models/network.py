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
    or :class:`CausalNormClassifier`.
    ``forward`` returns logits; :meth:`encode` returns features, projections and logits.
    """

    def __init__(
        self,
        backbone: nn.Module = gin.REQUIRED,
        num_classes: int = gin.REQUIRED,
        projector: Callable[[int], nn.Module] = MLPProjector,
        classifier: Callable[[int, int], GrowingLinear] = GrowingLinear,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.projector = projector(backbone.out_dim)
        self.classifier = classifier(backbone.out_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {
            "features": features,
            "projected": self.projector(features),
            "logits": self.classifier(features),
        }
