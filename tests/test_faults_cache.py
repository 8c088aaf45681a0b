"""The feature cache under faults: damaged bytes, truncated files, processes sharing a folder,
a size cap, and the ``python -m components.cache`` command (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import runpy
import time
import zlib
from pathlib import Path

import gin
import h5py
import numpy as np
import pytest

import components.cache
from components.cache import CacheCorrupt, CacheMismatch, FeatureCache, main, parse_size, read_checked

pytestmark = pytest.mark.faults


def _content(key: str, rows: int = 200) -> dict[str, np.ndarray]:
    """What encoding ``key`` gives: 200 x 16 floats and labels that differ from key to key."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return {"features": rng.standard_normal((rows, 16)).astype(np.float32),
            "targets": rng.integers(0, 10, rows)}


class _Encoder:
    def __init__(self, key: str):
        self.key, self.calls = key, 0

    def __call__(self):
        self.calls += 1
        return _content(self.key)


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _damage(path: Path, name: str = "features") -> None:
    """Overwrite 64 random bytes in the middle of the first data chunk of dataset ``name``
    (of its data, if it is not chunked)."""
    with h5py.File(path, "r") as f:
        dset = f[name]
        if dset.chunks:
            chunk = dset.id.get_chunk_info(0)
            offset, size = chunk.byte_offset, chunk.size
        else:
            offset, size = dset.id.get_offset(), dset.id.get_storage_size()
    start = offset + size // 2 - 32
    noise = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    with open(path, "r+b") as raw:
        raw.seek(start)
        assert raw.read(64) != noise
        raw.seek(start)
        raw.write(noise)


@pytest.fixture
def warnings_of_components(caplog, monkeypatch):
    """The warnings logged on the ``components`` logger. ``setup_logging`` (called by tests of
    the command line) stops that logger's propagation, which would hide them from caplog."""
    monkeypatch.setattr(logging.getLogger("components"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="components")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name == "components" and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------


def test_every_dataset_is_checksummed_also_an_empty_one(tmp_dir):
    cache = FeatureCache(tmp_dir)
    cache.save("k", _content("k"), model="m")
    cache.save("empty", {"features": np.zeros((0, 16), np.float32), "targets": np.zeros(0, np.int64)})
    for key in ("k", "empty"):
        with h5py.File(cache.path(key), "r") as f:
            assert sorted(f) == ["features", "targets"]
            assert all(f[name].fletcher32 for name in f)
    assert _equal(cache.load("k"), _content("k"))
    assert cache.load("empty")["features"].shape == (0, 16)


def test_damaged_chunk_is_detected_deleted_and_reencoded(tmp_dir, warnings_of_components):
    cache, encode = FeatureCache(tmp_dir), _Encoder("k")
    cache.get("k", encode)
    _damage(cache.path("k"))
    assert cache.load("k") is None
    messages = warnings_of_components()
    assert len(messages) == 1
    assert str(cache.path("k")) in messages[0] and "re-encoded" in messages[0]
    assert not cache.path("k").exists()  # deleted, not left to be found again
    assert _equal(cache.get("k", encode), _content("k")) and encode.calls == 2
    assert _equal(cache.load("k"), _content("k")) and len(warnings_of_components()) == 1


def test_the_same_damage_without_checksums_reads_back_wrong_silently(tmp_dir):
    """Why the checksums: without them HDF5 returns the damaged floats as if nothing happened."""
    path = tmp_dir / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=_content("k")["features"])
    _damage(path)
    with h5py.File(path, "r") as f:
        assert not np.array_equal(f["features"][()], _content("k")["features"])


def test_read_checked_refuses_a_damaged_file_with_one_clear_message(tmp_dir):
    cache = FeatureCache(tmp_dir)
    path = cache.save("k", _content("k"), model="m")
    _damage(path, "targets")
    with pytest.raises(CacheCorrupt, match=r"corrupt \(checksum failed\): delete it and re-encode") as error:
        read_checked(path, model="m")
    assert str(path) in str(error.value) and isinstance(error.value, CacheMismatch)


def test_truncated_file_is_reencoded_and_refused_by_read_checked(tmp_dir, warnings_of_components):
    cache, encode = FeatureCache(tmp_dir), _Encoder("k")
    path = cache.save("k", _content("k"))
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CacheCorrupt, match="corrupt .*truncated"):
        read_checked(path)
    assert _equal(cache.get("k", encode), _content("k")) and encode.calls == 1
    assert len(warnings_of_components()) == 1


def test_unequal_lengths_or_missing_checksums_count_as_corrupt(tmp_dir, warnings_of_components):
    cache = FeatureCache(tmp_dir)
    for key, rows, checksum in (("short", 3, True), ("unchecked", 4, False)):
        with h5py.File(cache.path(key), "w") as f:
            f.create_dataset("features", data=np.zeros((4, 2)), fletcher32=checksum)
            f.create_dataset("targets", data=np.zeros(rows), fletcher32=checksum)
            f.attrs["fingerprint"], f.attrs["complete"] = key, True
        assert cache.load(key) is None and not cache.path(key).exists()
    messages = warnings_of_components()
    assert len(messages) == 2
    assert "unequal length" in messages[0] and "no checksum on features, targets" in messages[1]


# --------------------------------------------------------------------------------------------
# processes sharing one folder
# --------------------------------------------------------------------------------------------

# Run in each spawned process. It loads components/cache.py alone: importing the `components`
# package would import torch, faiss and torchvision, seconds per process on the test machines.
_WORKER = """
import importlib.util, json, logging
import numpy as np

spec = importlib.util.spec_from_file_location("cache_under_test", cache_py)
cache_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache_module)
warned = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warned.append(record.getMessage())
logging.getLogger("components").addHandler(handler)

cache = cache_module.FeatureCache(root, max_bytes=max_bytes)
barrier.wait(timeout=60)
wrong = gets = 0
for rep in range(repetitions):
    for key in keys:
        got = cache.get(key, lambda key=key: expected[key])
        gets += 1
        wrong += got.keys() != expected[key].keys() or not all(
            np.array_equal(got[k], expected[key][k]) for k in got)
    if rep % 2 == worker % 2:  # replace the shared entry while the other processes read it
        cache.save("shared", expected["shared"])
with open(result, "w") as out:
    json.dump({"gets": gets, "wrong": int(wrong), "warnings": warned}, out)
"""


def test_processes_sharing_a_folder_never_read_a_partial_entry(tmp_path):
    workers, repetitions = 3, 20
    root, script = tmp_path / "cache", tmp_path / "worker.py"
    script.write_text(_WORKER)
    keys = ["shared", *(f"own{n}" for n in range(workers))]
    expected = {key: _content(key) for key in keys}
    size = FeatureCache(tmp_path / "probe").save("probe", _content("probe")).stat().st_size
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    processes = []
    for n in range(workers):
        # the shared key, its own key and its neighbour's; a cap of 3 of the 4 entries makes
        # every process evict files the others are reading
        init = {"cache_py": components.cache.__file__, "root": str(root), "max_bytes": 3 * size + 100,
                "worker": n, "repetitions": repetitions, "barrier": barrier, "expected": expected,
                "keys": ["shared", f"own{n}", f"own{(n + 1) % workers}"],
                "result": str(tmp_path / f"result{n}.json")}
        processes.append(ctx.Process(target=runpy.run_path, args=(str(script), init, "__worker__")))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * workers
    for n in range(workers):
        result = json.loads((tmp_path / f"result{n}.json").read_text())
        assert result == {"gets": 3 * repetitions, "wrong": 0, "warnings": []}
    assert not [p.name for p in root.iterdir() if p.suffix == ".tmp"]
    left = FeatureCache(root)
    for path in root.glob("*.h5"):
        assert _equal(left.load(path.stem), expected[path.stem])


# --------------------------------------------------------------------------------------------
# size cap
# --------------------------------------------------------------------------------------------


def _age(cache: FeatureCache, key: str, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(cache.path(key), (stamp, stamp))


def test_size_cap_evicts_the_least_recently_used_never_the_one_just_written(tmp_dir):
    cache = FeatureCache(tmp_dir)
    for age, key in enumerate("cba"):
        cache.save(key, _content(key))
        _age(cache, key, 100 * (age + 1))  # a used 300 s ago, b 200 s, c 100 s
    size = max(cache.path(k).stat().st_size for k in "abc")
    before = cache.path("a").stat().st_mtime
    assert cache.load("a") is not None  # a hit makes a the most recently used
    assert cache.path("a").stat().st_mtime > before
    capped = FeatureCache(tmp_dir, max_bytes=3 * size + 100)
    capped.get("d", _Encoder("d"))
    assert sorted(p.stem for p in tmp_dir.glob("*.h5")) == ["a", "c", "d"]  # b was the least recent
    FeatureCache(tmp_dir, max_bytes=1).save("e", _content("e"))  # smaller than any entry
    assert [p.stem for p in tmp_dir.glob("*.h5")] == ["e"]


def test_size_cap_is_gin_configurable_with_a_unit():
    gin.parse_config("FeatureCache.max_bytes = '20M'")
    assert FeatureCache().max_bytes == 20 * 2**20
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=-1)


# --------------------------------------------------------------------------------------------
# python -m components.cache
# --------------------------------------------------------------------------------------------


def test_cli_lists_prunes_and_verifies(tmp_dir, capsys):
    cache = FeatureCache(tmp_dir)
    for age, key in ((10, "old"), (5, "middle"), (0, "new")):
        cache.get(key, _Encoder(key), model="m" * 40, data="d" * 40, dataset="train")
        _age(cache, key, age * 86400 + 60)
    root = str(tmp_dir)

    assert main(["list", "--root", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["new", "middle", "old"]  # most recent first
    for line in lines[1:4]:  # dataset, rows, ..., model and data abbreviated, state
        fields = line.split()
        assert fields[1:3] == ["train", "200"] and fields[-3:] == ["mmmmmmmm", "dddddddd", "complete"]
    assert lines[-1].startswith("total: 3 entries, ")

    assert main(["verify", "--root", root]) == 0
    assert "verified 3 entries: 0 unusable" in capsys.readouterr().out

    assert main(["prune", "--root", root, "--older-than", "7"]) == 0
    assert "removed old.h5" in capsys.readouterr().out
    assert main(["prune", "--root", root, "--max-size", "2G"]) == 0  # under the cap: nothing goes
    keep = str(cache.path("new").stat().st_size + 10)
    assert main(["prune", "--root", root, "--max-size", keep]) == 0
    assert "removed middle.h5" in capsys.readouterr().out
    assert [p.stem for p in tmp_dir.glob("*.h5")] == ["new"]

    _damage(cache.path("new"))
    assert main(["verify", "--root", root]) == 1
    out = capsys.readouterr().out
    assert f"{cache.path('new')} is corrupt (checksum failed)" in out.replace("\n", "")
    assert "verified 1 entry: 1 unusable" in out


def test_cli_refuses_a_missing_folder_and_a_bad_size(tmp_dir, capsys):
    assert main(["list", "--root", str(tmp_dir / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"no cache folder at {tmp_dir / 'missing'}"
    for argv in (["prune", "--root", str(tmp_dir), "--max-size", "lots"], ["prune", "--root", str(tmp_dir)]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert [parse_size(s) for s in ("1000", "1.5K", "500M", "2G", "2GiB")] == \
        [1000, 1536, 500 * 2**20, 2 * 2**30, 2 * 2**30]
