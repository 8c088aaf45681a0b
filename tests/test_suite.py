"""The suite command: runs over sampled protocols × ratios × seeds, mean / std / worst, resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gin
import pytest

import components.suite as suite
from components.run import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
# the real loop, as short as it gets: the suite's mechanics are tested, not the loop's quality
TINY = ["train.epochs = 1", "adapt.epochs = 1", "distill.epochs = 1", "SemiSupervisedKMeans.n_init = 1",
        "SamplePool.trigger_size = 120"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def _argv(out: Path, *extra: str, gin_file: str = "gin/distill.gin", bindings=TINY) -> list[str]:
    cache = out.parent / "cache"
    return ["--gin", gin_file, "--dataset", "digits", "--out", str(out), *extra,
            "--gin-bindings", *bindings, f"FeatureCache.root = '{cache}'"]


@pytest.fixture(scope="module")
def digits_suite(tmp_path_factory) -> Path:
    """Two random protocols of digits-7/3 at ratio 50, seed 0, each run one epoch a stage."""
    out = tmp_path_factory.mktemp("suite") / "out"
    os.chdir(ROOT)
    assert suite.main(_argv(out, "--splits", "2", "--ratios", "50")) == 0
    gin.clear_config()
    return out


def _lifecycle(all_: float, new: float, seconds: float, few: float | None = 0.5) -> dict:
    """A hand-made metrics.json of the single-round loop."""
    return {"protocol": "digits-7/3/split0", "test": {"all": all_, "old": 0.9, "new": new},
            "teacher_old_accuracy": 0.9, "shots": {"medium": 0.8, "few": few}, "novelty": {"auroc": 0.9},
            "pool": {"precision": 0.5, "recall": 0.4}, "pool_clustering": {"new": 0.7}, "seconds": seconds}


def _continual(all_: float, forgetting: float | None, discovered: int, spurious: int) -> dict:
    """A hand-made metrics.json of the continual loop (5 new classes to find)."""
    return {"graph": "continual", "protocol": "digits-phased/split0",
            "final": {"all": all_, "old": 0.9, "new": 0.7, "phases": [0.7, 0.6]},
            "forgetting": {"old": forgetting, "phases": [None, None]}, "average_incremental": 0.8,
            "discovered": discovered, "true_new": 5, "duplicates": 0, "spurious": spurious, "seconds": 10.0}


def test_worst_is_the_lowest_accuracy_and_the_highest_cost():
    runs = [_lifecycle(0.9, 0.8, 30.0), _lifecycle(0.7, 0.9, 10.0, few=None), _lifecycle(0.8, 0.6, 20.0)]
    out = suite.summarize_runs(runs, ["a", "b", "c"])
    assert out["test.all"]["values"] == [0.9, 0.7, 0.8]
    assert out["test.all"]["worst"] == 0.7 and out["test.all"]["worst_run"] == "b"
    assert out["test.new"]["worst"] == 0.6 and out["test.new"]["worst_run"] == "c"
    assert out["test.all"]["mean"] == pytest.approx(0.8)
    assert out["test.all"]["std"] == pytest.approx((2 * 0.1 ** 2 / 3) ** 0.5)  # population std
    assert out["seconds"]["worst"] == 30.0 and out["seconds"]["worst_is"] == "highest"
    # a null is left out of the values and of every statistic, never averaged and never NaN
    assert out["shots.few"]["values"] == [0.5, 0.5] and out["shots.few"]["mean"] == 0.5


def test_worst_in_the_continual_loop_is_the_most_forgetting_and_the_farthest_count():
    runs = [_continual(0.8, 2.0, 5, 0), _continual(0.6, None, 9, 1), _continual(0.7, 6.0, 3, 0)]
    out = suite.summarize_runs(runs, ["a", "b", "c"])
    assert out["final.all"]["worst"] == 0.6
    assert out["forgetting.old"] == {"mean": 4.0, "std": 2.0, "values": [2.0, 6.0], "worst": 6.0,
                                     "worst_is": "highest", "worst_run": "c"}
    assert out["discovered"]["worst"] == 9  # 4 from the true 5, against 2 from it
    assert out["spurious"]["worst"] == 1
    assert out["forgetting.phase1"] == {"mean": None, "std": None, "values": [], "worst": None,
                                        "worst_is": "highest", "worst_run": None}
    assert suite.worst_direction("energy.fpr95") == "highest"
    assert suite.worst_direction("energy.auroc") == "lowest"
    assert suite.worst_direction("k_new") is None


def test_summary_json_has_mean_std_worst_values_per_key_and_per_ratio(digits_suite):
    summary = json.loads((digits_suite / "summary.json").read_text())
    metrics = [k for k in summary if k not in suite.RESERVED]
    assert {"test.all", "test.old", "test.new", "seconds"} <= set(metrics)
    for key in metrics:
        assert {"mean", "std", "worst", "values"} <= set(summary[key]), key
    for key in ("test.all", "test.old", "test.new", "novelty.auroc"):
        assert len(summary[key]["values"]) == 2
        assert summary[key]["worst"] == min(summary[key]["values"])
    assert summary["seconds"]["worst"] == max(summary["seconds"]["values"])
    assert summary["by_ratio"]["50"]["test.new"] == summary["test.new"]  # one ratio: the same numbers
    assert summary["suite"]["splits"] == [0, 1] and summary["suite"]["data_file"] is None


def test_each_split_draws_its_own_classes_and_the_bindings_reach_the_run(digits_suite):
    from components.data.sources import digits
    from components.data.splits import make_protocol

    rows = json.loads((digits_suite / "summary.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["digits-split0-ratio50-seed0", "digits-split1-ratio50-seed0"]
    assert rows[0]["classes"]["new"] != rows[1]["classes"]["new"]
    for row in rows:
        drawn = make_protocol(source=lambda: digits(0), new_classes=[7, 8, 9], split_seed=row["split"])
        assert row["classes"]["new"] == drawn.class_names[drawn.n_old:]
        assert row["classes"]["old"] == drawn.class_names[:drawn.n_old]  # long-tail rank order
        folder = digits_suite / row["run"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["protocol"] == row["protocol"] == f"digits-7/3/split{row['split']}"
        assert row["metrics"]["test.new"] == metrics["test"]["new"]
        used = (folder / "operative_config.gin").read_text()  # what make_protocol was called with
        assert f"make_protocol.split_seed = {row['split']}" in used
        assert "make_protocol.ratio = 50" in used  # not digits.gin's 10


def test_a_suite_started_again_skips_finished_runs_and_runs_the_rest(digits_suite, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "out"
    shutil.copytree(digits_suite, out)  # FeatureCache.root differs: a where-only binding, the runs match
    before = json.loads((out / "summary.json").read_text())
    calls = []
    real = suite.run_main
    monkeypatch.setattr(suite, "run_main", lambda argv: calls.append(argv) or real(argv))
    assert suite.main(_argv(out, "--splits", "2", "--ratios", "50")) == 0
    assert calls == []  # both finished: nothing ran
    assert "finished earlier, skipped" in capsys.readouterr().err
    again = json.loads((out / "summary.json").read_text())
    assert again["test.new"] == before["test.new"]
    shutil.rmtree(out / "digits-split1-ratio50-seed0")  # as if the suite was stopped before it
    assert suite.main(_argv(out, "--splits", "2", "--ratios", "50")) == 0
    assert len(calls) == 1 and str(out / "digits-split1-ratio50-seed0") in calls[0]
    assert (out / "digits-split1-ratio50-seed0" / "finished").exists()


def test_a_failed_run_stops_the_suite_and_names_its_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code = suite.main(_argv(out, "--splits", "2", "--ratios", "10",
                            bindings=[*TINY, "torch.optim.SGD.lr = 1e12"]))  # diverges at once
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "suite stopped" in err and "digits-split0-ratio10-seed0" in err and "resume" in err
    assert not (out / "summary.json").exists() and not (out / "digits-split1-ratio10-seed0").exists()


def test_the_continual_loop_reports_final_accuracies_forgetting_and_its_phases(tmp_path):
    out = tmp_path / "out"
    assert suite.main(_argv(out, "--splits", "1", "--first-split", "3", "--ratios", "10",
                            gin_file="gin/continual.gin",
                            bindings=[*TINY[:4], "ClusterAcceptance.resamples = 2"])) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = {"final.all", "final.new", "final.phase1", "final.phase2", "forgetting.old", "spurious"}
    assert expected <= set(summary)
    assert summary["forgetting.old"]["worst_is"] == "highest"
    row = summary["runs"][0]
    assert row["run"] == "digits-split3-ratio10-seed0" and row["protocol"] == "digits-phased/split3"
    assert [len(p) for p in row["classes"]["phases"]] == [2, 3]  # phase sizes kept, classes drawn


@pytest.mark.parametrize("gin_file, data_file, name", [
    ("gin/distill.gin", "gin/data/fmnist.gin", "fmnist-7/3"),
    ("gin/continual.gin", "gin/data/fmnist_phased.gin", "fmnist-phased"),
    ("gin/continual_fmnist.gin", None, "fmnist-phased"),  # already fmnist: as it is
])
def test_fmnist_adds_the_data_file_of_the_graph_before_the_bindings(gin_file, data_file, name):
    added, bindings = suite.compose([gin_file], "fmnist", ["train.epochs = 3"])
    assert added == data_file
    parse_config([gin_file], [*bindings, "make_protocol.split_seed = 2", "make_protocol.ratio = 50"])
    assert gin.query_parameter("make_protocol.source").configurable.name == "torchvision_dataset"
    assert gin.query_parameter("torchvision_dataset.name") == "FashionMNIST"
    assert gin.query_parameter("make_protocol.name") == name
    assert gin.query_parameter("make_protocol.ratio") == 50  # the suite's ratio over the data file's 100
    assert gin.query_parameter("train.epochs") == 3  # the user's bindings over the data file
    if "continual" in gin_file:
        assert gin.query_parameter("make_protocol.phases") == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]


def test_what_the_suite_cannot_sample_is_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(ConfigError, match="longtail graph"):  # no new classes to draw
        suite.compose(["gin/longtail/digits_lt.gin"], "fmnist", [])
    with pytest.raises(SystemExit) as exit_info:  # the suite binds the seed itself
        suite.main(_argv(tmp_path / "out", "--splits", "1", "--ratios", "10", bindings=["SEED = 3"]))
    assert exit_info.value.code == 2 and "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
