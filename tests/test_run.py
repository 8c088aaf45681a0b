"""The command line: gin errors exit 2 and write nothing; the whole loop runs on digits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gin
import pytest
import torch

from components.run import CONFIG_ERROR, main

DISTILL = "gin/distill.gin"
ROOT = Path(__file__).resolve().parents[1]
# A short configuration of the real loop: same graph and components, fewer steps.
SHORT = [
    "train.epochs = 15", "adapt.epochs = 2", "distill.epochs = 2",
    "SemiSupervisedKMeans.n_init = 1", "SamplePool.trigger_size = 120",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def _run(tmp_path, *bindings, gin_files=(DISTILL,)):
    run_dir = tmp_path / "run"
    argv = [a for f in gin_files for a in ("--gin", f)]
    argv += [a for b in bindings for a in ("--gin-bindings", b)]
    argv += ["--run-dir", str(run_dir), "--gin-bindings", f"FeatureCache.root = '{tmp_path / 'cache'}'"]
    return main(argv), run_dir


@pytest.mark.parametrize(
    "binding, expected",
    [
        ("NoSuchThing.value = 1", "NoSuchThing"),  # unknown configurable
        ("SamplePool.trigger_sise = 3", "trigger_sise"),  # misspelt parameter
        ("SamplePool.trigger_size = ", "trigger_size"),  # syntax error
        ("SamplePool.trigger_size = -1", "trigger_size must be >= 1"),  # bad value
        ("make_protocol.ratio = 0.5", "ratio must be >= 1"),  # bad value deeper down
        ("lifecycle.claim_rate = 1.5", "claim_rate must be in [0, 1)"),
    ],
)
def test_gin_errors_exit_2_and_write_nothing(tmp_path, capsys, binding, expected):
    code, run_dir = _run(tmp_path, binding)
    assert code == CONFIG_ERROR
    assert expected in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_gin_file_names_the_path(tmp_path, capsys):
    code, run_dir = _run(tmp_path, gin_files=("gin/does_not_exist.gin",))
    assert code == CONFIG_ERROR
    assert "does_not_exist.gin" in capsys.readouterr().err
    assert not run_dir.exists()


def test_bad_gin_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/distill.gin'\nSamplePool.nonsense = 3\n")
    code, run_dir = _run(tmp_path, gin_files=(str(bad),))
    assert code == CONFIG_ERROR
    err = capsys.readouterr().err
    assert "bad.gin" in err and "nonsense" in err
    assert not run_dir.exists()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--gin" in out and "--gin-bindings" in out and "--run-dir" in out


def test_whole_loop_on_digits(tmp_path):
    # long enough for the student to learn the new classes (2 + 2 epochs learned none of them)
    code, run_dir = _run(tmp_path, *SHORT, "adapt.epochs = 20", "distill.epochs = 20")
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["protocol"] == "digits-7/3" and metrics["k_new"] == 3
    assert metrics["k_scores"] == {}  # k_new was given, nothing was estimated
    # the student keeps the old classes and learns the new ones: measured old 0.98, new 0.67,
    # all 0.89 on seed 0 (chance is 0.10; a student that learned no new class scored new 0.0)
    assert metrics["test"]["old"] > 0.85 and metrics["test"]["new"] > 0.45 and metrics["test"]["all"] > 0.7
    # Fifteen short epochs of a small convnet on the long-tailed old classes beat chance by far.
    assert metrics["teacher_old_accuracy"] > 0.5
    assert 0.5 < metrics["novelty"]["auroc"] <= 1.0
    assert metrics["pool"]["size"] > 0
    operative = (run_dir / "operative_config.gin").read_text()
    assert "lifecycle" in operative and "SamplePool.trigger_size = 120" in operative
    # where it ran, for whoever reproduces it: the thread count changes the last bits of a sum
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["threads"] == torch.get_num_threads() and environment["processes"] == 1
    assert environment["versions"]["torch"] == torch.__version__.split("+")[0]
    assert environment["device"] == "cpu" and environment["resumed_stages"] == []
    checkpoints = {c.name.split("_")[0]: c for c in (run_dir / "checkpoints").glob("*.pt")}
    assert metrics["consolidation"] is None  # off by default since refine ('new') replaced it
    assert metrics["pseudo_labels"]["not_pooled"]["new"] > 0  # refine taught seen samples too
    adjusted = ["adjusted"] if metrics["logit_adjustment"]["tau"] > 0 else []  # the held-out images decide
    assert sorted(checkpoints) == [*adjusted, "student", "teacher"]
    for name, outputs in (("student", 10), ("adjusted", 10), ("teacher", 7)):  # 7 old + 3 found
        if name in checkpoints:
            assert torch.load(checkpoints[name], weights_only=True)["classifier.weight"].shape[0] == outputs


def test_consolidation_relabels_what_the_student_assigns_and_goes_through_the_gate(tmp_path):
    code, run_dir = _run(tmp_path, *SHORT, "adapt.epochs = 10", "distill.epochs = 10",
                         "lifecycle.consolidate = True")
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics["consolidation"]
    # the stream samples the student gives a discovered output are relabeled: at least two
    # per output (else no student is made), and no sample twice
    assert entry["candidates"] >= 2 * metrics["k_new"]
    assert {o["id"] for o in entry["outputs"]} <= {7, 8, 9}
    assert sum(o["size"] for o in entry["outputs"]) <= entry["candidates"]
    assert entry["decision"] in ("promoted", "kept") and "held-out" in entry["why"]
    names = sorted(c.name.split("_")[0] for c in (run_dir / "checkpoints").glob("*.pt"))
    adjusted = ["adjusted"] if metrics["logit_adjustment"]["tau"] > 0 else []
    assert names == [*adjusted, *(["consolidated"] if entry["decision"] == "promoted" else []),
                     "student", "teacher"]


def test_swaps_are_bindings(tmp_path):
    """Backbone and confidence score change by binding, with no code edit."""
    code, run_dir = _run(
        tmp_path, *SHORT,
        "Network.backbone = @TorchvisionBackbone()",
        "TorchvisionBackbone.arch = @torchvision.models.resnet18",
        "TorchvisionBackbone.cifar_stem = True",
        "TorchvisionBackbone.in_channels = 1",
        "lifecycle.score = @max_softmax",
        "train.epochs = 1", "adapt.epochs = 1", "distill.epochs = 1",
        "make_protocol.val_per_class = 0",  # no held-out images: the run falls back and says so
    )
    assert code == 0
    notes = json.loads((run_dir / "metrics.json").read_text())["notes"]
    assert any("falling back" in n for n in notes) and any("temperature" in n for n in notes)
    operative = (run_dir / "operative_config.gin").read_text()
    assert "TorchvisionBackbone.cifar_stem = True" in operative
    assert "lifecycle.score = @max_softmax" in operative


NOVELTY = ("gin/novelty/digits.gin", "gin/novelty/evidential.gin")


def test_novelty_measures_every_score_with_a_histogram_each(tmp_path):
    code, run_dir = _run(tmp_path, "train.epochs = 12", gin_files=NOVELTY)
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["old_accuracy"]["all"] > 0.5 and metrics["temperature"] > 0
    names = {"max-softmax", "entropy", "margin", "max-logit", "energy", "knn-k1", "knn-k10", "knn-k50",
             "knn-k10-ivf128", "knn-k50-ivf64", "mahalanobis", "evidential"}
    assert set(metrics["scores"]) == names
    # measured on seed 0: the logit scores, Mahalanobis and 1-NN 0.77-0.89; kNN with k = 10, 50
    # and the evidential head below chance after 12 epochs (a tiny long-tailed training set)
    separating = {"energy", "max-logit", "max-softmax", "entropy", "margin", "mahalanobis", "knn-k1"}
    for name, row in metrics["scores"].items():
        assert isinstance(row["novelty"]["auroc"], float) and isinstance(row["novelty"]["fpr95"], float), name
        if name in separating:
            assert row["novelty"]["auroc"] > 0.68, name
        assert row["pool"]["threshold"] == row["pool"]["threshold"], name  # chosen, not NaN
        assert (run_dir / f"scores_{name}.png").stat().st_size > 5_000
    # the default energy score of a digits model separates new digits well above chance
    assert metrics["scores"]["energy"]["novelty"]["auroc"] > 0.75


def test_novelty_reports_what_it_can_on_bad_input(tmp_path):
    code, run_dir = _run(
        tmp_path, "train.epochs = 2", "make_protocol.val_per_class = 0",
        "novelty.scores = [@MaxSoftmax(), @EvidentialUncertainty()]",  # no evidential head
        gin_files=NOVELTY[:1],
    )
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "EvidentialHead" in metrics["scores"]["evidential"]["error"]
    row = metrics["scores"]["max-softmax"]
    assert isinstance(row["novelty"]["auroc"], float)  # measured without held-out images ...
    assert "val_per_class" in row["threshold_error"]  # ... but no threshold to pool with
    assert metrics["temperature"] == 1.0 and any("temperature" in n for n in metrics["notes"])


@pytest.mark.parametrize("path", sorted((ROOT / "gin" / "scores").glob("*.gin")), ids=lambda p: p.stem)
def test_each_score_file_switches_the_online_score(path):
    from components.run import parse_config

    parse_config([DISTILL, str(path.relative_to(ROOT))], [])
    score = gin.query_parameter("lifecycle.score").scoped_configurable_fn()
    expected = {"max_softmax": "max-softmax", "max_logit": "max-logit", "knn": "knn-k50"}
    assert score.name == expected.get(path.stem, path.stem)  # distill.gin's energy was replaced


def test_whole_loop_with_the_evidential_head(tmp_path):
    code, run_dir = _run(tmp_path, *SHORT, "train.epochs = 3", "adapt.epochs = 1", "distill.epochs = 1",
                         "SamplePool.threshold = 0.5",  # K / S is in (0, 1]
                         gin_files=(DISTILL, "gin/scores/evidential.gin"))
    assert code == 0
    student = sorted((run_dir / "checkpoints").glob("student*.pt"))[0]
    state = torch.load(student, weights_only=True)
    assert state["confidence.weight"].shape[0] == state["classifier.weight"].shape[0] == 10


def test_an_empty_pool_reports_the_teacher_and_says_why(tmp_path):
    code, run_dir = _run(tmp_path, *SHORT, "train.epochs = 1", "lifecycle.score = @MaxSoftmax()",
                         "SamplePool.threshold = 2.0")  # 1 - max softmax never exceeds 1
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["k_new"] == 0 and metrics["pool"]["size"] == 0
    assert any("pool is empty" in n for n in metrics["notes"])
    assert metrics["test"]["old"] == metrics["teacher_old_accuracy"]
    assert [p.name.split("_")[0] for p in (run_dir / "checkpoints").glob("*.pt")] == ["teacher"]


def test_a_refused_pool_is_kept_and_the_teacher_reported(tmp_path):
    code, run_dir = _run(tmp_path, *SHORT, "train.epochs = 1", "adapt.epochs = 1",
                         "SemiSupervisedKMeans.k_new = 5000")  # more clusters than pooled samples
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["k_new"] == 0 and metrics["pool"]["size"] > 0
    note = next(n for n in metrics["notes"] if "refused" in n)
    assert "5000 new clusters" in note and f"its {metrics['pool']['size']} samples stay pooled" in note
    assert [p.name.split("_")[0] for p in (run_dir / "checkpoints").glob("*.pt")] == ["teacher"]


def test_discovery_clusters_the_stream_and_estimates_k(tmp_path):
    code, run_dir = _run(tmp_path, "train.epochs = 10", "adapt.epochs = 3", "pretrain.epochs = 1",
                         "estimate/SemiSupervisedKMeans.k_max = 4",
                         gin_files=("gin/discovery/digits.gin", "gin/discovery/contrastive.gin",
                                    "gin/discovery/pretrain.gin"))
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["k_new"] == metrics["k_new_true"] == 3
    assert 1 <= metrics["k_estimated"] <= 4 and set(metrics["k_scores"]) == {"1", "2", "3", "4"}
    assert metrics["assigned_new"]["precision"] > 0.3  # the stream's share of new digits is 0.3
    assert metrics["stream"]["all"] > 0.5  # far above chance (10 classes) even after 3 epochs
    names = sorted(p.name.split("_")[0] for p in (run_dir / "checkpoints").glob("*.pt"))
    assert names == ["model", "representation"]
    assert "discovery.pretrain = @pretrain" in (run_dir / "operative_config.gin").read_text()
    # cluster the same run again from its checkpoint and cache, whitened: no training
    again = tmp_path / "again"
    code = main(["--gin", str(run_dir / "operative_config.gin"), "--run-dir", str(again),
                 "--gin-bindings", "run.graph = @recluster_run",
                 "--gin-bindings", f"recluster_run.source = '{run_dir}'",
                 "--gin-bindings", "recluster_run.cluster_on = 'features'",
                 "--gin-bindings", "SemiSupervisedKMeans.whiten = True"])
    assert code == 0
    redone = json.loads((again / "metrics.json").read_text())
    assert redone["source"] == str(run_dir) and redone["k_new"] == 3
    # whitened features cluster the new digits far better: measured new 0.51 -> 0.82 on seed 0
    assert redone["stream"]["new"] > metrics["stream"]["new"] + 0.15
    assert not (again / "checkpoints").exists()


def test_list_shows_every_configurable_with_its_defaults(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for expected in ("SemiSupervisedKMeans(k_new=REQUIRED, n_iter=100", "KNNDistance(k=50,",
                     "lifecycle(data=REQUIRED", "# torch.optim", "SGD("):
        assert expected in out, expected
    adapt = next(line for line in out.splitlines() if line.startswith("adapt("))
    # data arguments (denylisted) are not configuration; the sizes that bound them are
    names = set(re.findall(r"(\w+)=", adapt))
    assert not names & {"model", "labeled", "unlabeled"} and "max_unlabeled" in names


def test_print_config_resolves_files_and_bindings_without_running(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["--gin", DISTILL, "--gin-bindings", "SamplePool.trigger_size = 77", "--print-config",
                 "--run-dir", str(run_dir)])
    assert code == 0 and not run_dir.exists()
    out = capsys.readouterr().out
    assert "SamplePool.trigger_size = 77" in out and "run.graph = @lifecycle" in out


def test_quiet_shows_warnings_and_the_table_but_no_progress(tmp_path, capsys):
    quiet_dir = tmp_path / "quiet"
    code = main(["--gin", "gin/novelty/digits.gin", "--quiet", "--run-dir", str(quiet_dir),
                 "--gin-bindings", "train.epochs = 1", "--gin-bindings", "novelty.scores = [@Energy()]",
                 "--gin-bindings", "make_protocol.val_per_class = 0",  # warns: no held-out images
                 "--gin-bindings", f"FeatureCache.root = '{tmp_path / 'cache'}'"])
    err = capsys.readouterr().err
    assert code == 0 and "novelty scores on the stream" in err and "run directory" in err
    assert "INFO" not in err and "train digits-7/3" not in err  # no info lines, no bars
    assert "WARNING" in err and "temperature scaling needs held-out" in err  # warnings still shown
    code = main(["--gin", "gin/novelty/digits.gin", "--run-dir", str(tmp_path / "loud"),
                 "--gin-bindings", "train.epochs = 1", "--gin-bindings", "novelty.scores = [@Energy()]",
                 "--gin-bindings", f"FeatureCache.root = '{tmp_path / 'cache'}'"])
    err = capsys.readouterr().err
    assert code == 0 and "model: SmallConvNet" in err and "train digits-7/3" in err


def test_report_links_plots_that_exist(tmp_path):
    import re

    code, run_dir = _run(tmp_path, *SHORT, "train.epochs = 3", "adapt.epochs = 1", "distill.epochs = 2")
    assert code == 0
    report = (run_dir / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {"training_curves.png", "confusion.png", "per_class_accuracy.png", "scores.png", "pool.png",
                "pool_embedding.png"}
    assert set(linked) == expected
    for name in linked:
        assert (run_dir / name).stat().st_size > 10_000, name  # a real figure, not an empty file
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"| test accuracy, new classes (%) | {100 * metrics['test']['new']:.1f} |" in report
    assert f"AUROC {metrics['novelty']['auroc']:.3f}" in report


@pytest.mark.parametrize("refine", [None, "new", "all"])
def test_refine_teaches_seen_samples_outside_the_pool(tmp_path, refine):
    """With ``lifecycle.refine`` the pool's clusters are refined on the whole seen stream, and
    its samples in new clusters (``"new"``) or in every cluster (``"all"``) are taught too;
    without, only pooled samples are. (The runs also check ``lifecycle.claim_rate`` and the
    default ``lifecycle.logit_adjustment``.)"""
    code, run_dir = _run(tmp_path, *SHORT, "lifecycle.representation = None", "distill.epochs = 2",
                         "lifecycle.consolidate = False", f"lifecycle.refine = {refine!r}",
                         "lifecycle.claim_rate = 0.0")
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # lifecycle.claim_rate = 0: no held-out known-class image is left to a discovered output, and
    # the run records it, saves the lowered model and reports it (what the offset does to the
    # classifier: tests/test_graphs.py)
    entry = metrics["offset"]
    assert entry["rate"] == 0.0 and entry["claimed_after"] == 0.0 and entry["images"] > 0
    checkpoints = {c.name.split("_")[0] for c in (run_dir / "checkpoints").glob("*.pt")}
    assert ("offset" in checkpoints) == (max(entry["offset"]) > 0)
    report = (run_dir / "report.md").read_text()
    assert "held-out known images claimed by new outputs" in report
    # the known classes' logit adjustment (on by default) ran first, chose its τ on the
    # held-out images and says so (what it does to the classifier: tests/test_graphs.py)
    adjusted = metrics["logit_adjustment"]
    assert adjusted["tau"] in adjusted["taus"] and adjusted["images"] == entry["images"]
    assert ("adjusted" in checkpoints) == (adjusted["tau"] > 0)
    assert f"| known classes' logit adjustment τ (held-out accuracy, %) | {adjusted['tau']:g} (" in report
    taught = metrics["pseudo_labels"]
    assert 0 < taught["pooled"] <= metrics["pool"]["size"]
    outside = taught["not_pooled"]
    assert (outside["new"] > 0) == (refine is not None)
    assert (outside["old"] > 0) == (refine == "all")
