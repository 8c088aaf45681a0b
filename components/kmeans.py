"""k-means on faiss: turn features into clusters, and a pool of unlabeled features into
pseudo-labels.

* :class:`KMeans` — Lloyd's k-means. Seeds come from greedy k-means++ (Arthur & Vassilvitskii,
  2007, with the candidate trials of scikit-learn's variant) run on a random subsample, which
  is where scikit-learn spends most of its time on large data; the Lloyd iterations then run on
  every point, with faiss's nearest-centroid search (on the GPU when faiss-gpu and a GPU are
  present) streamed in batches so a million 512-d points need no N x k matrix, and stop when
  the centroids move less than ``tol`` (scikit-learn's criterion). Empty clusters are re-seeded
  at the worst-served points.
* :class:`SemiSupervisedKMeans` — the same with labeled samples fixed to their class (GCD, Vaze
  et al. CVPR 2022, §3.2): the first ``n_old`` clusters *are* the old classes (centroids start
  at the labeled class means) and the ``k_new`` further clusters are the discovered classes.
"""

from __future__ import annotations

import dataclasses

import faiss
import gin
import numpy as np
import torch


@dataclasses.dataclass
class KMeansResult:
    labels: np.ndarray  # cluster of each unlabeled sample, in 0 .. n_old + k_new - 1
    distances: np.ndarray  # squared distance of each unlabeled sample to its centroid
    centroids: np.ndarray  # [n_old + k_new, D]
    inertia: float
    iterations: int


def _gpu_default(use_gpu: bool | None) -> bool:
    return faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu


def _nearest(x: np.ndarray, centroids: np.ndarray, use_gpu: bool,
             batch_size: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance of every row of ``x``, searched by faiss in
    batches of ``batch_size`` rows (memory stays O(batch · k), not O(N · k))."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for lo in range(0, len(x), batch_size):
        d, i = index.search(np.ascontiguousarray(x[lo:lo + batch_size]), 1)
        labels[lo:lo + batch_size], dist[lo:lo + batch_size] = i[:, 0], d[:, 0]
    return labels, dist


def _means(x: np.ndarray, labels: np.ndarray, k: int,
           batch_size: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (float32 adds batch by batch into a float64 total) and counts."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        part = torch.zeros(k, x.shape[1]).index_add_(
            0, torch.from_numpy(labels[lo:lo + batch_size]), torch.from_numpy(x[lo:lo + batch_size]))
        sums += part.numpy()
    return sums, np.bincount(labels, minlength=k)


def _lloyd(x: np.ndarray, centroids: np.ndarray, n_iter: int, tol: float, use_gpu: bool,
           batch_size: int) -> KMeansResult:
    """Lloyd iterations from ``centroids`` until the squared centroid shift is at most ``tol``
    (or the assignment stops changing), at most ``n_iter`` times; empty clusters are re-seeded
    at the points farthest from their centroid."""
    k = len(centroids)
    labels, dist = _nearest(x, centroids, use_gpu, batch_size)
    iterations = 0
    while iterations < n_iter:
        iterations += 1
        sums, counts = _means(x, labels, k, batch_size)
        new = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            new[empty] = x[np.argsort(-dist)[: len(empty)]]
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        new_labels, dist = _nearest(x, centroids, use_gpu, batch_size)
        settled = np.array_equal(new_labels, labels)
        labels = new_labels
        if (shift <= tol or settled) and not len(empty):
            break
    return KMeansResult(labels, dist, centroids, float(dist.astype(np.float64).sum()), iterations)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator,
                    n_trials: int | None = None, start: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-means++ seeds (Arthur & Vassilvitskii, 2007): each next seed is drawn with
    probability ∝ D(x)², taking the best of ``n_trials`` draws (default ``2 + ln k``, as in
    scikit-learn). ``start`` are centres already fixed (e.g. old-class means): seeds then start
    away from them. Returns ``[k, D]`` seeds, rows of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_trials = n_trials or 2 + int(np.log(k))
    norms = (x.astype(np.float64) ** 2).sum(1)

    def d2_to(rows: np.ndarray) -> np.ndarray:  # [len(rows), N] squared distances
        d = norms[None, :] - 2 * (x[rows] @ x.T) + norms[rows][:, None]
        return np.maximum(d, 0.0)

    if start is not None and len(start):
        closest = _nearest(x, np.asarray(start, np.float32), False)[1].astype(np.float64)
        chosen = []
    else:
        first = int(rng.integers(len(x)))
        chosen, closest = [first], d2_to(np.array([first]))[0]
    while len(chosen) < k:
        total = closest.sum()
        if total <= 0:  # every point sits on a seed: any unused point will do
            rest = np.setdiff1d(np.arange(len(x)), chosen)
            chosen.append(int(rng.choice(rest)))
            continue
        candidates = np.searchsorted(np.cumsum(closest), rng.random(n_trials) * total)
        candidates = np.minimum(candidates, len(x) - 1)
        trial = np.minimum(closest[None, :], d2_to(candidates))
        best = int(np.argmin(trial.sum(1)))
        chosen.append(int(candidates[best]))
        closest = trial[best]
    return x[chosen]


def _check(x, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} features must be [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise ValueError(f"{what} features: {bad} rows contain NaN or inf; check the model and the "
                         "cache (nothing was clustered)")
    return x


@gin.configurable
class KMeans:
    """Lloyd's k-means on faiss, seeded cheaply on a subsample (see the module docstring).

    Seeding: ``init_sample`` points (default ``max(20 k, 2,000)``) are drawn once; greedy
    k-means++ plus Lloyd's iterations on that subsample are repeated ``n_init`` times and the
    seeds with the lowest subsample inertia are kept. On well-separated data, one k-means++ run
    misses a cluster with fair probability (two seeds in one blob); repeating on the subsample
    costs little and makes that rare. Then at most ``n_iter`` Lloyd iterations run on every
    point, stopping once the squared centroid shift is at most ``tol`` times the mean
    per-feature variance (scikit-learn's rule) or the assignment stops changing.
    Deterministic in ``seed``.
    """

    def __init__(self, k: int = gin.REQUIRED, n_iter: int = 20, tol: float = 1e-4, seed: int = 0,
                 n_init: int = 5, init_sample: int | None = None, batch_size: int = 1 << 16,
                 use_gpu: bool | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        self.k, self.n_iter, self.tol, self.seed = k, n_iter, tol, seed
        self.n_init, self.init_sample, self.batch_size = n_init, init_sample, batch_size
        self.use_gpu = _gpu_default(use_gpu)

    def fit(self, x) -> KMeansResult:
        x = _check(x, "k-means")
        if len(x) < self.k:
            raise ValueError(f"cannot make {self.k} clusters of {len(x)} points: lower k")
        rng = np.random.default_rng(self.seed)
        m = min(len(x), self.init_sample or max(20 * self.k, 2000))
        sample = x[np.sort(rng.choice(len(x), m, replace=False))] if m < len(x) else x
        tol = self.tol * float(sample.var(0).mean())
        trials = [_lloyd(sample, kmeans_plusplus(sample, self.k, rng), self.n_iter, tol,
                         self.use_gpu, self.batch_size) for _ in range(self.n_init)]
        seeds = min(trials, key=lambda r: r.inertia).centroids
        return _lloyd(x, seeds, self.n_iter, tol, self.use_gpu, self.batch_size)


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
        self.use_gpu = _gpu_default(use_gpu)

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
        x = _check(x, what)
        if self.normalize:
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return x

    def _seed_new(self, x_u: np.ndarray, old: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return kmeans_plusplus(x_u, self.k_new, rng, start=old)

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
            sums, counts = _means(x_all, np.concatenate([y_l, labels]), k)
            centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
            new_labels, dist = self._assign(x_u, centroids, len(old))
            converged = np.array_equal(new_labels, labels)
            labels = new_labels
            if converged:
                break
        dist_l = ((x_l - centroids[y_l]) ** 2).sum(1)
        inertia = float(dist.sum() + dist_l.sum())
        return KMeansResult(labels, dist, centroids, inertia, iterations)
