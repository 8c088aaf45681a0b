"""Command line: ``python -m components.run --gin FILE [--gin FILE ...] [--gin-bindings B ...]``.

Parses the gin files and bindings, then calls the configured graph (``run.graph``). A gin
error (unknown configurable, misspelt parameter, bad value, missing file) prints one message
naming the file and binding and exits with status 2 without writing anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import gin

import components  # noqa: F401  (registers the components)
import graphs  # noqa: F401  (registers the graphs)
from components.gin_files import add_search_paths, gin_dir, locate, search_paths
from graphs.handlers import RunDir, console, setup_logging
from graphs.report import show_metrics

CONFIG_ERROR = 2


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
    run_dir = RunDir(args.run_dir or Path("runs") / f"{Path(args.gin[-1]).stem}-{stamp}")
    try:
        metrics = run(run_dir)
    except Exception as error:
        if run_dir.created:
            raise  # the run had started: a real failure, show the traceback
        # Raised before anything was written: a bad value or a missing input.
        console.print(f"[bold red]error[/]: {error}")
        return CONFIG_ERROR
    show_metrics(metrics)
    console.print(f"run directory: [bold]{run_dir.path}[/]")  # shown even with --quiet
    return 0


if __name__ == "__main__":
    sys.exit(main())
