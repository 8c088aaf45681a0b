"""Print the README's discovery table (Markdown) from ``scripts/discovery_recluster.sh``'s output.

``python scripts/discovery_table.py runs/discovery-recluster`` reads
``<dir>/<protocol>-<features>-<geometry>/seed*/metrics.json`` and prints one row per protocol,
features (supervised-only or contrastive) and geometry (cosine k-means on what the run clustered,
or whitened backbone features): mean ± std over the seeds of the stream's clustering accuracy (all / old /
new, and the class-balanced new), NMI, ARI, assigned-new precision and recall, and the number
of new classes estimated per seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from components.seeds import summarize

PROTOCOLS = [("digits", "digits-7/3"), ("fmnist", "fmnist-7/3")]
FEATURES = [("supervised", "supervised-only"), ("contrastive", "contrastive (GCD)"),
            ("supervised_wide", "supervised-only, 32 wide, 30 epochs")]
GEOMETRIES = [("cosine", None), ("whitened", "whitened backbone features")]


def pct(stats: dict) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def label(features: str, geometry: str) -> str:
    if geometry == "whitened":
        return f"{dict(FEATURES)[features]}, whitened backbone features"
    space = "projector, cosine" if features == "contrastive" else "backbone features, cosine"
    return f"{dict(FEATURES)[features]}, {space}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    print("| protocol | features, k-means geometry | all | old | new | new, balanced | NMI | ARI | "
          "assigned-new precision | assigned-new recall | k estimated per seed (true 3) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, protocol in PROTOCOLS:
        for features, _ in FEATURES:
            for geometry, _ in GEOMETRIES:
                runs = [json.loads(p.read_text()) for p in
                        sorted((root / f"{key}-{features}-{geometry}").glob("seed*/metrics.json"))]
                if not runs:
                    continue
                m = summarize(runs)
                cells = [pct(m[f"stream.{g}"]) for g in ("all", "old", "new", "new_balanced")]
                cells += [f"{m[f'stream.{g}']['mean']:.3f}" for g in ("nmi", "ari")]
                cells += [pct(m["assigned_new.precision"]), pct(m["assigned_new.recall"])]
                cells.append(", ".join(str(r["k_estimated"]) for r in runs))
                print(f"| {protocol} | {label(features, geometry)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
