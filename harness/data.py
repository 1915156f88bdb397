"""Reader for the Brain-to-Text '25 HDF5 format (docs/reference.md, section 1), real or synthetic.

`<data_dir>/<session>/data_{train,val,test}.hdf5`, one group per trial (`trial_0000`, ...), with
`input_features` (T, 512), and, except in the unlabeled test split, `seq_class_ids` (zero padded,
valid prefix `seq_len`), `transcription` and `sentence_label`. Any numeric dtype is accepted; string
attributes may be `str` or `bytes`. Every malformed input is a UserError naming the file and trial.
"""

from __future__ import annotations

import copy
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
from harness.phonemes import SIL_ID
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
    width: int | None = None  # features per time step (input_features' second dimension)

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.split, self.session, self.block_num, self.trial_num)


def data_width(trials_by_split: dict[str, list[Trial]], given: int | None = None) -> int:
    """The one feature width of the trials read (`given` when none was read); sessions of different
    widths are a user error."""
    first: dict[int, Trial] = {}
    for ts in trials_by_split.values():
        for t in ts:
            first.setdefault(t.width, t)
    if len(first) > 1:
        (wa, a), (wb, b) = list(first.items())[:2]
        raise UserError(f"the sessions have different feature widths: {a.path} is {wa} wide, {b.path} is {wb}: "
                        "one run reads data of one width (list the sessions of one width in data_params.sessions)")
    if not first:
        if given is not None:
            return given
        raise UserError("no trial was read: nothing to learn the feature width from")
    return next(iter(first))


def find_sessions(data_dir: Path | str) -> list[str]:
    """Session folders (holding at least one data_*.hdf5) under data_dir, sorted by name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir} (make it with `make synth`, or set data_params.data_dir)")
    sessions = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        found = sorted(folder.glob("data_*.hdf5"))
        for path in found:  # glob also lists broken links and folders: say so now, not when a split is read
            _check_is_file(path)
        if found:
            sessions.append(folder.name)
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
        if path.exists() or path.is_symlink():  # exists() is False for a broken link: refused, not skipped
            _check_is_file(path)
            trials.extend(_read_file(path, split, session, day, n_features, cache_dir))
    _check_labels_everywhere(trials, split)
    return add_description(trials, data_dir, split)


def _check_is_file(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path}: a broken link (to {os.readlink(path)}), not an HDF5 file")
    if not path.is_file():
        raise UserError(f"{path}: {'a folder' if path.is_dir() else 'not a regular file'}, not an HDF5 file")


def _check_labels_everywhere(trials: list[Trial], split: str) -> None:
    """A split is labeled in full or not at all: a batch with one unlabeled trial loses its labels
    (harness.batching.collate), so a partly labeled split would train and score on less, silently."""
    for label, missing in (("seq_class_ids", [t for t in trials if t.phoneme_ids is None]),
                           ("sentence (sentence_label or transcription)", [t for t in trials if t.sentence is None])):
        if 0 < len(missing) < len(trials):
            first = missing[0]
            raise UserError(f"{len(missing)} of {len(trials)} {split} trials have no {label}, the first "
                            f"{first.path} {first.group}: a split must be labeled in every trial or in none")


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
    except OSError as error:  # random bytes, a truncated copy, a folder...
        raise UserError(f"{path}: not a readable HDF5 file ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _read_file(path: Path, split: str, session: str, day: int, n_features: int,
               cache_dir: Path | None) -> list[Trial]:
    records = _cached_records(path, cache_dir) if cache_dir is not None else None
    if records is None:
        with _open(path) as f:
            names = sorted(k for k in f.keys() if k.startswith("trial_"))
            if not names:
                raise UserError(f"{path}: no trial_* group in this HDF5 file (expected trial_0000, trial_0001, ...)")
            records = []
            for name in names:
                try:
                    records.append(_read_record(f[name], path, name))
                except OSError as error:  # a damaged object inside a file whose header is fine
                    raise UserError(f"{path} {name}: not readable ({_first_line(error)})") from None
        _check_unique_keys(records, path)
        if cache_dir is not None:
            _write_records(path, cache_dir, records)
    return [_trial(r, path, split, session, day, n_features) for r in records]


def _check_unique_keys(records: list[dict], path: Path) -> None:
    """(block_num, trial_num) names a trial in per_trial.csv and the data fingerprint: one per trial."""
    seen = {}
    for r in records:
        key = (r["block_num"], r["trial_num"])
        if key in seen:
            raise UserError(f"{path}: {seen[key]} and {r['group']} have the same block_num {key[0]} and "
                            f"trial_num {key[1]} (each trial of a file needs its own)")
        seen[key] = r["group"]


# The trial index: each file's labels and trial facts (not the features) as JSON, so that a start
# after the first reads no HDF5 attribute (h5py costs about 3 ms per trial: 35 s for the real
# dataset's 10,948 trials, in every rank). Keyed like the feature cache by the file's identity. A file
# gets an index only once it passed every check that depends on the file alone; INDEX_VERSION grows
# when those checks do, so that an index written before them is not trusted.

INDEX_VERSION = 2  # 2: phoneme id range, attribute types, UTF-8, unique keys, empty files (1: unversioned)


def _index_path(path: Path, cache_dir: Path) -> tuple[Path, str]:
    identity = file_identity(path)
    prefix = hashlib.sha256(identity["path"].encode()).hexdigest()[:16]
    return Path(cache_dir) / "trial_index" / f"{prefix}-{entry_key(identity)}.json", prefix


def _index(path: Path, cache_dir: Path) -> dict:
    """The file's trial index, {"version", "source", "trials"[, "finite"]}, or {} when none is trusted."""
    try:
        index = json.loads(_index_path(path, cache_dir)[0].read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return index if isinstance(index, dict) and index.get("version") == INDEX_VERSION and "trials" in index else {}


def _cached_records(path: Path, cache_dir: Path) -> list[dict] | None:
    return _index(path, cache_dir).get("trials")


def _write_records(path: Path, cache_dir: Path, records: list[dict]) -> None:
    _write_index(path, cache_dir, {"version": INDEX_VERSION, "source": str(path), "trials": records})


def _write_index(path: Path, cache_dir: Path, index: dict) -> None:
    target, prefix = _index_path(path, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{prefix}-*.json"):  # the same file before it changed
        if stale != target:
            stale.unlink(missing_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, target)  # atomic: ranks writing at once write the same thing


def _read_record(g, path: Path, name: str) -> dict:
    """What the reader needs of one trial group: every check that depends only on the file is made here."""
    where = f"{path} {name}"
    features = g.get("input_features") if isinstance(g, h5py.Group) else None
    if not isinstance(features, h5py.Dataset):
        raise UserError(f"{where}: trial has no input_features dataset")
    shape = list(features.shape)
    _numeric(features.dtype, "input_features", where)
    attrs = g.attrs  # h5py makes a new attribute manager at each g.attrs: one per trial (about 30 us each)
    n_time_steps = _int_attr(attrs, "n_time_steps", where, shape[0] if shape else 0)
    if not shape or n_time_steps > shape[0] or n_time_steps < 0:
        raise UserError(f"{where}: n_time_steps {n_time_steps} does not fit input_features of shape {tuple(shape)}")
    trial_num = _int_attr(attrs, "trial_num", where)
    if trial_num is None:  # the group's number stands in
        if not name.removeprefix("trial_").isdigit():
            raise UserError(f"{where}: no trial_num attribute, and the group's name holds no number")
        trial_num = int(name.removeprefix("trial_"))
    session = attrs.get("session")
    return {
        "group": name,
        "shape": shape,
        "n_time_steps": n_time_steps,
        "session": _text(session, where, "session") if session is not None else None,
        "block_num": _int_attr(attrs, "block_num", where, -1),
        "trial_num": trial_num,
        "phoneme_ids": _phoneme_ids(g, attrs, where),
        "sentence": _sentence(g, attrs, where),
    }


def _numeric(dtype: np.dtype, name: str, where: str) -> None:
    """Any int or float dtype is fine; strings and compounds are refused."""
    if dtype.kind not in "biuf":
        raise UserError(f"{where}: {name} is of dtype {dtype}, expected numbers")


def _int_attr(attrs, name: str, where: str, default: int | None = None) -> int | None:
    """The whole-number attribute `name` (a number, a 1-element array or a numeric string), or default."""
    value = attrs.get(name)
    if value is None:
        return default
    if isinstance(value, np.ndarray) and value.size == 1:  # e.g. a 1x1 matrix from MATLAB
        value = value.reshape(-1)[0]
    try:
        number = int(value)
        if not isinstance(value, (str, bytes)) and number != value:  # 2.5 is no trial number
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # an array, "abc", NaN, 2.5...
        shown = f"an array of shape {value.shape}" if isinstance(value, np.ndarray) else repr(value)[:60]
        raise UserError(f"{where}: attribute {name} is {shown}, expected a whole number") from None
    return number


def _trial(record: dict, path: Path, split: str, session: str, day: int, n_features: int) -> Trial:
    where = f"{path} {record['group']}"
    shape = tuple(record["shape"])
    if len(shape) != 2 or (n_features is not None and shape[1] != n_features):
        raise UserError(
            f"{where}: input_features has shape {shape}, expected (T, {n_features or 'features'}) "
            f"(set data_params.n_features if your data is {shape[-1]} wide, or leave it unset: the data's width)"
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
        width=shape[1],
    )


def _phoneme_ids(g, attrs, where: str) -> list[int] | None:
    """The valid prefix of seq_class_ids, every id a phoneme: 1 to 40 (0, the CTC blank, only pads)."""
    if "seq_class_ids" not in g:
        return None
    ids = np.asarray(g["seq_class_ids"][()]).reshape(-1)
    _numeric(ids.dtype, "seq_class_ids", where)
    seq_len = _int_attr(attrs, "seq_len", where)
    if seq_len is None:  # no length stored: the valid prefix ends at the zero padding
        seq_len = int(np.argmax(ids == 0)) if (ids == 0).any() else len(ids)
    if seq_len > len(ids) or seq_len < 0:
        raise UserError(f"{where}: seq_len {seq_len} is longer than the {len(ids)} stored seq_class_ids")
    prefix = ids[:seq_len]
    bad = (prefix < 1) | (prefix > SIL_ID)
    if ids.dtype.kind == "f":  # NaN, or 3.5, which the int64 cast would make 3
        bad |= prefix != np.trunc(prefix)
    if bad.any():
        at = int(bad.argmax())
        raise UserError(f"{where}: seq_class_ids holds {prefix[at].item()} at position {at} of its seq_len "
                        f"{seq_len}: phoneme ids are 1 to {SIL_ID} (0, the blank, only pads after seq_len)")
    return prefix.astype(np.int64).tolist()


def _sentence(g, attrs, where: str) -> str | None:
    label = attrs.get("sentence_label")
    if label is not None:
        return _text(label, where, "sentence_label")
    if "transcription" in g:  # character codes, zero padded
        codes = np.asarray(g["transcription"][()])
        _numeric(codes.dtype, "transcription", where)
        codes = codes.astype(np.int64).reshape(-1)
        codes = codes[codes > 0]
        if (codes > 0x10FFFF).any():  # chr() would raise a ValueError
            raise UserError(f"{where}: transcription holds {codes.max()}, not a character code")
        return "".join(map(chr, codes.tolist()))
    return None


def _text(value, where: str, name: str) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    try:
        if isinstance(value, (bytes, np.bytes_)):
            return bytes(value).decode("utf-8")
        value = str(value)
        value.encode("utf-8")  # h5py gives undecodable bytes of a string attribute as surrogates
        return value
    except UnicodeError:
        raise UserError(f"{where}: attribute {name} is not UTF-8 text") from None


def load_features(trial: Trial, file: h5py.File | None = None) -> np.ndarray:
    """The trial's valid (n_time_steps, C) features as float32; NaN or Inf is a UserError."""
    if file is None:
        with _open(Path(trial.path)) as f:
            return load_features(trial, f)
    try:
        x = np.asarray(file[trial.group]["input_features"][: trial.n_time_steps], dtype=np.float32)
    except OSError as error:  # a damaged dataset inside a file whose header is fine
        raise UserError(f"{trial.path} {trial.group}: input_features not readable ({_first_line(error)})") from None
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

    def subset(self, indices: list[int]) -> FeatureStore:
        """A store of trials[i] for i in indices, sharing this one's features (no read, no copy)."""
        part = copy.copy(self)
        part.trials = [self.trials[i] for i in indices]
        part._files, part._pid = {}, None
        if self._memory is not None:
            part._memory = [self._memory[i] for i in indices]
        return part

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
    """One FeatureStore per split; with the cache, every file's entry opened (or built) in one pass.
    Every source refuses NaN or Inf here, before the run folder is made: the cache when it is built,
    memory when it reads, hdf5 (read on demand) through check_files_finite."""
    cached = None
    trials = [t for ts in trials_by_split.values() for t in ts]
    if source == "cache":
        cached = open_cached(trials_per_file(trials), cache_dir)
    if source == "hdf5":
        check_files_finite(sorted({t.path for t in trials}), cache_dir)
    return {split: FeatureStore(ts, source, cached) for split, ts in trials_by_split.items()}


def check_files_finite(paths: list[str], cache_dir: str | Path) -> None:
    """A UserError naming the file, trial and time bin if a trial's valid features hold NaN or Inf
    (which reading on demand would meet mid-training). The verdict is kept as `"finite": true` in the
    file's trial index under cache_dir (written by read_trials with that cache_dir, as the runner
    does; without an index nothing is written and every start reads again), so that only the first
    start of a file version reads its features (11 GB for the real dataset)."""
    todo = [p for p in paths if not _index(Path(p), cache_dir).get("finite")]
    # torchrun's ranks start at different files (as in open_cached) and skip those another rank passed
    rank, world = int(os.environ.get("LOCAL_RANK", "0")), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    start = (rank * len(todo)) // world
    todo = todo[start:] + todo[:start]
    if not todo:
        return
    with phase(f"check that features are finite ({len(todo)} file{'s' if len(todo) > 1 else ''})",
               total=len(todo), unit="file") as bar:
        for path in todo:
            index = _index(Path(path), cache_dir)
            if not index.get("finite"):
                _check_file_finite(Path(path))
                if index:
                    _write_index(Path(path), cache_dir, {**index, "finite": True})
            bar.update(1)


def _check_file_finite(path: Path) -> None:
    """Every trial group's valid rows, as float32 (as load_features gives them: float64 beyond float32 is Inf)."""
    with _open(path) as f:
        for name in sorted(k for k in f.keys() if k.startswith("trial_")):
            data = f[name]["input_features"]
            if data.dtype.kind != "f":  # integers are always finite
                continue
            n = _int_attr(f[name].attrs, "n_time_steps", f"{path} {name}", data.shape[0])
            try:
                with np.errstate(over="ignore"):  # float64 beyond float32 becomes Inf: said just below
                    x = np.asarray(data[:n], dtype=np.float32)
            except OSError as error:
                raise UserError(f"{path} {name}: input_features not readable ({_first_line(error)})") from None
            check_finite(x, path, name)


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
