"""One read-only, memory-mapped copy of each data file's features per machine (`data_params.features: cache`).

Preloading reads every trial into each process: every torchrun rank and every DataLoader worker
holds its own copy (on the real data, 11 GB each). Here each `data_<split>.hdf5` file gets one cache
entry, built the first time any process needs it:

    <cache_dir>/features/<key>/features.npy   the valid rows of every trial, float32, one after another
    <cache_dir>/features/<key>/index.json     trial group -> (first row, rows), each trial's digest,
                                              the file's identity and the width

and is then memory-mapped read-only by every process. The pages live once in the kernel's page
cache, shared by all processes that map the file, so the features cost their bytes once per machine
however many ranks and workers read them, and a start after the first reads no feature at all.

- Key: the file's resolved path, size and modification time (and the cache format version), so an
  entry is never re-hashed at start; a file that changes gets a new key (and its old entries are
  removed when the new one is built).
- Content digests: each trial's features are hashed once, while the entry is built, and kept in
  index.json; the run's data fingerprint (harness.data.fingerprint) combines them.
- Safe when several ranks start together: one process builds an entry while the others wait on an
  exclusive lock (fcntl.flock) on `<key>.lock`; the entry is written to a temporary folder and
  renamed into place, so a reader sees a complete entry or none, and a killed build leaves only a
  temporary folder that the next build removes.
- NaN or Inf in a trial is a UserError when the entry is built (once), naming the file and trial.

Why hand-written: numpy's memmap/`.npy` format does the mapping; what is left (one entry per HDF5
file, keyed by identity, with a lock and an atomic rename) is a few lines that no caching library
(joblib.Memory, diskcache) does without copying the arrays into each process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from harness.errors import UserError
from harness.progress import phase

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DIGEST_BYTES = 16


def trial_digest(x: np.ndarray) -> str:
    """The digest of one trial's valid float32 features (the same whether read from HDF5 or the cache)."""
    return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float32).tobytes(), digest_size=DIGEST_BYTES).hexdigest()


def check_finite(x: np.ndarray, path, group: str) -> None:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).argmax())
        raise UserError(f"{path} {group}: input_features holds NaN or Inf (first at time bin {bad})")


def file_identity(path: Path) -> dict:
    """What keys an entry: the file's resolved path, size and modification time (ns)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def entry_key(identity: dict) -> str:
    text = json.dumps({"version": FORMAT_VERSION, **identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class CachedFile:
    """One entry, mapped on first use. Pickles as its folder: a spawned worker maps it again."""

    folder: Path
    index: dict

    def __post_init__(self):
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.folder / "features.npy", mmap_mode="r")
        return self._array

    def rows(self, group: str, n_time_steps: int) -> np.ndarray:
        """A trial's first n_time_steps rows: a read-only view of the map (collate copies it into the
        batch; copying here first cost a fresh allocation per trial, 1.6x slower batches)."""
        start, stored = self.index["groups"][group]
        if n_time_steps > stored:
            raise UserError(f"{self.index['source']['path']} {group}: {n_time_steps} time steps asked, "
                            f"the cache holds {stored}")
        return self.array[start:start + n_time_steps]

    def digest(self, group: str, n_time_steps: int) -> str:
        """The trial's digest: kept in the index (computed when the rows held are the rows read)."""
        if n_time_steps == self.index["groups"][group][1]:
            return self.index["digests"][group]
        return trial_digest(self.rows(group, n_time_steps))

    def __getstate__(self):
        return {"folder": self.folder, "index": self.index, "_array": None}


def features_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "features"


def open_cached(trials_per_file: dict[str, dict[str, int]], cache_dir: str | Path) -> dict[str, CachedFile]:
    """The cache entry of every file in `paths`, built where missing. trials_per_file[path] maps each
    trial group read from that file to its n_time_steps (what the entry must hold). Under torchrun
    the ranks of a machine start at different files, so that a cold cache is built in parallel."""
    root = features_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    ordered = sorted(trials_per_file)
    # torchrun's variables, read here rather than through harness.distributed: this module is imported
    # by the data reader, which processes that only read features (workers) use without torch
    rank, world = int(os.environ.get("LOCAL_RANK", "0")), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    start = (rank * len(ordered)) // world if ordered else 0
    ordered = ordered[start:] + ordered[:start]
    entries = {path: _read_entry(root, Path(path)) for path in ordered}  # one read of each index per start
    missing = [p for p in ordered if entries[p] is None]
    if missing:
        total = sum(sum(trials_per_file[p].values()) for p in missing)
        # the phase's line: "feature cache (7 new files in .cache/features): 9120 bins in 2.1 s"
        with phase(f"feature cache ({len(missing)} new file{'s' if len(missing) > 1 else ''} in {root})",
                   total=total, unit="bin") as bar:
            for path in missing:
                entries[path] = _build_entry(root, Path(path), bar)
    for path, entry in entries.items():
        _check_covers(entry, Path(path), trials_per_file[path])
    return entries


def _read_entry(root: Path, path: Path) -> CachedFile | None:
    folder = root / entry_key(file_identity(path))
    try:
        index = json.loads((folder / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not (folder / "features.npy").is_file():
        return None
    return CachedFile(folder, index)


def _build_entry(root: Path, path: Path, bar) -> CachedFile:
    """Build the missing entry of `path`, unless another process does it while we wait for the lock."""
    identity = file_identity(path)
    key = entry_key(identity)
    with _locked(root / f"{key}.lock"):
        entry = _read_entry(root, path)  # another process may have built it while we waited
        if entry is None:
            _build(root, key, identity, path, bar)
            _remove_stale(root, identity, key)
            entry = _read_entry(root, path)
    return entry


def _check_covers(entry: CachedFile, path: Path, groups: dict[str, int]) -> None:
    held = entry.index["groups"]
    for group, n in groups.items():
        if group not in held or held[group][1] < n:
            raise UserError(f"the feature cache {entry.folder} does not hold {path} {group} as read now; "
                            f"remove that folder (data_params.features: hdf5 reads the file directly)")


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(root: Path, key: str, identity: dict, path: Path, bar) -> None:
    """Write the entry to a temporary folder beside it, then rename it into place (atomic)."""
    for leftover in root.glob(f"{key}.tmp-*"):  # a build that was killed (we hold the lock: not in progress)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
    try:
        with h5py.File(path, "r") as f:
            names = sorted(k for k in f.keys() if k.startswith("trial_"))
            lengths = {name: _valid_rows(f[name]) for name in names}
            total = sum(lengths.values())
            n_features = f[names[0]]["input_features"].shape[1] if names else 0
            array = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32,
                                              shape=(total, n_features))
            groups, digests, row = {}, {}, 0
            for name in names:
                n = lengths[name]
                x = np.asarray(f[name]["input_features"][:n], dtype=np.float32)
                if x.ndim != 2 or x.shape[1] != n_features:
                    raise UserError(f"{path} {name}: input_features has shape {x.shape}, expected (T, {n_features})")
                check_finite(x, path, name)
                array[row:row + n] = x
                groups[name], digests[name] = (row, n), trial_digest(x)
                row += n
                if bar is not None:
                    bar.update(n)
            array.flush()
            del array
        index = {"version": FORMAT_VERSION, "source": identity, "n_features": n_features,
                 "groups": groups, "digests": digests}
        (tmp / "index.json").write_text(json.dumps(index))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users of a shared cache may read it
        os.rename(tmp, root / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _valid_rows(group) -> int:
    shape = group["input_features"].shape
    return min(int(group.attrs.get("n_time_steps", shape[0])), shape[0])


def _remove_stale(root: Path, identity: dict, key: str) -> None:
    """Entries of the same file built before it changed: nothing will ever read them again."""
    for index_path in root.glob("*/index.json"):
        folder = index_path.parent
        if folder.name == key:
            continue
        try:
            source = json.loads(index_path.read_text())["source"]
        except (OSError, ValueError, KeyError):
            continue
        if source.get("path") == identity["path"]:
            log.info("feature cache: removing %s, built from an older version of %s", folder, identity["path"])
            shutil.rmtree(folder, ignore_errors=True)
