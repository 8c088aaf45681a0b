"""Data: sources, long-tail and novel-class splits, the stream, batched loading and augmentation."""

from components.data.checks import check_channels, check_model_input, input_channels
from components.data.distractors import Distractors
from components.data.loading import BatchAugment, BatchedImages, class_balanced_weights, image_loader
from components.data.sources import ImageSet, digits, image_folder, torchvision_dataset
from components.data.splits import ProtocolData, long_tail_counts, make_protocol, superclass_members

__all__ = [
    "BatchAugment", "BatchedImages", "Distractors", "ImageSet", "ProtocolData", "check_channels",
    "check_model_input", "class_balanced_weights", "digits", "image_folder", "image_loader",
    "input_channels", "long_tail_counts", "make_protocol", "superclass_members", "torchvision_dataset",
]
