"""What ``lifecycle.claim_rate`` would have given finished single-round runs, for several rates
at once, without training again: loads each run's reported student, fits the discovered
outputs' offset on its held-out known-class images for every rate and measures the test images
with it. Reads the test set, so it is a tuning tool for choosing the default on a suite, never
part of a run.

    python scripts/claim_sweep.py runs/suite-fmnist/*/ --rates 0.01 0.02 0.05 0.1

Each run folder needs its ``operative_config.gin``, ``metrics.json`` and checkpoints (a run of
``gin/distill.gin`` or ``gin/distill_fmnist.gin``; a run that already lowered its outputs is
measured from the student before the offset). Prints, per rate, the mean test accuracy
(all / old / new, %) over the runs and each run's line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gin
import numpy as np
import torch
from ignite.handlers import Checkpoint

import components  # noqa: F401  (registers the configurables the configs name)
import components.run  # noqa: F401
import graphs  # noqa: F401
from components.recalibration import discovered_offset
from graphs.encode import encode
from graphs.evaluate import evaluate
from graphs.handlers import load_checkpoint


def _binding(name: str):
    value = gin.query_parameter(f"lifecycle.{name}")
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def sweep(folder: Path, rates: list[float]) -> dict[float, dict] | None:
    metrics = json.loads((folder / "metrics.json").read_text())
    k_new = metrics["k_new"]
    if k_new == 0:
        return None
    gin.clear_config()
    gin.parse_config_file(str(folder / "operative_config.gin"))
    data, model, augment, cache = (_binding(k) for k in ("data", "model", "augment", "cache"))
    protocol = data()
    saved = {p.name.split("_")[0]: p for p in sorted((folder / "checkpoints").glob("*.pt"))}
    name = "consolidated" if (metrics.get("consolidation") or {}).get("decision") == "promoted" else "student"
    net = model(num_classes=protocol.n_old + k_new)
    Checkpoint.load_objects({"model": net}, load_checkpoint(saved[name]))
    device = torch.device("cpu")
    val = encode(net, protocol.val, augment, cache, device)
    test = encode(net, protocol.test, augment, cache, device)
    out = {}
    for rate in ["none", *rates]:
        for per_output in (False, True):
            if rate == "none" and per_output:
                continue
            if rate == "none":
                offsets = np.zeros(k_new)
                entry = discovered_offset(torch.as_tensor(val["logits"]), protocol.n_old, 0.0)[1]
            else:
                offsets, entry = discovered_offset(torch.as_tensor(val["logits"]), protocol.n_old, rate,
                                                   per_output)
            logits = test["logits"].copy()
            logits[:, protocol.n_old:] -= offsets.astype(np.float32)
            accuracy = evaluate({"logits": logits, "targets": test["targets"]}, protocol.n_old,
                                protocol.train_counts)["accuracy"]
            key = rate if rate == "none" else f"{rate}{' each' if per_output else ''}"
            out[key] = {k: 100 * accuracy[k] for k in ("all", "old", "new")} | {
                "offset": float(offsets.max()), "claimed": 100 * entry["claimed_before"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.02, 0.03, 0.05, 0.1])
    args = parser.parse_args()
    table: dict[str, list[dict]] = {}
    for folder in args.runs:
        result = sweep(folder, args.rates)
        if result is None:
            print(f"{folder}: nothing discovered, skipped")
            continue
        line = "  ".join(f"{r}: {v['all']:.1f}/{v['old']:.1f}/{v['new']:.1f} (δ≤{v['offset']:.2f})"
                         for r, v in result.items())
        print(f"{folder} (claimed {result['none']['claimed']:.1f} % of held-out): {line}")
        for r, v in result.items():
            table.setdefault(r, []).append(v)
    print("rate       all   old   new   (mean over runs, %; 'each': per_output)")
    for r, values in table.items():
        mean = {k: np.mean([v[k] for v in values]) for k in ("all", "old", "new")}
        worst = min(v["new"] for v in values)
        print(f"{r!s:<10} {mean['all']:.1f}  {mean['old']:.1f}  {mean['new']:.1f}  worst new {worst:.1f}")


if __name__ == "__main__":
    main()
