"""Device check: does the library run, and how fast, on this machine's accelerator? One table.

    python scripts/device_check.py                        # a GPU machine: under 8 minutes
    python scripts/device_check.py --device cpu --tiny    # the same checks at toy sizes (tests)

Rows (docs/scale.md#device-check):

* **digits main job**: ``python -m components.run --gin gin/distill.gin`` in a fresh run folder
  (wall seconds, test accuracy all / new from its metrics.json);
* **fmnist loop**: the same with ``include 'gin/data/fmnist.gin'``, when the Fashion-MNIST files
  are here (``data/FashionMNIST/raw`` or Debian's ``dataset-fashion-mnist``); skipped otherwise,
  and on the CPU unless ``--fmnist`` is given (a full run takes many minutes there);
* **training throughput** (images/s) of ResNet-18 with the CIFAR stem on 32×32 images, through
  the library's ``graphs.train.train`` and through a bare PyTorch loop (same model, same batched
  augmentation, plain optimizer steps), each in fp32 and under bf16 autocast; the ratio column
  is library / bare at the same precision;
* **k-means** of N × D points (1,000,000 × 512 on a GPU machine) with ``components.kmeans.KMeans``
  on faiss-gpu against faiss-cpu, and faiss's own ``faiss.Kmeans`` beside them for reference;
  the GPU rows are skipped, with a note, where faiss sees no GPU;
* **2 processes**: DDP training throughput and an all-reduce over NCCL when there are two GPUs
  (and ``python -m components.run --nproc 2`` on the digits job); skipped otherwise
  (``--gloo`` runs the same worker as two CPU processes over gloo).

``--device cpu`` forces every check onto the CPU (the subprocess runs see no GPU), ``--tiny``
shrinks every size so the whole script runs in seconds; ``--json FILE`` writes the rows as JSON.
Exits 1 when a check failed, 0 otherwise (skipped rows are not failures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# CIFAR-10's per-channel statistics (gin/data/cifar10.gin)
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@dataclasses.dataclass
class Sizes:
    images: int  # training images per throughput measurement (one epoch)
    batch: int
    warmup: int  # batches before the clock starts
    kmeans_n: int
    kmeans_d: int
    kmeans_k: int
    kmeans_iter: int
    ddp_steps: int
    allreduce_mb: int
    job_bindings: tuple[str, ...] = ()  # shorten the digits / fmnist runs
    job_timeout: float = 180.0
    fmnist_timeout: float = 240.0


SIZES = {
    "gpu": Sizes(images=25_600, batch=256, warmup=10, kmeans_n=1_000_000, kmeans_d=512, kmeans_k=100,
                 kmeans_iter=10, ddp_steps=50, allreduce_mb=256, job_timeout=120, fmnist_timeout=210),
    "cpu": Sizes(images=512, batch=64, warmup=1, kmeans_n=100_000, kmeans_d=128, kmeans_k=50,
                 kmeans_iter=10, ddp_steps=4, allreduce_mb=16, job_timeout=300, fmnist_timeout=900),
    "tiny": Sizes(images=32, batch=16, warmup=1, kmeans_n=4_000, kmeans_d=32, kmeans_k=10, kmeans_iter=5,
                  ddp_steps=2, allreduce_mb=1,
                  job_bindings=("train.epochs = 1", "adapt.epochs = 1", "distill.epochs = 1"),
                  job_timeout=120),
}


@dataclasses.dataclass
class Row:
    check: str
    setting: str
    value: float | None = None
    unit: str = ""
    ratio: float | None = None
    note: str = ""
    status: str = "ok"  # ok, skipped, FAIL


def skipped(check: str, setting: str, why: str) -> Row:
    return Row(check, setting, note=why, status="skipped")


def failed(check: str, setting: str, why: str) -> Row:
    return Row(check, setting, note=why, status="FAIL")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- the command line runs


def run_job(name: str, bindings: list[str], out: Path, device: torch.device, sizes: Sizes,
            timeout: float, extra: tuple[str, ...] = ()) -> Row:
    """``python -m components.run --gin gin/distill.gin`` with ``bindings`` in ``out/<name>``;
    wall seconds, and the test accuracy its metrics.json reports."""
    run_dir = out / name
    argv = [sys.executable, "-m", "components.run", "--gin", "gin/distill.gin", "--run-dir", str(run_dir),
            "--quiet", *extra]
    for binding in (*bindings, *sizes.job_bindings, f"FeatureCache.root = '{out / 'cache'}'"):
        argv += ["--gin-bindings", binding]
    env = dict(os.environ)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # idist.device() would pick a GPU otherwise
    shown = [f'--gin-bindings "{b}"' for b in (*bindings, *sizes.job_bindings)]
    setting = " ".join(["--gin gin/distill.gin", *extra, *shown])
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return failed(name, setting, f"did not finish within {timeout:.0f} s")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-3:]
        return failed(name, setting, f"exit {done.returncode}: {' '.join(last)[-300:]}")
    if not (run_dir / "metrics.json").is_file():
        return failed(name, setting, f"exit 0 but no metrics.json in {run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics.get("test", {})
    note = (f"test all {100 * test.get('all', float('nan')):.1f} % / new "
            f"{100 * test.get('new', float('nan')):.1f} %; metrics.json seconds "
            f"{metrics.get('seconds', float('nan')):.1f}")
    return Row(name, setting, seconds, "s wall", note=note)


def fmnist_present() -> bool:
    from components.data.sources import DEBIAN_FASHION_MNIST

    raw = ROOT / "data" / "FashionMNIST" / "raw"
    return (raw / "train-images-idx3-ubyte").exists() or (
        Path(DEBIAN_FASHION_MNIST) / "train-images-idx3-ubyte.gz").exists()


# ------------------------------------------------------------------------------- training throughput


def _model(seed: int = 0) -> torch.nn.Module:
    import torchvision

    from components.models import Network
    from components.models.extractors import TorchvisionBackbone

    torch.manual_seed(seed)
    return Network(TorchvisionBackbone(torchvision.models.resnet18, cifar_stem=True), num_classes=10)


def _images(n: int):
    from components.data import ImageSet

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    targets = torch.arange(n) % 10
    return ImageSet(pixels, targets, [str(c) for c in range(10)], "random-32px")


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def library_throughput(device: torch.device, sizes: Sizes, amp: bool) -> float:
    """Images/s of ``graphs.train.train`` (Ignite engine, batched loader, augmentation, the
    library's per-step checks) on one epoch, after a warm-up run. bf16: the graph's own option
    (``data_parallel.bf16``: the forward pass under bfloat16 autocast, as the bare loop does)."""
    import gin

    from components.data import BatchAugment
    from graphs.train import train

    images, model = _images(sizes.images), _model()
    augment = BatchAugment(MEAN, STD, pad=4, flip=True).to(device)
    warm = images.subset(torch.arange(min(len(images), sizes.batch * (sizes.warmup + 1))))
    gin.bind_parameter("data_parallel.bf16", amp)
    try:
        train(model, warm, augment, device, epochs=1, batch_size=sizes.batch, sampler="instance",
              optimizer=_sgd, seed=0)
        sync(device)
        start = time.perf_counter()
        train(model, images, augment, device, epochs=1, batch_size=sizes.batch, sampler="instance",
              optimizer=_sgd, seed=1)
        sync(device)
    finally:
        gin.clear_config()
    seconds = time.perf_counter() - start
    return (len(images) // sizes.batch) * sizes.batch / seconds  # the graph drops the last partial batch


def bare_throughput(device: torch.device, sizes: Sizes, amp: bool) -> float:
    """Images/s of a plain loop over the same model and images: index a batch of the uint8
    images, move it, augment it on the device, forward (bf16: under autocast), cross-entropy,
    backward, SGD step. No engine, no per-step ``.item()``."""
    from components.data import BatchAugment

    images, model = _images(sizes.images), _model().to(device)
    augment = BatchAugment(MEAN, STD, pad=4, flip=True).to(device)
    model.train()
    augment.train()
    optimizer = _sgd(model.parameters())

    def step(index: torch.Tensor) -> None:
        x = images.images[index].to(device, non_blocking=True)
        y = images.targets[index].to(device, non_blocking=True)
        with _autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(augment(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    g = torch.Generator().manual_seed(0)
    batches = list(torch.randperm(len(images), generator=g).split(sizes.batch))
    batches = [b for b in batches if len(b) == sizes.batch]
    for index in batches[: sizes.warmup]:
        step(index)
    sync(device)
    start = time.perf_counter()
    for index in batches:
        step(index)
    sync(device)
    return len(batches) * sizes.batch / (time.perf_counter() - start)


def throughput_rows(device: torch.device, sizes: Sizes) -> list[Row]:
    rows = []
    setting = f"ResNet-18 CIFAR stem, 32x32, batch {sizes.batch}, {sizes.images:,} images"
    for amp in (False, True):
        precision = "bf16 autocast" if amp else "fp32"
        measured = {}
        sides = (("bare PyTorch loop", bare_throughput), ("graphs.train.train", library_throughput))
        for side, measure in sides:
            try:
                measured[side] = measure(device, sizes, amp)
            except Exception as error:  # report, keep going: one table whatever happens  # noqa: BLE001
                rows.append(failed(f"train {precision}: {side}", setting, f"{type(error).__name__}: {error}"))
        for side, value in measured.items():
            ratio = None
            if side == "graphs.train.train" and "bare PyTorch loop" in measured:
                ratio = value / measured["bare PyTorch loop"]
            note = "ratio: library / bare" if ratio is not None else ""
            rows.append(Row(f"train {precision}: {side}", setting, value, "img/s", ratio, note))
    return rows


# ------------------------------------------------------------------------------- k-means


def _points(n: int, d: int) -> np.ndarray:
    """Gaussian noise: no cluster structure, so Lloyd runs every iteration it is given (on
    well-separated blobs it settles in two or three and the seeding would dominate the time)."""
    return np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)


def kmeans_rows(device: torch.device, sizes: Sizes) -> list[Row]:
    import faiss
    from sklearn.metrics import adjusted_rand_score

    from components.kmeans import KMeans

    n, d, k, iters = sizes.kmeans_n, sizes.kmeans_d, sizes.kmeans_k, sizes.kmeans_iter
    x = _points(n, d)
    setting = f"{n:,} x {d}-d, k = {k}, {iters} iterations"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    use_gpu_sides = [True] if device.type == "cuda" and gpus > 0 else []
    why_no_gpu = ("--device cpu" if device.type == "cpu" else
                  "faiss sees no GPU (faiss-cpu installed; the `gpu` extra installs faiss-gpu)")
    rows, seconds, labels = [], {}, {}
    for on_gpu in [*use_gpu_sides, False]:
        where = "faiss-gpu" if on_gpu else f"faiss-cpu, {faiss.omp_get_max_threads()} threads"
        start = time.perf_counter()
        result = KMeans(k=k, n_iter=iters, tol=0.0, seed=0, use_gpu=on_gpu).fit(x)
        seconds[on_gpu] = time.perf_counter() - start
        labels[on_gpu] = result.labels
        note = f"{result.iterations} Lloyd iterations on every point after seeding on a subsample"
        rows.append(Row(f"k-means: components.kmeans.KMeans, {where}", setting, seconds[on_gpu], "s",
                        note=note))
    if not use_gpu_sides:
        rows.insert(0, skipped("k-means: components.kmeans.KMeans, faiss-gpu", setting, why_no_gpu))
    else:
        rows[0].ratio = seconds[False] / seconds[True]
        rows[0].note += (f"; ratio: CPU s / GPU s; GPU and CPU labels agree to ARI "
                         f"{adjusted_rand_score(labels[True], labels[False]):.3f}")
    for on_gpu in [*use_gpu_sides, False]:  # faiss's own k-means on every point, for reference
        where = "faiss-gpu" if on_gpu else "faiss-cpu"
        km = faiss.Kmeans(d, k, niter=iters, seed=0, gpu=on_gpu, max_points_per_centroid=n // k + 1)
        start = time.perf_counter()
        km.train(x)
        rows.append(Row(f"k-means: faiss.Kmeans (reference), {where}", setting,
                        time.perf_counter() - start, "s", note="faiss's own Lloyd, random seeds"))
    return rows


# ------------------------------------------------------------------------------- two processes


def ddp_worker(local_rank: int, config: dict) -> None:
    """One process of the 2-process check: an all-reduce of ``allreduce_mb`` MB, then DDP
    training steps of the ResNet-18 (CIFAR stem) on random 32×32 batches; rank 0 writes JSON."""
    import ignite.distributed as idist

    device = idist.device()
    size = config["allreduce_mb"] * 2**20 // 4
    tensor = torch.ones(size, device=device)
    for _ in range(2):
        idist.all_reduce(tensor)
    sync(device)
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        idist.all_reduce(tensor)
    sync(device)
    allreduce_s = (time.perf_counter() - start) / repeats
    network = _model()  # backbone and classifier only: DDP refuses parameters a step leaves unused
    model = idist.auto_model(torch.nn.Sequential(network.backbone, network.classifier))
    optimizer = _sgd(model.parameters())
    batch = config["batch"]
    g = torch.Generator().manual_seed(idist.get_rank())
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    sync(device)
    idist.barrier()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    sync(device)
    idist.barrier()
    seconds = time.perf_counter() - start
    if idist.get_rank() == 0:
        world = idist.get_world_size()
        Path(config["out"]).write_text(json.dumps({
            "img_per_s": world * batch * config["steps"] / seconds,
            # ring all-reduce bus bandwidth: 2 (w - 1) / w of the buffer crosses each link
            "bus_gb_per_s": 2 * (world - 1) / world * size * 4 / allreduce_s / 1e9,
            "world": world, "backend": idist.backend(),
        }))


def two_process_rows(device: torch.device, sizes: Sizes, out: Path, gloo: bool) -> list[Row]:
    import ignite.distributed as idist

    setting = f"2 processes, ResNet-18 CIFAR stem, batch {sizes.batch} each, {sizes.ddp_steps} steps"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus >= 2:
        backend = "nccl"
    elif gloo:
        backend = "gloo"
    else:
        why = f"needs two GPUs ({gpus} here)" if device.type == "cuda" else "--device cpu"
        return [skipped("2 processes: DDP throughput", setting, f"{why}; --gloo runs it as 2 CPU processes")]
    result = out / "ddp.json"
    config = {"batch": sizes.batch, "steps": sizes.ddp_steps, "allreduce_mb": sizes.allreduce_mb,
              "out": str(result)}
    env_cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    if backend == "gloo" and device.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers' idist.device() must be the CPU
    try:
        with idist.Parallel(backend=backend, nproc_per_node=2) as parallel:
            parallel.run(ddp_worker, config)
    except Exception as error:  # noqa: BLE001
        return [failed(f"2 processes ({backend}): DDP throughput", setting,
                       f"{type(error).__name__}: {error}")]
    finally:
        if env_cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_cuda
    measured = json.loads(result.read_text())
    rows = [Row(f"2 processes ({backend}): DDP throughput", setting, measured["img_per_s"], "img/s",
                note="fp32, both processes together"),
            Row(f"2 processes ({backend}): all-reduce", f"{sizes.allreduce_mb} MB float32",
                measured["bus_gb_per_s"], "GB/s bus")]
    from components.run import build_parser

    if backend == "nccl" and "--nproc" in build_parser()._option_string_actions:  # noqa: SLF001
        rows.append(run_job("digits main job, --nproc 2", [], out, device, sizes, sizes.job_timeout,
                            extra=("--nproc", "2")))
    return rows


# ------------------------------------------------------------------------------- the table


def table(rows: list[Row], title: str):
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    for column, justify in (("check", "left"), ("setting", "left"), ("value", "right"), ("unit", "left"),
                            ("ratio", "right"), ("", "center"), ("note", "left")):
        out.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        value = "" if row.value is None else (f"{row.value:,.0f}" if row.value >= 100 else f"{row.value:.3g}")
        status = {"ok": "[green]ok[/]", "skipped": "[yellow]skipped[/]"}.get(row.status, "[red]FAIL[/]")
        out.add_row(row.check, row.setting, value, row.unit, "" if row.ratio is None else f"{row.ratio:.2f}",
                    status, row.note)
    return out


def describe(device: torch.device) -> str:
    import faiss

    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}"
    else:
        what = f"CPU, {torch.get_num_threads()} torch threads"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return (f"{what}; {os.cpu_count()} CPUs {platform.machine()}; torch {torch.__version__}, "
            f"faiss {faiss.__version__} (sees {gpus} GPU)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/device_check.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: a GPU when torch sees one")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: seconds, for tests")
    parser.add_argument("--gloo", action="store_true",
                        help="without two GPUs, run the 2-process check on CPU (gloo)")
    parser.add_argument("--fmnist", action="store_true", help="run the fmnist loop on CPU too")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("jobs", "throughput", "kmeans", "ddp"),
                        help="leave a group of checks out (repeatable)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    sizes = SIZES["tiny" if args.tiny else device.type.replace("cuda", "gpu")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    keep = args.out is not None
    out = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="device_check-"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        if "jobs" not in args.skip:
            rows.append(run_job("digits main job", [], out, device, sizes, sizes.job_timeout))
            fmnist = ["include 'gin/data/fmnist.gin'"]
            if args.tiny:
                rows.append(skipped("fmnist loop", "include 'gin/data/fmnist.gin'", "--tiny"))
            elif device.type == "cpu" and not args.fmnist:
                rows.append(skipped("fmnist loop", "include 'gin/data/fmnist.gin'",
                                    "on CPU only with --fmnist (a full run takes many minutes there)"))
            elif not fmnist_present():
                rows.append(skipped("fmnist loop", "include 'gin/data/fmnist.gin'",
                                    "no Fashion-MNIST files: apt-get install dataset-fashion-mnist "
                                    "(docs/data.md)"))
            else:
                rows.append(run_job("fmnist loop", fmnist, out, device, sizes, sizes.fmnist_timeout))
        groups = {"throughput": lambda: throughput_rows(device, sizes),
                  "kmeans": lambda: kmeans_rows(device, sizes),
                  "ddp": lambda: two_process_rows(device, sizes, out, args.gloo)}
        for group, measure in groups.items():
            if group in args.skip:
                continue
            try:
                rows += measure()
            except Exception as error:  # one table whatever happens  # noqa: BLE001
                rows.append(failed(group, "", f"{type(error).__name__}: {error}"))
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    scale = "tiny sizes" if args.tiny else f"{device.type.replace('cuda', 'GPU').upper()} sizes"
    title = f"device check ({scale}, {time.perf_counter() - started:.0f} s): {describe(device)}"
    console.print(table(rows, title))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
