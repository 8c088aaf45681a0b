"""Faults of a whole run: killed, interrupted, out of space, a diverged loss, a reused run
folder, a checkpoint that pickles code. Each test starts the real command line (a subprocess
where a signal or a resource limit is involved) on a short digits run and checks what the
library promises in docs/reliability.md."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.run import CONFIG_ERROR, FAILED, INTERRUPTED, main
from graphs.handlers import RunFailure, load_checkpoint

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # bit-identical reruns
# the real loop (gin/distill.gin), shorter
TINY = ["train.epochs = 6", "adapt.epochs = 3", "distill.epochs = 4", "SemiSupervisedKMeans.n_init = 1",
        "SamplePool.trigger_size = 120"]


def _argv(run_dir: Path, cache: Path, *bindings: str) -> list[str]:
    argv = ["--gin", "gin/distill.gin", "--run-dir", str(run_dir), "--gin-bindings",
            f"FeatureCache.root = '{cache}'"]
    for b in [*TINY, *bindings]:
        argv += ["--gin-bindings", b]
    return argv


def _start(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "components.run", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    process = _start(argv, **kwargs)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _results(run_dir: Path) -> dict:
    """What a run measured (no wall-clock times)."""
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: m[k] for k in ("test", "pool", "novelty", "teacher_old_accuracy")}


def _wait_for(moment: str, folder: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``stages/<stage>/epoch_checkpoint_<n>.pt`` or a later epoch of that stage is on
    disk (``n_saved=2`` prunes older epochs, so an exact file may come and go unseen)."""
    stage, name = moment.split("/")[-2:]
    wanted = int(name.split("_")[-1].split(".")[0])
    deadline = time.monotonic() + timeout
    while not any(int(f.stem.split("_")[-1]) >= wanted for f in (folder / "stages" / stage).glob("*.pt")):
        assert process.poll() is None, f"the run ended before {moment} appeared"
        assert time.monotonic() < deadline, f"{moment} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted short run: what every interrupted one must end with."""
    folder = tmp_path_factory.mktemp("reference")
    done = _run(_argv(folder / "run", folder / "cache"))
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.parametrize("moment", [
    "stages/run-01-train/epoch_checkpoint_2.pt",  # during training
    "stages/run-02-adapt/epoch_checkpoint_1.pt",  # during the representation step
    "stages/run-03-distill/epoch_checkpoint_2.pt",  # during distillation, after encode wrote the cache
])
def test_a_run_killed_at_any_moment_resumes_to_the_same_metrics(reference, tmp_path, moment):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    process = _start(_argv(run_dir, cache))
    _wait_for(moment, run_dir, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (run_dir / "metrics.json").exists()
    resumed = _run(_argv(run_dir, cache))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: run-01-train" in " ".join(resumed.stderr.split())  # it says what it skipped
    resumed_stages = json.loads((run_dir / "environment.json").read_text())["resumed_stages"]
    assert resumed_stages[0].startswith("run-01-train (")  # (done) or (epoch N): recorded beside the metrics
    assert _results(run_dir) == _results(reference / "run")
    assert not (run_dir / "stages").exists()  # the finished run keeps no epoch checkpoints


def test_a_finished_run_is_left_alone_and_fresh_starts_over(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference / "run", run_dir)
    before = {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file()}
    again = _run(_argv(run_dir, reference / "cache"))
    assert again.returncode == 0 and "holds a finished run" in " ".join(again.stderr.split())
    assert {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file()} == before
    # another configuration into the same folder is refused, nothing touched
    other = _run(_argv(run_dir, reference / "cache", "SEED = 1"))
    assert other.returncode == CONFIG_ERROR and "another configuration" in " ".join(other.stderr.split())
    assert {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file()} == before
    # --fresh starts over: one set of checkpoints, the same results
    fresh = _run(_argv(run_dir, reference / "cache") + ["--fresh"])
    assert fresh.returncode == 0, fresh.stderr
    names = [sorted(p.name for p in (d / "checkpoints").glob("*.pt")) for d in (run_dir, reference / "run")]
    assert names[0] == names[1]
    assert _results(run_dir) == _results(reference / "run")


def test_a_diverging_loss_stops_in_the_epoch_it_diverged_with_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main(_argv(tmp_path / "run", tmp_path / "cache", "torch.optim.SGD.lr = 1e4"))
    import re

    err = " ".join(capsys.readouterr().err.split())
    assert code == FAILED
    found = re.search(r"train \S+: the loss became (nan|inf|-inf) at epoch (\d+), iteration \d+", err)
    assert found and "learning rate" in err and "In call to configurable" not in err
    assert "Traceback" not in err and "Traceback" in (tmp_path / "run" / "error.log").read_text()
    assert not (tmp_path / "run" / "metrics.json").exists()
    # it stopped in the epoch of the first non-finite loss: the last saved epoch is the one before
    epoch = int(found.group(2))
    saved = [int(f.stem.split("_")[-1]) for f in (tmp_path / "run" / "stages").rglob("*.pt")]
    assert max(saved, default=0) == epoch - 1


def test_a_run_dir_that_is_a_file_or_not_writable_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    assert main(_argv(a_file, tmp_path / "cache")) == CONFIG_ERROR
    assert "is a file" in capsys.readouterr().err
    monkeypatch.setattr("components.run.os.access", lambda *_: False)  # root may write anywhere
    assert main(_argv(tmp_path / "run", tmp_path / "cache")) == CONFIG_ERROR
    assert "not writable" in capsys.readouterr().err and not (tmp_path / "run").exists()


class _Runs:
    """Pickles as a call that leaves a file behind: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_pickles_code_is_refused_not_run(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "it ran"
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": _Runs(str(marker))}, path)
    with pytest.raises(RunFailure, match="refusing to load .*pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "good.pt")  # tensors load as before
    assert load_checkpoint(tmp_path / "good.pt")["weight"].shape == (2,)


def test_a_resume_after_a_kill_between_ignites_remove_and_write_saves_again(tmp_path):
    """Ignite's ``Checkpoint`` removes the oldest file, then writes the newest: a run killed in
    between (or whose newest state was damaged and set aside) resumes from a state whose handler
    list names a file that is gone. The continual loop's saver must save the next round anyway."""
    from ignite.engine import Engine
    from ignite.handlers import Checkpoint, DiskSaver

    from graphs.handlers import CheckedDiskSaver

    def states(saver_type):
        """Rounds 1 and 2 saved as the loop saves them; round 3 saved by a resumed handler after
        a kill that came between Ignite's removal of state 1 and its write of state 3."""
        folder, engine = tmp_path / saver_type.__name__, Engine(lambda e, b: None)

        def handler(round_: int) -> Checkpoint:
            return Checkpoint({"loop": torch.nn.Linear(2, 2)}, saver_type(folder, require_empty=False),
                              filename_prefix="state", n_saved=2, include_self=True,
                              global_step_transform=lambda *_: round_)

        first = handler(1)
        first(engine)
        first.global_step_transform = lambda *_: 2
        first(engine)
        saved = load_checkpoint(folder / "state_loop_2.pt")
        (folder / "state_loop_1.pt").unlink()  # removed, and then the run was killed
        resumed = handler(3)
        resumed.load_state_dict(saved["checkpointer"])
        resumed(engine)
        return sorted(f.name for f in folder.glob("state_*.pt"))

    with pytest.raises(FileNotFoundError):  # Ignite's own saver: every resume would die here
        states(DiskSaver)
    assert states(CheckedDiskSaver) == ["state_loop_2.pt", "state_loop_3.pt"]


def test_ctrl_c_ends_with_one_line_and_130_and_the_run_resumes(reference, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    process = _start(_argv(run_dir, cache))
    _wait_for("stages/run-01-train/epoch_checkpoint_2.pt", run_dir, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED
    assert "interrupted" in err and "Traceback" not in err
    resumed = _run(_argv(run_dir, cache))
    assert resumed.returncode == 0 and "resumed: run-01-train (epoch" in " ".join(resumed.stderr.split())
    assert _results(run_dir) == _results(reference / "run")


def test_a_write_that_fails_names_the_file_and_keeps_every_earlier_one(reference, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) as a full disk. The run is first killed inside the
    representation step, so training's checkpoints and cache entries are on disk; started again
    under a limit below the size of an epoch checkpoint, its next write fails."""
    from components.cache import FeatureCache

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    process = _start(_argv(run_dir, cache))
    _wait_for("stages/run-02-adapt/epoch_checkpoint_1.pt", run_dir, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    before = {f: f.read_bytes() for f in [*cache.glob("*.h5"), *run_dir.rglob("*.pt")]}
    assert any(f.suffix == ".h5" for f in before) and any(f.suffix == ".pt" for f in before)
    limit_bytes = min(f.stat().st_size for f in run_dir.glob("stages/run-02-adapt/*.pt")) - 1

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    failed = _run(_argv(run_dir, cache), preexec_fn=limit)
    err = " ".join(failed.stderr.split())
    assert failed.returncode == FAILED and "could not write" in err and "earlier files are intact" in err
    assert str(run_dir / "stages") in err and "Traceback" not in failed.stderr  # the file that failed
    for path, content in before.items():  # every file written before reads back, unchanged
        if path.exists():  # (an older epoch may have been pruned as usual)
            assert path.read_bytes() == content, path
    store = FeatureCache(str(cache))
    assert all(store.load(entry.stem) is not None for entry in cache.glob("*.h5"))
    for checkpoint in run_dir.rglob("*.pt"):
        load_checkpoint(checkpoint)
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "error.log").exists()
    resumed = _run(_argv(run_dir, cache))  # space again: the run resumes and ends as it should
    assert resumed.returncode == 0, resumed.stderr
    assert _results(run_dir) == _results(reference / "run")
    assert not (run_dir / "error.log").exists()  # the failed attempt's log goes with its failure


def test_non_finite_features_and_scores_are_refused_by_name(tmp_path):
    import numpy as np

    from components.cache import FeatureCache
    from components.data import ImageSet
    from components.data.loading import BatchAugment
    from components.metrics import novelty_metrics
    from components.models import Network, SmallConvNet
    from graphs.encode import encode

    model = Network(SmallConvNet(in_channels=1, width=4), num_classes=3)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # a diverged model
    images = ImageSet(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2] * 2),
                      ["a", "b", "c"], "x")
    cache = FeatureCache(str(tmp_path / "cache"))
    with pytest.raises(RunFailure, match="encode x: the model's 'features' are not finite for 6 of 6"):
        encode(model, images, BatchAugment(), cache, torch.device("cpu"))
    assert not list((tmp_path / "cache").glob("*.h5"))  # nothing cached
    with pytest.raises(ValueError, match="1 non-finite values of 4"):
        novelty_metrics(np.array([0.1, np.nan, 0.3, 0.4]), np.array([0, 1, 0, 1], bool))


def test_a_damaged_checkpoint_or_metrics_file_costs_an_epoch_not_the_run(reference, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    process = _start(_argv(run_dir, cache))
    _wait_for("stages/run-01-train/epoch_checkpoint_3.pt", run_dir, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    newest = max((run_dir / "stages" / "run-01-train").glob("*.pt"), key=lambda f: int(f.stem.split("_")[-1]))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    resumed = _run(_argv(run_dir, cache))
    assert resumed.returncode == 0, resumed.stderr
    assert "using the one before it" in " ".join(resumed.stderr.split())
    assert _results(run_dir) == _results(reference / "run")
    # a finished run whose metrics.json was damaged is not taken for finished: it runs again
    (run_dir / "metrics.json").write_text('{"test": {"all": 0.9')
    again = _run(_argv(run_dir, cache))
    assert again.returncode == 0 and "not valid JSON" in " ".join(again.stderr.split())
    assert _results(run_dir) == _results(reference / "run")


def test_a_missing_binding_is_a_config_error_and_a_folder_without_a_recorded_config_is_refused(
        tmp_path, capsys, monkeypatch):
    from components.run import ConfigError, prepare_run_dir

    monkeypatch.chdir(ROOT)
    # a gin file with no graph bound: gin's own complaint, before any work
    assert main(["--gin", "gin/models/small_convnet.gin", "--run-dir", str(tmp_path / "run")]) == CONFIG_ERROR
    assert "Required bindings" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # files but no run_config.gin: nothing says which configuration made them
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="no run_config.gin"):
        prepare_run_dir(old, "SEED = 0", fresh=False)
    # metrics.json without the finished marker (killed while writing the report): not finished
    done = tmp_path / "done"
    done.mkdir()
    (done / "run_config.gin").write_text("SEED = 0\n")
    (done / "metrics.json").write_text("{}")
    assert prepare_run_dir(done, "SEED = 0\n", fresh=False) is None
    (done / "finished").write_text("")
    assert prepare_run_dir(done, "SEED = 0\n", fresh=False) == {}
    # bindings that only say where things go may be added, comments and blank lines aside
    assert prepare_run_dir(done, "SEED = 0\n\n# Parameters for FeatureCache:\nFeatureCache.root = 'x'\n",
                           fresh=False) == {}
