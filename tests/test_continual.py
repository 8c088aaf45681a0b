"""The continual loop end to end on the embedded digits (digits-phased, short schedules): its
metrics and files, the version lineage, and a run killed mid-round that resumes and ends with
the same metrics as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from components.run import main

ROOT = Path(__file__).resolve().parents[1]
CONTINUAL = "gin/continual.gin"
# the real loop, shorter: same graph and components, fewer epochs and restarts
SHORT = [
    "adapt.epochs = 15", "distill.epochs = 30", "SemiSupervisedKMeans.n_init = 2",
    "ClusterAcceptance.resamples = 3",
]


def _argv(run_dir: Path, cache: Path, *bindings: str) -> list[str]:
    argv = ["--gin", CONTINUAL, "--run-dir", str(run_dir), "--gin-bindings", f"FeatureCache.root = '{cache}'"]
    for b in [*SHORT, *bindings]:
        argv += ["--gin-bindings", b]
    return argv


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"{path.name} holds a bare {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


TEACHERS: list[tuple[int, int]] = []  # (teacher outputs, student outputs) of every distill call
LABELER_CALLS: list[tuple[str, bool]] = []  # ("round" or "consolidation", the labeler's fixed_old)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One short continual run, shared by the checks below; it records what every distillation
    was taught by."""
    import importlib

    loop = importlib.import_module("graphs.continual")  # the module (graphs exports a function of that name)
    relabel = importlib.import_module("graphs.consolidate")
    real, relabel_real, estimate_real = loop.distill, relabel.stable_relabel, relabel.estimate_k

    def recording(student, teacher, images, augment, device):
        modes = [m.training for m in (student, teacher, augment)]
        with torch.no_grad():  # eval mode: no random draw, no batch-norm update
            x = augment.eval()(images.images[:2]).to(device)
            TEACHERS.append((teacher.to(device).eval()(x).shape[1], student.to(device).eval()(x).shape[1]))
        for module, mode in zip((student, teacher, augment), modes, strict=True):
            module.train(mode)
        return real(student, teacher, images, augment, device)

    from components.kmeans import SemiSupervisedKMeans

    stage, cluster = ["round"], SemiSupervisedKMeans.__call__

    def clustering(labeler, *args, **kwargs):
        LABELER_CALLS.append((stage[0], labeler.fixed_old))
        return cluster(labeler, *args, **kwargs)

    def relabeling(*args, **kwargs):
        stage[0] = "consolidation"
        try:
            return relabel_real(*args, **kwargs)
        finally:
            stage[0] = "round"

    def estimating(*args, **kwargs):  # consolidation's k, estimated before it relabels
        stage[0] = "consolidation"
        try:
            return estimate_real(*args, **kwargs)
        finally:
            stage[0] = "round"

    folder = tmp_path_factory.mktemp("continual")
    os.chdir(ROOT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "distill", recording)
        patch.setattr(relabel, "distill", recording)
        patch.setattr(relabel, "stable_relabel", relabeling)
        patch.setattr(relabel, "estimate_k", estimating)
        patch.setattr(SemiSupervisedKMeans, "__call__", clustering)
        assert main(_argv(folder / "run", folder / "cache", "continual.consolidation_inputs = True")) == 0
    return folder / "run"


def test_consolidation_is_taught_the_labeled_classes_only(finished):
    """A round's student learns every class its teacher knows (LwF); consolidation relabels the
    discovered classes, so its teacher speaks for the labeled ones alone: distilling the old
    (possibly merged) discovered outputs would teach the student the labels it replaces."""
    m = _strict_json(finished / "metrics.json")
    rounds = [r for r in m["rounds"][1:] if r.get("outputs")]
    assert len(TEACHERS) == len(rounds) + 1  # one per round that distilled, then consolidation
    n_old = 5
    for (teacher, student), r in zip(TEACHERS, rounds, strict=False):
        # grown by the round's accepted clusters (the gate may have dropped some afterwards)
        assert student == teacher + len(r["outputs"]) + len(r.get("dropped_outputs", []))
    consolidation = m["rounds"][-1]["consolidation"]  # its student keeps only the stable outputs
    assert TEACHERS[-1] == (n_old, n_old + len(consolidation["outputs"]))
    # consolidation clusters the model's new samples with the labeled classes' centroids fixed
    # (continual.consolidation_fixed_anchors); the rounds' labeler is left as configured
    assert {fixed for stage, fixed in LABELER_CALLS if stage == "consolidation"} == {True}
    assert {fixed for stage, fixed in LABELER_CALLS if stage == "round"} == {False}
    # the candidates it gave a labeled class are reported, not relabeled
    to_labeled = consolidation["to_labeled"]
    assert all(0 <= row["class"] < n_old and row["size"] > 0 for row in to_labeled)
    assert (sum(row["size"] for row in to_labeled) + sum(o["size"] for o in consolidation["outputs"])
            <= consolidation["candidates"])


def test_the_consolidation_table_lists_every_relabeled_output_and_every_labeled_class_it_fed(finished):
    m = _strict_json(finished / "metrics.json")
    consolidation = m["rounds"][-1]["consolidation"]
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "consolidation_table.py"), str(finished)],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("| relabeled |") == len(consolidation["outputs"])
    assert out.count("| labeled class ") == len(consolidation["to_labeled"])
    assert f"{consolidation['candidates']} candidates" in out
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "consolidation_table.py"), str(ROOT)],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no metrics.json" in missing.stderr


def test_consolidation_replays_offline_from_the_inputs_it_saved(finished):
    """``continual.consolidation_inputs`` saves what consolidation clustered; the replay script
    builds the labeler again and repeats the run's relabeling exactly (every output's stability,
    the kept outputs), then the same under another stability line, another k and k estimated."""
    consolidation = _strict_json(finished / "metrics.json")["rounds"][-1]["consolidation"]
    script = str(ROOT / "scripts" / "consolidation_replay.py")
    out = subprocess.run([sys.executable, script, str(finished), "--min-stability", "0.99", "--k", "1",
                          "--k-from", "density", "--k-floor", "0.99"], capture_output=True, text=True,
                         check=True).stdout
    assert "the run's own settings give its relabeling again: yes" in out
    runs_own = out.split("### min_stability")[0]
    assert f"{len(consolidation['kept']) + len(consolidation.get('added', []))} outputs kept" in runs_own
    for output in consolidation["kept"]:  # each kept output's cluster, with the stability the run measured
        measured = consolidation["stability"][str(output)]
        assert f"| {output} |" in runs_own and f"{measured:.2f} |" in runs_own
    assert "### min_stability = 0.99" in out and "### k = 1 (one clustering)" in out
    assert consolidation["k_estimate"] >= 1  # the default estimates consolidation's k
    # the other way, one cluster per output, is the one replayed
    assert "### one cluster per output" in out
    # a floor of 99 % of the candidates leaves room for one group at most (k is at least 1)
    assert "### k from density, smallest group 0.99: 1" in out
    missing = subprocess.run([sys.executable, script, str(ROOT)], capture_output=True, text=True)
    assert missing.returncode == 2 and "continual.consolidation_inputs = True" in missing.stderr


def test_consolidation_bounds_report_the_runs_relabeling_and_every_pair(finished):
    """``scripts/consolidation_bounds.py`` prints the run's own relabeling (the share the replay
    prints too), the oracle lines, and one row per pair of relabeled clusters."""
    script = str(ROOT / "scripts" / "consolidation_bounds.py")
    out = subprocess.run([sys.executable, script, str(finished)], capture_output=True, text=True,
                         check=True).stdout
    replay = str(ROOT / "scripts" / "consolidation_replay.py")
    replayed = subprocess.run([sys.executable, replay, str(finished)], capture_output=True, text=True,
                              check=True).stdout
    share = replayed.split("candidates' clustering accuracy ")[1].split(" %")[0]
    assert f"| the run's relabeling | {share} % |" in out
    assert "| the labeler, k = the true classes of 2 % of the candidates or more (" in out
    assert "| 10 nearest candidates' vote |" in out
    clusters = replayed.split("| labeled classes |")[0].count("\n| ") - 1  # the table's rows, less its header
    pairs = [line for line in out.split("| pair |")[1].splitlines()[2:] if line.startswith("| ")]
    assert len(pairs) == clusters * (clusters - 1) // 2
    missing = subprocess.run([sys.executable, script, str(ROOT)], capture_output=True, text=True)
    assert missing.returncode == 2 and "continual.consolidation_inputs = True" in missing.stderr


def test_g_means_statistic_tells_one_gaussian_cut_in_two_from_two_and_the_vote_reads_neighbours(monkeypatch):
    """The pair test of ``consolidation_bounds``: one Gaussian cut at its mean projects as one
    Gaussian (A*² below G-means' critical values, about 1), two Gaussians six deviations apart do
    not; the neighbour vote is 1 on separated blobs and about chance when the classes are mixed."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from consolidation_bounds import neighbour_vote, projected_anderson

    rng = np.random.default_rng(0)
    one = rng.normal(size=(400, 4))
    halves = one[:, 0] < 0
    assert projected_anderson(one[halves], one[~halves]) < 1.0
    two = np.concatenate([rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + [6, 0, 0, 0]])
    assert projected_anderson(two[:200], two[200:]) > 10
    truth = np.repeat([0, 1], 200)
    assert neighbour_vote(two + [0, 0, 0, 20], truth) == 1.0  # cosine: the blobs kept off the origin
    assert neighbour_vote(one, rng.permutation(np.repeat([0, 1], 200))) < 0.65


def test_the_verdicts_table_lists_every_judged_cluster_and_the_nearest_pairs(finished):
    m = _strict_json(finished / "metrics.json")
    judged = [v for r in m["rounds"] for v in r["accepted"] + r["rejected"]]
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "verdicts_table.py"), str(finished)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| round")]
    assert len(rows) == len(judged) and out.count("| accepted |") == sum(v["accepted"] for v in judged)
    for v in judged:  # every accepted cluster of a round with another accepted one knows its neighbour
        assert (v["nearest_accepted"] is None) == (v["nearest_cluster"] is None)
        assert v["nearest_accepted"] is None or (v["accepted"] and v["nearest_accepted"] > 0)
    assert "one true class (a duplicate):" in out and "two true classes:" in out
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "verdicts_table.py"), str(ROOT)],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no metrics.json" in missing.stderr


def test_the_loop_runs_rounds_over_the_whole_stream_and_learns(finished):
    m = _strict_json(finished / "metrics.json")  # strict JSON: values that do not exist are null
    rounds = m["rounds"]
    assert rounds[0]["round"] == 0 and rounds[-1]["position"] == m["stream"]["length"]  # all of it
    assert len(rounds) >= 3
    assert all(a["position"] <= b["position"] for a, b in zip(rounds, rounds[1:], strict=False))
    assert set(m["final"]) == {"all", "old", "new", "phases", "old_own"} and len(m["final"]["phases"]) == 2
    assert len(m["forgetting"]["phases"]) == 2 and len(m["matrix"]) == len(rounds)
    # the labeled classes by their own outputs, every round, and where each class's test images went
    assert all(0 <= row["old_own"] <= 1 for row in m["matrix"])
    assert m["final"]["old_own"] == m["matrix"][-1]["old_own"]
    assert m["forgetting"]["old_own"] == pytest.approx(
        100 * (max(row["old_own"] for row in m["matrix"][:-1]) - m["final"]["old_own"]))
    names = {c["name"] for c in m["classes"]}
    assert [row["class"] for row in m["class_outputs"]] == [str(c) for c in range(10)]  # every class was seen
    for row in m["class_outputs"]:
        assert row["samples"] > 0 and all(name in names for name, _ in row["outputs"])
        shares = [share for _, share in row["outputs"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    own = [next((share for name, share in row["outputs"] if name == row["class"]), 0.0) * row["samples"]
           for row in m["class_outputs"][:5]]  # an old class's own output, when it is in its top 3
    assert sum(own) / sum(row["samples"] for row in m["class_outputs"][:5]) <= m["final"]["old_own"] + 1e-9
    # the same, after every round: v0 sees the old classes only, the last round is the final model
    old = [str(c) for c in range(5)]
    assert [row["class"] for row in rounds[0]["class_outputs"]] == old
    assert {name for row in rounds[0]["class_outputs"] for name, _ in row["outputs"]} <= set(old)
    assert rounds[-1]["class_outputs"] == m["class_outputs"]
    assert all(len(r["class_outputs"]) >= 5 for r in rounds)
    # the loop learned: old classes kept, new classes found and recognized (floors far below
    # what the full schedule reaches, above what a model without discovery could score)
    assert m["final"]["old"] >= 0.85
    assert m["discovered"] >= 2 and m["final"]["new"] >= 0.4
    # consolidation relabeled every discovered output once, from more of the stream than the
    # pseudo-labels the model was taught in the rounds (those of students the gate promoted; a
    # refused student's pseudo-labels never reached the model)
    consolidation = rounds[-1]["consolidation"]
    discovered = {c["id"] for c in m["classes"] if c["origin"] != "labeled"}
    assert consolidation["decision"] in ("promoted", "kept")
    # every output it was given is kept (renumbered in order), or dropped: no cluster matched it
    # (its k is estimated on the candidates, continual.consolidation_k) or its cluster was
    # unstable; a stable cluster no output matched is added after the kept ones ("was" None)
    assert consolidation["k_estimate"] >= 1
    was = [o["was"] for o in consolidation["outputs"] if o["was"] is not None]
    added = [o for o in consolidation["outputs"] if o["was"] is None]
    assert [o["name"] for o in added] == [a["name"] for a in consolidation.get("added", [])]
    assert consolidation["outputs"][len(was):] == added
    dropped = [o["id"] for o in consolidation["dropped_outputs"]]
    assert sorted(was + dropped) == list(range(5, 5 + len(was) + len(dropped))) and was == sorted(was)
    # those without a cluster go at once; then one at a time, each below the acceptance's bound
    # (0.5), or below 0.75 after its cluster had dissolved in an earlier pass; the kept ones
    # passed the last pass
    passes = consolidation.get("reclustered", [])
    assert sorted(p["dropped"] for p in passes) == dropped  # dropped_outputs: in id order
    unmatched = [p["dropped"] for p in passes if p.get("why") == "no cluster"]
    assert unmatched == consolidation["unmatched"] and passes[:len(unmatched)] == [
        p for p in passes if p.get("why") == "no cluster"]
    measured = [p for p in passes if p.get("why") != "no cluster"]
    for i, p in enumerate(measured):
        bound = 0.75 if any(q["stability"][str(p["dropped"])] < 0.5 for q in measured[:i]) else 0.5
        assert p["stability"][str(p["dropped"])] < bound
    assert all(consolidation["stability"][str(o)] >= 0.5 for o in was)
    assert all(o["stability"] >= 0.5 for o in added)
    # the test accuracy before it (for the report; no decision reads it): the round's own
    # verdict when consolidation kept the model, something else when its student replaced it
    before = consolidation["accuracy_before"]
    assert set(before) == set(rounds[-1]["accuracy"]) and 0 < before["all"] <= 1
    if consolidation["decision"] == "kept":
        assert before == rounds[-1]["accuracy"]
    if consolidation["decision"] == "promoted":
        assert [o["id"] for o in consolidation["outputs"]] == sorted(discovered)
        assert sorted(discovered) == list(range(5, 5 + len(was) + len(added)))
    taught = sum(o["size"] for r in rounds if r["promotion"]["decision"] == "promoted"
                 and not r["promotion"]["why"].startswith("consolidation") for o in r.get("outputs", []))
    assert 0 < taught < sum(o["size"] for o in consolidation["outputs"])
    for r in rounds[1:]:
        assert r["promotion"]["decision"] in ("promoted", "kept", "nothing to learn", "nothing pooled",
                                              "refused")
        for verdict in r["accepted"] + r["rejected"]:
            assert verdict["accepted"] == (not verdict["reasons"])
        held = r["pool_truth"]["classes"]  # what the pool held, class by class (for the report)
        assert sum(held.values()) == r["pooled"] and all(-1 <= int(c) < 10 for c in held)


def test_every_version_is_written_once_with_its_lineage(finished):
    m = _strict_json(finished / "metrics.json")
    versions = sorted((finished / "versions").iterdir(), key=lambda f: int(f.name[1:]))
    assert [v.name for v in versions] == [f"v{i}" for i in range(m["version"] + 1)]
    for i, folder in enumerate(versions):
        table = _strict_json(folder / "classes.json")
        assert table["parent"] == (None if i == 0 else i - 1) and (folder / "model.pt").is_file()
        assert len(table["classes"]) == 5 + sum(c["origin"] != "labeled" for c in table["classes"])
        # each version holds the labeled classes and every output promoted up to its round, but
        # those a promoted consolidation dropped (their relabeled clusters dissolved)
        promoted = sum(len(r.get("outputs", [])) for r in m["rounds"]
                       if r["promotion"]["decision"] == "promoted" and r["round"] <= table["round"])
        dropped = sum(len(r["consolidation"].get("dropped_outputs", [])) for r in m["rounds"]
                      if r.get("consolidation", {}).get("decision") == "promoted"
                      and r["round"] <= table["round"])
        assert len(table["classes"]) == 5 + promoted - dropped
    final_table = _strict_json(versions[-1] / "classes.json")["classes"]
    assert len(final_table) == 5 + m["discovered"]
    assert all(c["name"].startswith("new-") and c["pseudo_labels"] > 0
               for c in final_table if c["origin"] != "labeled")


def test_a_strict_gate_drops_outputs_and_every_version_matches_its_class_table(tmp_path):
    """With no drop allowed (max_drop 0, no noise allowance) most students fail whole; the
    gate drops the outputs that took held-out old-class images and promotes the rest. Every
    version's weights then have exactly the outputs its class table names, and the round's
    record counts the outputs it kept apart from the ones it dropped."""
    run = tmp_path / "run"
    assert main(_argv(run, tmp_path / "cache", "PromotionGate.max_drop = 0.0", "PromotionGate.z = 0.0")) == 0
    m = _strict_json(run / "metrics.json")
    dropping = [r for r in m["rounds"]
                if r.get("dropped_outputs") and r["promotion"]["decision"] == "promoted"]
    assert dropping, "the strict gate was expected to drop an output in some round"
    for r in dropping:
        assert r["promotion"]["why"].startswith("dropped output")
        # the kept outputs are renumbered to follow the known classes, the last of the table
        assert [o["id"] for o in r["outputs"]] == list(range(r["classes"] - len(r["outputs"]), r["classes"]))
    for folder in (run / "versions").iterdir():
        table = _strict_json(folder / "classes.json")["classes"]
        weights = torch.load(folder / "model.pt", weights_only=True)
        assert weights["classifier.weight"].shape[0] == len(table) == 1 + max(c["id"] for c in table)
    assert len(m["classes"]) == 5 + m["discovered"]


def test_outputs_consolidation_adds_are_in_the_table_the_weights_and_the_report(tmp_path):
    """continual.consolidation_added: a group of candidates that the relabeling gives a labeled
    class from beyond the territory gets a cluster, and a stable one no output matches becomes a
    class "discovered in consolidation". (Digits never fire at the measured bound, 0.75: a rare
    digit's look-alikes lie within 0.6 of the spacing; 0.05 makes every such group fire.)"""
    run = tmp_path / "run"
    assert main(_argv(run, tmp_path / "cache", "continual.consolidation_added = 2",
                      "continual.consolidation_territory = 0.05",
                      "continual.consolidation_k = 'outputs'")) == 0
    m = _strict_json(run / "metrics.json")
    consolidation = m["rounds"][-1]["consolidation"]
    added = [o for o in consolidation["outputs"] if o["was"] is None]
    assert [o["name"] for o in added] == [a["name"] for a in consolidation["added"]]
    assert added, "a territory of 0.05 was expected to add an output"
    assert all(o["stability"] >= 0.5 and o["size"] > 0 for o in added)  # stable, and taught
    n_old, table = 5, m["classes"]
    from_consolidation = [c for c in table if c["origin"].startswith("discovered in consolidation")]
    assert [c["id"] for c in from_consolidation] == [o["id"] for o in added] == list(
        range(len(table) - len(added), len(table)))
    assert all(c["pseudo_labels"] > 0 for c in table[n_old:])  # every output has exemplars to replay
    final = sorted((run / "versions").iterdir(), key=lambda f: int(f.name[1:]))[-1]
    assert torch.load(final / "model.pt", weights_only=True)["classifier.weight"].shape[0] == len(table)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "consolidation_table.py"), str(run)],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("| added |") == len(added)


def _files(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in folder.rglob("*") if f.is_file()}


def test_a_finished_run_started_again_writes_nothing(finished, tmp_path):
    before = _files(finished)
    assert main(_argv(finished, tmp_path / "cache")) == 0
    assert _files(finished) == before  # metrics, report, plots, versions, state: all untouched


def test_a_version_newer_than_the_saved_state_is_removed_on_resume(finished, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    last = max(int(v.name[1:]) for v in (copy / "versions").iterdir())
    stray = copy / "versions" / f"v{last + 1}"  # as if a round wrote it and died before its state
    stray.mkdir()
    (stray / "classes.json").write_text("{}")
    (copy / "metrics.json").unlink()  # the run died before its end
    assert main(_argv(copy, tmp_path / "cache")) == 0
    assert not stray.exists() and (copy / "versions" / f"v{last}" / "classes.json").exists()


def test_a_threshold_rule_that_reads_stream_labels_is_refused(tmp_path, capsys):
    assert main(_argv(tmp_path / "run", tmp_path / "cache", "continual.threshold = @PoolPrecision()")) == 1
    assert "held-out known-class scores alone" in " ".join(capsys.readouterr().err.split())


def test_core_pseudo_labels_without_a_density_estimate_are_refused_before_training(tmp_path, capsys):
    argv = _argv(tmp_path / "run", tmp_path / "cache", "continual.pseudo_labels = 'core'",
                 "SemiSupervisedKMeans.estimate = 'probe'")
    assert main(argv) == 2  # a config error: one line, nothing run
    err = " ".join(capsys.readouterr().err.split())
    assert "config error" in err and "estimates k by density" in err and "estimate = 'density'" in err
    assert not list((tmp_path / "run").glob("versions/v*"))  # nothing was trained


def test_a_score_fitted_on_assigned_samples_learns_a_discovered_class_from_the_stream_it_has_seen():
    """score_fit='assigned': the labeled classes keep their exemplars; a discovered class is
    represented by every stream sample before the position that the model assigns to it (not
    by its exemplars, nor by samples past the position); one the model assigns nothing falls
    back to its exemplars. 'memory' fits on the exemplars alone."""
    import importlib
    from types import SimpleNamespace

    import numpy as np

    loop = importlib.import_module("graphs.continual").ContinualLoop
    memory_targets = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # 2 labeled classes, discovered 2 and 3
    memory = {"features": np.arange(8.0)[:, None], "logits": np.eye(4)[memory_targets],
              "targets": memory_targets}
    assigned = np.array([2, 0, 2, 1, 2, 2])  # the model's answer on 6 stream samples; position 4
    stream = {"features": 100 + np.arange(6.0)[:, None], "logits": np.eye(4)[assigned],
              "targets": -np.ones(6)}
    fake = SimpleNamespace(
        state=SimpleNamespace(classes=[{}] * 4, position=4, temperature=1.0),
        protocol=SimpleNamespace(n_old=2, stream="stream"), score_fit="assigned",
        _memory_images=lambda: "memory", model=None,
        _encode=lambda model, images: {"memory": memory, "stream": stream}[images])
    fit = loop._score_fit_outputs(fake)
    assert fit["targets"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # class 2: stream rows 0 and 2 (rows 4 and 5 are past the position); class 3: its exemplars
    assert fit["features"][:, 0].tolist() == [0, 1, 2, 3, 100, 102, 6, 7]
    assert fit["logits"].shape == (8, 4)
    fake.score_fit = "memory"
    assert loop._score_fit_outputs(fake)["features"][:, 0].tolist() == list(range(8))


def test_an_unknown_score_fit_is_refused_before_training(tmp_path, capsys):
    assert main(_argv(tmp_path / "run", tmp_path / "cache", "continual.score_fit = 'stream'")) == 2
    assert "score_fit must be 'memory' or 'assigned'" in " ".join(capsys.readouterr().err.split())
    assert not list((tmp_path / "run").glob("versions/v*"))


def test_off_domain_options_without_a_domain_test_are_refused_before_training(tmp_path, capsys):
    assert main(_argv(tmp_path / "run", tmp_path / "cache", "continual.domain = None",
                      "continual.pool_off_domain = False")) == 2
    assert "continual.domain = @InputComplexity()" in " ".join(capsys.readouterr().err.split())
    assert not list((tmp_path / "run").glob("versions/v*"))
    assert main(_argv(tmp_path / "run2", tmp_path / "cache", "ClusterAcceptance.max_off_domain = 0.5")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "max_off_domain" in err and "continual.domain = @InputComplexity()" in err
    assert not list((tmp_path / "run2").glob("versions/v*"))


def test_fixed_anchors_with_a_labeler_that_cannot_fix_them_are_refused_before_training(tmp_path, capsys):
    parametric = ["import components.parametric", "continual.labeler = @SelfDistillationLabeler()",
                  "SelfDistillationLabeler.init = @SemiSupervisedKMeans()"]
    assert main(_argv(tmp_path / "run", tmp_path / "cache", *parametric)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "SelfDistillationLabeler" in err and "continual.consolidation_fixed_anchors = False" in err
    assert not list((tmp_path / "run").glob("versions/v*"))


def test_the_report_links_plots_that_exist(finished):
    import re

    report = (finished / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert set(linked) == {"accuracy_per_round.png", "classes.png", "pool.png"}
    assert all((finished / name).is_file() for name in linked)
    assert "## Lineage" in report and "| v0 | – | 0 |" in report
    assert "the pool held (true classes, never read by a decision): " in report
    m = _strict_json(finished / "metrics.json")
    assert "## Where each class's test images go" in report
    first = m["class_outputs"][0]
    assert (f"| {first['class']} | {first['samples']} | {first['outputs'][0][0]} "
            f"{100 * first['outputs'][0][1]:.1f} %") in report
    assert "## Round by round" in report
    top = [r["class_outputs"][0]["outputs"][0] for r in m["rounds"]]  # the first old class, every round
    assert (f"| {first['class']} | " + " | ".join(f"{name} {100 * share:.1f} %" for name, share in top)
            + " |") in report
    assert f"| old classes by their own outputs, no Hungarian (%) / forgetting (points) | " \
           f"{100 * m['final']['old_own']:.1f} / " in report
    # what consolidation changed, as measured on the test set (this run consolidates: the loop
    # test above reads its record)
    last = _strict_json(finished / "metrics.json")["rounds"][-1]
    before, after = last["consolidation"]["accuracy_before"], last["accuracy"]
    assert (f"test accuracy (all / old / new) {100 * before['all']:.1f} / {100 * before['old']:.1f} / "
            f"{100 * before['new']:.1f} % before, {100 * after['all']:.1f}") in report


def _comparable(metrics: dict) -> dict:
    """Metrics without wall-clock times."""
    out = {k: v for k, v in metrics.items() if k != "seconds"}
    out["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]
    return out


_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_RUN = [sys.executable, "-m", "components.run", "--quiet"]
_SCORE = "continual.score = @Mahalanobis()"  # a score fitted on the memory: resuming must refit it


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run of the kill-and-resume tests, started once in its own process on one
    thread: it runs beside the first test's killed run (2 cores), and both tests compare to it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    log = (folder / "stderr.txt").open("w")
    process = subprocess.Popen(_RUN + _argv(folder / "run", folder / "cache", _SCORE), cwd=ROOT,
                               env=_ONE_THREAD, stdout=subprocess.DEVNULL, stderr=log)

    def metrics() -> dict:  # the first test waits for it; the second finds it done
        assert process.wait() == 0, (folder / "stderr.txt").read_text()
        return _comparable(_strict_json(folder / "run" / "metrics.json"))

    yield metrics
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


@pytest.mark.parametrize("damage", [False, True])
def test_a_run_killed_mid_round_resumes_and_ends_as_an_uninterrupted_one(tmp_path, uninterrupted, damage):
    killed = tmp_path / "killed"
    # the same run, SIGKILLed once round 1 is saved (it is then inside round 2), then started again
    process = subprocess.Popen(_RUN + _argv(killed, tmp_path / "cache", _SCORE), cwd=ROOT, env=_ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((killed / "loop").glob("state_loop_[1-9]*.pt")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()
    if damage:  # the newest loop state truncated: the one before it is used, that round runs again
        newest = max((killed / "loop").glob("state_*.pt"), key=lambda f: int(f.stem.split("_")[-1]))
        newest.write_bytes(newest.read_bytes()[:100])
    resumed = subprocess.run(_RUN[:-1] + _argv(killed, tmp_path / "cache", _SCORE), cwd=ROOT, env=_ONE_THREAD,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round" in resumed.stderr
    assert ("using the one before it" in " ".join(resumed.stderr.split())) == damage
    assert _comparable(_strict_json(killed / "metrics.json")) == uninterrupted()
    # the checkpoint handler keeps two (Ignite removes the oldest, then writes the newest)
    assert len(list((killed / "loop").glob("state_*.pt"))) == 2
    assert not (killed / "stages").exists()  # a finished run leaves no epoch checkpoints


def test_seeds_summarizes_continual_runs(finished):
    from components.seeds import summarize

    m = _strict_json(finished / "metrics.json")
    other = json.loads(json.dumps(m))
    other["final"]["all"], other["forgetting"]["old"] = 0.5, None
    out = summarize([m, other])
    assert out["final.all"]["values"] == [m["final"]["all"], 0.5]
    assert {"final.phase1", "final.phase2", "forgetting.old", "discovered", "spurious", "final.old_own",
            "forgetting.old_own"} <= set(out)
    assert out["final.old_own"]["values"] == [m["final"]["old_own"]] * 2
    expected = [] if m["forgetting"]["old"] is None else [m["forgetting"]["old"]]
    assert out["forgetting.old"]["values"] == expected  # a null is left out, not averaged as 0
