"""Use a few components in a plain PyTorch script: no gin, no Ignite, your own model.

A small MLP is trained on digits 0-6 of scikit-learn's bundled digits; the unlabeled digits
7-9 arrive later. The components do the rest:

* ``Mahalanobis`` scores which unlabeled samples look new, with a threshold at 20 % false
  alarms on held-out known digits (``false_alarm_threshold``);
* ``SemiSupervisedKMeans`` turns the flagged samples into pseudo-labels, anchored by the
  labeled features and in their Mahalanobis geometry (``whiten``); ``confident`` keeps the
  half nearest each centroid;
* ``GrowingLinear`` adds the new classes to the classifier, and ``DistillLoss`` trains the
  grown model on labels + pseudo-labels while keeping the old model's answers.

    python examples/plain_pytorch.py [--epochs 60]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from components.kmeans import SemiSupervisedKMeans, confident
from components.losses import DistillLoss
from components.metrics import clustering_accuracy
from components.models import GrowingLinear
from components.scores import Mahalanobis
from components.thresholds import false_alarm_threshold

RATE = 0.2  # share of held-out known digits let into the pool: more recall, less precision


class MLP(nn.Module):
    """Anyone's model: a feature extractor and a classifier that can grow."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.classifier = GrowingLinear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fit(model: nn.Module, x: torch.Tensor, loss_of, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()


def main(epochs: int = 60) -> dict:
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    old = y[train_idx] < 7
    labeled_idx = train_idx[old.numpy()][:400]
    held_idx = train_idx[old.numpy()][400:]  # held-out known digits, for the threshold
    unlabeled_idx = np.concatenate([train_idx[(~old).numpy()], held_idx[:100]])  # new + some old

    # 1. your model, trained on the old classes the usual way
    model = MLP(7)
    xl, yl = x[labeled_idx], y[labeled_idx]
    fit(model, xl, lambda m, b: nn.functional.cross_entropy(m(xl[b]), yl[b]), epochs)
    model.eval()
    with torch.no_grad():
        feats = {k: model.features(x[idx]).numpy() for k, idx in
                 (("labeled", labeled_idx), ("held", held_idx), ("unlabeled", unlabeled_idx))}

    # 2. which unlabeled samples are new? Mahalanobis distance, threshold on held-out known digits
    score = Mahalanobis().fit({"features": feats["labeled"], "targets": yl.numpy()})
    threshold = false_alarm_threshold(score({"features": feats["held"]}).numpy(), rate=RATE)
    flagged = score({"features": feats["unlabeled"]}).numpy() > threshold
    truly_new = y[unlabeled_idx].numpy() >= 7
    print(f"flagged {flagged.sum()} of {len(flagged)} unlabeled samples; "
          f"{truly_new[flagged].mean():.0%} of them are new, "
          f"{flagged[truly_new].mean():.0%} of the new found")

    # 3. pseudo-labels: semi-supervised k-means anchored by the labeled features
    result = SemiSupervisedKMeans(k_new=3, whiten=True, normalize=False)(
        feats["unlabeled"][flagged], feats["labeled"], yl.numpy(), 7)
    keep = confident(result, 0.5)
    pool_y = y[unlabeled_idx][flagged].numpy()
    clusters = clustering_accuracy(pool_y, result.labels, pool_y < 7)
    print(f"pool clustering accuracy: new {clusters['new']:.0%}, all {clusters['all']:.0%}")

    # 4. grow the classifier by 3 and distill: labels + confident pseudo-labels + the old model
    teacher = MLP(7)
    teacher.load_state_dict(model.state_dict())
    teacher.eval()
    model.classifier.grow(3)
    xs = torch.cat([xl, x[unlabeled_idx][flagged][torch.from_numpy(keep)]])
    ys = torch.cat([yl, torch.from_numpy(result.labels[keep])])
    distill = DistillLoss(temperature=2.0)

    def distill_loss(m, b):
        with torch.no_grad():
            old_logits = teacher(xs[b])
        return distill(m(xs[b]), ys[b], old_logits)

    model.train()
    fit(model, xs, distill_loss, epochs)
    model.eval()
    with torch.no_grad():
        pred = model(x[test_idx]).argmax(1).numpy()
    truth = y[test_idx].numpy()
    test = clustering_accuracy(truth, pred, truth < 7)
    print(f"test accuracy after distillation: old {test['old']:.0%}, new {test['new']:.0%}, "
          f"all {test['all']:.0%}")
    return test


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    main(parser.parse_args().epochs)
