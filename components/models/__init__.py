"""Models: feature extractors, projector, growing classifier and the network that holds them."""

from components.models.extractors import SmallConvNet, TorchvisionBackbone
from components.models.heads import CausalNormClassifier, CosineLinear, GrowingLinear, MLPProjector
from components.models.network import Network

__all__ = [
    "CausalNormClassifier", "CosineLinear", "GrowingLinear", "MLPProjector", "Network", "SmallConvNet",
    "TorchvisionBackbone",
]
