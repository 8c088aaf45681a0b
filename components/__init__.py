"""Composable PyTorch components for discovering new classes under long-tailed data.

Importing the package registers every component with gin; each one also works when called
directly from Python with no gin file parsed.
"""

from components import (  # noqa: F401
    acceptance,
    cache,
    data,
    domain,
    external,
    kmeans,
    losses,
    memory,
    metrics,
    models,
    pool,
    recalibration,
    scores,
)
