"""Kill a run at random moments and start it again: does it end as an uninterrupted run does,
and how much time does resuming save? (docs/reliability.md quotes its output.)

    python scripts/kill_resume.py --gin gin/distill.gin --kills 10 --out runs/kill_resume

One uninterrupted reference run first; then, ``--kills`` times, the same command in a fresh
run folder is SIGKILLed after a random share (5-95 %) of the reference's wall time and
started again on the same folder. Every run is single-threaded (bit-identical arithmetic)
and has a feature cache of its own (the killed run and its resumption share one, as they
would for a user). Prints one row per kill and the median time a resumption took against
the reference run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(gin: str, run_dir: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "components.run", "--gin", gin, "--quiet", "--run-dir", str(run_dir),
            "--gin-bindings", f"FeatureCache.root = '{cache}'"]


def results(run_dir: Path) -> dict:
    """Everything the run measured, without its wall time."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k != "seconds"}


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin", default="gin/distill.gin")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--out", default="runs/kill_resume")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    reference_time = timed(command(args.gin, out / "reference", out / "reference-cache"))
    reference = results(out / "reference")
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.kills):
        run_dir, cache = out / f"kill{i}", out / f"kill{i}-cache"
        after = rng.uniform(0.05, 0.95) * reference_time
        process = subprocess.Popen(command(args.gin, run_dir, cache), cwd=ROOT, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(after)
        killed = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        stages = sorted(p.parent.name + "/" + p.stem.split("_")[-1] for p in run_dir.glob("stages/*/*.pt"))
        resume_time = timed(command(args.gin, run_dir, cache))
        same = results(run_dir) == reference
        rows.append((i, after, killed, stages[-1] if stages else "-", resume_time, same))
        print(f"kill {i}: after {after:5.1f} s ({'killed' if killed else 'had ended'}), last epoch saved "
              f"{rows[-1][3]}, resumed in {resume_time:5.1f} s, identical metrics: {same}", flush=True)
    identical = sum(r[5] for r in rows)
    median = statistics.median(r[4] for r in rows)
    print(f"reference run {reference_time:.1f} s; {identical} of {len(rows)} resumed runs ended with metrics "
          f"identical to it; median time to finish after a kill {median:.1f} s "
          f"({median / reference_time:.2f} of a run started over)")
    return 0 if identical == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
