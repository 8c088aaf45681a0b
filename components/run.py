"""Command line: ``python -m components.run --gin FILE [--gin FILE ...] [--gin-bindings B ...]``.

Parses the gin files and bindings, checks every bound value and the run folder, then calls the
configured graph (``run.graph``). What it promises (docs/reliability.md has the table):

* a gin error, a bad value or an unusable ``--run-dir`` prints one ``config error`` line and
  exits 2 before anything is written;
* a run started again on the same ``--run-dir`` resumes: every training stage continues after
  its last checkpointed epoch, finished stages are loaded, not trained again; a folder that
  holds a finished run is left alone (``--fresh`` starts over), one of another configuration
  is refused;
* a failure the library explains (bad data, a diverged loss, a refused checkpoint, a failed
  write) prints one line and exits 1, with the traceback in ``<run>/error.log``; anything else
  is a bug and shows its traceback; Ctrl-C prints one line and exits 130.

``--nproc N`` runs the graph in N processes (DDP through ``ignite.distributed``: gloo on CPU,
NCCL on GPUs), and under ``torchrun`` the processes it starts do the same. Every process parses
the gin files and bindings itself (spawned processes inherit no gin state) and checks that it
resolved the same configuration as process 0; process 0 prepares and writes the run folder, the
others wait at a barrier; a failure in any process ends all of them with the promises above.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import difflib
import hashlib
import importlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gin
import ignite.distributed as idist
import torch

import components  # noqa: F401  (registers the components)
import graphs  # noqa: F401  (registers the graphs)
from components.gin_files import add_search_paths, gin_dir, locate, search_paths
from components.validate import validate_config
from graphs.handlers import RunDir, RunFailure, checkpointing, console, setup_logging, stop_on_ctrl_c
from graphs.report import show_metrics

CONFIG_ERROR = 2
FAILED = 1
INTERRUPTED = 130
RUN_CONFIG = "run_config.gin"  # the resolved configuration, written when the folder is made
FINISHED = "finished"  # written last, after metrics, report and plots: the run is complete
DISTRIBUTED = "distributed.json"  # a distributed run's processes and what each parsed
ENVIRONMENT = "environment.json"  # where the run finished: versions, threads, processor, device
# the graphs that run in several processes; the others refuse --nproc > 1 and torchrun
DISTRIBUTED_GRAPHS = ("lifecycle",)


class ConfigError(Exception):
    """The gin files or bindings are wrong; nothing was run or written."""


@gin.configurable(denylist=["run_dir"])
def run(run_dir: RunDir, graph: Callable[..., dict] = gin.REQUIRED) -> dict:
    """Call the experiment's graph with the run directory."""
    return graph(run_dir=run_dir)


def parse_config(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parse gin files and bindings, turning every gin complaint into a ConfigError.

    A relative path is looked up in the working directory first, then among the shipped
    experiment files (``components.gin_files``), so ``gin/distill.gin`` and ``distill.gin``
    work from any folder.
    """
    gin.clear_config()
    add_search_paths()
    located = []
    for file in files:
        path = locate(file)
        if path is None:
            looked = ", ".join(str(prefix / file) for prefix in search_paths())
            raise ConfigError(f"gin file {file!r} not found (looked for {looked}); "
                              "`python -m components.run --list-gin` lists the shipped ones")
        located.append(str(path))
    try:
        gin.parse_config_files_and_bindings(located, list(bindings), finalize_config=False)
    except (ValueError, TypeError, KeyError, SyntaxError, OSError, NameError) as error:
        where = f"binding {bindings!r}" if bindings else f"file(s) {', '.join(files)}"
        raise ConfigError(f"{where}: {error}") from None
    try:  # every bound value's type and range, before any work
        validate_config()
    except ValueError as error:
        raise ConfigError(str(error)) from None


def configurables() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Every configurable the project registers with gin (its own and the third-party ones of
    ``components.external``): ``(name, module, [(parameter, default), ...])``, denylisted
    (data) parameters left out. gin has no public listing API, so this reads its registry."""
    import inspect

    from gin import config as gin_config

    out = []
    for selector, configurable in sorted(gin_config._REGISTRY.items()):  # noqa: SLF001
        if selector.startswith("gin."):
            continue
        try:
            signature = inspect.signature(configurable.wrapped)
        except (TypeError, ValueError):  # some builtins have none
            out.append((configurable.name, configurable.module or "", []))
            continue
        hidden = set(configurable.denylist or ())
        params = []
        for name, p in signature.parameters.items():
            if name in hidden or name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = p.default
            if default is inspect.Parameter.empty or default is gin.REQUIRED:
                text = "REQUIRED"
            elif callable(default) and hasattr(default, "__name__"):
                text = f"@{default.__name__}"
            else:
                text = repr(default)
            params.append((name, text))
        module = "components.run" if configurable.module == "__main__" else configurable.module or ""
        out.append((configurable.name, module, params))
    return sorted(out, key=lambda row: (row[1], row[0]))


def print_configurables() -> None:
    """One line per configurable, grouped by module: ``Name(parameter=default, ...)``."""
    module = None
    for name, where, params in configurables():
        if where != module:
            module = where
            print(f"\n# {module}")
        print(f"{name}(" + ", ".join(f"{p}={d}" for p, d in params) + ")")


def gin_files() -> list[tuple[str, str]]:
    """Every shipped experiment file as ``(gin/<path>, the first line of its leading comment)``."""
    root = gin_dir()
    out = []
    for path in sorted(root.rglob("*.gin")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines()
                      if line.startswith("#")), "")
        out.append((f"gin/{path.relative_to(root).as_posix()}", first))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.run",
        description="Run an experiment described by gin files: python -m components.run --gin distill.gin",
        epilog="Gin files are found in the working directory first, then among the shipped ones "
               "(gin/...; see --list-gin). Every option, gin file and binding is explained in "
               "docs/configuration.md.",
    )
    add = parser.add_argument
    add("--gin", action="append", metavar="FILE", help="gin file to run; repeat to compose several")
    add("--gin-bindings", action="append", default=[], metavar="B",
        help="one more binding, e.g. 'SEED = 1'; repeatable")
    add("--run-dir", default=None, metavar="DIR", help="output folder (default runs/<gin name>-<time>)")
    add("--fresh", action="store_true", help="start over in --run-dir instead of resuming it")
    add("--nproc", type=int, default=1, metavar="N",
        help="run in N processes (DDP; see docs/scale.md)")
    add("--backend", choices=("gloo", "nccl"), default=None, metavar="B",
        help="gloo or nccl (default: nccl with CUDA, else gloo)")
    add("--print-config", action="store_true", help="print the resolved bindings and exit")
    add("--list", action="store_true", help="list every configurable and its defaults, exit")
    add("--list-gin", action="store_true", help="list the shipped gin files, exit")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="only warnings and the final table")
    loudness.add_argument("--verbose", action="store_true", help="debug messages too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print_configurables()
        return 0
    if args.list_gin:
        for name, what in gin_files():
            print(f"{name:40s} {what}")
        return 0
    if not args.gin:
        parser.error("--gin FILE is required (or --list, --list-gin); try --gin distill.gin")
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    launched = _torchrun_world() > 1  # torchrun started this process as one of several
    setup_logging(logging.ERROR if launched and int(os.environ.get("RANK", 0)) else level)
    try:
        parse_config(args.gin, args.gin_bindings)
    except ConfigError as error:
        if not launched or int(os.environ.get("RANK", 0)) == 0:
            console.print(f"[bold red]config error[/]: {error}")
        return CONFIG_ERROR
    if args.print_config:
        print(gin.config_str())  # every binding the files and flags resolve to, macros included
        return 0
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.run_dir or Path("runs") / f"{Path(args.gin[-1]).stem}-{stamp}")
    if args.nproc > 1 or launched:
        return _distributed(args, path, level, launched)
    config = gin.config_str()
    try:
        finished = prepare_run_dir(path, config, args.fresh)
    except ConfigError as error:
        console.print(f"[bold red]config error[/]: {error}")
        return CONFIG_ERROR
    if finished is not None:
        console.print(f"{path} holds a finished run: nothing to do, nothing written "
                      "(--fresh starts it over)")
        show_metrics(finished)
        return 0
    run_dir = RunDir(path, on_create=lambda d: d.write_text(RUN_CONFIG, config))
    if path.exists() and not (path / RUN_CONFIG).exists():  # an empty folder made beforehand
        run_dir.write_text(RUN_CONFIG, config)
    return execute(run_dir)


def execute(run_dir: RunDir, distributed: dict | None = None) -> int:
    """Run the configured graph in ``run_dir`` and turn its failures into the promised exits.
    ``distributed``: what a distributed run records in ``distributed.json`` when it finishes."""
    rank = idist.get_rank()
    try:
        with checkpointing(run_dir) as stages, stop_on_ctrl_c():
            metrics = run(run_dir)
    except KeyboardInterrupt:
        if rank == 0:
            _report(f"[bold red]interrupted[/]: run the same command again (same --run-dir "
                    f"{run_dir.path}) to resume after the last finished epoch", INTERRUPTED)
        return INTERRUPTED
    except Exception as error:
        started = run_dir.created
        # documented failures: bad input (ValueError), RunFailure, a failed read or write, and
        # gin's own complaint about a binding it was never given; anything else is a bug
        missing = isinstance(error, RuntimeError) and "Required bindings" in str(error)
        if not isinstance(error, (RunFailure, ValueError, OSError)) and not missing:
            raise
        if started:  # the whole story for whoever debugs it, beside the run
            with contextlib.suppress(OSError):  # the disk may be what failed
                log_name = "error.log" if rank == 0 else f"error-process{rank}.log"
                (run_dir.path / log_name).write_text(traceback.format_exc())
        # without the "In call to configurable ..." lines gin adds on the way up
        message = "\n".join(line for line in str(error).splitlines()
                            if not line.strip().startswith("In call to configurable"))
        if isinstance(error, OSError):  # a failed read or write (a full disk, a size limit)
            message += "; earlier files are intact"
        where = f" (process {rank})" if rank else ""
        code = FAILED if started else CONFIG_ERROR
        _report(f"[bold red]{'error' if started else 'config error'}[/]{where}: {message}", code)
        return code
    if not run_dir.writes:  # process 0 finishes the run folder and shows the metrics
        return 0
    if stages.resumed:
        console.print(f"resumed: {', '.join(stages.resumed)}")
    shutil.rmtree(run_dir.path / "stages", ignore_errors=True)  # the run is done: bounded disk
    (run_dir.path / "error.log").unlink(missing_ok=True)  # an earlier attempt's, now resumed
    for log_file in run_dir.path.glob("error-process*.log"):
        log_file.unlink(missing_ok=True)
    if distributed is not None:
        run_dir.write_json(DISTRIBUTED, distributed)
    run_dir.write_json(ENVIRONMENT, environment() | {"resumed_stages": list(stages.resumed)})
    run_dir.write_text(FINISHED, "")
    show_metrics(metrics)
    console.print(f"run directory: [bold]{run_dir.path}[/]")  # shown even with --quiet
    return 0


def environment() -> dict:
    """What a run's numbers depend on besides its configuration: the library versions, torch's
    CPU threads, the processes, the processor and the device. Float sums are not associative,
    so a different thread count or processor changes the last bits of a reduction, and a loop
    of many decisions (which cluster is accepted, when the pool fires) can amplify them into
    different results from the same files and seed (docs/reliability.md)."""
    import platform
    from importlib import metadata

    versions = {}
    for package in ("torch", "torchvision", "pytorch-ignite", "faiss-cpu", "faiss-gpu", "numpy",
                    "scikit-learn", "gin-config"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    processor = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        processor = names[0].strip() if names else processor
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"python": platform.python_version(), "versions": versions, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "processes": idist.get_world_size(),
            "cpu_count": os.cpu_count(), "processor": processor, "machine": platform.machine(),
            "device": device}


# ---------------------------------------------------------------------- several processes

_MESSAGES: Path | None = None  # a spawned process's folder for its final line (the launcher prints it)


def _report(text: str, code: int) -> None:
    """The run's final one-line message: printed, or, in a process ``--nproc`` spawned, left for
    the launcher, which prints one line for all of them (the first process's, if it left one)."""
    if _MESSAGES is None:
        if idist.get_rank() > 0:  # under torchrun: process 0's line first; a failure shared by
            time.sleep(2)  # every process then ends this one (torchrun stops them) before it says it again
        console.print(text)
        return
    with contextlib.suppress(OSError):
        tmp = _MESSAGES / f".{idist.get_rank()}.tmp"
        tmp.write_text(f"{code}\n{text}")
        os.replace(tmp, _MESSAGES / str(idist.get_rank()))


def _torchrun_world() -> int:
    """The number of processes torchrun (or another launcher setting its variables) started."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1
    return int(os.environ["WORLD_SIZE"])


def _graph_name() -> str | None:
    try:
        return gin.query_parameter("run.graph").configurable.name
    except (ValueError, AttributeError):
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Under ``python -m components.run``, spawned processes would run this module again as
    their ``__main__`` and then import it by name for the worker: gin would hold two ``run``
    configurables. Hide the main module from multiprocessing while it spawns."""
    main = sys.modules["__main__"]
    if getattr(getattr(main, "__spec__", None), "name", None) != __spec__.name:
        yield
        return
    spec, file = main.__spec__, main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = spec
        if file is not None:
            main.__file__ = file


def _distributed(args: argparse.Namespace, path: Path, level: int, launched: bool) -> int:
    """Run the parsed configuration in several processes: spawned here (``--nproc``) with
    ``idist.Parallel``, or this one of those torchrun started."""
    if launched and args.nproc > 1:
        console.print("[bold red]config error[/]: --nproc with torchrun: torchrun starts the processes "
                      "(--nproc_per_node); leave --nproc out")
        return CONFIG_ERROR
    graph = _graph_name()
    if graph not in DISTRIBUTED_GRAPHS:
        if not launched or int(os.environ.get("RANK", 0)) == 0:
            console.print(f"[bold red]config error[/]: run.graph = @{graph} runs in one process only; "
                          f"several processes (--nproc, torchrun) run {', '.join(DISTRIBUTED_GRAPHS)}")
        return CONFIG_ERROR
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and torch.cuda.device_count() < max(args.nproc, 1) and not launched:
        console.print(f"[bold red]config error[/]: --backend nccl needs a GPU per process: {args.nproc} "
                      f"processes, {torch.cuda.device_count()} GPUs; use --backend gloo")
        return CONFIG_ERROR
    # spawned processes share the cores, as torchrun makes them (it sets OMP_NUM_THREADS=1)
    threads = None if launched or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1)
                                                                           // args.nproc)
    spec = {"gin": args.gin, "bindings": args.gin_bindings, "run_dir": str(path), "fresh": args.fresh,
            "level": level, "messages": None, "threads": threads}
    if launched:  # torchrun: this process is one of them; idist.Parallel reads its variables
        with idist.Parallel(backend=backend) as parallel:
            parallel.run(_worker, spec)  # ends the process
    worker = _worker
    if __name__ == "__main__":  # the spawned processes import the worker by this module's name
        worker = importlib.import_module(__spec__.name)._worker
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # "Terminating process"
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # the processes stop
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    try:
        with tempfile.TemporaryDirectory(prefix="components-run-") as messages:
            spec["messages"] = messages
            try:
                with _main_not_rerun(), idist.Parallel(backend=backend, nproc_per_node=args.nproc,
                                                       master_port=_free_port()) as parallel:
                    parallel.run(worker, spec)
            except ProcessRaisedException as error:  # a bug: its traceback, as in one process
                print(error.msg.strip(), file=sys.stderr)
                return FAILED
            except ProcessExitedException as error:
                return _launcher_exit(Path(messages), error, bool(interrupted))
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0  # every process finished (a Ctrl-C that came after their last step changes nothing)


def _launcher_exit(messages: Path, error: Exception, interrupted: bool) -> int:
    """Print the one line the processes left (process 0's first) and return its exit code."""
    for rank in sorted(int(f.name) for f in messages.iterdir() if f.name.isdigit()):
        code, text = (messages / str(rank)).read_text().split("\n", 1)
        console.print(text)
        return int(code)
    if interrupted:
        console.print("[bold red]interrupted[/]: run the same command again to resume")
        return INTERRUPTED
    console.print(f"[bold red]error[/]: {error} (killed: out of memory?)")
    return FAILED


def _worker(local_rank: int, spec: dict) -> None:
    """One process of a distributed run (``idist.Parallel`` calls it). It leaves with
    ``os._exit``: a process that fails at once, with its exit code (the others may be waiting
    in a collective, and the launcher, ``--nproc`` or torchrun, ends them); one that succeeded
    after the others reached the end too. torch's distributed objects can abort the process
    ("terminate called without an active exception") when the interpreter tears them down at
    exit; by then every file is written and closed."""
    code = _work(spec)
    if code == 0:
        idist.barrier()
    leave(code)


def leave(code: int) -> None:
    """End this process of a distributed run now with ``code``, output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _work(spec: dict) -> int:
    global _MESSAGES
    _MESSAGES = Path(spec["messages"]) if spec["messages"] else None
    rank, world = idist.get_rank(), idist.get_world_size()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    setup_logging(spec["level"] if rank == 0 else logging.ERROR)  # one voice: process 0's
    try:
        parse_config(spec["gin"], spec["bindings"])  # spawned processes inherit no gin state
    except ConfigError as error:
        if rank == 0:
            _report(f"[bold red]config error[/]: {error}", CONFIG_ERROR)
        return CONFIG_ERROR
    config = gin.config_str()
    digests = list(idist.all_gather(hashlib.sha256(config.encode()).hexdigest()))
    if any(d != digests[0] for d in digests):
        if rank == 0:
            others = [r for r, d in enumerate(digests) if d != digests[0]]
            _report(f"[bold red]config error[/]: process(es) {others} resolved another configuration "
                    "than process 0 from the same files and bindings (did a gin file change while the "
                    "processes started, or does a file differ between the machines?)", CONFIG_ERROR)
        return CONFIG_ERROR
    path = Path(idist.broadcast(spec["run_dir"] if rank == 0 else None, src=0, safe_mode=True))
    status, finished = 0, None
    if rank == 0:
        try:
            finished = prepare_run_dir(path, config, spec["fresh"])
        except ConfigError as error:
            _report(f"[bold red]config error[/]: {error}", CONFIG_ERROR)
            status = CONFIG_ERROR
    # process 0's verdict on the folder: 0 run, 2 refused, -1 finished
    status = int(idist.broadcast(torch.tensor([-1 if finished is not None else status]), src=0).item())
    if status == CONFIG_ERROR:
        return CONFIG_ERROR
    if status == -1:
        if rank == 0:
            console.print(f"{path} holds a finished run: nothing to do, nothing written "
                          "(--fresh starts it over)")
            show_metrics(finished)
        return 0
    run_dir = RunDir(path, on_create=lambda d: d.write_text(RUN_CONFIG, config))
    if rank == 0 and path.exists() and not (path / RUN_CONFIG).exists():
        run_dir.write_text(RUN_CONFIG, config)
    idist.barrier()  # the folder is ready (or emptied by --fresh) before anyone reads it
    record = {"world_size": world, "backend": idist.backend(),
              "processes": [{"rank": r, "config_sha256": d} for r, d in enumerate(digests)]}
    return execute(run_dir, record)


# bindings that say where things go, not what is computed: a run may resume with them changed
# bindings that say where files go, or add a diagnostic file, and change no result: a run may be
# resumed with them changed
WHERE_ONLY = ("FeatureCache.root", "FeatureCache.max_bytes", "tensorboard.log_dir",
              "continual.consolidation_inputs")


def _results_config(config: str) -> list[str]:
    """The configuration's bindings, one per line (gin wraps long ones), the where-only ones out."""
    lines = re.sub(r"\\\n\s*", " ", config).splitlines()
    return [line for line in lines
            if line.strip() and not line.startswith("#") and not line.strip().startswith(WHERE_ONLY)]


def prepare_run_dir(path: Path, config: str, fresh: bool) -> dict | None:
    """Check the run folder before any work. Returns the metrics of a finished run found there
    (its ``finished`` marker is written last, after the report: nothing is to be done), else
    None. Refuses (``ConfigError``) a path that is a file or not writable, a folder of files
    with no recorded configuration, and a folder holding a run of another configuration;
    ``fresh`` empties a folder that holds a run first."""
    import json

    if path.exists() and not path.is_dir():
        raise ConfigError(f"--run-dir {path} is a file, not a folder: choose another --run-dir")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {path}: {existing} is not writable; choose another --run-dir")
    if not path.exists() or not any(path.iterdir()):
        return None
    recorded = path / RUN_CONFIG
    if not recorded.exists() and not fresh:
        raise ConfigError(f"{path} holds files but no {RUN_CONFIG} (a run of an older version, or not a "
                          "run folder): nothing tells which configuration made them; start over with "
                          "--fresh or choose another --run-dir")
    if fresh:
        if not recorded.exists() and not (path / "metrics.json").exists():
            raise ConfigError(f"--fresh: {path} does not hold a run of this library (no {RUN_CONFIG}); "
                              "refusing to empty it, remove it yourself")
        shutil.rmtree(path)  # the whole folder: it holds a run (checked above), and --fresh asks it
        return None
    if recorded.exists() and _results_config(recorded.read_text()) != _results_config(config):
        diff = [line for line in difflib.unified_diff(_results_config(recorded.read_text()),
                                                      _results_config(config), "recorded", "now", n=0,
                                                      lineterm="")
                if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        raise ConfigError(f"{path} holds a run of another configuration (first difference: "
                          f"{' / '.join(diff[:2])}); resume it with the same files and bindings, "
                          "start over with --fresh, or choose another --run-dir")
    if (path / FINISHED).exists() and (path / "metrics.json").exists():
        try:
            return json.loads((path / "metrics.json").read_text())
        except ValueError:  # damaged: the run is not known to be finished, so it runs (resumes) again
            console.print(f"{path / 'metrics.json'} is not valid JSON: running again to rewrite it")
    return None


if __name__ == "__main__":
    sys.exit(main())
