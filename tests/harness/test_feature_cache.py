"""The memory-mapped feature cache (harness/feature_cache.py): same features as HDF5, built once,
rebuilt when the data changes, safe when processes start together, and held once in memory however
many processes read it (counted with PSS from /proc)."""

import json
import multiprocessing as mp
import os
import pickle
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from harness import feature_cache
from harness.data import FeatureStore, find_sessions, fingerprint, open_feature_stores, read_trials
from harness.errors import UserError
from tests.conftest import make_trials, write_split


def all_trials(root):
    sessions = find_sessions(root)
    return {s: read_trials(root, sessions, s, 512) for s in ("train", "val")}


def entries(cache_dir):
    return sorted(p.name for p in (Path(cache_dir) / "features").iterdir() if p.is_dir())


def test_cache_gives_the_hdf5_features_and_the_memory_hash(small_dataset, tmp_path):
    trials = all_trials(small_dataset)
    cached = open_feature_stores(trials, "cache", tmp_path / "cache")
    memory = open_feature_stores(trials, "memory", tmp_path / "unused")
    on_demand = open_feature_stores(trials, "hdf5", tmp_path / "unused")
    for split, ts in trials.items():
        for i in range(len(ts)):
            x = cached[split][i]
            assert x.dtype == np.float32 and not x.flags.writeable and x.shape == (ts[i].n_time_steps, 512)
            np.testing.assert_array_equal(x, on_demand[split][i])
        assert cached[split].content_hash() == memory[split].content_hash() is not None
        assert on_demand[split].content_hash() is None
    assert fingerprint(trials, cached) == fingerprint(trials, memory)
    assert len(entries(tmp_path / "cache")) == 5  # one per data file: 3 train + 2 val
    assert not (tmp_path / "unused").exists()


def test_a_second_start_reads_the_index_only(small_dataset, tmp_path, monkeypatch):
    trials = all_trials(small_dataset)
    open_feature_stores(trials, "cache", tmp_path)

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(feature_cache, "_build", no_build)
    monkeypatch.setattr(feature_cache, "trial_digest", no_build)  # and hashes nothing
    stores = open_feature_stores(trials, "cache", tmp_path)
    assert stores["val"].content_hash()


def test_a_changed_file_is_cached_again_and_its_old_entry_removed(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data" / "s1" / "data_train.hdf5"
    write_split(path, make_trials("s1", 3, rng))
    trials = read_trials(tmp_path / "data", ["s1"], "train", 512)
    before = FeatureStore(trials, "cache", cache_dir=tmp_path / "cache")
    old_first = before[0].copy()
    with h5py.File(path, "a") as f:
        f["trial_0000"]["input_features"][0, 0] = 123.0
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # in case the clock did not move
    after = FeatureStore(trials, "cache", cache_dir=tmp_path / "cache")
    assert after[0][0, 0] == 123.0 and old_first[0, 0] != 123.0
    assert after.content_hash() != before.content_hash()
    assert len(entries(tmp_path / "cache")) == 1  # the old entry is gone


def test_a_killed_build_leaves_nothing_that_is_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_split(tmp_path / "data" / "s1" / "data_train.hdf5", make_trials("s1", 3, rng))
    trials = read_trials(tmp_path / "data", ["s1"], "train", 512)
    calls = []

    def dies(x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return "0" * 32

    monkeypatch.setattr(feature_cache, "trial_digest", dies)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(trials, "cache", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "features").iterdir()) == [next((tmp_path / "cache" / "features").glob("*.lock"))]
    monkeypatch.undo()
    store = FeatureStore(trials, "cache", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(store[2], FeatureStore(trials, "hdf5")[2])


def test_nan_is_named_when_the_cache_is_built(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data" / "s1" / "data_train.hdf5"
    write_split(path, make_trials("s1", 3, rng))
    with h5py.File(path, "a") as f:
        f["trial_0002"]["input_features"][4, 1] = np.inf
    trials = read_trials(tmp_path / "data", ["s1"], "train", 512)
    with pytest.raises(UserError, match="trial_0002: input_features holds NaN or Inf .first at time bin 4"):
        FeatureStore(trials, "cache", cache_dir=tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


def test_a_store_pickles_without_its_features(small_dataset, tmp_path):
    trials = all_trials(small_dataset)
    store = open_feature_stores(trials, "cache", tmp_path)["train"]
    first = store[0]
    blob = pickle.dumps(store)
    assert len(blob) < 20_000  # the index and the trials, not the 18 trials' features (about 1 MB)
    np.testing.assert_array_equal(pickle.loads(blob)[0], first)


# --- several processes at once (spawned, as DataLoader workers and torchrun ranks are separate processes)


def _open_and_touch(root, cache_dir, barrier, queue, source):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from harness.data import find_sessions, open_feature_stores, read_trials

    trials = {"train": read_trials(root, find_sessions(root), "train", 512)}
    store = open_feature_stores(trials, source, cache_dir)["train"]
    total = sum(float(store[i].sum()) for i in range(len(store)))  # every page read
    barrier.wait()  # all alive together: PSS shares the mapped pages among them
    queue.put((os.getpid(), mapping_pss(cache_dir), anonymous_pss(), total))
    barrier.wait()  # measured by every process before any exits


def mapping_pss(cache_dir) -> int:
    """Bytes of PSS in this process's mappings of files under cache_dir (from /proc/self/smaps)."""
    pss, inside = 0, False
    prefix = str(Path(cache_dir).resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5].startswith(prefix)
        elif inside and fields[0] == "Pss:":
            pss += int(fields[1]) * 1024
    return pss


def anonymous_pss() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss_Anon:"))


def run_together(root, cache_dir, n, source):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_touch, args=(root, cache_dir, barrier, queue, source)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return results


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory):
    """About 40 MB of train features: large enough to see in PSS next to the interpreter."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("big") / "data"
    for session in ("s1", "s2"):
        write_split(root / session / "data_train.hdf5", make_trials(session, 10, rng, t_range=(900, 1100)))
    return root


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="PSS needs Linux /proc smaps_rollup")
def test_three_processes_hold_the_cached_features_once(big_dataset, tmp_path):
    trials = read_trials(big_dataset, find_sessions(big_dataset), "train", 512)
    feature_bytes = sum(t.n_time_steps for t in trials) * 512 * 4
    results = run_together(big_dataset, tmp_path / "cache", 3, "cache")
    assert len({r[3] for r in results}) == 1  # the same features everywhere
    assert len(entries(tmp_path / "cache")) == 2  # built once per file, although three started together
    assert not list((tmp_path / "cache" / "features").glob("*.tmp-*"))
    summed = sum(r[1] for r in results)
    assert 0.9 * feature_bytes <= summed <= 1.1 * feature_bytes, (summed, feature_bytes)  # one copy, shared

    # the same count sees a private copy in each process when each preloads its own ("memory")
    preloaded = run_together(big_dataset, tmp_path / "cache", 3, "memory")
    private = min(r[2] for r in preloaded) - max(r[2] for r in results)  # anonymous memory beyond the cached run's
    assert private > 0.9 * feature_bytes, (private, feature_bytes)
    index = json.loads(next((tmp_path / "cache" / "features").glob("*/index.json")).read_text())
    assert index["version"] == feature_cache.FORMAT_VERSION


# --- the trial index (labels and trial facts, read by read_trials without opening HDF5 files)


def test_the_trial_index_gives_the_same_trials_without_opening_a_file(small_dataset, tmp_path, monkeypatch):
    sessions = find_sessions(small_dataset)
    plain = {s: read_trials(small_dataset, sessions, s, 512) for s in ("train", "val", "test")}
    first = {s: read_trials(small_dataset, sessions, s, 512, cache_dir=tmp_path) for s in ("train", "val", "test")}
    assert first == plain
    import harness.data

    def no_file(*args, **kwargs):
        raise AssertionError("opened an HDF5 file")

    monkeypatch.setattr(harness.data.h5py, "File", no_file)
    again = {s: read_trials(small_dataset, sessions, s, 512, cache_dir=tmp_path) for s in ("train", "val", "test")}
    assert again == plain
    with pytest.raises(UserError, match="expected .T, 256."):  # checks that depend on the config still run
        read_trials(small_dataset, sessions, "train", 256, cache_dir=tmp_path)


def test_the_trial_index_follows_a_changed_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data" / "s1" / "data_train.hdf5"
    write_split(path, make_trials("s1", 3, rng))
    before = read_trials(tmp_path / "data", ["s1"], "train", 512, cache_dir=tmp_path / "cache")
    write_split(path, make_trials("s1", 4, rng))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = read_trials(tmp_path / "data", ["s1"], "train", 512, cache_dir=tmp_path / "cache")
    assert (len(before), len(after)) == (3, 4)
    assert len(list((tmp_path / "cache" / "trial_index").iterdir())) == 1  # the old index is gone
