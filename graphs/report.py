"""The end-of-run tables (rich) for the metrics the lifecycle and long-tail graphs return."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from graphs.handlers import console


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _lifecycle_rows(m: dict) -> list[tuple[str, str]]:
    test, shots = m["test"], m["shots"]
    offset = m.get("offset")
    lowered = [] if not offset else [
        ("held-out known images claimed by new outputs (%)",
         f"{_pct(offset['claimed_before'])} → {_pct(offset['claimed_after'])} "
         f"(lowered by {', '.join(f'{x:.3g}' for x in offset['offset'])})")]
    adjusted = m.get("logit_adjustment")
    adjustment = [] if not adjusted else [
        ("known classes' logit adjustment τ (held-out accuracy, %)",
         f"{adjusted['tau']:g} ({_pct(adjusted['held_out_before'])} → {_pct(max(adjusted['held_out']))})")]
    return [
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
        *adjustment,
        *lowered,
    ]


def _two_columns(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def metrics_table(m: dict) -> Table:
    return _two_columns(f"{m['protocol']} (seed {m['seed']}, {m['seconds']:.0f} s)", _lifecycle_rows(m))


def write_lifecycle_report(run_dir, m: dict, protocol, histories: dict, before: dict, after: dict,
                           scores, seen_new, trace, trigger: int, extras: dict,
                           embedding: str = "pca") -> Path:
    """``report.md`` in the run directory: the final table as Markdown and the plots it links
    (training curves, confusion matrix after distillation, per-class accuracy against training
    count, score histogram, pool size over the stream, a 2-D view of the pool)."""
    import numpy as np

    from components.metrics import hungarian_mapping, per_class_accuracy
    from graphs import plots

    n_old, names = protocol.n_old, list(protocol.class_names)
    title = f"{m['protocol']}, seed {m['seed']}"
    figures: list[tuple[str, str, str]] = []  # (file, heading, what it shows)

    def add(file: str, heading: str, caption: str) -> None:
        figures.append((file, heading, caption))

    plots.training_curves(run_dir.file("training_curves.png"), histories, f"{title}: training")
    last = {stage: h[-1] for stage, h in histories.items() if h}
    add("training_curves.png", "Training curves", "Mean loss per epoch of each stage" + "".join(
        f"; {stage} ends at loss {h['loss']:.3f}" + (f", batch accuracy {100 * h['accuracy']:.1f} %"
                                                     if "accuracy" in h else "")
        for stage, h in last.items()) + ".")

    truth, pred = after["targets"], after["logits"].argmax(1)
    mapping = hungarian_mapping(truth, pred)
    mapped = np.array([mapping.get(p, p) for p in pred])
    plots.confusion_plot(run_dir.file("confusion.png"), truth, mapped, names,
                         f"{title}: test set after distillation")
    add("confusion.png", "Confusion matrix after distillation",
        f"Rows: true class, columns: prediction; each discovered output is shown as the class it "
        f"was matched to (one Hungarian assignment over the test set). Test accuracy "
        f"{_pct(m['test']['all'])} % (old {_pct(m['test']['old'])} %, new {_pct(m['test']['new'])} %).")

    old_rows = {"before distillation": per_class_accuracy(before["targets"], before["logits"].argmax(1),
                                                          range(n_old)),
                "after distillation": per_class_accuracy(truth, mapped, range(n_old))}
    plots.per_class_accuracy_plot(run_dir.file("per_class_accuracy.png"), protocol.train_counts,
                                  {k: v.tolist() for k, v in old_rows.items()}, names[:n_old],
                                  f"{title}: old classes")
    rarest = int(np.argmin(protocol.train_counts))
    add("per_class_accuracy.png", "Per-class accuracy against training count",
        f"Old classes from head to tail. The rarest ({names[rarest]}, "
        f"{protocol.train_counts[rarest]} labeled images) goes from "
        f"{_pct(old_rows['before distillation'][rarest])} % to "
        f"{_pct(old_rows['after distillation'][rarest])} %.")

    plots.score_histogram(run_dir.file("scores.png"), scores, seen_new,
                          f"{title}: stream scores (AUROC {m['novelty']['auroc']:.3f})")
    add("scores.png", "Novelty scores, old against new stream samples",
        f"AUROC {m['novelty']['auroc']:.3f}; the pool threshold was {m['pool']['threshold']:.4g}.")

    plots.pool_over_stream(run_dir.file("pool.png"), [(0, 0), *trace], trigger, f"{title}: the pool")
    add("pool.png", "Pool size over the stream",
        f"{m['pool']['size']} samples pooled (precision {_pct(m['pool']['precision'])} %, recall "
        f"{_pct(m['pool']['recall'])} %), trigger at {trigger}.")

    if "pool_features" in extras and len(extras["pool_truth"]) >= 3:
        plots.embedding_plot(run_dir.file("pool_embedding.png"), extras["pool_features"],
                             extras["pool_truth"], extras["pool_clusters"], names,
                             f"{title}: pooled samples ({extras['cluster_on']})", method=embedding,
                             n_old=n_old)
        add("pool_embedding.png", f"The pool in 2-D ({embedding.upper()})",
            f"Pooled samples by true class (left) and by cluster (right); pool clustering accuracy "
            f"{_pct(m['pool_clustering']['all'])} % (new {_pct(m['pool_clustering']['new'])} %).")

    lines = [f"# {title}", "", f"{m['seconds']:.0f} s. Metrics in `metrics.json`, bindings in "
             "`operative_config.gin`.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _lifecycle_rows(m)]
    lines += [f"\n> {note}" for note in m.get("notes", [])]
    for file, heading, caption in figures:
        lines += ["", f"## {heading}", "", caption, "", f"![{heading}]({file})"]
    return run_dir.write_text("report.md", "\n".join(lines) + "\n")


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


def _points(value) -> str:
    return "–" if value is None else f"{value:+.1f}"


def _continual_rows(m: dict) -> list[tuple[str, str]]:
    final, forgetting = m["final"], m["forgetting"]
    rows = [
        ("final test accuracy, all / old / new (%)",
         " / ".join(_pct(final[k]) for k in ("all", "old", "new"))),
        ("final, each phase's new classes (%)", " / ".join(_pct(v) for v in final["phases"])),
        ("average incremental accuracy (%)", _pct(m["average_incremental"])),
        ("forgetting, old / each phase (points)",
         " / ".join(_points(v) for v in [forgetting["old"], *forgetting["phases"]])),
        ("old classes by their own outputs, no Hungarian (%) / forgetting (points)",
         f"{_pct(final.get('old_own'))} / {_points(forgetting.get('old_own'))}"),
        ("classes discovered (true new) / duplicates / spurious",
         f"{m['discovered']} ({m['true_new']}) / {m['duplicates']} / {m['spurious']}"),
        ("rounds / current version", f"{len(m['rounds']) - 1} / v{m['version']}"),
    ]
    return rows


def continual_table(m: dict) -> Table:
    return _two_columns(f"{m['protocol']}, continual (seed {m['seed']}, {m['seconds']:.0f} s)",
                        _continual_rows(m))


def write_continual_report(run_dir, m: dict, state, protocol) -> Path:
    """``report.md`` of a continual run: the final table, the accuracy per round, the classes
    over time, the pool over the whole stream with every round marked, each round's decisions
    and the version lineage."""
    from graphs import plots

    title = f"{m['protocol']}, seed {m['seed']}"
    groups = ["old", *[f"phase {i}" for i in range(1, len(protocol.phases))]]
    plots.accuracy_per_round(run_dir.file("accuracy_per_round.png"), m["matrix"], groups,
                             f"{title}: test accuracy after every round")
    starts = [0, *protocol.segment_ends[:-1]]
    positions = [r["position"] for r in m["rounds"]]
    true_seen = [protocol.n_old + sum(len(ids) for phase, ids in enumerate(protocol.phases[1:], start=1)
                                      if pos > starts[phase - 1]) for pos in positions]
    plots.classes_over_time(run_dir.file("classes.png"), positions, [r["classes"] for r in m["rounds"]],
                            true_seen, f"{title}: classes over time")
    plots.pool_over_rounds(run_dir.file("pool.png"), state.trace,
                           [(r["round"], r["position"]) for r in m["rounds"][1:]], protocol.segment_ends,
                           f"{title}: the pool over the stream")
    lines = [f"# {title}: the continual loop", "",
             f"{m['seconds']:.0f} s. Metrics in `metrics.json`, bindings in `operative_config.gin`, "
             "every model version in `versions/`.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _continual_rows(m)]
    lines += ["", "## Accuracy per round", "",
              "Test accuracy (one Hungarian assignment over the test images of the classes seen so far) "
              "of each class group after every round.", "", "![Accuracy per round](accuracy_per_round.png)",
              "", "| round | stream | pooled | k | accepted | rejected | decision | classes | all | "
              + " | ".join(groups) + " |", "|" + "---|" * (9 + len(groups))]
    for r in m["rounds"]:
        acc = r["accuracy"]
        lines.append(f"| {r['round']} | {r['start']}→{r['position']} | {r['pooled']} | "
                     f"{'–' if r['k_estimated'] is None else r['k_estimated']} | {len(r['accepted'])} | "
                     f"{len(r['rejected'])} | {r['promotion']['decision']} | {r['classes']} | "
                     f"{_pct(acc['all'])} | " + " | ".join(_pct(acc.get(g)) for g in groups) + " |")
    lines += ["", "## Classes over time", "", "![Classes over time](classes.png)", "",
              "## The pool over the stream", "",
              "Every round discovers at a dotted line; rejected samples wait in the pool for the next "
              "rounds, then age out.", "", "![The pool over the stream](pool.png)", "",
              "## Decisions", ""]
    for r in m["rounds"][1:]:
        lines.append(f"- **round {r['round']}** ({r['trigger']}): {r['promotion']['why']}.")
        held = (r.get("pool_truth") or {}).get("classes")
        if held:  # the true classes, read for the report only
            named = sorted(held.items(), key=lambda kv: -kv[1])
            lines.append("  - the pool held (true classes, never read by a decision): " + ", ".join(
                f"{'distractors' if int(c) < 0 else protocol.class_names[int(c)]} {n}" for c, n in named))
        for verdict in r["accepted"]:
            lines.append(f"  - accepted cluster of {verdict['size']}, stability {verdict['stability']:.2f}, "
                         f"separation {verdict['separation']:.2f}")
        for verdict in r["rejected"]:
            lines.append(f"  - rejected cluster of {verdict['size']}: {'; '.join(verdict['reasons'])}")
        before = (r.get("consolidation") or {}).get("accuracy_before")
        if before:  # test accuracy, for the report only
            def three(accuracy: dict) -> str:
                return " / ".join(_pct(accuracy.get(g)) for g in ("all", "old", "new"))

            decision = r["consolidation"].get("decision", "not run")
            lines.append(f"  - consolidation ({decision}): test accuracy (all / old / new) "
                         f"{three(before)} % before, {three(r['accuracy'])} % after")
    if m.get("class_outputs"):
        lines += ["", "## Where each class's test images go", "",
                  "The final model's predictions on the test images of every class seen, the outputs that "
                  "take most of them. A class with no output of its own shows up in another's, and the "
                  "accuracies above, after one Hungarian assignment, may then give that output to it.", "",
                  "| class | test images | outputs (share) |", "|---|---|---|"]
        for row in m["class_outputs"]:
            lines.append(f"| {row['class']} | {row['samples']} | " + ", ".join(
                f"{name} {_pct(share)} %" for name, share in row["outputs"]) + " |")
    by_round = [r for r in m["rounds"] if r.get("class_outputs")]
    if by_round:
        lines += ["", "## Round by round", "",
                  "The output that takes most of each class's test images after every round (its share), "
                  "from the class's first segment on: a new class taken by another class's output was "
                  "absorbed by it, and may stay out of the pool while that output is sure of it.", "",
                  "| class | " + " | ".join(f"round {r['round']}" for r in by_round) + " |",
                  "|---|" + "---|" * len(by_round)]
        classes = list(dict.fromkeys(row["class"] for r in by_round for row in r["class_outputs"]))
        for name in classes:
            cells = []
            for r in by_round:
                row = next((row for row in r["class_outputs"] if row["class"] == name), None)
                top = row["outputs"][0] if row and row["outputs"] else None
                cells.append("–" if top is None else f"{top[0]} {_pct(top[1])} %")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Lineage", "", "| version | parent | round | classes | decision |",
              "|---|---|---|---|---|"]
    versions = sorted((run_dir.path / "versions").glob("v*"), key=lambda f: int(f.name[1:]))
    import json

    for folder in versions:
        table = json.loads((folder / "classes.json").read_text())
        parent = "–" if table["parent"] is None else f"v{table['parent']}"
        lines.append(f"| v{table['version']} | {parent} | {table['round']} | {len(table['classes'])} | "
                     f"{table['decision']} |")
    return run_dir.write_text("report.md", "\n".join(lines) + "\n")


def show_metrics(m: dict) -> None:
    """Print the end-of-run table of a lifecycle, continual, long-tail, novelty or discovery run."""
    if m.get("graph") == "continual":
        console.print(continual_table(m))
    elif "methods" in m:
        console.print(longtail_table(m))
    elif "assigned_new" in m:
        console.print(discovery_table(m))
    elif "scores" in m:
        console.print(novelty_table(m))
    else:
        console.print(metrics_table(m))
