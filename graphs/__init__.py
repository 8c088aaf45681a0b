"""Graphs: how the components flow. Each builds Ignite engines from the components it is given."""

from graphs import recalibrate
from graphs.continual import continual
from graphs.discovery import discovery, recluster_run
from graphs.lifecycle import lifecycle
from graphs.longtail import longtail, recalibrate_run
from graphs.novelty import novelty

__all__ = ["continual", "discovery", "lifecycle", "longtail", "novelty", "recalibrate", "recalibrate_run",
           "recluster_run"]
