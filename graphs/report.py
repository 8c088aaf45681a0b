"""The end-of-run table (rich) for the metrics the lifecycle graph returns."""

from __future__ import annotations

import math

from rich.table import Table

from graphs.handlers import console


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def metrics_table(m: dict) -> Table:
    table = Table(title=f"{m['protocol']} (seed {m['seed']}, {m['seconds']:.0f} s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    test, shots = m["test"], m["shots"]
    rows = [
        ("test accuracy, all classes (%)", _pct(test["all"])),
        ("test accuracy, old classes (%)", _pct(test["old"])),
        ("test accuracy, new classes (%)", _pct(test["new"])),
        ("old classes before distillation (%)", _pct(m["teacher_old_accuracy"])),
        ("old many / medium / few-shot (%)",
         " / ".join(_pct(shots[g]) for g in ("many", "medium", "few"))),
        ("novelty AUROC on the stream (new = positive)", f"{m['novelty']['auroc']:.3f}"),
        ("pool size / precision / recall (%)",
         f"{m['pool']['size']} / {_pct(m['pool']['precision'])} / {_pct(m['pool']['recall'])}"),
        ("pool clustering accuracy all / new (%)",
         f"{_pct(m['pool_clustering']['all'])} / {_pct(m['pool_clustering']['new'])}"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def show_metrics(m: dict) -> None:
    console.print(metrics_table(m))
