"""Shared test helpers: a hand-rolled writer of the Brain-to-Text '25 HDF5 format (independent of
the synthetic generator, so reader tests can craft odd dtypes and broken files), and paths."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("B2T_PLUGINS", "tests.tiny_plugin")
# Model artefacts and feature caches of the tests' temporary datasets go to a folder of this test
# session (removed at its end), not to the repository's .cache/.
if "B2T_CACHE_DIR" not in os.environ:
    os.environ["B2T_CACHE_DIR"] = tempfile.mkdtemp(prefix="b2t-test-cache-")
    atexit.register(shutil.rmtree, os.environ["B2T_CACHE_DIR"], ignore_errors=True)
TINY_CONFIG = REPO_ROOT / "tests" / "tiny_plugin" / "tiny.yml"


def write_split(path, trials, *, feature_dtype="float32", label_dtype="int32", bytes_attrs=False, labels=True):
    """trials: list of dicts with features (T, C), phonemes (list of ids), sentence, block, trial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (lambda s: s.encode()) if bytes_attrs else (lambda s: s)
    with h5py.File(path, "w") as f:
        for i, t in enumerate(trials):
            g = f.create_group(f"trial_{i:04d}")
            g.create_dataset("input_features", data=np.asarray(t["features"]).astype(feature_dtype))
            g.attrs["n_time_steps"] = len(t["features"])
            g.attrs["session"] = text(t["session"])
            g.attrs["block_num"] = t.get("block", 1)
            g.attrs["trial_num"] = t.get("trial", i)
            if labels:
                ids = np.zeros(500, dtype=label_dtype)
                ids[: len(t["phonemes"])] = t["phonemes"]
                g.create_dataset("seq_class_ids", data=ids)
                chars = np.zeros(500, dtype=label_dtype)
                chars[: len(t["sentence"])] = [ord(c) for c in t["sentence"]]
                g.create_dataset("transcription", data=chars)
                g.attrs["seq_len"] = t.get("seq_len", len(t["phonemes"]))
                g.attrs["sentence_label"] = text(t["sentence"])


def make_trials(session, n, rng, n_features=512, t_range=(20, 40), block=1):
    out = []
    for i in range(n):
        T = int(rng.integers(*t_range))
        phonemes = rng.integers(1, 41, size=int(rng.integers(2, 6))).tolist() + [40]
        out.append({"features": rng.standard_normal((T, n_features)), "phonemes": phonemes,
                    "sentence": f"Sentence number {i}.", "session": session, "block": block, "trial": i})
    return out


@pytest.fixture
def small_dataset(tmp_path):
    """3 sessions; the first has train only (like 4 real sessions); test files are unlabeled."""
    return write_small_dataset(tmp_path / "hdf5_data_final")


def write_small_dataset(root: Path) -> Path:
    """small_dataset's files in `root` (the same bytes each time)."""
    rng = np.random.default_rng(0)
    for s, session in enumerate(["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]):
        write_split(root / session / "data_train.hdf5", make_trials(session, 6, rng, block=1))
        if s > 0:
            write_split(root / session / "data_val.hdf5", make_trials(session, 3, rng, block=2))
            write_split(root / session / "data_test.hdf5", make_trials(session, 2, rng, block=3), labels=False)
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset in the real format (4 sessions, the first train-only)."""
    from harness.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic_dataset(root, n_sessions=4, trials_per_session=80, seed=0)
    return root


@pytest.fixture(scope="session")
def ctc_tiny_run(synthetic_dataset, tmp_path_factory):
    """configs/ctc_baseline/tiny.yml trained on synthetic_dataset once per test session, with its
    artefacts (lexicon, n-gram LM) in a cache of its own: (run folder, cache folder). Read only."""
    from harness import runner

    folder = tmp_path_factory.mktemp("ctc_tiny_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("B2T_CACHE_DIR", str(folder / "cache"))  # it overrides runner.CACHE_DIR (the tests set it)
        run_dir = runner.run(str(REPO_ROOT / "configs" / "ctc_baseline" / "tiny.yml"),
                             [f"data_params.data_dir={synthetic_dataset}"], str(folder / "run"), False, False)
    return run_dir, folder / "cache"


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (a training run to convergence, torchrun, kill-and-resume, a slurm cluster)
    run when B2T_TEST_ALL=1, as in CI (.ci/run): a researcher's `make test` stays under ten minutes
    and says what it left out."""
    if os.environ.get("B2T_TEST_ALL") == "1":
        return
    skip = pytest.mark.skip(reason="slow: B2T_TEST_ALL=1 runs it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
