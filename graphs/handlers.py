"""Ignite handlers shared by the graphs: logging, rich progress bars and the run directory.

Graphs log through the ``components`` logger (Python logging); :func:`setup_logging` routes it
through rich's handler at the level the command line asks for (``--quiet``: warnings only and
no progress bars; ``--verbose``: debug messages too, with their source lines).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

console = Console(stderr=True)
log = logging.getLogger("components")


def setup_logging(level: int = logging.INFO) -> None:
    """Send the ``components`` logger to rich's handler on stderr at ``level``."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, markup=True, show_path=level <= logging.DEBUG)
    log.handlers.clear()
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    # warnings.warn (e.g. a short validation split) the same way, as one line without the
    # source line of gin's wrapper that issued it
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}"
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.handlers.clear()
    py_warnings.addHandler(handler)
    py_warnings.setLevel(level)
    py_warnings.propagate = False
    # Ignite logs "Engine run is terminating due to exception" before re-raising it: the
    # command line reports the exception itself, once
    logging.getLogger("ignite.engine").setLevel(logging.CRITICAL)
    # Ignite's launcher and auto_model announce every start at INFO: the run says it once itself
    for name in ("ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_model"):
        logging.getLogger(name).setLevel(logging.WARNING)


def describe(model: nn.Module) -> str:
    """One line on a model for the start-of-run summary: backbone, heads, parameters."""
    parts = [type(getattr(model, "backbone", model)).__name__]
    for head in ("classifier", "confidence"):
        if getattr(model, head, None) is not None:
            parts.append(f"{head} {type(getattr(model, head)).__name__}")
    count = sum(p.numel() for p in model.parameters())
    return f"model: {', '.join(parts)} ({count / 1e6:.2f} M parameters)"


def _bars_shown() -> bool:
    """Progress bars are info-level output: hidden when the logger is quieter than that."""
    return log.getEffectiveLevel() <= logging.INFO


_INTERRUPTED = {"asked": False}


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Within the block, Ctrl-C (SIGINT) asks the run to stop: the engine that is running ends
    after its current iteration by raising ``KeyboardInterrupt`` from ordinary code (Python's
    own handler may raise it inside a finalizer, where it is printed and ignored, and the run
    goes on). A second Ctrl-C stops at once."""
    import signal

    def ask(signum, frame) -> None:
        if _INTERRUPTED["asked"]:
            raise KeyboardInterrupt
        _INTERRUPTED["asked"] = True
        if idist.get_rank() == 0:  # every process of a distributed run gets the signal
            console.print("stopping after the current step (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, ask)
    _INTERRUPTED["asked"] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED["asked"] = False


def _stop_if_asked(engine: Engine) -> None:
    if _INTERRUPTED["asked"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def progress(engine: Engine, description: str, show: str | None = "loss"):
    """Show a rich progress bar over every iteration of ``engine`` while the block runs, and
    stop after the current iteration when Ctrl-C was pressed (:func:`stop_on_ctrl_c`): every
    long-running engine of the library runs inside this block.

    ``show`` names a key of the engine's output dict to print beside the bar (e.g. the loss).
    """
    engine.add_event_handler(Events.ITERATION_COMPLETED, _stop_if_asked)
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False,
    )
    task = bar.add_task(description, total=None, info="")

    def started(e: Engine) -> None:
        length = e.state.epoch_length
        total = length * e.state.max_epochs if length is not None else None
        bar.update(task, total=total)

    def advance(e: Engine) -> None:
        info = ""
        if show and isinstance(e.state.output, dict) and show in e.state.output:
            value = float(e.state.output[show])
            info = f"{show} {value:.4f}" if math.isfinite(value) else f"{show} {value}"
        bar.update(task, advance=1, info=info)

    if not _bars_shown():
        yield bar
        return
    handles = [engine.add_event_handler(Events.STARTED, started),
               engine.add_event_handler(Events.ITERATION_COMPLETED, advance)]
    with bar:
        try:
            yield bar
        finally:
            for handle in handles:
                handle.remove()


class RunFailure(RuntimeError):
    """A failure the library names and explains (a diverged loss, a checkpoint it refuses to
    load): the command line prints its message in one line and exits 1, no traceback."""


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, numpy scalars and
    arrays as plain numbers and lists: what strict JSON readers accept."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite_json(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def rank_zero(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` computed once, by process 0, and its result (or the exception it
    raised) handed to every process: what must come out the same everywhere (k-means on faiss).
    In one process, just the call."""
    if idist.get_world_size() == 1:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if idist.get_rank() == 0:
        try:
            box = [(True, fn(*args, **kwargs))]
        except Exception as error:  # every process raises it
            box = [(False, error)]
    torch.distributed.broadcast_object_list(box, src=0)
    done, value = box[0]
    if not done:
        raise value
    return value


class RunDir:
    """The run's output folder, created on first write so a run that fails to start leaves
    nothing behind. Files are written under a temporary name and renamed into place.
    ``on_create`` is called once, right after the folder is made (the command line records the
    run's configuration there).

    In a distributed run only process 0 writes: elsewhere the write methods return the path
    they would have written and ``file`` creates no folder."""

    def __init__(self, path: str | Path, on_create: Callable[[RunDir], None] | None = None) -> None:
        self.path = Path(path)
        self.on_create = on_create

    @property
    def created(self) -> bool:
        return self.path.exists()

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (process 0, or the only one)."""
        return idist.get_rank() == 0

    def file(self, name: str) -> Path:
        if not self.writes:
            return self.path / name
        if not self.path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            if self.on_create is not None:
                self.on_create(self)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        target = self.file(name)
        if not self.writes:
            return target
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        """Strict JSON: a value that does not exist (NaN) is written as ``null``."""
        text = json.dumps(finite_json(data), indent=2, sort_keys=True, allow_nan=False, default=float)
        return self.write_text(name, text + "\n")

    def save_operative_config(self) -> Path:
        """Write what gin actually bound so far (it lists only configurables that were called)."""
        return self.write_text("operative_config.gin", gin.operative_config_str())


class CheckedDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` (a temporary file renamed into place, removed if the write fails),
    whose failures name the file: ``torch.save`` on a full disk raises a bare ``RuntimeError``
    ("unexpected pos ...")."""

    def __call__(self, checkpoint, filename, metadata=None) -> None:
        try:
            super().__call__(checkpoint, filename, metadata)
        except (OSError, RuntimeError) as error:
            code = getattr(error, "errno", None) or errno.EIO
            raise OSError(code, f"could not write the checkpoint (is the disk full? {error})",
                          os.path.join(self.dirname, filename)) from error

    def remove(self, filename: str) -> None:
        """Remove an old checkpoint; one that is already gone is what was wanted. Ignite's
        ``Checkpoint`` removes the oldest file *before* it writes the new one, so a run killed in
        between (or one whose newest file was damaged and set aside) resumes from a state whose
        list still names that file: without this, every resume would die on removing it."""
        try:
            super().remove(filename)
        except FileNotFoundError:
            pass


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only. A file that
    pickles code or other objects is refused with a message saying so, never executed."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunFailure(f"refusing to load {path}: it holds pickled Python objects, not only tensors "
                         f"(torch.load(weights_only=True) said: {first}). Load only checkpoints this "
                         "library wrote; re-save foreign weights with model.state_dict().") from None
    except (EOFError, RuntimeError) as error:
        raise RunFailure(f"cannot read checkpoint {path} ({error}): the file is truncated or not a "
                         "checkpoint; delete it (the run resumes from an earlier one)") from None


def save_checkpoint(run_dir: RunDir, model: nn.Module, engine: Engine, name: str) -> Path:
    """Save ``model`` with Ignite's ``Checkpoint`` and ``DiskSaver`` (which writes to a temporary
    file and renames it into place) under ``<run_dir>/checkpoints``; return the file's path.
    Load it with ``Checkpoint.load_objects({"model": m}, load_checkpoint(path))``."""
    folder = run_dir.file("checkpoints")
    checkpoint = Checkpoint({"model": model}, CheckedDiskSaver(folder, require_empty=False),
                            filename_prefix=name)
    checkpoint(engine)
    return folder / checkpoint.last_checkpoint


@gin.configurable
def tensorboard(log_dir: str | None = None) -> str | None:
    """Where the training graphs write TensorBoard logs (Ignite's ``TensorboardLogger``), or
    ``None`` for none: bind ``tensorboard.log_dir = 'runs/tb'`` and install the ``tb`` extra."""
    return log_dir


@contextlib.contextmanager
def tensorboard_logging(engine: Engine, tag: str, optimizer=None):
    """Log every iteration's outputs (and the learning rate) of ``engine`` under ``tag`` to
    TensorBoard while the block runs, when :func:`tensorboard` names a folder."""
    log_dir = tensorboard()
    if log_dir is None:
        yield
        return
    try:
        from ignite.handlers.tensorboard_logger import (
            OptimizerParamsHandler,
            OutputHandler,
            TensorboardLogger,
        )

        logger = TensorboardLogger(log_dir=log_dir)
    except (ImportError, RuntimeError) as error:
        raise RuntimeError(f"tensorboard.log_dir is set but TensorBoard is not installed ({error}): "
                           "pip install -e '.[tb]'") from error
    logger.attach(engine, OutputHandler(tag=tag, output_transform=lambda out: out),
                  Events.ITERATION_COMPLETED)
    if optimizer is not None:
        logger.attach(engine, OptimizerParamsHandler(optimizer, tag=tag), Events.ITERATION_STARTED)
    try:
        yield
    finally:
        logger.close()


# ---------------------------------------------------------------------- resumable stages


class RNGStates:
    """Every random generator a training stage draws from, as one object Ignite's
    ``Checkpoint`` can save: torch's global generator (augmentation, dropout, initialization),
    CUDA's when present, numpy's, Python's, and the data loader's own generator (the sampler's
    order). Restored, the next epoch draws exactly what an uninterrupted run would have."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, words, gauss = random.getstate()
        state = {"torch": torch.get_rng_state(),
                 "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                 "numpy_rest": [int(pos), int(has_gauss), float(cached)],
                 "python": torch.tensor(words, dtype=torch.int64), "python_rest": [version, gauss]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self.generator is not None:
            state["loader"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        pos, has_gauss, cached = state["numpy_rest"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, gauss = state["python_rest"]
        random.setstate((version, tuple(int(w) for w in state["python"].tolist()), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.generator is not None and "loader" in state:
            self.generator.set_state(state["loader"])


class _History:
    """The epoch curves of ``engine.state.history`` as a checkpointable object."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.restored: list[dict] = []

    def state_dict(self) -> dict:
        return {"epochs": list(getattr(self.engine.state, "history", []))}

    def load_state_dict(self, state: dict) -> None:
        self.restored = [dict(row) for row in state["epochs"]]


class StageCheckpoints:
    """Epoch checkpoints of a run's training stages, under ``<run>/stages/<key>/``.

    Every stage a run trains (``train``, ``adapt``, ``distill``, …) gets a key from the order in
    which the run reaches it (``run-02-adapt``; the continual loop scopes keys by round, see
    :func:`stage_scope`): a run is deterministic, so the n-th stage of a run started again is the
    n-th stage of the first. At the end of every epoch Ignite's ``Checkpoint`` saves the model,
    optimizer, learning-rate schedule, engine state, epoch curves and every random generator
    (:class:`RNGStates`); ``n_saved=2``, because Ignite removes the oldest file *before*
    writing the new one, and the previous epoch must stay on disk until the new one is. A
    stage that finished is loaded and skipped, an unfinished one continues after its last
    epoch; either way the run goes on exactly as an uninterrupted one would.
    """

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.scope, self.count = "run", 0
        self.resumed: list[str] = []

    def next_key(self, stage: str) -> str:
        self.count += 1
        return f"{self.scope}-{self.count:02d}-{stage}"

    def folder(self, key: str) -> Path:
        return self.run_dir.file("stages") / key  # through RunDir: it records the configuration

    def remove_scope(self, scope: str) -> None:
        """Drop the checkpoints of a finished scope (a round the loop state has saved)."""
        for folder in (self.run_dir.path / "stages").glob(f"{scope}-*"):
            shutil.rmtree(folder, ignore_errors=True)


_STAGES: StageCheckpoints | None = None


@contextlib.contextmanager
def checkpointing(run_dir: RunDir):
    """Within the block, every training stage checkpoints each epoch under ``run_dir`` and
    resumes from what an earlier, interrupted run left there."""
    global _STAGES
    previous, _STAGES = _STAGES, StageCheckpoints(run_dir)
    try:
        yield _STAGES
    finally:
        _STAGES = previous


@contextlib.contextmanager
def stage_scope(scope: str):
    """Number the stages inside the block from 1 under ``scope`` (e.g. ``round-3``), so a loop
    that resumes after its last saved round finds that round's stages under the same keys."""
    if _STAGES is None:
        yield None
        return
    saved = _STAGES.scope, _STAGES.count
    _STAGES.scope, _STAGES.count = scope, 0
    try:
        yield _STAGES
    finally:
        _STAGES.scope, _STAGES.count = saved


def drop_stage_scope(scope: str) -> None:
    """The checkpoints of ``scope``'s stages are no longer needed (the loop saved its state)."""
    if _STAGES is not None:
        _STAGES.remove_scope(scope)


def resume_stage(engine: Engine, stage: str, epochs: int, objects: dict[str, Any],
                 generator: torch.Generator | None = None, sampler: Any = None) -> bool:
    """Attach epoch checkpoints of ``objects`` (model, optimizer, scheduler …) plus the engine,
    its curves and the random generators to ``engine``, and load the last one an earlier run
    left. Returns True when that stage had finished: the caller skips it. Outside
    :func:`checkpointing` it does nothing (library use, tests)."""
    history = _History(engine)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "history", list(history.restored)))
    if _STAGES is None:
        return False
    key = _STAGES.next_key(stage)
    folder = _STAGES.folder(key)
    to_save = {**objects, "trainer": engine, "rng": RNGStates(generator), "history": history}
    saved = sorted(folder.glob("epoch_checkpoint_*.pt"), key=lambda f: int(f.stem.split("_")[-1]))
    checkpoint = Checkpoint(to_save, CheckedDiskSaver(str(folder), require_empty=False, create_dir=True),
                            filename_prefix="epoch", n_saved=2,
                            global_step_transform=lambda e, _: e.state.epoch)
    while saved:  # the newest that reads; a damaged one is set aside, the one before it used
        try:
            state = load_checkpoint(saved[-1])
        except RunFailure as error:
            log.warning(f"[yellow]{error}; using the one before it[/]")
            if idist.get_rank() == 0:  # the others skip it too, and leave the file to process 0
                with contextlib.suppress(FileNotFoundError):
                    saved[-1].rename(saved[-1].with_suffix(".damaged"))
            saved.pop()
            continue
        Checkpoint.load_objects(to_save, state)
        done = engine.state.epoch
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(done)
        if done >= epochs:
            engine.state.history = list(history.restored)
            log.info(f"{key}: finished in an earlier run, loaded from {saved[-1].name}")
            _STAGES.resumed.append(f"{key} (done)")
            return True
        log.info(f"{key}: resuming after epoch {done} of {epochs}")
        _STAGES.resumed.append(f"{key} (epoch {done})")
        # Ignite's Checkpoint forgets what it saved in an earlier process: tell it, so the
        # older file is pruned as usual
        for f in saved:
            checkpoint._saved.append(Checkpoint.Item(int(f.stem.split("_")[-1]), f.name))  # noqa: SLF001
        break
    engine.add_event_handler(Events.EPOCH_COMPLETED, _drain_loader)
    engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    return False


def _drain_loader(engine: Engine) -> None:
    """Run the epoch's data iterator to its end before the checkpoint. With ``drop_last`` the
    sampler still holds the indices of the dropped batch, and PyTorch's ``RandomSampler`` draws
    once more from the loader's generator when it is exhausted; Ignite exhausts it at the start
    of the next epoch. Done here instead, the saved generator state is the one the next epoch
    starts from, in the first run and in a resumed one alike (the order of the batches does not
    change). Ignite keeps the iterator in a private attribute; without it, nothing is done."""
    iterator = getattr(engine, "_dataloader_iter", None)
    if iterator is not None:
        for _ in iterator:
            pass


def check_finite_loss(engine: Engine, stage: str, optimizer: torch.optim.Optimizer | None,
                      checkpointed: bool = True) -> None:
    """End the stage on the first non-finite loss with one message that names the stage, epoch
    and iteration and the usual causes; the last epoch checkpoint stays as it was."""

    def check(e: Engine) -> None:
        out = e.state.output
        value = out.get("loss") if isinstance(out, dict) else out
        if value is None or math.isfinite(float(value)):
            return
        lr = f" (it is {optimizer.param_groups[0]['lr']:.3g} now)" if optimizer is not None else ""
        where = (f" The last good checkpoint (epoch {e.state.epoch - 1}) is kept in "
                 f"{_STAGES.run_dir.path / 'stages'}." if checkpointed and _STAGES is not None
                 and e.state.epoch > 1 else "")
        raise NonFiniteLoss(
            f"{stage}: the loss became {float(value)} at epoch {e.state.epoch}, iteration "
            f"{e.state.iteration}. Likely causes: a learning rate too high{lr}, loss weights too "
            f"large, or non-finite input images.{where} Lower the rate (for SGD, e.g. --gin-bindings "
            f"'torch.optim.SGD.lr = 0.01') and start again with --fresh")

    engine.add_event_handler(Events.ITERATION_COMPLETED, check)


class NonFiniteLoss(RunFailure):
    """A training stage's loss became NaN or infinite."""
