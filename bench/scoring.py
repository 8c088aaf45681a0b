"""Scoring a cached stream of 100,000 samples with every novelty score (target: < 1 s each).

The stream is what the encode graph caches: 128-d features and 7 logits per sample. Features
are drawn around 10 class centres (7 old, 3 new) so that nearest-neighbour structure is
realistic; logits (and an evidential head's evidence) are linear read-outs of the features.
kNN and Mahalanobis are fitted on a 5,600-sample labeled bank of the old classes (about the size
of the fmnist-7/3 labeled set); fitting is not timed, scoring is. Medians over the repeats.

Exact kNN costs 2 · 100,000 · 5,600 · 128 ≈ 143 GFLOP of distances (plus the k-selection), over
a second on 2 cores whatever the library; faiss's inverted file (IVF) visits a few k-means cells
of the bank per query. The IVF rows print how far their k-th distance is from the exact one
(median relative error); on real features the README's novelty table compares their AUROC.
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

    evidence = rng.standard_normal((DIM, OLD)).astype(np.float32) / np.sqrt(DIM)

    def draw(n: int, classes: int) -> dict:
        y = rng.integers(0, classes, n)
        x = centres[y] + rng.standard_normal((n, DIM)).astype(np.float32)
        return {"features": x, "logits": x @ readout, "evidence": x @ evidence, "targets": y}

    return draw(N_BANK, OLD), draw(N_STREAM, OLD + NEW)


def run(repeats: int) -> list[dict]:
    bank, stream = data()
    exact = KNNDistance(k=50)
    scores = [MaxSoftmax(), Entropy(), Margin(), MaxLogit(), Energy(), EvidentialUncertainty(),
              Mahalanobis(), exact, KNNDistance(k=50, nlist=64, nprobe=2),
              KNNDistance(k=10, nlist=128, nprobe=4)]
    rows, reference = [], None
    for score in scores:
        score.fit(bank)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = score(stream)
            times.append(time.perf_counter() - start)
        assert out.shape == (N_STREAM,) and torch.isfinite(out).all()
        median = statistics.median(times)
        notes = f"{N_STREAM:,} cached samples, {DIM}-d; bank {N_BANK:,}"
        if score is exact:
            reference = out
        elif isinstance(score, KNNDistance) and score.k == exact.k:
            error = ((out - reference).abs() / reference).median().item()
            notes += f"; k-th distance {100 * error:.1f} % from exact (median)"
        rows.append({"name": repr(score), "median_s": median, "images_per_s": N_STREAM / median,
                     "target": f"< {TARGET_S:g} s", "ok": median < TARGET_S, "notes": notes})
    return rows
