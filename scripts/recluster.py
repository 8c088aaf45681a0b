"""Estimate the number of new classes again for finished discovery runs, from their cache.

``python scripts/recluster.py runs/discovery/fmnist-contrastive/seed0 [...]`` parses each run's
``operative_config.gin`` (so data, model, augmentation and cache are exactly the run's), loads
the checkpoint whose features were clustered, reads the labeled and stream features from the
HDF5 cache (a missing entry is encoded again) and runs ``SemiSupervisedKMeans(k_new=None)``
with both estimators. It writes ``k_estimate.json`` beside each run's ``metrics.json`` and
prints one line per run. Clustering takes seconds; no network is trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gin
import torch
from ignite.handlers import Checkpoint

import components  # noqa: F401  (registers the components)
import graphs  # noqa: F401
from components.data import BatchAugment
from components.data.splits import make_protocol
from components.kmeans import SemiSupervisedKMeans
from components.models import Network
from components.run import parse_config
from graphs.encode import encode
from graphs.handlers import RunDir


def recluster(run: Path) -> dict:
    parse_config([str(run / "operative_config.gin")], [])
    protocol = make_protocol()
    net = Network(num_classes=protocol.n_old)
    clustered = "representation" if gin.query_parameter("discovery.representation") else "model"
    checkpoint = sorted((run / "checkpoints").glob(f"{clustered}_*.pt"))[-1]
    Checkpoint.load_objects({"model": net}, torch.load(checkpoint, weights_only=True))
    augment, cache = BatchAugment(), gin.query_parameter("discovery.cache").scoped_configurable_fn()
    on = gin.query_parameter("discovery.cluster_on")
    device = torch.device("cpu")
    labeled = encode(net, protocol.labeled, augment, cache, device)
    stream = encode(net, protocol.stream, augment, cache, device)
    seed = json.loads((run / "metrics.json").read_text())["seed"]
    out = {"k_new_true": protocol.n_new, "features": on, "checkpoint": checkpoint.name}
    for rule in ("silhouette", "gcd"):
        result = SemiSupervisedKMeans(k_new=None, estimate=rule, seed=seed)(
            stream[on], labeled[on], labeled["targets"], protocol.n_old)
        out[rule] = {"k_estimate": result.k_estimate,
                     "scores": {str(k): v for k, v in result.k_scores.items()}}
    RunDir(run).write_json("k_estimate.json", out)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for run in map(Path, argv):
        out = recluster(run)
        print(f"{run}: silhouette {out['silhouette']['k_estimate']}, gcd {out['gcd']['k_estimate']} "
              f"(true {out['k_new_true']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
