"""Per-image costs of the library's stages on this machine, and what they come to for ImageNet-1k.

    python scripts/scale_costs.py --json costs.json          # 64 and 224 px, about 3 minutes on 2 cores
    python scripts/scale_costs.py --tiny --json costs.json   # toy sizes, seconds (tests)

What is measured (docs/scale.md#imagenet-1k-memory-and-time-per-stage), each the median of
``--repeats`` runs, on the CPU, with the library's own code:

* **train / distill / adapt**: ``graphs.train.train``, ``distill`` and ``adapt`` (one epoch of a
  few batches of random uint8 images, ``BatchAugment`` pad-and-crop + flip) on the ResNet-18 of
  ``gin/models/resnet18_cifar.gin`` (CIFAR stem) for sizes up to 64 px and the torchvision
  ImageNet stem above: seconds per image, FLOPs per image (``torch.utils.flop_counter``) and the
  activation bytes a training forward keeps for its backward, per image;
* **encode**: ``graphs.encode`` forward only (``_encoded``), and the whole ``encode_entry`` once
  (fingerprints, forward, cache write); the SHA-1 rate of the data fingerprint;
* **feature cache**: bytes per image of ``components.cache.FeatureCache`` entries (features,
  projected, logits as float32, targets and ids as int64) and their write time;
* **image store**: ``components.data.store.write_store`` bytes per image (uint8 3·S·S) and
  ``build_store`` time per JPEG (one process) on generated ~400×350 JPEGs; the decode+resize
  alone (``_DecodeFiles``, what the build's workers run), and PIL's reduced-size ``draft``
  decoding beside it (not what the library does);
* **k-means**: ``components.kmeans``'s nearest-centroid search (faiss-cpu ``IndexFlatL2``) and
  centroid update per point per iteration, greedy k-means++ per point per seed, and a whole
  ``KMeans.fit`` as a check of the model;
* **scoring**: ``graphs.online.online`` over cached outputs with ``energy``, ``Mahalanobis`` and
  exact ``KNNDistance`` (per stream sample; kNN per sample per bank row), and ``Mahalanobis.fit``
  per labeled sample.

Then every stage is extrapolated to ImageNet-1k (1,281,167 training images) at each measured
size: bytes on disk / in memory, CPU time (measured per-image cost × images, one process on
this machine), an A100 estimate for the network stages scaled by FLOPs from FFCV's published
ResNet-18 run (see ``FFCV``), and how many processes / GPUs the library uses for it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CPU = torch.device("cpu")

# FFCV's ResNet-18 on ImageNet, one A100 (github.com/libffcv/ffcv README, table "ImageNet";
# config github.com/libffcv/ffcv-imagenet rn18_configs/rn18_16_epochs.yaml): 16 epochs in 35.0
# minutes, batch 1024, fp16 autocast, channels-last, the FFCV loader; resolution 160 px for
# epochs 0-11 and 192 px for epochs 12-15 (its get_resolution: start_ramp 11, end_ramp 13,
# rounded to multiples of 32), plus one validation pass at the end (counted as training time
# here, so the rate below is a lower bound of what the A100 did).
FFCV = {"gpu": "1 x A100", "epochs": 16, "minutes": 35.0, "epochs_at": {160: 12, 192: 4},
        "source": "https://github.com/libffcv/ffcv#imagenet (ResNet-18, 16 epochs, 1 x A100, 35.0 min)"}


@dataclasses.dataclass
class Sizes:
    resolutions: tuple[int, ...]
    batch: int  # training batch; one batch per timed training call
    encode_images: int
    repeats: int
    jpegs: int  # generated JPEG files (train + val trees)
    jpeg_size: tuple[int, int]  # width, height
    kmeans_n: int
    kmeans_d: int
    kmeans_ks: tuple[int, ...]
    pp_n: int  # k-means++ points and seeds
    pp_k: int
    fit_n: int  # Mahalanobis fit samples / kNN bank
    classes: int  # old classes of the measured models (students grow by as many)
    score_n: int  # stream samples scored
    knn_queries: int
    cache_rows: int
    fingerprint_mb: int


SIZES = {
    "full": Sizes(resolutions=(64, 224), batch=8, encode_images=16, repeats=3, jpegs=300,
                  jpeg_size=(400, 350), kmeans_n=100_000, kmeans_d=512, kmeans_ks=(100, 1000), pp_n=20_000,
                  pp_k=20, fit_n=20_000, classes=500, score_n=1_024, knn_queries=512, cache_rows=8_192,
                  fingerprint_mb=64),
    "tiny": Sizes(resolutions=(16, 72), batch=4, encode_images=4, repeats=1, jpegs=8, jpeg_size=(80, 70),
                  kmeans_n=2_000, kmeans_d=32, kmeans_ks=(10, 20), pp_n=500, pp_k=5, fit_n=400, classes=10,
                  score_n=128, knn_queries=32, cache_rows=256, fingerprint_mb=1),
}

# The ImageNet-1k protocol the extrapolation assumes: SimGCD's (Wen et al., ICCV 2023) 500 old +
# 500 new classes, and the split rule of DESIGN.md (first half of each old class labeled, the
# second half of every class is the stream).
ASSUMPTIONS = {
    "images": IMAGENET_TRAIN,
    "stream": IMAGENET_TRAIN - IMAGENET_TRAIN // 2,  # the second half of every class
    "labeled": IMAGENET_TRAIN // 4,  # first halves of 500 old classes, before the long-tail cut: at most
    "old_classes": 500,
    "classes": 1000,  # logit width after discovery (the cache row's upper bound)
    "pool": 100_000,  # SamplePool.trigger_size, a choice
    "kmeans_dim": 512,  # cluster_on = 'features' (ResNet-18); 'projected' is 64-d, 8x cheaper
    "n_init": 10, "n_iter": 100,  # SemiSupervisedKMeans defaults (n_iter is a maximum)
    "batch": 256,  # for the memory of a training step
    "store_chunk": 1024,  # components.data.store.CHUNK: images a build writes between flushes
}


# ----------------------------------------------------------------------------------------- helpers


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def network(size: int, classes: int) -> torch.nn.Module:
    """ResNet-18 as gin/models/resnet18_cifar.gin builds it (CIFAR stem) up to 64 px; the
    torchvision ImageNet stem (7x7 stride-2 conv + max-pool) above."""
    import torchvision

    from components.models import Network, TorchvisionBackbone

    torch.manual_seed(0)
    return Network(TorchvisionBackbone(torchvision.models.resnet18, cifar_stem=size <= 64),
                   num_classes=classes)


def random_images(n: int, size: int, classes: int, name: str, seed: int = 0):
    from components.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageSet(pixels, torch.arange(n) % classes, [str(c) for c in range(classes)], name)


def augment_for(size: int):
    from components.data import BatchAugment

    return BatchAugment(IMAGENET_MEAN, IMAGENET_STD, pad=max(1, size // 8), flip=True)


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(size: int, classes: int) -> dict[str, float]:
    """FLOPs per image of the network calls of each graph's step, counted on the meta device
    (shapes only): train = ``encode`` + cross-entropy, forward and backward; distill = teacher
    forward + grown student forward and backward (``DistillLoss``); adapt = ``encode`` of two
    views, forward and backward; encode = ``encode`` forward. The losses' own arithmetic (a
    batch x batch similarity at most) is left out."""
    from components.losses import DistillLoss

    F = torch.nn.functional
    with torch.device("meta"):
        model = network(size, classes)
        student = network(size, 2 * classes)  # the shapes of the teacher grown by as many classes
    x = torch.randn(2, 3, size, size, device="meta")
    y = torch.tensor([0, 1], device="meta")

    def train_step():
        F.cross_entropy(model.encode(x)["logits"], y).backward()

    def distill_step():
        with torch.no_grad():
            teacher = model(x)
        DistillLoss()(student(x), y, teacher).backward()

    def adapt_step():
        first, second = model.encode(x), model.encode(x)
        ((first["projected"] * second["projected"]).sum() + F.cross_entropy(first["logits"], y)).backward()

    def encode_step():
        with torch.no_grad():
            model.eval().encode(x)
        model.train()

    steps = {"train": train_step, "distill": distill_step, "adapt": adapt_step, "encode": encode_step}
    return {name: flops(fn) / 2 for name, fn in steps.items()}


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors a training forward (``model.encode`` + cross-entropy, as
    ``graphs.train.train``'s step) keeps for its backward, each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model.encode(x)["logits"], y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in seen.items() if ptr not in params)


# ------------------------------------------------------------------------------------ measurements


def measure_network(size: int, sizes: Sizes) -> dict:
    """train / distill / adapt / encode at ``size`` px: seconds, FLOPs, activation bytes per image."""
    from components.cache import FeatureCache, data_fingerprint
    from components.losses import DistillLoss, GCDContrastive
    from graphs.encode import _encoded, encode_entry
    from graphs.train import adapt, distill, train

    b, c = sizes.batch, sizes.classes
    model = network(size, c)
    augment = augment_for(size)
    images = random_images(b, size, c, f"random-{size}px")
    labeled = random_images(b // 2, size, c, "labeled", seed=1)  # adapt: one batch of both halves
    unlabeled = random_images(b - b // 2, size, c, "unlabeled", seed=2)
    out: dict = {"size": size, "stem": "cifar" if size <= 64 else "imagenet", "batch": b}

    def run_train():
        return train(model, images, augment, CPU, epochs=1, batch_size=b, sampler="instance", optimizer=sgd)

    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).grow(c)
    taught = random_images(b, size, 2 * c, "labeled+pseudo", seed=3)

    def run_distill():
        return distill(student, teacher, taught, augment, CPU, loss=DistillLoss(), epochs=1, batch_size=b,
                       sampler="instance", optimizer=sgd)

    def run_adapt():
        return adapt(model, labeled, unlabeled, augment, CPU, loss=GCDContrastive(), epochs=1, batch_size=b,
                     optimizer=sgd)

    n_adapt = len(labeled) + len(unlabeled)
    for name, fn, n in (("train", run_train, b), ("distill", run_distill, b), ("adapt", run_adapt, n_adapt)):
        seconds, times = median_seconds(fn, sizes.repeats)
        out[name] = {"seconds_per_image": seconds / n, "images": n, "runs_s": times}

    to_encode = random_images(sizes.encode_images, size, c, f"encode-{size}px", seed=4)
    seconds, times = median_seconds(
        lambda: _encoded(model, to_encode, augment, CPU, 64, 0, 0), sizes.repeats)
    out["encode"] = {"seconds_per_image": seconds / len(to_encode), "images": len(to_encode), "runs_s": times}
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        start = time.perf_counter()
        arrays, key, _ = encode_entry(model, to_encode, augment, cache, CPU, batch_size=64)
        whole = time.perf_counter() - start
        file_bytes = cache.path(key).stat().st_size
    row_bytes = {name: int(a.itemsize * (a[0].size if a.ndim > 1 else 1)) for name, a in arrays.items()}
    out["encode_entry"] = {"seconds_per_image": whole / len(to_encode), "images": len(to_encode),
                           "file_bytes": file_bytes, "row_bytes": row_bytes,
                           "dims": {n: int(a.shape[1]) for n, a in arrays.items() if a.ndim > 1},
                           "dtypes": {n: str(a.dtype) for n, a in arrays.items()}}

    out["flops_per_image"] = step_flops(size, c)
    x = augment.eval()(images.images[:2])
    out["activation_bytes_per_image"] = saved_activation_bytes(model, x, images.targets[:2]) / 2
    out["parameters"] = sum(p.numel() for p in model.parameters())
    # the data fingerprint: SHA-1 over every image byte, once per encode call
    n = max(1, sizes.fingerprint_mb * 2**20 // (3 * size * size))
    blob = random_images(n, size, c, "fingerprint")
    seconds, _ = median_seconds(lambda: data_fingerprint(blob.images, blob.targets, blob.name), sizes.repeats)
    out["fingerprint"] = {"seconds_per_image": seconds / n, "bytes_per_second": n * 3 * size * size / seconds}
    return out


def ffcv_reference() -> dict:
    """FLOPs per image of FFCV's ResNet-18 step at 160 and 192 px, and the A100's FLOP rate they imply."""
    import torchvision

    with torch.device("meta"):  # shapes only: the counter needs no numbers
        model = torchvision.models.resnet18()
    per_res = {}
    for res in FFCV["epochs_at"]:
        x = torch.randn(2, 3, res, res, device="meta")

        def step(x=x):
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1], device="meta")).backward()

        per_res[res] = flops(step) / 2
    total = sum(per_res[r] * e for r, e in FFCV["epochs_at"].items()) * IMAGENET_TRAIN
    seconds = FFCV["minutes"] * 60
    return {**FFCV, "flops_per_image": per_res, "flops_per_second": total / seconds,
            "images_per_second": FFCV["epochs"] * IMAGENET_TRAIN / seconds}


def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields plus fine noise, quality 90) in an ImageFolder
    train / val tree of 4 classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    w, h = size
    for i in range(n):
        split = "val" if i >= n - max(4, n // 5) else "train"  # every class in both trees
        folder = root / split / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        files.append(path)
    return files


def measure_images(sizes: Sizes, tmp: Path) -> dict:
    """JPEG decode+resize and store build per image, store bytes per image, at every size."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from components.data.store import _DecodeFiles, build_store, write_store

    files = make_jpegs(tmp / "tree", sizes.jpegs, sizes.jpeg_size)
    out: dict = {"jpegs": len(files), "jpeg_pixels": list(sizes.jpeg_size),
                 "jpeg_mean_bytes": float(np.mean([f.stat().st_size for f in files]))}
    names = [str(f) for f in files]
    for size in sizes.resolutions:
        decode = _DecodeFiles(names, size)
        seconds, _ = median_seconds(lambda decode=decode: [decode[i] for i in range(len(decode))],
                                    sizes.repeats)

        def drafted(size=size):
            for name in names:
                with Image.open(name) as image:
                    image.draft("RGB", (size, size))
                    F.resize(F.pil_to_tensor(image.convert("RGB")), [size, size], antialias=True)

        draft_s, _ = median_seconds(drafted, sizes.repeats)
        builds = []
        for r in range(sizes.repeats):
            start = time.perf_counter()
            build_store(tmp / "tree", tmp / f"store-{size}-{r}", image_size=size, num_workers=0,
                        progress=False)
            builds.append(time.perf_counter() - start)
        n = max(2, sizes.encode_images)
        path = write_store(tmp / f"written-{size}", "train", torch.zeros(n, 3, size, size, dtype=torch.uint8),
                           list(range(n)), [str(i) for i in range(n)])
        header = np.load(path, mmap_mode="r").offset
        payload = path.stat().st_size - header
        out[str(size)] = {
            "decode_resize_s": seconds / len(names),
            "draft_decode_resize_s": draft_s / len(names),
            "build_s": statistics.median(builds) / len(names),
            "store_bytes_per_image": payload / n,
            "npy_header_bytes": header,
            "sidecar_bytes_per_image": path.with_suffix(".json").stat().st_size / n,
        }
    return out


def measure_cache(sizes: Sizes, dims: dict[str, int], classes: int, tmp: Path) -> dict:
    """Bytes and write time per image of FeatureCache entries of ``dims`` with ``classes`` logits,
    from two entry lengths (bytes = fixed + per_row · rows)."""
    from components.cache import FeatureCache

    cache = FeatureCache(str(tmp / "cache"))
    rng = np.random.default_rng(0)
    widths = {"features": dims["features"], "projected": dims["projected"], "logits": classes}
    sizes_bytes, seconds = {}, {}
    for rows in (sizes.cache_rows // 4, sizes.cache_rows):
        arrays = {name: rng.standard_normal((rows, w), dtype=np.float32) for name, w in widths.items()}
        arrays |= {"targets": np.arange(rows, dtype=np.int64), "ids": np.arange(rows, dtype=np.int64)}
        seconds[rows], _ = median_seconds(lambda arrays=arrays, rows=rows: cache.save(f"k{rows}", arrays),
                                          sizes.repeats)
        sizes_bytes[rows] = cache.path(f"k{rows}").stat().st_size
    small, big = sorted(sizes_bytes)
    per_row = (sizes_bytes[big] - sizes_bytes[small]) / (big - small)
    payload = 4 * sum(widths.values()) + 8 + 8
    return {"widths": widths, "payload_bytes_per_image": payload, "file_bytes_per_image": per_row,
            "file_fixed_bytes": sizes_bytes[big] - per_row * big, "write_s_per_image": seconds[big] / big}


def blobs(n: int, d: int, centers: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d), dtype=np.float32) * 3
    return (means[rng.integers(centers, size=n)] + rng.standard_normal((n, d), dtype=np.float32))


def measure_kmeans(sizes: Sizes) -> dict:
    from components.kmeans import KMeans, _means, _nearest, kmeans_plusplus

    x = blobs(sizes.kmeans_n, sizes.kmeans_d, 50)
    out: dict = {"n": len(x), "d": x.shape[1], "search": {}, "means": {}}
    rng = np.random.default_rng(0)
    for k in sizes.kmeans_ks:
        centroids = x[rng.choice(len(x), k, replace=False)]
        search_s, _ = median_seconds(lambda c=centroids: _nearest(x, c, False), sizes.repeats)
        labels, _ = _nearest(x, centroids, False)
        means_s, _ = median_seconds(lambda labels=labels, k=k: _means(x, labels, k), sizes.repeats)
        out["search"][str(k)] = search_s / (len(x) * k * x.shape[1])
        out["means"][str(k)] = means_s / (len(x) * x.shape[1])
    sample = x[: sizes.pp_n]
    trials = 2 + int(np.log(sizes.pp_k))
    pp_s, _ = median_seconds(lambda: kmeans_plusplus(sample, sizes.pp_k, np.random.default_rng(0)),
                             sizes.repeats)
    out["kmeanspp"] = pp_s / (len(sample) * sizes.pp_k * trials * x.shape[1])
    k = sizes.kmeans_ks[0]
    fitter = KMeans(k=k, n_iter=5, use_gpu=False)
    start = time.perf_counter()
    result = fitter.fit(x)
    out["fit"] = {"k": k, "seconds": time.perf_counter() - start, "iterations": result.iterations,
                  "lloyd_model_s": (result.iterations + 1) * out["search"][str(k)] * len(x) * k * x.shape[1]
                  + result.iterations * out["means"][str(k)] * len(x) * x.shape[1]}
    # per point per centroid per dimension at the largest k measured (the extrapolation's k)
    out["search_s"] = out["search"][str(max(sizes.kmeans_ks))]
    out["means_s"] = statistics.median(out["means"].values())
    return out


def measure_scores(sizes: Sizes) -> dict:
    from components.pool import SamplePool
    from components.scores import KNNDistance, Mahalanobis, energy
    from graphs.online import online

    d, c = sizes.kmeans_d, sizes.classes
    rng = np.random.default_rng(0)
    labeled = {"features": blobs(sizes.fit_n, d, c), "targets": np.arange(sizes.fit_n) % c}
    n = sizes.score_n
    stream = {"features": blobs(n, d, c, seed=1), "logits": rng.standard_normal((n, c), dtype=np.float32),
              "projected": rng.standard_normal((n, 64), dtype=np.float32),
              "ids": np.arange(n), "targets": np.zeros(n, dtype=np.int64)}

    def run(score, rows=n):
        part = {k: v[:rows] for k, v in stream.items()}
        return online(part, score, SamplePool(trigger_size=rows + 1, threshold=math.inf))

    out: dict = {"d": d, "classes": c, "fit_n": sizes.fit_n}
    maha = Mahalanobis()
    fit_s, _ = median_seconds(lambda: maha.fit(labeled), sizes.repeats)
    out["mahalanobis_fit_s"] = fit_s / sizes.fit_n
    out["energy_s"] = median_seconds(lambda: run(energy), sizes.repeats)[0] / n
    out["mahalanobis_s"] = median_seconds(lambda: run(maha), sizes.repeats)[0] / n
    knn = KNNDistance(k=50).fit(labeled)
    q = sizes.knn_queries
    out["knn_s"] = median_seconds(lambda: run(knn, q), sizes.repeats)[0] / q
    out["knn_s_per_bank_row"] = out["knn_s"] / sizes.fit_n
    return out


# ---------------------------------------------------------------------------------- extrapolation


def _seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def extrapolate(size: int, net: dict, images: dict, cache: dict, kmeans: dict, scores: dict,
                ffcv: dict) -> list[dict]:
    """The ImageNet-1k rows at ``size`` px: images, bytes, CPU seconds (one process here), A100
    seconds (FLOP-scaled from FFCV) and what runs it."""
    a = ASSUMPTIONS
    n, stream, lab = a["images"], a["stream"], a["labeled"]
    rate = ffcv["flops_per_second"]
    im = images[str(size)]
    store = im["store_bytes_per_image"] * n
    act = net["activation_bytes_per_image"]
    state = net["parameters"] * 4 * 3  # weights, gradients, SGD momentum (float32)
    payload = cache["payload_bytes_per_image"]

    def gpu(stage: str, count: int) -> float:
        return net["flops_per_image"][stage] * count / rate

    k, d = a["classes"], a["kmeans_dim"]
    k_new, old = a["classes"] - a["old_classes"], a["old_classes"]
    trials = 2 + int(np.log(k_new))

    def kmeans_call(points: int) -> tuple[float, float]:
        """One Lloyd iteration, and a whole SemiSupervisedKMeans call at most (n_init k-means++
        seedings, each with n_iter iterations)."""
        search = kmeans["search_s"] * points * k * d
        iteration = search + kmeans["means_s"] * (points + lab) * d
        seeding = kmeans["kmeanspp"] * points * k_new * trials * d + kmeans["search_s"] * points * old * d
        return iteration, a["n_init"] * (seeding + search + a["n_iter"] * iteration)

    pool_iter, pool_call = kmeans_call(a["pool"])
    stream_iter, stream_call = kmeans_call(stream)
    rows = [
        {"stage": "image store build", "images": n,
         "disk": f"{_bytes(store)} (.npy, {im['store_bytes_per_image']:.0f} B = 3·{size}·{size} per image)",
         "memory": f"one chunk in flight: {_bytes(a['store_chunk'] * im['store_bytes_per_image'])}",
         "cpu_s": im["build_s"] * n, "gpu_s": None,
         "processes": "one builder (a file lock makes other ranks wait), num_workers decoding processes "
                      "(default min(4, CPUs)); time divides by the workers up to the cores"},
        {"stage": "train v0, per epoch", "images": n, "disk": "reads the store (memory map)",
         "memory": f"activations {_bytes(act)}/image: {_bytes(act * a['batch'] + state)} at batch "
                   f"{a['batch']} (fp32, incl. {_bytes(state)} weights+grads+momentum)",
         "cpu_s": net["train"]["seconds_per_image"] * n, "gpu_s": gpu("train", n),
         "processes": "all ranks: DDP via ignite.distributed, each its share of every batch"},
        {"stage": "encode (labeled + stream + test)", "images": n,
         "disk": "reads the store; SHA-1 of every image",
         "memory": f"outputs {_bytes(payload * n)} in RAM (twice while concatenated), on every rank",
         "cpu_s": net["encode"]["seconds_per_image"] * n + net["fingerprint"]["seconds_per_image"] * n,
         "gpu_s": gpu("encode", n),
         "processes": "all ranks encode a contiguous share; the shares are gathered to every rank"},
        {"stage": "feature cache write", "images": n,
         "disk": f"{_bytes(cache['file_bytes_per_image'] * n)} ({payload} B/image payload)",
         "memory": "the outputs above", "cpu_s": cache["write_s_per_image"] * n, "gpu_s": None,
         "processes": "rank 0 writes; the others wait"},
        {"stage": f"k-means on the pool ({a['pool']:,} x {d}, {k} centroids)", "images": a["pool"],
         "disk": "",
         "memory": f"{_bytes((a['pool'] + lab) * d * 4 * 3)}: pool and labeled features, normalized "
                   "copies, and both concatenated",
         "cpu_s": pool_call, "cpu_note": f"{_seconds(pool_iter)} per Lloyd iteration; the call at most",
         "gpu_s": None, "processes": "rank 0 only; faiss-gpu on GPU 0 when the gpu extra sees a GPU"},
        {"stage": f"k-means on the whole stream ({stream:,} x {d})", "images": stream, "disk": "",
         "memory": f"{_bytes((stream + lab) * d * 4 * 3)}", "cpu_s": stream_call,
         "cpu_note": f"{_seconds(stream_iter)} per Lloyd iteration; the call at most",
         "gpu_s": None, "processes": "rank 0 only; faiss-gpu on GPU 0 when the gpu extra sees a GPU"},
        {"stage": "scoring the stream: energy", "images": stream, "disk": "", "memory": "the cached logits",
         "cpu_s": scores["energy_s"] * stream, "gpu_s": None,
         "processes": "every rank scores the whole stream (same pool in each), on the CPU"},
        {"stage": "scoring: Mahalanobis (fit on the labeled set)", "images": stream, "disk": "",
         "memory": f"{_bytes(2 * lab * d * 8)} while fitting (labeled features as float64, and centred)",
         "cpu_s": scores["mahalanobis_s"] * stream + scores["mahalanobis_fit_s"] * lab, "gpu_s": None,
         "processes": "every rank, on the CPU"},
        {"stage": f"scoring: kNN, exact, bank {lab:,}", "images": stream, "disk": "",
         "memory": f"bank {_bytes(lab * d * 4)}",
         "cpu_s": scores["knn_s_per_bank_row"] * lab * stream, "gpu_s": None,
         "processes": "every rank, faiss-cpu (KNNDistance has no GPU path yet; nlist= for IVF)"},
        {"stage": "distill, per epoch", "images": n, "disk": "reads the store",
         "memory": f"row numbers of the labeled + pseudo-labeled images (8 B each, "
                   f"{_bytes((lab + a['pool']) * 8)}); batches read from the store",
         "cpu_s": net["distill"]["seconds_per_image"] * n, "gpu_s": gpu("distill", n),
         "processes": "all ranks: DDP, teacher forward in each"},
        {"stage": "adapt (representation), per epoch", "images": n, "disk": "reads the store",
         "memory": f"row numbers of the labeled + seen stream (8 B each, {_bytes((lab + stream) * 8)}); "
                   "batches read from the store; two views per image",
         "cpu_s": net["adapt"]["seconds_per_image"] * n, "gpu_s": gpu("adapt", n),
         "processes": "all ranks: DDP; contrastive negatives gathered across ranks"},
    ]
    return rows


# ---------------------------------------------------------------------------------------- output


def machine() -> dict:
    import faiss

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "cpus_usable": len(os.sched_getaffinity(0)),
            "load_average": list(os.getloadavg()), "torch": torch.__version__, "faiss": faiss.__version__,
            "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = result["machine"]
    measured = Table(title=f"measured per-image costs ({result['mode']} sizes; {m['cpus_usable']} CPUs, "
                           f"{m['torch_threads']} threads, load {m['load_average_start'][0]:.1f}"
                           f"→{m['load_average'][0]:.1f})")
    for col in ("stage", "setting", "value"):
        measured.add_column(col)
    for size in result["sizes"]["resolutions"]:
        net = result["network"][str(size)]
        setting = f"{size} px, ResNet-18 {net['stem']} stem, batch {net['batch']}"
        for stage in ("train", "distill", "adapt", "encode"):
            gflop = net["flops_per_image"][stage] / 1e9
            measured.add_row(stage, setting, f"{net[stage]['seconds_per_image'] * 1000:.1f} ms/image, "
                                             f"{gflop:.2f} GFLOP/image")
        measured.add_row("encode_entry", setting + ", fresh cache",
                         f"{net['encode_entry']['seconds_per_image'] * 1000:.1f} ms/image")
        measured.add_row("activations saved for backward", setting,
                         f"{net['activation_bytes_per_image'] / 1e6:.1f} MB/image")
        measured.add_row("data fingerprint (SHA-1)", f"{size} px",
                         f"{net['fingerprint']['bytes_per_second'] / 1e6:.0f} MB/s")
        im = result["images"][str(size)]
        jpeg = f"{result['images']['jpegs']} JPEGs {result['images']['jpeg_pixels'][0]}x" \
               f"{result['images']['jpeg_pixels'][1]}, {result['images']['jpeg_mean_bytes'] / 1e3:.0f} KB"
        measured.add_row("decode+resize (store build's worker)", f"{jpeg} → {size} px",
                         f"{im['decode_resize_s'] * 1000:.2f} ms/image")
        measured.add_row("  same with PIL draft (not in the library)", f"→ {size} px",
                         f"{im['draft_decode_resize_s'] * 1000:.2f} ms/image")
        measured.add_row("build_store, num_workers=0", f"→ {size} px", f"{im['build_s'] * 1000:.2f} ms/image")
        measured.add_row("image store bytes", f"{size} px", f"{im['store_bytes_per_image']:.0f} B/image "
                                                              f"(+{im['npy_header_bytes']} B header)")
    cache = result["cache"]
    measured.add_row("feature cache bytes", f"widths {cache['widths']}",
                     f"{cache['file_bytes_per_image']:.1f} B/image in the file, payload "
                     f"{cache['payload_bytes_per_image']} B")
    measured.add_row("feature cache write", "", f"{cache['write_s_per_image'] * 1e6:.1f} µs/image")
    km = result["kmeans"]
    for k, s in km["search"].items():
        per_iteration = s * km["n"] * int(k) * km["d"]
        measured.add_row("k-means nearest-centroid search", f"{km['n']:,} x {km['d']}, k = {k}",
                         f"{s * 1e12:.1f} ps per point·centroid·dim ({per_iteration:.2f} s/iter)")
    measured.add_row("k-means centroid update", f"{km['n']:,} x {km['d']}",
                     f"{km['means_s'] * 1e12:.0f} ps per point·dim")
    measured.add_row("k-means++ seeding", "", f"{km['kmeanspp'] * 1e12:.1f} ps per point·seed·trial·dim")
    fit = km["fit"]
    measured.add_row("KMeans.fit (check of the model)", f"k = {fit['k']}, {fit['iterations']} iterations",
                     f"{fit['seconds']:.2f} s (Lloyd part by the model {fit['lloyd_model_s']:.2f} s)")
    sc = result["scores"]
    measured.add_row("score: energy (online graph)", f"{sc['classes']} logits",
                     f"{sc['energy_s'] * 1e6:.1f} µs/sample")
    measured.add_row("score: Mahalanobis", f"{sc['d']}-d, {sc['classes']} classes",
                     f"{sc['mahalanobis_s'] * 1e6:.1f} µs/sample; "
                     f"fit {sc['mahalanobis_fit_s'] * 1e6:.1f} µs/labeled")
    measured.add_row("score: kNN exact (k = 50)", f"bank {sc['fit_n']:,} x {sc['d']}",
                     f"{sc['knn_s'] * 1e3:.2f} ms/sample "
                     f"({sc['knn_s_per_bank_row'] * 1e9:.2f} ns per bank row)")
    console.print(measured)
    f = result["ffcv"]
    for size in result["sizes"]["resolutions"]:
        table = Table(title=f"ImageNet-1k ({IMAGENET_TRAIN:,} images) at {size} px, extrapolated from the "
                            f"costs above; A100 = FLOPs / {f['flops_per_second'] / 1e12:.1f} TFLOP/s (FFCV)")
        for col in ("stage", "images", "disk", "memory", "CPU here (1 process)", "A100 est.",
                    "processes / GPUs"):
            table.add_column(col, overflow="fold")
        for row in result["imagenet"][str(size)]:
            cpu = _seconds(row["cpu_s"]) + (f" ({row['cpu_note']})" if row.get("cpu_note") else "")
            table.add_row(row["stage"], f"{row['images']:,}", row["disk"], row["memory"], cpu,
                          "—" if row["gpu_s"] is None else _seconds(row["gpu_s"]), row["processes"])
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, seconds (tests)")
    parser.add_argument("--json", type=Path, help="write every number as JSON here")
    parser.add_argument("--repeats", type=int, help="runs per measurement (median); default 3, tiny 1")
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    logging.getLogger("components").setLevel(logging.WARNING)  # no progress bars
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    result: dict = {"mode": "tiny" if args.tiny else "full", "sizes": dataclasses.asdict(sizes),
                    "assumptions": ASSUMPTIONS, "network": {}}
    for size in sizes.resolutions:
        result["network"][str(size)] = measure_network(size, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        result["images"] = measure_images(sizes, Path(tmp))
        first = result["network"][str(sizes.resolutions[0])]["encode_entry"]["dims"]
        result["cache"] = measure_cache(sizes, first, ASSUMPTIONS["classes"], Path(tmp))
    result["kmeans"] = measure_kmeans(sizes)
    result["scores"] = measure_scores(sizes)
    result["ffcv"] = ffcv_reference()
    result["imagenet"] = {str(s): extrapolate(s, result["network"][str(s)], result["images"], result["cache"],
                                              result["kmeans"], result["scores"], result["ffcv"])
                          for s in sizes.resolutions}
    result["machine"] = machine() | {"load_average_start": load_start,
                                     "seconds": time.perf_counter() - started}
    print_tables(result)
    print(f"{result['machine']['seconds']:.0f} s; load average {load_start[0]:.1f} at the start, "
          f"{result['machine']['load_average'][0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
