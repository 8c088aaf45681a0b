"""How well could any relabeling of a run's consolidation candidates do, and can a test tell a
class found twice from two classes? A diagnostic that reads the candidates' true classes.

``python scripts/consolidation_bounds.py RUN [RUN ...]``

RUN is a continual run made with ``--gin-bindings "continual.consolidation_inputs = True"``
(``RUN/loop/consolidation_inputs.npz``, :func:`graphs.consolidate.save_inputs`). For each run it
prints the share of candidates labeled right (Hungarian; distractors a class of their own) by

* the outputs the model predicted them as (what the rounds learned);
* the run's own relabeling (:func:`graphs.consolidate.stable_relabel` with the run's settings);
* the labeler with as many new clusters as the candidates hold true classes of at least 2 % of
  them (distractors one class; a handful of an old class's look-alikes is no cluster), and again
  with the distractors taken out first: what k-means in this geometry reaches when told what no
  run knows;
* the vote of each candidate's 10 nearest other candidates' true classes (cosine, in the
  labeler's geometry): how far the classes are apart *locally*. A high vote with a low k-means
  line says the classes are separable but not as k-means' round, equal-sized blobs.

Then, for every pair of clusters of the run's relabeling, the majority classes, the sizes and
the Anderson-Darling statistic of the pair's samples projected on the line through the two
centroids (standardized, with G-means' small-sample correction A*² = A²(1 + 4/n - 25/n²);
Hamerly & Elkan, *Learning the k in k-means*, NIPS 2003, split a cluster while that projection
is not Gaussian). A pair of one class ("same") should look like one Gaussian (a small value),
two classes like two. docs/loop.md ("What bounds Fashion-MNIST's consolidation") reads the
output.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
from scipy.stats import anderson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from consolidation_replay import accuracy, name, replay  # noqa: E402

from components.metrics import cluster_truth  # noqa: E402
from graphs.consolidate import load_inputs  # noqa: E402


def neighbour_vote(x: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Share of samples whose ``k`` nearest others (cosine) hold their true class most often."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes, coded = np.unique(truth, return_inverse=True)
    votes = np.zeros((len(x), len(classes)))
    for start in range(0, len(x), 2048):  # blocks of rows: 13,000 candidates fit in memory
        similarity = x[start:start + 2048] @ x.T
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf  # not oneself
        nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
        np.add.at(votes, (np.repeat(start + rows, k), coded[nearest].ravel()), 1)
    return float(np.mean(votes.argmax(1) == coded))


def groups(truth: np.ndarray, share: float = 0.02) -> int:
    """How many true classes (distractors one) hold at least ``share`` of ``truth``."""
    return int(np.count_nonzero(np.unique(truth, return_counts=True)[1] >= share * len(truth)))


def true_k(d: dict, keep: np.ndarray) -> float:
    """The labeler (one clustering, as the run's consolidation configured it) with :func:`groups`
    of the kept candidates as its number of new clusters."""
    truth = d["truth"][keep]
    labeler = copy.copy(d["labeler"])
    labeler.k_new = groups(truth)
    result = labeler(d["x_u"][keep], d["x_l"], d["y_l"], d["n_old"])
    return accuracy(truth, result.labels)


def projected_anderson(a: np.ndarray, b: np.ndarray) -> float:
    """G-means' statistic for the union of ``a`` and ``b`` projected on their centroids' line."""
    axis = b.mean(0) - a.mean(0)
    z = np.concatenate([a, b]) @ (axis / max(np.linalg.norm(axis), 1e-12))
    n = len(z)
    statistic = anderson((z - z.mean()) / max(z.std(), 1e-12), dist="norm", method="interpolate").statistic
    return float(statistic * (1 + 4 / n - 25 / n ** 2))


def report(run: Path) -> list[str]:
    d = load_inputs(run / "loop" / "consolidation_inputs.npz")
    truth, n_old = d["truth"], d["n_old"]
    labels, output, _, _ = replay(d)
    geometry, _ = d["labeler"].geometry(d["x_u"], d["x_l"], d["y_l"], n_old)
    real = truth != -1
    lines = [f"## {run}: {len(truth)} candidates, {len(d['outputs'])} outputs", "",
             "| labeling | candidates labeled right |", "|---|---|",
             f"| the model's outputs | {100 * accuracy(truth, d['predicted']):.1f} % |",
             f"| the run's relabeling | {100 * accuracy(truth, labels):.1f} % |",
             f"| the labeler, k = the true classes of 2 % of the candidates or more ({groups(truth)}) | "
             f"{100 * true_k(d, np.ones(len(truth), bool)):.1f} % |"]
    if real.any() and not real.all():
        lines.append(f"| the same, distractors taken out (k = {groups(truth[real])}) | "
                     f"{100 * true_k(d, real):.1f} % |")
    lines += [f"| 10 nearest candidates' vote | {100 * neighbour_vote(geometry, truth):.1f} % |", "",
              "| pair | majorities | sizes | A*² on the centroids' line |", "|---|---|---|---|"]
    clusters = [c for c in np.unique(labels) if c >= n_old]
    majority = {c: cluster_truth(truth[labels == c])["majority"] for c in clusters}
    rows = []
    for i, a in enumerate(clusters):
        for b in clusters[i + 1:]:
            statistic = projected_anderson(geometry[labels == a], geometry[labels == b])
            same = "same: " if majority[a] == majority[b] else ""
            pair, sizes = f"{output.get(a, '–')}, {output.get(b, '–')}", np.count_nonzero(labels == a)
            rows.append((statistic, f"| {pair} | {same}{name(majority[a])}, {name(majority[b])} | {sizes}, "
                                    f"{np.count_nonzero(labels == b)} | {statistic:.2f} |"))
    return lines + [row for _, row in sorted(rows)] + [""]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for run in args.runs:
        try:
            print("\n".join(report(run)))
        except (FileNotFoundError, ValueError) as error:
            print(f"{run}: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
