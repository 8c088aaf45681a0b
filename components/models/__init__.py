"""Models: feature extractors, projector, growing classifier and the network that holds them."""

from components.models.extractors import SmallConvNet, TorchvisionBackbone
from components.models.heads import (
    CausalNormClassifier,
    CosineLinear,
    EvidentialHead,
    GrowingLinear,
    MLPProjector,
)
from components.models.network import Network

__all__ = [
    "CausalNormClassifier", "CosineLinear", "EvidentialHead", "GrowingLinear", "MLPProjector", "Network",
    "SmallConvNet", "TorchvisionBackbone",
]
