"""Ignite handlers shared by the graphs: logging, rich progress bars and the run directory.

Graphs log through the ``components`` logger (Python logging); :func:`setup_logging` routes it
through rich's handler at the level the command line asks for (``--quiet``: warnings only and
no progress bars; ``--verbose``: debug messages too, with their source lines).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import gin
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
    py_warnings.propagate = False


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


@contextlib.contextmanager
def progress(engine: Engine, description: str, show: str | None = "loss"):
    """Show a rich progress bar over every iteration of ``engine`` while the block runs.

    ``show`` names a key of the engine's output dict to print beside the bar (e.g. the loss).
    """
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


class RunDir:
    """The run's output folder, created on first write so a run that fails to start leaves
    nothing behind. Files are written under a temporary name and renamed into place."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def created(self) -> bool:
        return self.path.exists()

    def file(self, name: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        target = self.file(name)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")

    def save_operative_config(self) -> Path:
        """Write what gin actually bound so far (it lists only configurables that were called)."""
        return self.write_text("operative_config.gin", gin.operative_config_str())


def save_checkpoint(run_dir: RunDir, model: nn.Module, engine: Engine, name: str) -> Path:
    """Save ``model`` with Ignite's ``Checkpoint`` and ``DiskSaver`` (which writes to a temporary
    file and renames it into place) under ``<run_dir>/checkpoints``; return the file's path.
    Load it with ``Checkpoint.load_objects({"model": m}, torch.load(path, weights_only=True))``."""
    folder = run_dir.file("checkpoints")
    checkpoint = Checkpoint({"model": model}, DiskSaver(folder, require_empty=False), filename_prefix=name)
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
