"""Drive the library's graphs from Python, without gin files: build the pieces in code and
call the train, encode and online graphs (Ignite engines underneath) yourself.

On digits-7/3 (docs/definitions.md): train a small convnet on the long-tailed old digits, cache its
outputs in HDF5, fit temperature scaling and a 5 % false-alarm threshold on held-out digits,
then let the online graph fill the sample pool from the stream with the energy score.

    python examples/drive_graphs.py [--epochs 40] [--cache /tmp/example-cache]
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import numpy as np
import torch

from components.cache import FeatureCache
from components.data import BatchAugment, digits, make_protocol
from components.metrics import novelty_metrics, pool_quality
from components.models import Network, SmallConvNet
from components.pool import SamplePool
from components.scores import Energy
from components.thresholds import FalseAlarmRate, fit_temperature
from graphs.encode import encode
from graphs.online import online
from graphs.train import train


def main(epochs: int = 40, cache_root: str | None = None) -> dict:
    torch.manual_seed(0)
    protocol = make_protocol(source=None, source_sets=digits(seed=0), new_classes=[7, 8, 9], ratio=10,
                             val_per_class=20, val_partial=True, name="digits-7/3")
    augment = BatchAugment(mean=(0.5,), std=(0.5,), pad=1, degrees=15, translate=0.1, scale=(0.8, 1.0))
    model = Network(SmallConvNet(in_channels=1, width=32), num_classes=protocol.n_old)
    device = torch.device("cpu")

    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    train(model, protocol.labeled, augment, device, epochs=epochs, sampler="class_balanced", optimizer=sgd)

    cache = FeatureCache(cache_root or tempfile.mkdtemp(prefix="example-cache-"))
    val, stream = (encode(model, s, augment, cache, device) for s in (protocol.val, protocol.stream))

    temperature = fit_temperature(val["logits"], val["targets"])
    score = Energy()
    known = score({"logits": torch.from_numpy(val["logits"]) / temperature}).numpy()
    pool = SamplePool(trigger_size=10_000, threshold=FalseAlarmRate(0.05)(known))
    scaled = {**stream, "logits": stream["logits"] / temperature}
    _, scores = online(scaled, score, pool)

    is_new = stream["targets"] >= protocol.n_old
    pooled = np.isin(np.arange(len(is_new)), pool.ids)
    out = {"temperature": temperature, **novelty_metrics(scores, is_new), **pool_quality(pooled, is_new)}
    print(f"T = {temperature:.2f}; stream AUROC {out['auroc']:.3f}; pool of {out['size']}: "
          f"precision {out['precision']:.0%}, recall {out['recall']:.0%}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cache", default=None, help="feature cache folder (default: a new temporary one)")
    args = parser.parse_args()
    main(args.epochs, args.cache)
