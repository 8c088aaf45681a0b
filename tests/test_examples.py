"""The examples in examples/ run, with fewer epochs, and do what they say."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


def test_plain_pytorch_example_pseudo_labels_and_distills_without_gin_or_ignite(capsys):
    test = _main("plain_pytorch.py")(epochs=20)
    out = capsys.readouterr().out
    assert "flagged" in out and "pool clustering accuracy" in out and "after distillation" in out
    assert test["old"] > 0.85  # distillation kept the old digits
    assert test["new"] > 0.15  # and the grown classifier predicts new ones (chance: 0)


def test_drive_graphs_example_fills_a_pool_from_the_stream(tmp_path, capsys):
    out = _main("drive_graphs.py")(epochs=20, cache_root=str(tmp_path))
    assert "stream AUROC" in capsys.readouterr().out
    assert out["auroc"] > 0.7 and out["size"] > 0 and out["temperature"] > 0
    assert list(tmp_path.glob("*.h5"))  # the outputs went through the HDF5 cache
