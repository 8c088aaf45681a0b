"""Data: sources, long-tail and novel-class splits, the stream, batched loading and augmentation."""

from components.data.checks import check_channels, check_model_input, input_channels
from components.data.distractors import Distractors
from components.data.loading import BatchAugment, BatchedImages, class_balanced_weights, image_loader
from components.data.sources import (
    ImageRows,
    ImageSet,
    concat_images,
    digits,
    image_folder,
    mini_imagenet,
    take_images,
    tiny_imagenet,
    torchvision_dataset,
)
from components.data.splits import ProtocolData, long_tail_counts, make_protocol, superclass_members
from components.data.store import image_store

__all__ = [
    "BatchAugment", "BatchedImages", "Distractors", "ImageRows", "ImageSet", "ProtocolData",
    "check_channels", "check_model_input", "class_balanced_weights", "concat_images", "digits",
    "image_folder", "image_loader", "image_store", "input_channels", "long_tail_counts",
    "make_protocol", "mini_imagenet", "superclass_members", "take_images", "tiny_imagenet",
    "torchvision_dataset",
]
