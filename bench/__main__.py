"""Run the benchmarks and print a table of medians and ratios: ``python -m bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from bench import (
    crt_cache,
    data_path,
    distributed,
    ignite_overhead,
    image_store,
    kmeans,
    scoring,
    torch_compile,
)

BENCHMARKS = {"ignite_overhead": ignite_overhead, "data_path": data_path, "crt_cache": crt_cache,
              "scoring": scoring, "kmeans": kmeans, "image_store": image_store,
              "distributed": distributed, "torch_compile": torch_compile}


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def table(results: list[tuple[str, dict]], repeats: int, load: tuple[float, float]) -> Table:
    out = Table(title=f"bench: medians over {repeats} repeats "
                      f"(torch {torch.__version__}, {torch.get_num_threads()} threads, "
                      f"{os.cpu_count()} CPUs {platform.machine()}, "
                      f"1-min load avg {load[0]:.2f} before / {load[1]:.2f} after)")
    for column, justify in (("benchmark", "left"), ("row", "left"), ("median s", "right"),
                            ("images/s", "right"), ("ratio", "right"), ("target", "right"),
                            ("", "center"), ("notes", "left")):
        out.add_column(column, justify=justify, overflow="fold")
    for bench, row in results:
        ok = row.get("ok")
        out.add_row(
            bench, row["name"], _fmt(row.get("median_s"), ".3f"),
            _fmt(row.get("images_per_s"), ",.0f"), _fmt(row.get("ratio"), ".2f"),
            row.get("target", ""),
            "" if ok is None else ("[green]ok[/]" if ok else "[red]MISS[/]"),
            row.get("notes", ""),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per side (median reported; default 5)")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only this benchmark (may be given more than once)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    before = _load()
    if before > (os.cpu_count() or 1) / 2:
        print(f"bench: warning: 1-min load average is {before:.2f} before starting; other "
              f"processes compete for the {os.cpu_count()} CPUs and the timings will be noisy "
              f"(with OpenMP threads, badly so)", file=sys.stderr, flush=True)
    chosen = [name for name in BENCHMARKS if not args.only or name in args.only]
    results = []
    for name in chosen:
        print(f"bench: {name} (repeats={args.repeats}) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows = BENCHMARKS[name].run(args.repeats)
        print(f"bench: {name} took {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
        results += [(name, row) for row in rows]
    Console(width=max(Console().width, 160)).print(table(results, args.repeats, (before, _load())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
