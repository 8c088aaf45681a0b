"""The evaluate graph: Ignite metrics over cached test outputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine

from components.metrics import ClusteringAccuracy, ShotAccuracy


def evaluate(
    outputs: dict[str, np.ndarray], n_old: int, train_counts: Sequence[int], batch_size: int = 1024
) -> dict[str, dict[str, float]]:
    """Accuracy on all / old / new test samples (one Hungarian assignment over all of them)
    and many / medium / few-shot accuracy of the old classes."""
    logits = torch.from_numpy(outputs["logits"])
    targets = torch.from_numpy(outputs["targets"])
    batches = [(logits[i:i + batch_size], targets[i:i + batch_size])
               for i in range(0, len(targets), batch_size)]
    engine = Engine(lambda engine, batch: batch)
    ClusteringAccuracy(n_old).attach(engine, "accuracy")
    ShotAccuracy(train_counts).attach(engine, "shots")
    state = engine.run(batches)
    return {"accuracy": state.metrics["accuracy"], "shots": state.metrics["shots"]}
