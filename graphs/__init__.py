"""Graphs: how the components flow. Each builds Ignite engines from the components it is given."""

from graphs.lifecycle import lifecycle

__all__ = ["lifecycle"]
