"""The end-of-run tables (rich) for the metrics the lifecycle and long-tail graphs return."""

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


def longtail_table(metrics: dict) -> Table:
    table = Table(title=f"{metrics['protocol']} (seed {metrics['seed']}, {metrics['seconds']:.0f} s)")
    for column in ("method", "all", "many", "medium", "few", "tail-3", "chosen", "seconds"):
        table.add_column(column, justify="left" if column in ("method", "chosen") else "right")

    for name, row in metrics["methods"].items():
        chosen = ", ".join(f"{k}={v:g}" for k, v in row["info"].items() if isinstance(v, (int, float)))
        table.add_row(name, *(_pct(row[k]) for k in ("all", "many", "medium", "few", "tail3")),
                      chosen, f"{row['seconds']:.2f}")
    return table


def novelty_table(m: dict) -> Table:
    acc = m["old_accuracy"]
    table = Table(title=f"{m['protocol']} (seed {m['seed']}, {m['seconds']:.0f} s): novelty scores "
                        f"on the stream, new = positive; old-class test accuracy {_pct(acc['all'])} %, "
                        f"T = {m['temperature']:.2f}, pool by {m['threshold_rule']}")
    for column in ("score", "AUROC", "FPR@95", "AUPR new", "AUPR old", "pool precision", "pool recall"):
        table.add_column(column, justify="left" if column == "score" else "right")
    for name, row in m["scores"].items():
        if "error" in row:
            table.add_row(name, f"[yellow]not measured: {row['error']}[/]")
            continue
        n, pool = row["novelty"], row["pool"]
        table.add_row(name, *(f"{n[k]:.3f}" for k in ("auroc", "fpr95", "aupr_new", "aupr_old")),
                      _pct(pool["precision"]), _pct(pool["recall"]))
    return table


def discovery_table(m: dict) -> Table:
    table = Table(title=f"{m['protocol']} (seed {m['seed']}, {m['seconds']:.0f} s): the stream clustered")
    table.add_column("metric")
    table.add_column("value", justify="right")
    stream, new = m["stream"], m["assigned_new"]
    table.add_row("clustering accuracy all / old / new (%)",
                  " / ".join(_pct(stream[g]) for g in ("all", "old", "new")))
    table.add_row("class-balanced all / old / new (%)",
                  " / ".join(_pct(stream[f"{g}_balanced"]) for g in ("all", "old", "new")))
    table.add_row("NMI / ARI", f"{stream['nmi']:.3f} / {stream['ari']:.3f}")
    table.add_row("assigned-new precision / recall (%)", f"{_pct(new['precision'])} / {_pct(new['recall'])}")
    table.add_row("new classes clustered (true)", f"{m['k_new']} ({m['k_new_true']})")
    if m.get("k_estimated") is not None:
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in m["k_scores"].items())
        table.add_row("new classes estimated (score per candidate)", f"{m['k_estimated']} ({scores})")
    return table


def show_metrics(m: dict) -> None:
    """Print the end-of-run table of a lifecycle, long-tail, novelty or discovery run."""
    if "methods" in m:
        console.print(longtail_table(m))
    elif "assigned_new" in m:
        console.print(discovery_table(m))
    elif "scores" in m:
        console.print(novelty_table(m))
    else:
        console.print(metrics_table(m))
