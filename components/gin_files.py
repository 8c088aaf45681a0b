"""The experiment files (``gin/``) and gin's search path, so they are found from any folder.

The gin files live in ``gin/`` at the repository root and are shipped inside the wheel as
``components/gin/`` (``pyproject.toml`` maps one onto the other). :func:`add_search_paths` puts
that folder on gin's search path twice: as itself, so ``--gin distill.gin`` works, and through
its parent, so the paths the files and the docs use (``gin/distill.gin``, ``include
'gin/data/digits.gin'``) resolve wherever the command runs. gin tries the working directory
first, so a ``gin/distill.gin`` of your own beside you wins over the shipped one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gin

_PACKAGE = Path(__file__).resolve().parent
_added: set[str] = set()


def gin_dir() -> Path:
    """The folder holding the shipped experiment files.

    ``components/gin`` in an installed wheel; ``gin/`` beside the package in a source checkout
    (also what an editable install sees).
    """
    for candidate in (_PACKAGE / "gin", _PACKAGE.parent / "gin"):
        if (candidate / "distill.gin").is_file():
            return candidate
    raise FileNotFoundError(
        f"the experiment files are missing: looked for distill.gin in {_PACKAGE / 'gin'} and "
        f"{_PACKAGE.parent / 'gin'}; reinstall the package (pip install components) or run from "
        "a clone of the repository"
    )


def search_paths() -> list[Path]:
    """Where a relative gin path is looked up, in order: the working directory, then the
    shipped files by their own name and by their ``gin/...`` path."""
    shipped = gin_dir()
    return [Path.cwd(), shipped, shipped.parent]


def _not_a_miss_of_gin(record: logging.LogRecord) -> bool:
    """False for the "Path not found" error gin's package-resource reader logs (on the root
    logger) each time a search-path prefix does not hold the file, which is expected when a
    later prefix does; gin still raises when no prefix has it."""
    return not (record.msg == "Path not found: %s" and record.pathname.endswith("resource_reader.py"))


def add_search_paths() -> None:
    """Put the shipped gin files on gin's search path (once per process; idempotent)."""
    for path in search_paths()[1:]:
        key = os.fspath(path)
        if key not in _added:
            gin.add_config_file_search_path(key)
            _added.add(key)
    root = logging.getLogger()
    if _not_a_miss_of_gin not in root.filters:
        root.addFilter(_not_a_miss_of_gin)


def locate(name: str) -> Path | None:
    """The file a relative or absolute gin path names, as gin will find it; None if nowhere."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path if path.is_file() else None
    for prefix in search_paths():
        if (prefix / path).is_file():
            return prefix / path
    return None


def resolve(value):
    """A value ``gin.query_parameter`` returned, references resolved: ``@X`` is the callable,
    ``@X()`` calls it (macros such as ``%SEED`` are references too); a literal as it is."""
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value
