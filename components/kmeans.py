"""Semi-supervised k-means on faiss: turn a pool of unlabeled features into pseudo-labels.

Labeled samples stay fixed to their class (GCD, Vaze et al. CVPR 2022, §3.2), so the first
``n_old`` clusters *are* the old classes (centroids start at the labeled class means) and the
``k_new`` further clusters are the discovered classes. Nearest-centroid search runs in faiss
(on the GPU when faiss-gpu and a GPU are present); centroid updates are a scatter-add.
"""

from __future__ import annotations

import dataclasses

import faiss
import gin
import numpy as np


@dataclasses.dataclass
class KMeansResult:
    labels: np.ndarray  # cluster of each unlabeled sample, in 0 .. n_old + k_new - 1
    distances: np.ndarray  # squared distance of each unlabeled sample to its centroid
    centroids: np.ndarray  # [n_old + k_new, D]
    inertia: float
    iterations: int


def _nearest(x: np.ndarray, centroids: np.ndarray, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(centroids)
    dist, nearest = index.search(x, 1)
    return nearest[:, 0], dist[:, 0]


@gin.configurable
class SemiSupervisedKMeans:
    """k-means with ``n_old`` clusters anchored by labeled samples plus ``k_new`` free ones.

    New centroids are seeded by k-means++ (Arthur & Vassilvitskii, 2007) over the unlabeled
    samples, counting distance to the old centroids too, so seeds start away from known classes.
    An empty new cluster is re-seeded at the unlabeled sample farthest from its centroid. The
    best of ``n_init`` seeded runs (lowest inertia) is kept; results are deterministic in
    ``seed``. ``normalize`` L2-normalizes features first (cosine geometry).
    """

    def __init__(
        self,
        k_new: int = gin.REQUIRED,
        n_iter: int = 100,
        n_init: int = 3,
        seed: int = 0,
        normalize: bool = True,
        use_gpu: bool | None = None,
    ) -> None:
        if k_new < 1:
            raise ValueError(f"k_new must be >= 1, got {k_new}")
        self.k_new, self.n_iter, self.n_init, self.seed = k_new, n_iter, n_init, seed
        self.normalize = normalize
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu

    def __call__(
        self, unlabeled: np.ndarray, labeled: np.ndarray, labeled_targets: np.ndarray, n_old: int
    ) -> KMeansResult:
        x_u, x_l = self._prepare(unlabeled, "unlabeled"), self._prepare(labeled, "labeled")
        y_l = np.asarray(labeled_targets, dtype=np.int64)
        if len(x_u) < self.k_new:
            raise ValueError(
                f"cannot find {self.k_new} new clusters in {len(x_u)} unlabeled samples: "
                f"let the pool grow (raise the trigger size) or lower k_new"
            )
        missing = sorted(set(range(n_old)) - set(y_l.tolist()))
        if missing:
            raise ValueError(f"old classes {missing} have no labeled sample to anchor a centroid")
        if x_l.shape[1] != x_u.shape[1]:
            raise ValueError(f"feature widths differ: labeled {x_l.shape[1]}, unlabeled {x_u.shape[1]}")
        old = np.stack([x_l[y_l == c].mean(0) for c in range(n_old)])
        runs = [self._run(x_u, x_l, y_l, old, self.seed + i) for i in range(self.n_init)]
        return min(runs, key=lambda r: r.inertia)

    def _prepare(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"{what} features must be [N, D], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} features contain NaN or inf: check the model and the cache")
        if self.normalize:
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return x

    def _seed_new(self, x_u: np.ndarray, old: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        d2 = _nearest(x_u, old, self.use_gpu)[1].astype(np.float64)
        chosen = []
        for _ in range(self.k_new):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x_u), 1 / len(x_u))
            i = rng.choice(len(x_u), p=p)
            chosen.append(i)
            d2 = np.minimum(d2, ((x_u - x_u[i]) ** 2).sum(1))
        return x_u[chosen]

    def _assign(self, x_u: np.ndarray, centroids: np.ndarray, n_old: int):
        """Nearest centroid for each unlabeled sample; an empty new cluster takes the sample
        farthest from its centroid (the worst-served one)."""
        labels, dist = _nearest(x_u, centroids, self.use_gpu)
        for empty in sorted(set(range(n_old, len(centroids))) - set(labels.tolist())):
            far = int(np.argmax(dist))
            labels[far], dist[far] = empty, 0.0
        return labels, dist

    def _run(self, x_u, x_l, y_l, old, seed) -> KMeansResult:
        rng = np.random.default_rng(seed)
        k = len(old) + self.k_new
        centroids = np.concatenate([old, self._seed_new(x_u, old, rng)]).astype(np.float32)
        x_all = np.concatenate([x_l, x_u])
        labels, dist = self._assign(x_u, centroids, len(old))
        iterations = 0
        while iterations < self.n_iter:
            iterations += 1
            assign = np.concatenate([y_l, labels])
            sums = np.zeros_like(centroids, dtype=np.float64)
            np.add.at(sums, assign, x_all)
            counts = np.bincount(assign, minlength=k)[:, None]
            centroids = (sums / np.maximum(counts, 1)).astype(np.float32)
            new_labels, dist = self._assign(x_u, centroids, len(old))
            converged = np.array_equal(new_labels, labels)
            labels = new_labels
            if converged:
                break
        dist_l = ((x_l - centroids[y_l]) ** 2).sum(1)
        inertia = float(dist.sum() + dist_l.sum())
        return KMeansResult(labels, dist, centroids, inertia, iterations)
