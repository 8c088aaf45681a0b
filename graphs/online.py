"""The online graph: score the stream in arrival order, fill the pool, stop when it fires."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from ignite.engine import Engine, EventEnum

from components.pool import SamplePool
from components.scores import Score
from graphs.handlers import progress


class PoolEvents(EventEnum):
    POOL_READY = "pool_ready"


def score_outputs(score: Score | Callable[[torch.Tensor], torch.Tensor],
                  outputs: Mapping[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
    """Apply a :class:`Score` to cached outputs, or a plain score function to their logits."""
    if isinstance(score, Score):
        return score(outputs)
    return score(torch.as_tensor(np.asarray(outputs["logits"])))


def online(
    stream: dict[str, np.ndarray],
    score: Score | Callable[[torch.Tensor], torch.Tensor],
    pool: SamplePool,
    start: int = 0,
    batch_size: int = 32,
    trace: list[tuple[int, int]] | None = None,
    admit: np.ndarray | None = None,
) -> tuple[int, np.ndarray]:
    """Feed the stream's cached outputs from ``start`` in batches to ``score`` (a
    :class:`Score` sees every cached output, a plain function the logits) and ``pool``.

    Stops after the batch that makes the pool ready (firing ``PoolEvents.POOL_READY``) or at
    the end of the stream. Returns the next stream position and the scores seen; ``trace``, if
    given, gets ``(position, pool size)`` after every batch. ``admit`` (a boolean per stream
    row) keeps the rows it marks False out of the pool, whatever their score.
    """
    arrays = {k: torch.from_numpy(np.asarray(v)) for k, v in stream.items() if k not in ("ids", "targets")}
    n = len(arrays["logits"])
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(start, n, batch_size)]
    seen: list[torch.Tensor] = []

    def step(engine: Engine, bound: tuple[int, int]) -> dict[str, int]:
        lo, hi = bound
        scores = score_outputs(score, {k: v[lo:hi] for k, v in arrays.items()})
        seen.append(scores)
        ids, batch = np.asarray(stream["ids"][lo:hi]), scores.numpy()
        if admit is not None:
            ids, batch = ids[admit[lo:hi]], batch[admit[lo:hi]]
        pooled = pool.add(ids, batch)
        engine.state.position = hi
        if trace is not None:
            trace.append((hi, len(pool)))
        if pool.ready:
            engine.fire_event(PoolEvents.POOL_READY)
        return {"pooled": pooled}

    engine = Engine(step)
    engine.register_events(*PoolEvents)
    engine.add_event_handler(PoolEvents.POOL_READY, lambda e: e.terminate())
    engine.state.position = start
    if bounds:
        with progress(engine, "online stream", show=None):
            engine.run(bounds)
    scores = torch.cat(seen).numpy() if seen else np.array([], dtype=np.float32)
    return engine.state.position, scores
