"""scripts/device_check.py runs on the CPU at toy sizes and prints its one table with numbers
(docs/scale.md#device-check). On a GPU machine the same script runs the full sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_on_cpu_and_prints_every_row_with_numbers(tmp_path):
    rows_file = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--device", "cpu", "--tiny",
         "--json", str(rows_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["check"]: row for row in json.loads(rows_file.read_text())}
    measured = [
        "digits main job",
        "train fp32: bare PyTorch loop", "train fp32: graphs.train.train",
        "train bf16 autocast: bare PyTorch loop", "train bf16 autocast: graphs.train.train",
        "k-means: faiss.Kmeans (reference), faiss-cpu",
    ]
    for check in measured:
        assert rows[check]["status"] == "ok" and rows[check]["value"] > 0, rows[check]
    [kmeans_cpu] = [r for name, r in rows.items()
                    if name.startswith("k-means: components.kmeans.KMeans, faiss-cpu")]
    assert kmeans_cpu["status"] == "ok" and kmeans_cpu["value"] > 0
    for library in ("train fp32: graphs.train.train", "train bf16 autocast: graphs.train.train"):
        assert rows[library]["ratio"] > 0 and rows[library]["unit"] == "img/s"
    assert "new" in rows["digits main job"]["note"]  # test accuracy read from its metrics.json
    # what a CPU cannot do is named, not silently left out
    assert rows["k-means: components.kmeans.KMeans, faiss-gpu"]["status"] == "skipped"
    assert rows["2 processes: DDP throughput"]["status"] == "skipped"
    assert rows["fmnist loop"]["status"] == "skipped"
    # one table on stdout, a line per row
    out = done.stdout
    assert out.count("device check (tiny sizes") == 1
    for check in rows:
        assert check.split(",")[0] in out
    assert "img/s" in out and "s wall" in out
    assert not list(tmp_path.glob("runs")), "the runs go to a temporary folder, removed afterwards"
