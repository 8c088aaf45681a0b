"""Ignite handlers shared by the graphs: rich progress bars and the run directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import gin
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

console = Console(stderr=True)


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
