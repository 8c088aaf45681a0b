"""Scoring a cached stream of 100,000 samples with every novelty score (target: < 1 s each).

The stream is what the encode graph caches: 128-d features and 7 logits per sample. Features
are drawn around 10 class centres (7 old, 3 new) so that nearest-neighbour structure is
realistic; logits are a linear read-out of the features. kNN and Mahalanobis are fitted on a
5,600-sample labeled bank of the old classes (about the size of the fmnist-7/3 labeled set);
fitting is not timed, scoring is. Medians over the repeats.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from components.scores import (
    Energy,
    Entropy,
    EvidentialUncertainty,
    KNNDistance,
    Mahalanobis,
    Margin,
    MaxLogit,
    MaxSoftmax,
)

N_STREAM, N_BANK, DIM, OLD, NEW = 100_000, 5_600, 128, 7, 3
TARGET_S = 1.0


def data(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((OLD + NEW, DIM)).astype(np.float32)
    readout = rng.standard_normal((DIM, OLD)).astype(np.float32) / np.sqrt(DIM)

    def draw(n: int, classes: int) -> dict:
        y = rng.integers(0, classes, n)
        x = centres[y] + rng.standard_normal((n, DIM)).astype(np.float32)
        return {"features": x, "logits": x @ readout, "targets": y}

    return draw(N_BANK, OLD), draw(N_STREAM, OLD + NEW)


def run(repeats: int) -> list[dict]:
    bank, stream = data()
    scores = [MaxSoftmax(), Entropy(), Margin(), MaxLogit(), Energy(), EvidentialUncertainty(),
              KNNDistance(k=50), Mahalanobis()]
    rows = []
    for score in scores:
        score.fit(bank)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = score(stream)
            times.append(time.perf_counter() - start)
        assert out.shape == (N_STREAM,) and torch.isfinite(out).all()
        median = statistics.median(times)
        rows.append({"name": repr(score), "median_s": median, "images_per_s": N_STREAM / median,
                     "target": f"< {TARGET_S:g} s", "ok": median < TARGET_S,
                     "notes": f"{N_STREAM:,} cached samples, {DIM}-d; bank {N_BANK:,}"})
    return rows
