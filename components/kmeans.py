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
import functools

import faiss
import gin
import numpy as np
import torch

from components.metrics import hungarian_mapping


@dataclasses.dataclass
class KMeansResult:
    labels: np.ndarray  # cluster of each unlabeled sample, in 0 .. n_old + k_new - 1
    distances: np.ndarray  # squared distance of each unlabeled sample to its centroid
    centroids: np.ndarray  # [n_old + k_new, D]
    inertia: float
    iterations: int
    k_scores: dict[int, float] | None = None  # score of each candidate k_new, when estimated
    k_estimate: int | None = None  # the number of new classes chosen from those scores
    # squared distance of each unlabeled sample to the nearest centroid not its own
    # (SemiSupervisedKMeans; None where not computed)
    runner_up: np.ndarray | None = None
    # estimate="density": whether each unlabeled sample lies in the dense group (HDBSCAN's) that
    # seeded its cluster; k-means also gives a cluster the sparse samples around the group
    core: np.ndarray | None = None


def gpu_default(use_gpu: bool | None) -> bool:
    """``use_gpu`` as given, or (None) whether faiss sees a GPU. Asking for the GPU where faiss
    sees none is an error that says why, not faiss's missing-attribute one later."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and gpus == 0:
        build = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu (no GPU code)"
        raise ValueError(f"use_gpu=True, but faiss sees no GPU (installed: {build}). Install the "
                         "`gpu` extra (pip install -e '.[gpu]') on a machine with a CUDA GPU, or "
                         "leave use_gpu unset: it is then True exactly where faiss sees one")
    return gpus > 0 if use_gpu is None else use_gpu


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of the CPU ``index`` on GPU 0 (inverted lists, ``nprobe`` and all), sharing the
    process's GPU resources."""
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


@functools.cache
def _gpu_resources() -> faiss.StandardGpuResources:
    """One set of faiss GPU resources (streams, scratch memory) for the process: creating it is
    costly, and ``_nearest`` runs once per Lloyd iteration."""
    return faiss.StandardGpuResources()


def _nearest(x: np.ndarray, centroids: np.ndarray, use_gpu: bool,
             batch_size: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance of every row of ``x``, searched by faiss in
    batches of ``batch_size`` rows (memory stays O(batch · k), not O(N · k))."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = to_gpu(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for lo in range(0, len(x), batch_size):
        d, i = index.search(np.ascontiguousarray(x[lo:lo + batch_size]), 1)
        labels[lo:lo + batch_size], dist[lo:lo + batch_size] = i[:, 0], d[:, 0]
    return labels, dist


def _runner_up(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, use_gpu: bool,
               batch_size: int = 1 << 16) -> np.ndarray:
    """Squared distance of every row of ``x`` to the nearest centroid other than its own
    cluster's (``labels``), searched by faiss in batches; +inf where there is no other."""
    if len(centroids) < 2:
        return np.full(len(x), np.inf, dtype=np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = to_gpu(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(x), dtype=np.float32)
    for lo in range(0, len(x), batch_size):
        d, i = index.search(np.ascontiguousarray(x[lo:lo + batch_size]), 2)
        own = labels[lo:lo + batch_size]
        out[lo:lo + batch_size] = np.where(i[:, 0] == own, d[:, 1], d[:, 0])
    return out


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
        self.use_gpu = gpu_default(use_gpu)

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

    New centroids are seeded by greedy k-means++ (Arthur & Vassilvitskii, 2007) over the
    unlabeled samples, counting distance to the old centroids too, so seeds start away from
    known classes. An empty new cluster is re-seeded at the unlabeled sample farthest from its
    centroid. The best of ``n_init`` seeded runs (lowest inertia) is kept; results are
    deterministic in ``seed``. Restarts matter: on fmnist-7/3 features runs land in local
    optima of very different accuracy and the lowest inertia picks the good ones, so the
    default is 10 (with 3, one seed's new-class accuracy was 49.9 % instead of 83.4 %).
    ``normalize`` L2-normalizes features first (cosine geometry).
    No cluster size is assumed: new classes may be long-tailed too.

    ``k_new=None`` estimates the number of new classes in ``1 .. k_max`` (the candidates are
    scored in :attr:`KMeansResult.k_scores`):

    * ``estimate="silhouette"``: the mean silhouette (Rousseeuw, 1987; scikit-learn's
      per-sample values, on a sample of ``silhouette_sample`` points) of each candidate's
      clustering of the unlabeled samples, old clusters included; the *smallest* k whose mean is
      within one standard error of the best wins (the one-standard-error rule of Breiman et
      al., 1984: silhouettes often plateau past the true k, and a plateau is noise);
    * ``estimate="gcd"``: GCD's rule (Vaze et al., CVPR 2022, §4): a stratified ``held_out``
      share of the labeled samples is clustered as if unlabeled, and the k with the best
      Hungarian accuracy on them wins (ties: the smallest k);
    * ``estimate="probe"`` (default): DTC's probe classes (Han et al., ICCV 2019, §3.3): each
      old class in turn loses its anchor (and, with ``whiten``, its share of the covariance) and
      its labeled samples join the unlabeled ones, so it must be discovered like a new class,
      with ``k + 1`` free clusters. A candidate's score is the mean over probes of the share of
      the probe's labeled samples in its largest cluster. Too few clusters do not hurt the probe
      (new classes merge elsewhere), too many split it, so the score plateaus up to the true k
      and then falls: the *largest* k within one standard error (over probes) of the best wins.

    * ``estimate="density"``: HDBSCAN (Campello et al., PAKDD 2013; scikit-learn's) on the
      unlabeled samples in this geometry finds the dense groups of at least
      ``max(min_cluster_size, min_cluster_share · N)`` samples and calls the rest noise; k is the
      number of groups, **0 included** (a pool of stray samples grows nothing), and the new
      centroids start at the groups' means. k-means then assigns every sample, noise too;
      ``KMeansResult.core`` marks the samples that lie in the group that seeded their cluster.

    ``overcluster=m`` makes ``m`` times as many new clusters (each a pseudo-class of its own).

    ``whiten=True`` clusters in Mahalanobis geometry: features are centred and multiplied by
    ``(Σ + ε·λ_max·I)^(-1/2)``, Σ the within-class covariance of the labeled samples shared by
    all classes (as :class:`components.scores.Mahalanobis` uses it), ``ε = whiten_ridge``. The
    directions along which known classes vary are shrunk, those they do not use (where new
    classes differ) stretched. It is applied before ``normalize``.

    ``fixed_old=True`` keeps each old centroid at its labeled samples' mean: unlabeled samples
    nearest it take its label but do not move it. GCD's k-means lets them move it, which is
    right when the unlabeled set is mostly old classes; when it is mostly new ones (the samples
    a grown model assigns to its discovered classes, :mod:`graphs.consolidate`) a new class
    lying nearest a tail class with a few dozen labeled samples outnumbers them 40 to 1 and
    takes the centroid over, and k-means has one cluster fewer for the new classes.
    """

    def __init__(
        self,
        k_new: int | None = gin.REQUIRED,
        n_iter: int = 100,
        n_init: int = 10,
        seed: int = 0,
        normalize: bool = True,
        use_gpu: bool | None = None,
        k_max: int = 10,
        estimate: str = "probe",
        held_out: float = 0.3,
        silhouette_sample: int = 4000,
        overcluster: int = 1,
        whiten: bool = False,
        whiten_ridge: float = 1e-3,
        min_cluster_size: int = 10,
        min_cluster_share: float = 0.05,
        min_samples: int = 5,
        density_selection: str = "eom",
        fixed_old: bool = False,
    ) -> None:
        if k_new is not None and k_new < 1:
            raise ValueError(f"k_new must be >= 1 (or None to estimate it), got {k_new}")
        if estimate not in ("silhouette", "gcd", "probe", "density"):
            raise ValueError(f"estimate must be 'silhouette', 'gcd', 'probe' or 'density', got {estimate!r}")
        if min_cluster_size < 2 or not 0 <= min_cluster_share < 1 or min_samples < 1:
            raise ValueError(f"need min_cluster_size >= 2, 0 <= min_cluster_share < 1 and min_samples >= 1, "
                             f"got {min_cluster_size}, {min_cluster_share}, {min_samples}")
        if k_max < 1 or overcluster < 1 or not 0 < held_out < 1:
            raise ValueError(f"need k_max >= 1, overcluster >= 1 and 0 < held_out < 1, got "
                             f"{k_max}, {overcluster}, {held_out}")
        self.k_new, self.n_iter, self.n_init, self.seed = k_new, n_iter, n_init, seed
        self.normalize = normalize
        self.use_gpu = gpu_default(use_gpu)
        self.k_max, self.estimate, self.held_out = k_max, estimate, held_out
        self.silhouette_sample, self.overcluster = silhouette_sample, overcluster
        self.whiten, self.whiten_ridge = whiten, whiten_ridge
        self.min_cluster_size, self.min_cluster_share = min_cluster_size, min_cluster_share
        self.min_samples = min_samples
        if density_selection not in ("eom", "leaf"):
            raise ValueError(f"density_selection must be 'eom' or 'leaf', got {density_selection!r}")
        self.density_selection = density_selection
        self.fixed_old = fixed_old

    def __call__(
        self, unlabeled: np.ndarray, labeled: np.ndarray, labeled_targets: np.ndarray, n_old: int
    ) -> KMeansResult:
        """Cluster ``unlabeled`` with ``n_old`` clusters anchored by the labeled samples."""
        y_l = np.asarray(labeled_targets, dtype=np.int64)
        raw_u, raw_l = _check(unlabeled, "unlabeled"), _check(labeled, "labeled")
        if len(raw_u) == 0:
            raise ValueError("no unlabeled samples to cluster")
        x_u, x_l = self.geometry(raw_u, raw_l, y_l, n_old)
        wanted = (self.k_new or (0 if self.estimate == "density" else 1)) * self.overcluster
        if len(x_u) < wanted:
            raise ValueError(
                f"cannot find {wanted} new clusters in {len(x_u)} unlabeled samples: "
                f"let the pool grow (raise the trigger size) or lower k_new"
            )
        missing = sorted(set(range(n_old)) - set(y_l.tolist()))
        if missing:
            raise ValueError(f"old classes {missing} have no labeled sample to anchor a centroid")
        if x_l.shape[1] != x_u.shape[1]:
            raise ValueError(f"feature widths differ: labeled {x_l.shape[1]}, unlabeled {x_u.shape[1]}")
        if self.k_new is not None:
            return self.cluster(x_u, x_l, y_l, n_old, self.k_new * self.overcluster)
        if self.estimate == "density":
            groups = self.dense_groups(x_u, x_l)
            seeds = np.stack([x_u[groups == g].mean(0) for g in range(groups.max() + 1)]) \
                if len(groups) and groups.max() >= 0 else np.zeros((0, x_u.shape[1]), np.float32)
            result = self.cluster(x_u, x_l, y_l, n_old, len(seeds), seeds=seeds)
            result.k_scores = {len(seeds): float(np.mean(groups >= 0))}  # the share in dense groups
            result.k_estimate = len(seeds)
            result.core = (groups >= 0) & (result.labels == n_old + groups)  # new cluster j: group j
            return result
        if self.estimate == "probe":  # each probe gets its own geometry (it may be whitened)
            scores, errors = self._probe_scores(raw_u, raw_l, y_l, n_old)
        else:
            scores, errors = self._scores(x_u, x_l, y_l, n_old)
        top = max(scores, key=lambda k: (scores[k], -k))
        near = [k for k in scores if scores[k] >= scores[top] - errors[top]]
        best = max(near) if self.estimate == "probe" else min(near)
        result = self.cluster(x_u, x_l, y_l, n_old, best * self.overcluster)
        result.k_scores, result.k_estimate = scores, best
        return result

    def cluster(self, x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray, n_old: int, k_new: int,
                seeds: np.ndarray | None = None) -> KMeansResult:
        """Semi-supervised k-means with exactly ``k_new`` free clusters on features already in
        this labeler's :meth:`geometry`: the best of ``n_init`` k-means++ starts, or one run from
        the given new-centroid ``seeds`` ``[k_new, D]``."""
        old = np.stack([x_l[y_l == c].mean(0) for c in range(n_old)])
        if seeds is not None:
            best = self._run(x_u, x_l, y_l, old, k_new, self.seed, seeds=np.asarray(seeds, np.float32))
        else:
            runs = [self._run(x_u, x_l, y_l, old, k_new, self.seed + i) for i in range(self.n_init)]
            best = min(runs, key=lambda r: r.inertia)
        # once, for the kept run only (confident's margin reads it)
        best.runner_up = _runner_up(x_u, best.centroids, best.labels, self.use_gpu)
        return best

    def refine(self, result: KMeansResult, unlabeled: np.ndarray, labeled: np.ndarray,
               labeled_targets: np.ndarray, n_old: int) -> KMeansResult:
        """Semi-supervised k-means on other ``unlabeled`` samples (e.g. the whole stream seen
        so far), started from the new centroids of ``result`` (found by this labeler on a pool
        of the same features): k stays ``result``'s, the labeled samples anchor the old
        clusters as in :meth:`__call__`. The pool says what is new; the larger set says where
        each new class lies (a pool of low-confidence samples holds the side of a new class
        farthest from the known ones, so its centroids sit off-centre)."""
        k_new = len(result.centroids) - n_old
        if k_new < 1:
            raise ValueError(f"nothing to refine: the result has no new cluster ({len(result.centroids)} "
                             f"centroids for {n_old} old classes)")
        y_l = np.asarray(labeled_targets, dtype=np.int64)
        x_u, x_l = self.geometry(_check(unlabeled, "unlabeled"), _check(labeled, "labeled"), y_l, n_old)
        if len(x_u) < k_new:
            raise ValueError(f"cannot refine {k_new} new clusters on {len(x_u)} unlabeled samples")
        return self.cluster(x_u, x_l, y_l, n_old, k_new, seeds=result.centroids[n_old:])

    def dense_groups(self, x_u: np.ndarray, x_l: np.ndarray | None = None) -> np.ndarray:
        """HDBSCAN's new groups among the unlabeled samples, numbered by size (largest first;
        ``-1``: noise or a known class); features already in this labeler's :meth:`geometry`.

        The labeled samples ``x_l`` join the density estimate, so that a group of unlabeled
        samples lying in a known class's region merges with it (a group that is mostly labeled
        is that known class, not a new one) and a pool holding one new class still has other
        groups to be told apart from (HDBSCAN never returns a single group)."""
        from sklearn.cluster import HDBSCAN

        size = max(self.min_cluster_size, int(self.min_cluster_share * len(x_u)))
        if len(x_u) < size:
            return np.full(len(x_u), -1)
        x_l = np.zeros((0, x_u.shape[1]), x_u.dtype) if x_l is None else x_l
        density = HDBSCAN(min_cluster_size=size, min_samples=min(self.min_samples, size), copy=True,
                          cluster_selection_method=self.density_selection)
        found = density.fit_predict(np.concatenate([x_l, x_u]))
        on_labeled, found = found[: len(x_l)], found[len(x_l):]
        new = [g for g in np.unique(found[found >= 0])
               if (on_labeled == g).sum() < (found == g).sum()]  # mostly unlabeled: a new group
        counts = [(found == g).sum() for g in new]
        by_size = np.array(new)[np.argsort(counts, kind="stable")[::-1]]
        renumber = {int(g): rank for rank, g in enumerate(by_size)}
        return np.array([renumber.get(int(g), -1) for g in found], dtype=np.int64)

    def _scores(self, x_u, x_l, y_l, n_old: int) -> tuple[dict[int, float], dict[int, float]]:
        """Score every candidate number of new classes (higher is better), with the standard
        error of each score (0 for GCD's rule, whose ties go to the smallest k)."""
        candidates = self._candidates(len(x_u))
        if self.estimate == "silhouette":
            from sklearn.metrics import silhouette_samples

            rng = np.random.default_rng(self.seed)
            sample = rng.choice(len(x_u), min(len(x_u), self.silhouette_sample), replace=False)
            out, errors = {}, {}
            for k in candidates:
                labels = self.cluster(x_u, x_l, y_l, n_old, k).labels[sample]
                if len(np.unique(labels)) < 2:
                    out[k], errors[k] = -1.0, 0.0
                    continue
                values = silhouette_samples(x_u[sample], labels)
                out[k] = float(values.mean())
                errors[k] = float(values.std() / np.sqrt(len(values)))
            return out, errors
        # GCD: a stratified share of the labeled samples joins the unlabeled ones
        rng = np.random.default_rng(self.seed)
        held = np.concatenate([np.array([], dtype=np.int64)] + [
            rng.permutation(idx)[: max(1, int(self.held_out * len(idx)))]
            for idx in (np.flatnonzero(y_l == c) for c in range(n_old)) if len(idx) > 1
        ])
        if len(held) == 0:
            raise ValueError("k_new=None with estimate='gcd' needs labeled samples to hold out "
                             "(at least 2 in some old class): give labeled samples, or a k_new")
        anchor = np.setdiff1d(np.arange(len(y_l)), held)
        x_mix = np.concatenate([x_u, x_l[held]])
        out = {}
        for k in candidates:
            labels = self.cluster(x_mix, x_l[anchor], y_l[anchor], n_old, k).labels[len(x_u):]
            mapping = hungarian_mapping(y_l[held], labels)
            out[k] = float(np.mean([mapping.get(p, -1) == t for p, t in zip(labels, y_l[held], strict=True)]))
        return out, dict.fromkeys(out, 0.0)

    def _candidates(self, n_unlabeled: int) -> range:
        return range(1, min(self.k_max, n_unlabeled - 1) + 1)

    def geometry(self, x_u, x_l, y_l, n_old: int) -> tuple[np.ndarray, np.ndarray]:
        """The features k-means sees: whitened by the labeled classes (``whiten``), then
        L2-normalized (``normalize``)."""
        if self.whiten and x_l.shape[1] == x_u.shape[1] and len(np.unique(y_l)) == n_old:
            x_u, x_l = whitened(x_u, x_l, y_l, self.whiten_ridge)
        return self._prepare(x_u), self._prepare(x_l)

    def _probe_scores(self, raw_u, raw_l, y_l, n_old: int) -> tuple[dict[int, float], dict[int, float]]:
        """DTC's probe-class scores of every candidate k, and their standard errors over probes.
        The probe class is hidden from all the labeled data defines: its anchor, and its share of
        the whitening covariance (whitened with it, a class looks like the isotropic blob k-means
        splits last, and the score never falls)."""
        probes = [c for c in range(n_old) if np.count_nonzero(y_l == c) >= 2]
        if n_old < 2 or not probes:
            raise ValueError("k_new=None with estimate='probe' needs at least 2 old classes, one with "
                             "2 or more labeled samples, to probe with: give labeled samples, or a k_new")
        candidates = self._candidates(len(raw_u))
        table = np.zeros((len(probes), len(candidates)))
        for i, c in enumerate(probes):
            probe, anchored = y_l == c, y_l != c
            y_anchored = y_l[anchored] - (y_l[anchored] > c)  # old classes renumbered 0..n_old-2
            x_mix, x_anchored = self.geometry(np.concatenate([raw_u, raw_l[probe]]), raw_l[anchored],
                                               y_anchored, n_old - 1)
            for j, k in enumerate(candidates):
                labels = self.cluster(x_mix, x_anchored, y_anchored, n_old - 1, k + 1).labels[len(raw_u):]
                table[i, j] = np.bincount(labels).max() / len(labels)
        error = table.std(0) / np.sqrt(len(probes))
        return ({k: float(v) for k, v in zip(candidates, table.mean(0), strict=True)},
                {k: float(v) for k, v in zip(candidates, error, strict=True)})

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """L2-normalized rows when ``normalize`` (``x`` was checked by :func:`_check`)."""
        if self.normalize:
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return x

    def _assign(self, x_u: np.ndarray, centroids: np.ndarray, n_old: int):
        """Nearest centroid for each unlabeled sample; an empty new cluster takes the sample
        farthest from its centroid (the worst-served one)."""
        labels, dist = _nearest(x_u, centroids, self.use_gpu)
        for empty in sorted(set(range(n_old, len(centroids))) - set(labels.tolist())):
            far = int(np.argmax(dist))
            labels[far], dist[far] = empty, 0.0
        return labels, dist

    def _run(self, x_u, x_l, y_l, old, k_new: int, seed: int,
             seeds: np.ndarray | None = None) -> KMeansResult:
        rng = np.random.default_rng(seed)
        k = len(old) + k_new
        if seeds is None:
            seeds = kmeans_plusplus(x_u, k_new, rng, start=old)
        centroids = np.concatenate([old, seeds]).astype(np.float32)
        x_all = np.concatenate([x_l, x_u])
        labels, dist = self._assign(x_u, centroids, len(old))
        iterations = 0
        while iterations < self.n_iter:
            iterations += 1
            sums, counts = _means(x_all, np.concatenate([y_l, labels]), k)
            centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
            if self.fixed_old:
                centroids[:len(old)] = old
            new_labels, dist = self._assign(x_u, centroids, len(old))
            converged = np.array_equal(new_labels, labels)
            labels = new_labels
            if converged:
                break
        dist_l = ((x_l - centroids[y_l]) ** 2).sum(1)
        inertia = float(dist.sum() + dist_l.sum())
        return KMeansResult(labels, dist, centroids, inertia, iterations)


def whitened(x_u: np.ndarray, x_l: np.ndarray, y_l: np.ndarray,
             ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets centred on the labeled mean and multiplied by ``(Σ + ε λ_max I)^(-1/2)``,
    Σ the labeled samples' within-class covariance shared by all classes."""
    x_l64 = x_l.astype(np.float64)
    classes = np.unique(y_l)
    means = np.stack([x_l64[y_l == c].mean(0) for c in classes])
    centred = x_l64 - means[np.searchsorted(classes, y_l)]
    values, vectors = np.linalg.eigh(centred.T @ centred / len(x_l64))
    values = np.maximum(values, 0.0) + ridge * max(values.max(), 1e-12)
    transform = (vectors / np.sqrt(values)) @ vectors.T
    mean = x_l64.mean(0)
    return (((x_u - mean) @ transform).astype(np.float32),
            ((x_l64 - mean) @ transform).astype(np.float32))


def confident(result: KMeansResult, fraction: float = 1.0, first: int = 0,
              margin: float | None = None) -> np.ndarray:
    """Mask of the samples to keep as pseudo-labels: in each cluster ``>= first``, the
    ``fraction`` nearest their centroid (at least one per cluster); samples of clusters below
    ``first`` (e.g. the old classes) are all kept. The rest can wait in the pool.

    ``margin``: moreover keep only the samples (of every cluster) whose squared distance to
    their centroid is at most ``margin`` times that to the nearest other centroid
    (``result.runner_up``): a sample about as near to another cluster lies on the boundary
    between two classes, where k-means' assignment is a coin toss. 1.0 keeps all."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction}")
    keep = np.ones(len(result.labels), dtype=bool)
    for c in np.unique(result.labels[result.labels >= first]):
        members = np.flatnonzero(result.labels == c)
        n = max(1, int(np.ceil(fraction * len(members))))
        order = members[np.argsort(result.distances[members], kind="stable")]
        keep[order[n:]] = False
    if margin is not None:
        if not 0 < margin <= 1:
            raise ValueError(f"the margin must be in (0, 1] (a distance ratio), got {margin}")
        if result.runner_up is None:
            raise ValueError("a margin needs each sample's distance to the nearest other centroid "
                             "(KMeansResult.runner_up), which this labeler's result does not have")
        keep &= result.distances <= margin * result.runner_up
    return keep
