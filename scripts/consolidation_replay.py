"""Replay a continual run's consolidation offline, under other settings, in seconds.

``python scripts/consolidation_replay.py RUN [--min-stability S ...] [--k K ...] [--k-from density]
[--k-floor F ...]``

RUN is a continual run made with ``--gin-bindings "continual.consolidation_inputs = True"``,
which writes what consolidation clusters to ``RUN/loop/consolidation_inputs.npz``
(:func:`graphs.consolidate.save_inputs`). The script first replays the run's own settings and
checks that they give the run's relabeling again (every output's stability and the kept outputs
in ``metrics.json``); then each ``--min-stability`` (the line under which consolidation drops an
output and clusters again, :func:`graphs.consolidate.stable_relabel`), each ``--k`` (one
clustering with k new clusters, no stability test) and, with ``--k-from density``, the run's
settings with k estimated on the candidates (``continual.consolidation_k = 'density'``,
:func:`graphs.consolidate.estimate_k`), or with one cluster per output when the run
estimated it; each ``--k-floor`` the run's settings with k estimated by density whose smallest
group is that share of the candidates (``estimate_k.min_cluster_share``). For each it prints the candidates'
clustering accuracy (Hungarian; distractors count as a class of their own) and every new
cluster: the output it was given, its size, majority true class, purity and stability. The true
classes are read for this report only; a Fashion-MNIST run's consolidation replays in about ten
seconds on one core, where the run took twenty minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.metrics import cluster_truth, hungarian_mapping  # noqa: E402
from graphs.consolidate import estimate_k, load_inputs, output_stability, stable_relabel  # noqa: E402


def accuracy(truth: np.ndarray, labels: np.ndarray) -> float:
    """Hungarian clustering accuracy of ``labels`` against ``truth`` (every value a class)."""
    truth = truth + 1  # distractors (-1) become class 0 here
    mapping = hungarian_mapping(truth, labels)
    return float(np.mean([mapping.get(p, None) == t for p, t in zip(labels, truth, strict=True)]))


def name(c: int) -> str:
    return "distractors" if c == -1 else f"class {c}"


def table(title: str, d: dict, labels: np.ndarray, output: dict, stability: dict,
          dropped: list[int]) -> list[str]:
    n_old, truth = d["n_old"], d["truth"]
    lines = [f"### {title}", "", f"candidates' clustering accuracy {100 * accuracy(truth, labels):.1f} %; "
             f"{len(output)} outputs kept" + (f", dropped {dropped}" if dropped else ""), "",
             "| cluster | output | size | majority | purity | stability |", "|---|---|---|---|---|---|"]
    for c in range(n_old, int(labels.max()) + 1 if len(labels) else n_old):
        members = labels == c
        if not members.any():
            continue
        t = cluster_truth(truth[members])
        s = stability.get(output.get(c))
        lines.append(f"| {c} | {output.get(c, '–')} | {int(members.sum())} | {name(t['majority'])} | "
                     f"{t['purity']:.2f} | {'–' if s is None else f'{s:.2f}'} |")
    to_labeled = int((labels < n_old).sum())
    return [*lines, f"| labeled classes | – | {to_labeled} | | | |", ""]


def replay(d: dict, **changes) -> tuple[np.ndarray, dict, dict, list[int]]:
    settings = d["settings"] | changes
    result, output, stability, passes = stable_relabel(
        copy.copy(d["labeler"]), d["x_u"], d["x_l"], d["y_l"], d["n_old"], d["predicted"], list(d["outputs"]),
        **settings)
    return result.labels, output, stability, [p["dropped"] for p in passes]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--min-stability", type=float, nargs="*", default=[])
    parser.add_argument("--k", type=int, nargs="*", default=[])
    parser.add_argument("--k-from", choices=["density"], default=None,
                        help="also replay with the other choice of consolidation's k")
    parser.add_argument("--k-floor", type=float, nargs="*", default=[],
                        help="k estimated by density with this smallest group (a share of the candidates)")
    args = parser.parse_args(argv)
    try:
        d = load_inputs(args.run / "loop" / "consolidation_inputs.npz")
    except (FileNotFoundError, ValueError) as error:
        print(f"{args.run}: {error}", file=sys.stderr)
        return 2
    labels, output, stability, dropped = replay(d)
    print(f"# {args.run}: {len(d['x_u'])} candidates, outputs {d['outputs']}, settings {d['settings']}\n")
    metrics = args.run / "metrics.json"
    if metrics.is_file():
        entry = json.loads(metrics.read_text())["rounds"][-1].get("consolidation", {})
        same = ({int(o): round(v, 6) for o, v in entry.get("stability", {}).items()}
                == {o: round(v, 6) for o, v in stability.items()}
                and entry.get("kept", sorted(set(output.values()))) == sorted(set(output.values())))
        print(f"the run's own settings give its relabeling again: {'yes' if same else 'NO'}\n")
    print("\n".join(table("the run's settings", d, labels, output, stability, dropped)))
    if args.k_from == "density":
        if "k_new" in d["settings"]:  # the run estimated k: the other way is one cluster per output
            labels, output, stability, dropped = replay(d, k_new=None)
            title = "one cluster per output"
        else:
            k = estimate_k(d["labeler"], d["x_u"], d["x_l"], d["y_l"], d["n_old"])
            labels, output, stability, dropped = replay(d, k_new=k)
            title = f"k from density: {k}"
        print("\n".join(table(title, d, labels, output, stability, dropped)))
    for floor in args.k_floor:
        k = estimate_k(d["labeler"], d["x_u"], d["x_l"], d["y_l"], d["n_old"], min_cluster_share=floor)
        labels, output, stability, dropped = replay(d, k_new=k)
        print("\n".join(table(f"k from density, smallest group {floor:g}: {k}", d, labels, output, stability,
                              dropped)))
    for line in args.min_stability:
        labels, output, stability, dropped = replay(d, min_stability=line)
        print("\n".join(table(f"min_stability = {line}", d, labels, output, stability, dropped)))
    for k in args.k:
        labeler = copy.copy(d["labeler"])
        labeler.k_new = k
        result = labeler(d["x_u"], d["x_l"], d["y_l"], d["n_old"])
        clusters = {c: c for c in range(d["n_old"], d["n_old"] + k)}
        s = d["settings"]
        stability = output_stability(result.labels, clusters, d["x_u"], d["x_l"], d["y_l"], d["n_old"],
                                     labeler, s["resamples"], s["fraction"], s["seed"])
        print("\n".join(table(f"k = {k} (one clustering)", d, result.labels, clusters, stability, [])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
