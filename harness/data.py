"""Reader for the Brain-to-Text '25 HDF5 format (docs/reference.md, section 1), real or synthetic.

`<data_dir>/<session>/data_{train,val,test}.hdf5`, one group per trial (`trial_0000`, ...), with
`input_features` (T, 512), and, except in the unlabeled test split, `seq_class_ids` (zero padded,
valid prefix `seq_len`), `transcription` and `sentence_label`. Any numeric dtype is accepted; string
attributes may be `str` or `bytes`. Every malformed input is a UserError naming the file and trial.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from harness.description import find_description, read_description, session_date
from harness.errors import UserError
from harness.feature_cache import CachedFile, check_finite, entry_key, file_identity, open_cached, trial_digest
from harness.progress import phase

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_file(session_dir: Path, split: str) -> Path:
    return Path(session_dir) / f"data_{split}.hdf5"


@dataclass(frozen=True)
class Trial:
    """One trial's identity, labels and where its features live (features are read separately)."""

    split: str
    session: str
    day: int  # index of the session in the run's session list (the day layer it uses)
    path: str
    group: str
    block_num: int
    trial_num: int
    n_time_steps: int
    phoneme_ids: tuple[int, ...] | None  # valid prefix of seq_class_ids; None when unlabeled
    sentence: str | None  # sentence_label; None when unlabeled
    # from the description CSV (harness.description) by session date and block; None when unknown
    corpus: str | None = None
    days_since_implant: int | None = None

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.split, self.session, self.block_num, self.trial_num)


def find_sessions(data_dir: Path | str) -> list[str]:
    """Session folders (holding at least one data_*.hdf5) under data_dir, sorted by name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir} (make it with `make synth`, or set data_params.data_dir)")
    sessions = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and any(p.glob("data_*.hdf5")))
    if not sessions:
        raise UserError(
            f"no session found in {data_dir}: expected <session>/data_train.hdf5 folders "
            "(data_dir must be the folder holding the session folders, e.g. hdf5_data_final/)"
        )
    return sessions


def read_trials(data_dir: Path | str, sessions: list[str], split: str, n_features: int,
                day_index: dict[str, int] | None = None, cache_dir: str | Path | None = None) -> list[Trial]:
    """Every trial of `split` in the given sessions, in session then file order. Sessions without
    the split's file are normal (4 real sessions have no val/test). A trial's day is its session's
    position in `sessions`, or `day_index[session]` when given (a checkpoint's own session order).
    Each trial's corpus and days since implant come from the description CSV when there is one
    (harness.description); without it they stay None. With cache_dir, each file's trial facts are
    kept in (and read from) `<cache_dir>/trial_index/`, so a later start opens no HDF5 file."""
    data_dir = Path(data_dir)
    trials = []
    for position, session in enumerate(sessions):
        day = position if day_index is None else day_index[session]
        session_dir = data_dir / session
        if not session_dir.is_dir():
            raise UserError(f"session folder not found: {session_dir}")
        path = split_file(session_dir, split)
        if path.exists():
            trials.extend(_read_file(path, split, session, day, n_features, cache_dir))
    return add_description(trials, data_dir, split)


def add_description(trials: list[Trial], data_dir: Path, split: str) -> list[Trial]:
    """The trials with corpus and days_since_implant from data_dir's description CSV, if it has
    one. A trial whose (session date, block) has no row keeps None; one warning counts them. A
    trial whose block the CSV puts in another split keeps its file's split; one warning counts them."""
    path = find_description(data_dir) if trials else None
    if path is None:
        return trials
    blocks = read_description(path)
    out, missing, other_split = [], Counter(), Counter()
    for t in trials:
        info = blocks.get((session_date(t.session), t.block_num))
        if info is None:
            missing[(t.session, t.block_num)] += 1
            out.append(t)
            continue
        if info.split is not None and info.split != t.split:
            other_split[(t.session, t.block_num, info.split)] += 1
        out.append(replace(t, corpus=info.corpus, days_since_implant=info.days_since_implant))
    if missing:
        log.warning("%s: no row for %s (%s); their corpus and days since implant are left empty",
                    path, _count(missing.total(), split), _first_blocks(missing))
    if other_split:
        log.warning("%s: blocks its Split column puts in another split hold %s (%s); the HDF5 file decides "
                    "a trial's split, the CSV's Split is not used", path, _count(other_split.total(), split),
                    _first_blocks(other_split))
    return out


def _count(n: int, split: str) -> str:
    return f"{n} {split} trial{'s' if n != 1 else ''}"


def _first_blocks(counts: Counter, shown: int = 3) -> str:
    """"t15.2023.08.11 block 2: 5 trials, ..." for the first few (session, block[, CSV split]) keys."""
    parts = [f"{key[0]} block {key[1]}" + (f" (CSV: {key[2]})" if len(key) > 2 else "")
             + f": {n} trial{'s' if n != 1 else ''}" for key, n in list(counts.items())[:shown]]
    return ", ".join(parts) + (f" and {len(counts) - shown} more blocks" if len(counts) > shown else "")


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path}: not a readable HDF5 file ({error})") from None


def _read_file(path: Path, split: str, session: str, day: int, n_features: int,
               cache_dir: Path | None) -> list[Trial]:
    records = _cached_records(path, cache_dir) if cache_dir is not None else None
    if records is None:
        with _open(path) as f:
            names = sorted(k for k in f.keys() if k.startswith("trial_"))
            records = [_read_record(f[name], path, name) for name in names]
        if cache_dir is not None:
            _write_records(path, cache_dir, records)
    return [_trial(r, path, split, session, day, n_features) for r in records]


# The trial index: each file's labels and trial facts (not the features) as JSON, so that a start
# after the first reads no HDF5 attribute (h5py costs about 3 ms per trial: 35 s for the real
# dataset's 10,948 trials, in every rank). Keyed like the feature cache by the file's identity.


def _index_path(path: Path, cache_dir: Path) -> tuple[Path, str]:
    identity = file_identity(path)
    prefix = hashlib.sha256(identity["path"].encode()).hexdigest()[:16]
    return Path(cache_dir) / "trial_index" / f"{prefix}-{entry_key(identity)}.json", prefix


def _cached_records(path: Path, cache_dir: Path) -> list[dict] | None:
    try:
        return json.loads(_index_path(path, cache_dir)[0].read_text())["trials"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _write_records(path: Path, cache_dir: Path, records: list[dict]) -> None:
    target, prefix = _index_path(path, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{prefix}-*.json"):  # the same file before it changed
        if stale != target:
            stale.unlink(missing_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"source": str(path), "trials": records}))
    os.replace(tmp, target)  # atomic: ranks writing at once write the same thing


def _read_record(g, path: Path, name: str) -> dict:
    """What the reader needs of one trial group: every check that depends only on the file is made here."""
    where = f"{path} {name}"
    if not isinstance(g, h5py.Group) or "input_features" not in g:
        raise UserError(f"{where}: trial has no input_features dataset")
    shape = list(g["input_features"].shape)
    n_time_steps = int(g.attrs.get("n_time_steps", shape[0]))
    if n_time_steps > shape[0] or n_time_steps < 0:
        raise UserError(f"{where}: n_time_steps {n_time_steps} does not fit input_features with {shape[0]} rows")
    phoneme_ids = _phoneme_ids(g, where)
    return {
        "group": name,
        "shape": shape,
        "n_time_steps": n_time_steps,
        "session": _text(g.attrs["session"]) if "session" in g.attrs else None,
        "block_num": int(g.attrs.get("block_num", -1)),
        "trial_num": int(g.attrs.get("trial_num", int(name.split("_")[-1]))),
        "phoneme_ids": list(phoneme_ids) if phoneme_ids is not None else None,
        "sentence": _sentence(g),
    }


def _trial(record: dict, path: Path, split: str, session: str, day: int, n_features: int) -> Trial:
    where = f"{path} {record['group']}"
    shape = tuple(record["shape"])
    if len(shape) != 2 or shape[1] != n_features:
        raise UserError(
            f"{where}: input_features has shape {shape}, expected (T, {n_features}) "
            f"(set data_params.n_features if your data is {shape[-1]} wide)"
        )
    stored_session = record["session"]
    if stored_session is not None and stored_session != session:
        log.warning("%s: session attribute %r differs from its folder %r; the folder is used", where, stored_session, session)
    ids = record["phoneme_ids"]
    return Trial(
        split=split,
        session=session,
        day=day,
        path=str(path),
        group=record["group"],
        block_num=record["block_num"],
        trial_num=record["trial_num"],
        n_time_steps=record["n_time_steps"],
        phoneme_ids=tuple(ids) if ids is not None else None,
        sentence=record["sentence"],
    )


def _phoneme_ids(g, where: str) -> tuple[int, ...] | None:
    if "seq_class_ids" not in g:
        return None
    ids = np.asarray(g["seq_class_ids"][()]).astype(np.int64).reshape(-1)
    seq_len = g.attrs.get("seq_len")
    if seq_len is None:  # no length stored: the valid prefix ends at the zero padding
        seq_len = int(np.argmax(ids == 0)) if (ids == 0).any() else len(ids)
    seq_len = int(seq_len)
    if seq_len > len(ids) or seq_len < 0:
        raise UserError(f"{where}: seq_len {seq_len} is longer than the {len(ids)} stored seq_class_ids")
    return tuple(int(i) for i in ids[:seq_len])


def _sentence(g) -> str | None:
    if "sentence_label" in g.attrs:
        return _text(g.attrs["sentence_label"])
    if "transcription" in g:  # character codes, zero padded
        codes = np.asarray(g["transcription"][()]).astype(np.int64).reshape(-1)
        return "".join(chr(c) for c in codes if c > 0)
    return None


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    return str(value)


def load_features(trial: Trial, file: h5py.File | None = None) -> np.ndarray:
    """The trial's valid (n_time_steps, C) features as float32; NaN or Inf is a UserError."""
    if file is None:
        with _open(Path(trial.path)) as f:
            return load_features(trial, f)
    x = np.asarray(file[trial.group]["input_features"][: trial.n_time_steps], dtype=np.float32)
    check_finite(x, trial.path, trial.group)
    return x


FEATURE_SOURCES = ("cache", "memory", "hdf5")  # data_params.features


class FeatureStore:
    """Gives a trial's valid features by index, from where `data_params.features` says:

    - "cache": the machine's read-only memory-mapped copy (harness.feature_cache), built once and
      shared by every rank and DataLoader worker; use `open_feature_stores` to open several splits;
    - "memory": every trial read into this process at start (each process holds its own copy);
    - "hdf5": read from the HDF5 file when asked, one open file per path and per process (h5py
      handles must not cross a fork, so a DataLoader worker opens its own).
    """

    def __init__(self, trials: list[Trial], source: str = "memory", cached: dict[str, CachedFile] | None = None,
                 cache_dir: str | Path | None = None):
        if source not in FEATURE_SOURCES:
            raise ValueError(f"unknown feature source {source!r}: {', '.join(FEATURE_SOURCES)}")
        self.trials, self.source = trials, source
        self._files: dict[str, h5py.File] = {}
        self._pid = None
        self._memory: list[np.ndarray] | None = None
        self._cached = cached
        if source == "cache" and cached is None:
            if cache_dir is None:
                raise ValueError("the cache source needs cache_dir (or the opened entries)")
            self._cached = open_cached(trials_per_file(trials), cache_dir)
        if source == "memory":
            with phase("read features", total=len(trials), unit="trial", show=len(trials) > 1000) as bar:
                self._memory = []
                for trial in trials:
                    self._memory.append(self._read(trial))
                    bar.update(1)
            self.close()

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._memory is not None:
            return self._memory[index]
        trial = self.trials[index]
        if self._cached is not None:
            return self._cached[trial.path].rows(trial.group, trial.n_time_steps)
        return self._read(trial)

    def _read(self, trial: Trial) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker: drop the parent's handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(trial.path)
        if f is None:
            f = self._files[trial.path] = _open(Path(trial.path))
        return load_features(trial, f)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):  # picklable for spawned workers: handles are reopened, maps remapped there
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state

    def content_hash(self) -> str | None:
        """A hash of every trial's features, from per-trial digests (harness.feature_cache.trial_digest):
        kept in the cache, computed from memory when preloaded; None when read on demand (hashing
        would read everything)."""
        if self._cached is not None:
            digests = (self._cached[t.path].digest(t.group, t.n_time_steps) for t in self.trials)
        elif self._memory is not None:
            digests = (trial_digest(x) for x in self._memory)
        else:
            return None
        h = hashlib.blake2b(digest_size=16)
        for digest in digests:
            h.update(bytes.fromhex(digest))
        return h.hexdigest()


def trials_per_file(trials: list[Trial]) -> dict[str, dict[str, int]]:
    """path -> {trial group: n_time_steps}: what a cache entry must hold for these trials."""
    out: dict[str, dict[str, int]] = {}
    for t in trials:
        out.setdefault(t.path, {})[t.group] = t.n_time_steps
    return out


def open_feature_stores(trials_by_split: dict[str, list[Trial]], source: str, cache_dir: str | Path) -> dict:
    """One FeatureStore per split; with the cache, every file's entry opened (or built) in one pass."""
    cached = None
    if source == "cache":
        cached = open_cached(trials_per_file([t for ts in trials_by_split.values() for t in ts]), cache_dir)
    return {split: FeatureStore(ts, source, cached) for split, ts in trials_by_split.items()}


# Version of the features hash in data fingerprints: 2 combines per-trial digests (0.3); 1 hashed the
# arrays in one stream (0.2). compare() only compares hashes of the same version.
FEATURES_HASH_VERSION = 2


def fingerprint(trials_by_split: dict[str, list[Trial]], stores: dict[str, FeatureStore]) -> dict:
    """What data a run read: sessions, splits, a hash of the trial keys and labels, and a content
    hash that adds the features (when they were cached or preloaded); the same per split in by_split."""
    keys = hashlib.blake2b(digest_size=16)
    split_keys = {}  # per split too, so that `compare` can match runs that read different sets of splits
    for split in sorted(trials_by_split):
        split_keys[split] = hashlib.blake2b(digest_size=16)
        for t in trials_by_split[split]:
            key = repr((t.key, t.n_time_steps, t.phoneme_ids, t.sentence)).encode()
            keys.update(key)
            split_keys[split].update(key)
    content = keys.copy()
    feature_hashes = {s: stores[s].content_hash() for s in sorted(stores)}
    for value in feature_hashes.values():
        content.update(str(value).encode())
    hashed = all(v is not None for v in feature_hashes.values())
    by_split = {split: {"keys_hash": h.hexdigest(), "features_hash": feature_hashes.get(split)}
                for split, h in split_keys.items()}
    return {
        "sessions": sorted({t.session for ts in trials_by_split.values() for t in ts}),
        "n_trials": {s: len(ts) for s, ts in trials_by_split.items()},
        "keys_hash": keys.hexdigest(),
        "content_hash": content.hexdigest() if hashed else None,
        "features_hash_version": FEATURES_HASH_VERSION,
        "by_split": by_split,
    }
