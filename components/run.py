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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import difflib
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import gin

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
    setup_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        parse_config(args.gin, args.gin_bindings)
    except ConfigError as error:
        console.print(f"[bold red]config error[/]: {error}")
        return CONFIG_ERROR
    if args.print_config:
        print(gin.config_str())  # every binding the files and flags resolve to, macros included
        return 0
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.run_dir or Path("runs") / f"{Path(args.gin[-1]).stem}-{stamp}")
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


def execute(run_dir: RunDir) -> int:
    """Run the configured graph in ``run_dir`` and turn its failures into the promised exits."""
    try:
        with checkpointing(run_dir) as stages, stop_on_ctrl_c():
            metrics = run(run_dir)
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: run the same command again (same --run-dir "
                      f"{run_dir.path}) to resume after the last finished epoch")
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
                (run_dir.path / "error.log").write_text(traceback.format_exc())
        # without the "In call to configurable ..." lines gin adds on the way up
        message = "\n".join(line for line in str(error).splitlines()
                            if not line.strip().startswith("In call to configurable"))
        if isinstance(error, OSError):  # a failed read or write (a full disk, a size limit)
            message += "; earlier files are intact"
        console.print(f"[bold red]{'error' if started else 'config error'}[/]: {message}")
        return FAILED if started else CONFIG_ERROR
    if stages.resumed:
        console.print(f"resumed: {', '.join(stages.resumed)}")
    shutil.rmtree(run_dir.path / "stages", ignore_errors=True)  # the run is done: bounded disk
    (run_dir.path / "error.log").unlink(missing_ok=True)  # an earlier attempt's, now resumed
    run_dir.write_text(FINISHED, "")
    show_metrics(metrics)
    console.print(f"run directory: [bold]{run_dir.path}[/]")  # shown even with --quiet
    return 0


# bindings that say where things go, not what is computed: a run may resume with them changed
WHERE_ONLY = ("FeatureCache.root", "FeatureCache.max_bytes", "tensorboard.log_dir")


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
