"""scripts/scale_costs.py at toy sizes: every stage is measured with a positive number, and the
byte arithmetic of the image store, the feature cache and the ImageNet extrapolation is exact
(docs/scale.md#imagenet-1k-memory-and-time-per-stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_costs_tiny_measures_every_stage_and_its_bytes_exactly(tmp_path):
    out = tmp_path / "costs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    argv = [sys.executable, str(ROOT / "scripts" / "scale_costs.py"), "--tiny", "--json", str(out)]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    sizes = result["sizes"]["resolutions"]
    assert sizes == [16, 72]  # one CIFAR-stem and one ImageNet-stem ResNet-18

    for size in sizes:
        net = result["network"][str(size)]
        assert net["stem"] == ("cifar" if size <= 64 else "imagenet")
        for stage in ("train", "distill", "adapt", "encode", "encode_entry", "fingerprint"):
            assert net[stage]["seconds_per_image"] > 0, (size, stage)
        # a training step costs more than the forward alone, two views more than one
        flops = net["flops_per_image"]
        assert 0 < flops["encode"] < flops["train"] < flops["adapt"]
        assert flops["train"] < flops["distill"]  # the teacher's forward on top
        assert net["activation_bytes_per_image"] > 0 and net["parameters"] > 11_000_000
        # what encode caches per image: float32 features, projections, logits; int64 targets, ids
        entry = net["encode_entry"]
        assert entry["dims"] == {"features": 512, "projected": 64, "logits": result["sizes"]["classes"]}
        assert entry["dtypes"] == {"features": "float32", "projected": "float32", "logits": "float32",
                                   "targets": "int64", "ids": "int64"}
        assert sum(entry["row_bytes"].values()) == 4 * (512 + 64 + result["sizes"]["classes"]) + 8 + 8
        assert entry["file_bytes"] > entry["images"] * sum(entry["row_bytes"].values())

        images = result["images"][str(size)]
        assert images["store_bytes_per_image"] == 3 * size * size  # uint8 [3, S, S], nothing else
        for key in ("decode_resize_s", "draft_decode_resize_s", "build_s"):
            assert images[key] > 0, (size, key)

    cache = result["cache"]
    assert cache["payload_bytes_per_image"] == 4 * (512 + 64 + 1000) + 8 + 8
    assert abs(cache["file_bytes_per_image"] / cache["payload_bytes_per_image"] - 1) < 0.05
    assert cache["write_s_per_image"] > 0
    kmeans, scores = result["kmeans"], result["scores"]
    for value in (kmeans["search_s"], kmeans["means_s"], kmeans["kmeanspp"], kmeans["fit"]["seconds"],
                  scores["energy_s"], scores["mahalanobis_s"], scores["mahalanobis_fit_s"], scores["knn_s"]):
        assert value > 0
    assert result["ffcv"]["flops_per_second"] > 1e13  # tens of TFLOP/s: one A100 in FFCV's run

    # the extrapolation: every stage at every size, with a time; the store's bytes exactly N·3·S·S
    stages = ["image store build", "train v0, per epoch", "encode", "feature cache write",
              "k-means on the pool", "k-means on the whole stream", "scoring the stream: energy",
              "scoring: Mahalanobis", "scoring: kNN", "distill, per epoch",
              "adapt (representation), per epoch"]
    n = result["assumptions"]["images"]
    assert n == 1_281_167
    for size in sizes:
        rows = result["imagenet"][str(size)]
        assert [next(s for s in stages if row["stage"].startswith(s)) for row in rows] == stages
        for row in rows:
            assert row["cpu_s"] > 0 and row["images"] > 0 and row["processes"], row
        assert all(row["gpu_s"] > 0 for row in rows if row["stage"].split(",")[0] in
                   ("train v0", "distill", "adapt (representation)"))
        store = rows[0]["disk"]
        gb = n * 3 * size * size / 1e9
        assert store.startswith(f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"), store
    out_text = done.stdout
    assert "measured per-image costs" in out_text and out_text.count("ImageNet-1k (1,281,167 images)") == 2
