"""Run one experiment over sampled protocols × imbalance ratios × seeds; report mean, std and worst.

``python -m components.suite --gin gin/distill.gin --dataset digits --splits 10 --ratios 10 50
--out runs/suite-digits`` runs ``components.run`` once per (split, ratio, seed), binding
``make_protocol.split_seed``, ``make_protocol.ratio`` and ``SEED``, each into
``<out>/<dataset>-split<S>-ratio<R>-seed<N>/``, and writes ``<out>/summary.json``: per metric key
of ``metrics.json`` (dotted, e.g. ``test.new``) its mean, std, worst value and the run it came
from, the same per ratio (``by_ratio``), and one row per run with the classes its split drew.
A suite started again on the same ``--out`` skips the runs that finished and resumes the others.
docs/suite.md has the details (which data file ``--dataset`` adds, the direction of "worst").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import gin
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from components.run import CONFIG_ERROR, INTERRUPTED, ConfigError, parse_config, prepare_run_dir
from components.run import main as run_main
from components.seeds import _fmt, _stats, summarize
from graphs.handlers import RunDir, console

# The data file --dataset adds for each graph when the gin files' data is another dataset:
# single-round graphs take the plain protocol, the continual loop its phased stream.
DATA_FILES = {
    "digits": {"lifecycle": "gin/data/digits.gin", "novelty": "gin/data/digits.gin",
               "discovery": "gin/data/digits.gin", "continual": "gin/data/digits_phased.gin"},
    "fmnist": {"lifecycle": "gin/data/fmnist.gin", "novelty": "gin/data/fmnist.gin",
               "discovery": "gin/data/fmnist.gin", "continual": "gin/data/fmnist_phased.gin"},
}
# What the suite binds itself; a --gin-bindings of one of these would be silently overridden.
SUITE_AXES = re.compile(r"^\s*(SEED|make_protocol\.(split_seed|ratio))\s*=")

# The direction of "worst" (docs/suite.md, "summary.json"): higher is worse for these (the last dotted part,
# or any forgetting), the farthest from the true number for counts that estimate one, no
# direction for plain counts; for everything else (accuracies, AUROC, AUPR, precision, recall,
# NMI, ARI) the lowest is the worst.
HIGHER_IS_WORSE = ("fpr95", "seconds", "duplicates", "spurious")
TRUTH = {"discovered": "true_new", "k_estimated": "k_new"}  # metric -> the metrics.json key of its truth
NO_DIRECTION = ("k_new",)
RESERVED = ("by_ratio", "runs", "suite")  # summary.json's keys that are not metrics


def worst_direction(key: str) -> str | None:
    """``"lowest"``, ``"highest"``, ``"farthest from the truth"`` or None (no worst) for a
    summary key such as ``test.new``, ``forgetting.old`` or ``novelty.fpr95``."""
    last = key.rsplit(".", 1)[-1]
    if key in TRUTH:
        return "farthest from the truth"
    if key in NO_DIRECTION:
        return None
    if key.startswith("forgetting") or last in HIGHER_IS_WORSE:
        return "highest"
    return "lowest"


def run_values(metrics: dict) -> dict[str, float | None]:
    """The reported metrics of one run (the keys :func:`components.seeds.summarize` gives),
    None where the run has no such value (null, NaN)."""
    out = {}
    for key, stats in summarize([metrics]).items():
        value = stats["values"][0] if stats["values"] else None
        out[key] = value if value is not None and math.isfinite(value) else None
    return out


def summarize_runs(runs: Sequence[dict], names: Sequence[str] | None = None) -> dict[str, dict]:
    """``{key: {mean, std, worst, worst_is, worst_run, values}}`` over the ``metrics.json`` of
    several runs (``names`` name them in ``worst_run``; default their index). ``values`` are in
    run order with the runs that have no value (null) left out of them and of every statistic;
    ``std`` is the population std (as ``components.seeds``); ``worst`` follows
    :func:`worst_direction`, the first run on a tie; a key with no direction or no value has
    ``worst`` None."""
    names = list(names) if names is not None else list(range(len(runs)))
    per_run = [run_values(m) for m in runs]
    keys = list(dict.fromkeys(k for values in per_run for k in values))
    out = {}
    for key in keys:
        pairs = [(i, v[key]) for i, v in enumerate(per_run) if v.get(key) is not None]
        direction = worst_direction(key)
        if direction == "farthest from the truth":
            pairs_true = [(i, v) for i, v in pairs if runs[i].get(TRUTH[key]) is not None]
            pick = max(pairs_true, key=lambda p: abs(p[1] - runs[p[0]][TRUTH[key]]), default=None)
        elif direction == "highest":
            pick = max(pairs, key=lambda p: p[1], default=None)
        elif direction == "lowest":
            pick = min(pairs, key=lambda p: p[1], default=None)
        else:
            pick = None
        out[key] = {**_stats([v for _, v in pairs]), "worst_is": direction,
                    "worst": None if pick is None else pick[1],
                    "worst_run": None if pick is None else names[pick[0]]}
    return out


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


@dataclass
class Planned:
    """One run of the suite."""

    split: int
    ratio: float
    seed: int
    dataset: str
    bindings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.dataset}-split{self.split}-ratio{_number(self.ratio)}-seed{self.seed}"


def _graph_and_dataset() -> tuple[str | None, str | None]:
    """The parsed configuration's graph (``run.graph``) and the dataset its protocol reads
    (``digits``, ``fmnist``, or the source's name); None where it binds none."""
    def query(name: str):
        try:
            return gin.query_parameter(name)
        except ValueError:
            return None

    graph, source = query("run.graph"), query("make_protocol.source")
    graph = getattr(getattr(graph, "configurable", None), "name", None)
    source = getattr(getattr(source, "configurable", None), "name", None)
    if source == "torchvision_dataset":
        name = query("torchvision_dataset.name")
        source = {"FashionMNIST": "fmnist"}.get(name, name)
    return graph, source


def compose(files: Sequence[str], dataset: str, bindings: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(data file, bindings)`` that run ``files`` on ``dataset``: when the files read another
    dataset, ``include '<data file>'`` (:data:`DATA_FILES`, by the files' graph) comes first —
    gin parses bindings after the files, so it overrides their data — then ``bindings``.
    Raises ConfigError for a graph that has no new classes to draw (no entry in the table) or
    files that do not read their protocol with ``make_protocol``."""
    parse_config(files, bindings)
    graph, source = _graph_and_dataset()
    where = ", ".join(files)
    if graph is None:
        raise ConfigError(f"{where} bind no run.graph: give an experiment file such as gin/distill.gin")
    if graph not in DATA_FILES[dataset]:
        raise ConfigError(f"{where} run the {graph} graph: the suite samples new classes, for the graphs "
                          f"{', '.join(sorted(DATA_FILES[dataset]))}; use components.seeds for others")
    if source is None:
        raise ConfigError(f"{where} ({graph}) bind no make_protocol.source: the suite samples protocols "
                          "of make_protocol (gin/data/*.gin), which these files do not use")
    if source == dataset:
        return None, list(bindings)
    data_file = DATA_FILES[dataset][graph]
    composed = [f"include '{data_file}'", *bindings]
    parse_config(files, composed)
    now = _graph_and_dataset()[1]
    if now != dataset:
        raise ConfigError(f"{where} with {data_file} still read {now}, not {dataset}: the bindings set "
                          "the data source after the data file")
    return data_file, composed


def plan(args: argparse.Namespace) -> tuple[str | None, list[Planned]]:
    """The data file the suite adds (or None) and every run of the suite, ratio by ratio, split
    by split, seed by seed (the order of summary.json's rows and values); checks the
    composition once (ConfigError)."""
    data_file, composed = compose(args.gin, args.dataset, args.gin_bindings)
    out = []
    for ratio in args.ratios:
        for split in range(args.first_split, args.first_split + args.splits):
            for seed in args.seeds:
                suite = [f"make_protocol.split_seed = {split}", f"make_protocol.ratio = {_number(ratio)}",
                         f"SEED = {seed}"]
                out.append(Planned(split, ratio, seed, args.dataset, [*composed, *suite]))
    return data_file, out


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """No warnings or log lines: the run itself reports them."""
    logger = logging.getLogger("components")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def drawn_classes(files: Sequence[str], bindings: Sequence[str]) -> dict[str, list]:
    """The classes a run's protocol has, by name: ``old`` in long-tail rank order (head first),
    ``new``, and for a phased stream ``phases`` (the new classes of each phase). Builds the
    protocol the run built (``make_protocol`` under its configuration)."""
    from components.data.splits import make_protocol

    parse_config(files, bindings)
    with _silenced():
        protocol = make_protocol()
    names = protocol.class_names
    out = {"old": names[:protocol.n_old], "new": names[protocol.n_old:]}
    if len(protocol.phases) > 2:
        out["phases"] = [[names[i] for i in phase] for phase in protocol.phases[1:]]
    return out


class _RunElapsed(ProgressColumn):
    """Time since the current run started."""

    def render(self, task) -> Text:
        started = task.fields.get("started")
        if started is None or task.finished:
            return Text("")
        elapsed = timedelta(seconds=int(time.monotonic() - started))
        return Text(f"this run {elapsed}", style="progress.elapsed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.suite",
        description="Run gin files over sampled protocols × ratios × seeds: python -m components.suite "
                    "--gin gin/distill.gin --dataset digits --splits 10 --ratios 10 50 --out runs/suite",
        epilog="docs/suite.md explains the sampling, summary.json and the direction of 'worst'.",
    )
    add = parser.add_argument
    add("--gin", action="append", required=True, metavar="FILE", help="gin file; repeat to compose several")
    add("--dataset", required=True, choices=sorted(DATA_FILES),
        help="the data; another dataset's files get this one's data file for their graph")
    add("--splits", type=int, required=True, metavar="N", help="how many protocols (split seeds) to draw")
    add("--first-split", type=int, default=0, metavar="S", help="the first split seed (default 0)")
    add("--ratios", type=float, nargs="+", required=True, metavar="R",
        help="imbalance ratios of the old classes")
    add("--seeds", type=int, nargs="+", default=[0], metavar="S", help="run seeds (SEED), default 0")
    add("--gin-bindings", action="extend", nargs="+", default=[], metavar="B",
        help="more bindings for every run, e.g. 'train.epochs = 20'")
    add("--out", required=True, metavar="DIR", help="folder of the runs and summary.json")
    add("--loud", action="store_true", help="show each run's progress bars and info lines")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.splits < 1:
        parser.error(f"--splits must be >= 1, got {args.splits}")
    if args.first_split < 0:
        parser.error(f"--first-split must be >= 0 (a numpy seed), got {args.first_split}")
    for flag, values in (("--ratios", args.ratios), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            parser.error(f"{flag} lists a value twice: {values}")
    if any(r < 1 for r in args.ratios):
        parser.error(f"--ratios must be >= 1 (n_max / n_min), got {args.ratios}")
    axes = [b for b in args.gin_bindings if SUITE_AXES.match(b)]
    if axes:
        parser.error(f"--gin-bindings {axes}: the suite binds SEED, make_protocol.split_seed and "
                     "make_protocol.ratio itself; use --seeds, --splits / --first-split and --ratios")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    out = Path(args.out)
    try:
        data_file, runs = plan(args)
    except ConfigError as error:
        console.print(f"[bold red]config error[/]: {error}")
        return CONFIG_ERROR
    quiet = [] if args.loud else ["--quiet"]
    bar = Progress(TextColumn("[bold]suite"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[run]}"), _RunElapsed(), console=console)
    rows, metrics, classes = [], [], {}
    try:
        with bar:
            task = bar.add_task("suite", total=len(runs), run="", started=None)
            for planned in runs:
                bar.update(task, run=planned.name, started=time.monotonic())
                result = _run_one(planned, args, out / planned.name, quiet)
                if planned.split not in classes:  # drawn by the split seed alone
                    classes[planned.split] = drawn_classes(args.gin, planned.bindings)
                metrics.append(result)
                rows.append({"run": planned.name, "split": planned.split, "ratio": _number(planned.ratio),
                             "seed": planned.seed, "protocol": result.get("protocol"),
                             "classes": classes[planned.split], "metrics": run_values(result)})
                bar.advance(task)
            bar.update(task, run="done", started=None)
    except SuiteStop as stop:
        console.print(f"[bold red]suite stopped[/]: {stop}")
        return stop.code
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: run the same suite command again (same --out {out}) to "
                      "resume; finished runs are skipped")
        return INTERRUPTED
    summary = summary_of(rows, metrics)
    summary["suite"] = {"gin": args.gin, "dataset": args.dataset, "bindings": args.gin_bindings,
                        "data_file": data_file, "splits": sorted({r.split for r in runs}),
                        "ratios": [_number(r) for r in args.ratios], "seeds": args.seeds}
    path = RunDir(out).write_json("summary.json", summary)
    console.print(table(summary, [_number(r) for r in args.ratios]))
    console.print(f"summary: [bold]{path}[/]")
    return 0


class SuiteStop(Exception):
    """A run failed or cannot run: the suite stops with ``code`` (earlier runs are kept)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _run_one(planned: Planned, args: argparse.Namespace, folder: Path, quiet: list[str]) -> dict:
    """Run one planned run, or find it finished in ``folder`` (``components.run``'s own check:
    a finished run of the same configuration); its metrics. Raises SuiteStop when it fails."""
    try:
        parse_config(args.gin, planned.bindings)
        finished = prepare_run_dir(folder, gin.config_str(), fresh=False)
    except ConfigError as error:
        raise SuiteStop(f"run {planned.name} cannot start: {error}. (For the suite: the same --gin and "
                        "--gin-bindings resume this --out; another --out starts a new suite.)",
                        CONFIG_ERROR) from None
    if finished is not None:
        console.print(f"{planned.name}: finished earlier, skipped")
        return finished
    argv = [a for f in args.gin for a in ("--gin", f)]
    argv += [a for b in planned.bindings for a in ("--gin-bindings", b)]
    try:
        code = run_main([*argv, "--run-dir", str(folder), *quiet])
    except Exception:
        console.print(f"[bold red]suite stopped[/]: run {planned.name} crashed; its folder: {folder}")
        raise
    if code == INTERRUPTED:
        raise KeyboardInterrupt
    if code != 0:
        log = " (its error.log has the traceback)" if (folder / "error.log").exists() else ""
        raise SuiteStop(f"run {planned.name} failed (exit {code}); its folder: {folder}{log}. Earlier runs "
                        "are kept: run the same suite command again to resume", code)
    return json.loads((folder / "metrics.json").read_text())


def summary_of(rows: Sequence[dict], metrics: Sequence[dict]) -> dict:
    """summary.json without its ``suite`` entry: every metric key over all runs, ``by_ratio``
    (the same per ratio, keyed by the ratio as text) and ``runs`` (the rows)."""
    names = [row["run"] for row in rows]
    out = summarize_runs(metrics, names)
    clash = set(out) & set(RESERVED)
    if clash:
        raise ValueError(f"metrics named {sorted(clash)} clash with summary.json's own keys")
    out["by_ratio"] = {}
    for ratio in dict.fromkeys(row["ratio"] for row in rows):
        index = [i for i, row in enumerate(rows) if row["ratio"] == ratio]
        out["by_ratio"][str(ratio)] = summarize_runs([metrics[i] for i in index], [names[i] for i in index])
    out["runs"] = list(rows)
    return out


def table(summary: dict, ratios: Sequence[int | float]) -> Table:
    """The summary as a rich table: mean ± std, worst and its run over all runs, then per ratio."""
    runs = summary["runs"]
    protocol = str(runs[0]["protocol"]).rsplit("/split", 1)[0]
    splits, seeds = sorted({r["split"] for r in runs}), sorted({r["seed"] for r in runs})
    title = (f"{protocol} suite: {len(runs)} runs (splits {splits[0]}–{splits[-1]}, ratios "
             f"{', '.join(map(str, ratios))}, seeds {', '.join(map(str, seeds))})")
    short = {r["run"]: f"split{r['split']} r{r['ratio']} s{r['seed']}" for r in runs}
    out = Table(title=title)
    out.add_column("metric", no_wrap=True)
    for column in ("mean ± std", "worst", "worst run"):
        out.add_column(column, justify="right")
    by_ratio = len(ratios) > 1
    if by_ratio:
        for ratio in ratios:
            out.add_column(f"ratio {ratio}: mean / worst", justify="right")
    for key, s in summary.items():
        if key in RESERVED:
            continue
        std = "" if s["std"] is None else f" ± {_fmt(key, s['std'])}"
        cells = [key, _fmt(key, s["mean"]) + std, _fmt(key, s["worst"]), short.get(s["worst_run"], "–")]
        if by_ratio:
            for ratio in ratios:
                r = summary["by_ratio"][str(ratio)].get(key, {"mean": None, "worst": None})
                cells.append(f"{_fmt(key, r['mean'])} / {_fmt(key, r['worst'])}")
        out.add_row(*cells)
    return out


if __name__ == "__main__":
    sys.exit(main())
