"""What the input-complexity domain test (components/domain.py) sees on a protocol: the band it
fits on the held-out known-class images and, for every class of the stream and every kind of
distractor, the spread of PNG lengths and the share outside the band. Reads the stream's labels,
so it is a tool for documenting the test, never part of a run.

    python scripts/complexity_table.py --gin gin/continual_fmnist.gin
    python scripts/complexity_table.py --gin gin/continual.gin

A distractor's kind is read off its pixels (a flat frame at most 16 is blank, at least 239
saturated; otherwise a mean above 90 is uniform noise, else another dataset's image), since the
protocol keeps only its target, -1.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch


def kind(image: torch.Tensor) -> str:
    x = image.float()
    if x.max() <= 16:
        return "blank"
    if x.min() >= 239:
        return "saturated"
    return "noise" if x.mean() > 90 else "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin", required=True, help="the run's gin file (its protocol is made)")
    parser.add_argument("--gin-bindings", nargs="*", default=[], metavar="B")
    parser.add_argument("--coverage", type=float, default=0.98, help="the band's share of held-out images")
    args = parser.parse_args(argv)

    from components.data import make_protocol
    from components.domain import InputComplexity, input_complexity
    from components.run import parse_config

    parse_config([args.gin], args.gin_bindings)
    p = make_protocol()
    domain = InputComplexity(args.coverage).fit(p.val.images)
    low, high = domain.band
    print(f"{p.name}: band {low:.0f}-{high:.0f} bytes, fitted on {len(p.val)} held-out known-class images")
    lengths = input_complexity(p.stream.images)
    outside = (lengths < low) | (lengths > high)
    targets = p.stream.targets.numpy()
    groups: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(targets == -1):
        groups[f"distractor: {kind(p.stream.images[i])}"].append(i)
    for c in sorted(set(targets.tolist()) - {-1}):
        groups[f"{c} {p.class_names[c]}"] = list(np.flatnonzero(targets == c))
    print(f"{'stream group':24s} {'n':>6s} {'5 %':>6s} {'median':>7s} {'95 %':>6s} {'outside':>8s}")
    for name, rows in groups.items():
        q5, q50, q95 = np.percentile(lengths[rows], [5, 50, 95])
        print(f"{name:24s} {len(rows):6d} {q5:6.0f} {q50:7.0f} {q95:6.0f} {100 * outside[rows].mean():7.1f}%")


if __name__ == "__main__":
    main()
