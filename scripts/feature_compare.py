"""Two models' features of the same seen stream, side by side, from a run's HDF5 cache: the
Mahalanobis AUROC (new = positive) and where whitened semi-supervised k-means (k_new = 3) puts
each new class. Reads the stream's labels, so it is a tuning tool, never part of a run.

    python scripts/feature_compare.py V0_LABELED.h5 V0_STREAM.h5 ADAPTED_LABELED.h5 ADAPTED_SEEN.h5

The cache files are named by fingerprint under ``cache/``; their ``dataset`` and ``model``
attributes say which set and model each holds (docs/suite.md used the v0 and adapted files of
one fmnist run). The v0 stream rows are cut to the seen stream's length.
"""

from __future__ import annotations

import sys

import h5py
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from components.kmeans import SemiSupervisedKMeans
from components.metrics import clustering_accuracy
from components.scores import Mahalanobis

N_OLD = 7  # fmnist-7/3 and its random splits: 7 old classes, new targets 7, 8, 9


def _load(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h:
        return {k: h[k][:] for k in h}


def report(tag: str, labeled: dict, seen: dict) -> None:
    y = seen["targets"]
    new = y >= N_OLD
    score = Mahalanobis().fit({"features": torch.from_numpy(labeled["features"]),
                               "targets": labeled["targets"]})
    s = score({"features": torch.from_numpy(seen["features"])}).numpy()
    km = SemiSupervisedKMeans(k_new=3, whiten=True, normalize=False, n_init=5)
    labels = km(seen["features"], labeled["features"], labeled["targets"], N_OLD).labels
    acc = clustering_accuracy(y, labels, ~new)
    shares = {c: round(float((labels[y == c] >= N_OLD).mean()), 2) for c in np.unique(y[new]).tolist()}
    print(f"{tag}: AUROC {roc_auc_score(new, s):.3f}; k-means of the seen stream all {acc['all']:.3f} "
          f"new {acc['new']:.3f}; share of each new class in new clusters {shares}")


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    v0_labeled, v0_stream, labeled, seen = (_load(p) for p in argv)
    v0_seen = {k: v[: len(seen["targets"])] for k, v in v0_stream.items()}
    if not np.array_equal(v0_seen["ids"], seen["ids"]):
        raise SystemExit("the two stream files do not hold the same rows: "
                         "give one run's v0 stream and seen files")
    report("v0", v0_labeled, v0_seen)
    report("adapted", labeled, seen)


if __name__ == "__main__":
    main(sys.argv[1:])
