"""Checks of images against the model that will read them, made before any training step.

A model built for grayscale images fed RGB ones (or the reverse) fails inside its first
convolution with torch's "expected input[...] to have 1 channels" error, after the data is loaded
and the stage has started; :func:`check_model_input` says which binding to change instead.
"""

from __future__ import annotations

import inspect

from torch import nn

from components.data.sources import ImageSet


def input_channels(model: nn.Module) -> tuple[int, str] | None:
    """The channel count the model's first convolution takes, and the binding that sets it
    (``SmallConvNet.in_channels``); None for a model with no convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    return conv.in_channels, _in_channels_binding(model)


def _in_channels_binding(model: nn.Module) -> str:
    """The first submodule of the project (not torch's) whose constructor takes ``in_channels``:
    that is the configurable a user binds."""
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torch"):
            continue
        try:
            parameters = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            continue
        if "in_channels" in parameters:
            return f"{cls.__name__}.in_channels"
    return "the model's in_channels"


def check_channels(images: ImageSet, expected: int, binding: str = "the model's in_channels") -> None:
    """Raise a ``ValueError`` naming the set and the binding to change when the images'
    channel count ``images.shape[1]`` is not ``expected``."""
    got = images.images.shape[1]
    if got != expected:
        raise ValueError(
            f"{images.name}: the images have {got} channel(s) but the model takes {expected} "
            f"({binding} = {expected}); bind {binding} = {got} to match the images"
        )


def check_model_input(images: ImageSet, model: nn.Module) -> None:
    """:func:`check_channels` against the model's first convolution (nothing to check without one)."""
    found = input_channels(model)
    if found is not None:
        check_channels(images, *found)
