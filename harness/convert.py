"""`main.py convert`: continuous recordings with sentence annotations -> session folders in the
Brain-to-Text '25 format (docs/reference.md, section 1) that every decoder here trains on.

    inputs -> blocks -> sessions -> trials (sentences, labels) -> splits -> features -> files

Inputs. Files that `mne.io.read_raw` reads (FIF, EDF, BDF, BrainVision .vhdr, EEGLAB, ...): one
file is one block. Or one BIDS root (a folder with dataset_description.json), read through
mne-bids: every ieeg/meg/eeg recording that matches `--subject/--session/--task/--run` is a block
(a split FIF counts once, by its first part).

Sessions. One output session per recording day: the UTC date of the recording's `meas_date` (what
the file stores; the time zone of the lab is not recorded), or per BIDS session (subject and
session entities). Its folder is `<prefix>.<YYYY.MM.DD>` (the BIDS session's earliest run date),
since the harness orders sessions by name and its cross-session protocol counts days from such
dates. The prefix is `--session-prefix`, else `sub-<label>` for BIDS (the subject), else `rec`
(a file header's subject field is no reliable id: EDF writes `X` for an unknown patient). Without a
date: `<prefix>.<BIDS session label>`, else one session per undated file, `<prefix>.<NN>` numbered
in input order; such names carry no date, and the cross-session protocol reports no days for them.
The blocks of a session are numbered 1, 2, ... in time order (then input order); a block's trials
are numbered 0, 1, ... by onset (skipped trials keep their number, so numbers may have gaps).

Sentences. From the annotations whose description starts with `--sentence-prefix` (default
`sentence:`; a BrainVision marker type such as `Comment/` before it is ignored): onset and duration
make the trial, the rest of the description is the sentence. Or from `--events` TSV files with the
columns onset, duration and sentence (seconds from the recording's first sample, as BIDS
events.tsv): either TSVs with a `recording` column naming each row's recording (the path as given,
its file name, or a BIDS run's file name), or one TSV per recording, in the order the recordings
are given (BIDS: the runs sorted by path, as convert_report.json lists them). With --events the
annotations are not read. A trial is the bins from the sentence onset's bin
(floor(onset / bin)) for round(duration / bin) bins (at least 1).

Labels as `synth` makes them (harness.pronounce): CMU phonemes without stress, SIL after every word.
Words without a pronunciation are listed, every one, in one UserError, or with
`--skip-unknown-words` their trials are skipped and counted in the report.

Features: harness.recording_features (`--features auto|spikes|high_gamma|as_is`, `--bin-ms`,
`--band`, `--spike-band`, `--threshold`), z-scored per block. `--picks` by channel type (ecog,
seeg, eeg, meg, ...) or by name; default every data channel (MEG, EEG, sEEG, ECoG, DBS), bad
channels included (every block of a session must have the same channels, and the real data too
keeps every electrode).

Splits. `--test-blocks` and `--val-blocks` (each SPEC: `SESSION:BLOCK`, a block number meaning
that block of every session, or a recording's path or file name) or `--splits TSV` (columns
`split` and either `recording` or `session` and `block`; blocks it does not name are train). Val
comes from the val blocks when any is named; otherwise every session's non-test sentences are split
train/val by sklearn's train_test_split (`--val-fraction`, default 0.1, of the distinct sentences,
ceil, so that a sentence said twice never lands in both; `--seed`). `--unlabeled-test` writes
the test split without labels, as the real test split.

Output: `--out DIR/<session>/data_{train,val,test}.hdf5` (harness.b2txt25_writer) and
`DIR/convert_report.json`. Every check runs before anything is written; the output is built in a
temporary folder beside DIR and renamed into place at the end, so a failure leaves nothing. An
existing non-empty DIR is refused, unless `--overwrite` and it holds a previous conversion (its
convert_report.json).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.b2txt25_writer import TrialRecord, label_too_long, write_split
from harness.errors import UserError, brief
from harness.pronounce import oov_words, sentence_ids, words
from harness.recording_features import FeatureSettings, check_settings, choose_kind, feature_names, features_per_channel
from harness.recording_features import block_features as compute_block_features
from harness.sentences import sentence_key

log = logging.getLogger(__name__)

REPORT_NAME = "convert_report.json"
SENTENCE_PREFIX = "sentence:"
SPLITS = ("train", "val", "test")
DEFAULT_PREFIX = "rec"
BIDS_DATATYPES = ("ieeg", "meg", "eeg")
DATA_TYPES = ("mag", "grad", "eeg", "seeg", "ecog", "dbs")  # the default picks
PICK_GROUPS = {"meg": ("mag", "grad"), "data": DATA_TYPES}
# What MNE's and mne-bids' readers raise on a file they cannot read: any Exception. A damaged or
# foreign file fails deep inside a format parser, in whatever way (a 6-byte text file named .fif
# ends in an AttributeError), and the file is the user's; the message keeps the error's type and text.
READ_ERRORS = (Exception,)
_PREFIX_OK = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ConvertOptions:
    inputs: tuple[str, ...]
    out: str
    overwrite: bool = False
    subjects: tuple[str, ...] | None = None  # BIDS filters
    sessions: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None
    runs: tuple[str, ...] | None = None
    session_prefix: str | None = None
    sentence_prefix: str = SENTENCE_PREFIX
    events: tuple[str, ...] | None = None
    picks: tuple[str, ...] | None = None
    features: FeatureSettings = field(default_factory=FeatureSettings)
    val_blocks: tuple[str, ...] | None = None
    test_blocks: tuple[str, ...] | None = None
    splits: str | None = None  # TSV
    val_fraction: float = 0.1
    seed: int = 0
    unlabeled_test: bool = False
    skip_unknown_words: bool = False


@dataclass
class Sentence:
    onset: float  # seconds from the block's first sample
    duration: float
    text: str
    trial_num: int = 0
    split: str = "train"
    phoneme_ids: tuple[int, ...] | None = None
    skipped: str | None = None  # why, when skipped


@dataclass
class Block:
    source: str  # the recording as given (BIDS: its path)
    names: tuple[str, ...]  # what a spec or TSV may call it: the source, its file name (BIDS: basename too)
    raw: object  # mne.io.BaseRaw, not preloaded
    start: datetime.datetime | None
    subject: str | None = None  # BIDS entities
    bids_session: str | None = None
    bids: dict | None = None
    sentences: list[Sentence] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)
    kind: str = ""
    session: str = ""
    block_num: int = 0

    @property
    def sfreq(self) -> float:
        return float(self.raw.info["sfreq"])

    @property
    def seconds(self) -> float:
        return self.raw.n_times / self.sfreq

    @property
    def channels(self) -> list[str]:
        return [self.raw.ch_names[i] for i in self.picks]

    @property
    def channel_types(self) -> list[str]:
        types = self.raw.get_channel_types()
        return [types[i] for i in self.picks]


# ---------------------------------------------------------------- entry point

def convert(options: ConvertOptions) -> dict:
    """Check everything, compute the features, write `options.out`; returns the report."""
    started = time.perf_counter()
    _check_options(options)
    out = Path(options.out)
    _check_out(out, options)
    blocks = _read_blocks(options)
    _refuse_inputs_inside(out, options)
    _add_sentences(blocks, options)
    _add_picks_and_kinds(blocks, options)
    _add_labels(blocks, options)
    sessions = _make_sessions(blocks, options)
    _check_channels(sessions)
    split_method = _assign_splits(sessions, options)
    if not any(s.skipped is None for b in blocks for s in b.sentences):
        raise UserError("no trial is left to convert (every sentence was skipped for unknown words)")
    report = _write(out, sessions, options, split_method)
    report["seconds"] = round(time.perf_counter() - started, 1)  # for the summary line (the file is written by then)
    return report


def summary(report: dict) -> str:
    """One line for the terminal."""
    n = report["n_trials"]
    f = report["features"]
    sessions = report["sessions"]
    skipped = len(report["skipped"])
    return (f"{len(sessions)} session{'s' * (len(sessions) != 1)} ({', '.join(sessions)}), "
            + ", ".join(f"{n[s]} {s}" for s in SPLITS if n[s]) + " trials"
            + (" (test unlabeled)" if report["splits"]["unlabeled_test"] and n["test"] else "")
            + f"; {f['n_features']} features ({f['kind']}, {f['bin_ms']:g} ms bins)"
            + (f"; {skipped} trial{'s' * (skipped != 1)} skipped" if skipped else "")
            + (f"; {report['seconds']:g} s" if "seconds" in report else "") + f"; report: {report['report']}")


# ---------------------------------------------------------------- options and --out

def _check_options(options: ConvertOptions) -> None:
    check_settings(options.features)
    if not options.inputs:
        raise UserError("give at least one recording (or a BIDS root)")
    if not 0 <= options.val_fraction < 1:
        raise UserError(f"--val-fraction must be at least 0 and below 1 (got {options.val_fraction:g})")
    if options.seed < 0:
        raise UserError(f"--seed must be a non-negative integer (got {options.seed})")
    if options.session_prefix is not None and not _PREFIX_OK.match(options.session_prefix):
        raise UserError(f"--session-prefix {options.session_prefix!r}: use letters, digits, '-' and '_' only "
                        "(the session folder is <prefix>.<YYYY.MM.DD>)")
    if not options.sentence_prefix.strip():
        raise UserError("--sentence-prefix must not be empty")
    if options.splits and (options.val_blocks or options.test_blocks):
        raise UserError("--splits TSV replaces --val-blocks and --test-blocks: give one or the other")


def _check_out(out: Path, options: ConvertOptions) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder; choose a new folder")
        if any(out.iterdir()):
            if not options.overwrite:
                raise UserError(f"--out {out} exists and is not empty; choose a new folder, or --overwrite to replace "
                                "a previous conversion")
            if not (out / REPORT_NAME).is_file():
                raise UserError(f"--overwrite refused: {out} holds no {REPORT_NAME}, so it is no previous conversion; "
                                "choose a new folder")


def _refuse_inputs_inside(out: Path, options: ConvertOptions) -> None:
    """--overwrite never deletes a recording it reads (nor the events or splits TSVs)."""
    if not out.is_dir():
        return
    root = out.resolve()
    for path in [*options.inputs, *(options.events or ()), *([options.splits] if options.splits else [])]:
        resolved = Path(path).resolve()
        if resolved == root or root in resolved.parents:
            raise UserError(f"--out {out} holds an input ({path}), which --overwrite would delete; choose another --out")


# ---------------------------------------------------------------- reading

@contextlib.contextmanager
def _quiet():
    """MNE's and mne-bids' warnings (units, coordinates, ...) are not the user's mistakes here."""
    import mne

    with warnings.catch_warnings(), mne.utils.use_log_level("error"):
        warnings.simplefilter("ignore")
        yield


def _meas_start(raw) -> datetime.datetime | None:
    when = raw.info["meas_date"]
    if when is None:
        return None
    return when.astimezone(datetime.UTC) if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _read_blocks(options: ConvertOptions) -> list[Block]:
    inputs = [Path(p) for p in options.inputs]
    bids_filters = any(x for x in (options.subjects, options.sessions, options.tasks, options.runs))
    folders = [p for p in inputs if p.is_dir()]
    if folders:
        if len(inputs) > 1:
            raise UserError(f"{folders[0]} is a folder: give one BIDS root alone, or recording files")
        return _read_bids(folders[0], options)
    if bids_filters:
        raise UserError("--subject, --session, --task and --run select runs of a BIDS root; the inputs are files")
    blocks = []
    for path in inputs:
        if not path.exists():
            raise UserError(f"recording not found: {path}")
        raw = _read_raw(path)
        blocks.append(Block(str(path), _unique((str(path), path.name)), raw, _meas_start(raw)))
    seen = Counter(Path(b.source).resolve() for b in blocks)
    twice = [str(p) for p, n in seen.items() if n > 1]
    if twice:
        raise UserError(f"recording given twice: {twice[0]}")
    return blocks


def _read_raw(path: Path):
    import mne

    try:
        with _quiet():
            return mne.io.read_raw(str(path), preload=False, verbose="error")  # str: MNE's messages then name it plainly
    except READ_ERRORS as error:
        raise UserError(f"cannot read recording {path}: {brief(error)}") from None


def _read_bids(root: Path, options: ConvertOptions) -> list[Block]:
    import mne_bids
    from mne_bids.config import reader

    if not (root / "dataset_description.json").is_file():
        raise UserError(f"{root} is a folder but no BIDS root (no dataset_description.json); give recording files, "
                        "or the BIDS dataset's root folder")
    try:
        with _quiet():
            paths = mne_bids.find_matching_paths(
                root, subjects=_list(options.subjects), sessions=_list(options.sessions), tasks=_list(options.tasks),
                runs=_list(options.runs), datatypes=list(BIDS_DATATYPES), suffixes=list(BIDS_DATATYPES),
                extensions=sorted(reader))
    except READ_ERRORS as error:
        raise UserError(f"cannot search BIDS root {root}: {brief(error)}") from None
    paths = sorted({p.fpath: p for p in paths if p.split in (None, "01")}.values(), key=_bids_order)
    if not paths:
        chosen = ", ".join(f"{k}={','.join(v)}" for k, v in (("subject", options.subjects), ("session", options.sessions),
                                                              ("task", options.tasks), ("run", options.runs)) if v)
        raise UserError(f"no {'/'.join(BIDS_DATATYPES)} recording in BIDS root {root}"
                        + (f" matches {chosen}" if chosen else ""))
    blocks = []
    for path in paths:
        try:
            with _quiet():
                raw = mne_bids.read_raw_bids(path, verbose="error")
        except READ_ERRORS as error:
            raise UserError(f"cannot read BIDS recording {path.fpath}: {brief(error)}") from None
        entities = {k: path.entities[k] for k in ("subject", "session", "task", "run", "acquisition")
                    if path.entities.get(k) is not None}
        blocks.append(Block(str(path.fpath), _unique((str(path.fpath), path.fpath.name, path.basename)), raw,
                            _meas_start(raw), path.subject, path.session, entities))
    return blocks


def _bids_order(path) -> tuple:
    """Subject, session, task, then run by number (run-2 before run-10), then the path."""
    run = str(path.run or "")
    return (str(path.subject), str(path.session or ""), str(path.task or ""),
            (0, int(run), "") if run.isdigit() else (1, 0, run), str(path.fpath))


def _list(values) -> list[str] | None:
    return list(values) if values else None


def _unique(values) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


# ---------------------------------------------------------------- sentences

def _sentence_text(description: str, prefix: str) -> str | None:
    if description.startswith(prefix):
        return description[len(prefix):].strip()
    head, slash, tail = description.partition("/")
    if slash and head and not any(c.isspace() for c in head) and tail.startswith(prefix):  # BrainVision "Comment/..."
        return tail[len(prefix):].strip()
    return None


def _add_sentences(blocks: list[Block], options: ConvertOptions) -> None:
    if options.events:
        found = _read_events(blocks, options.events)
    else:
        found = {}
        for b in blocks:
            a = b.raw.annotations
            onsets = np.asarray(a.onset, dtype=float) - b.raw.first_time  # seconds from the first sample
            found[b.source] = [Sentence(float(o), float(d), text) for o, d, desc in zip(onsets, a.duration, a.description)
                               if (text := _sentence_text(str(desc), options.sentence_prefix)) is not None]
            if not found[b.source]:
                kinds = sorted({str(d) for d in a.description})
                seen = (f"its annotations are {', '.join(repr(k) for k in kinds[:3])}{', ...' if len(kinds) > 3 else ''}"
                        if kinds else "it has no annotations")
                raise UserError(f"{b.source}: no sentence annotation (a description starting with "
                                f"{options.sentence_prefix!r}; {seen}); set --sentence-prefix, or give --events TSV")
    for b in blocks:
        sentences = sorted(found[b.source], key=lambda s: s.onset)
        if not sentences:
            raise UserError(f"{b.source}: no sentence in the --events TSV for this recording")
        _check_timing(b, sentences)
        for n, s in enumerate(sentences):
            s.trial_num = n
        b.sentences = sentences


def _check_timing(b: Block, sentences: list[Sentence]) -> None:
    tolerance = 1.0 / b.sfreq
    for s in sentences:
        if not (math.isfinite(s.onset) and math.isfinite(s.duration)) or s.duration <= 0:
            raise UserError(f"{b.source}: the sentence {s.text!r} at {s.onset:g} s has duration {s.duration:g} s; "
                            "a sentence needs a positive duration (the trial's length)")
        if s.onset < -tolerance or s.onset + s.duration > b.seconds + tolerance:
            raise UserError(f"{b.source}: the sentence {s.text!r} at {s.onset:g}-{s.onset + s.duration:g} s lies "
                            f"outside the recording (0-{b.seconds:g} s)")
        if not s.text:
            raise UserError(f"{b.source}: the sentence annotation at {s.onset:g} s has no text after the prefix")
    for a, c in zip(sentences, sentences[1:]):
        if c.onset < a.onset + a.duration - 1e-9:
            raise UserError(f"{b.source}: overlapping sentences: {a.text!r} at {a.onset:g}-{a.onset + a.duration:g} s "
                            f"and {c.text!r} from {c.onset:g} s; one block's trials must not overlap")


def _read_events(blocks: list[Block], paths: tuple[str, ...]) -> dict[str, list[Sentence]]:
    tables = [_read_tsv(Path(p), required=("onset", "duration", "sentence")) for p in paths]
    with_column = ["recording" in header for header, _ in tables]
    found: dict[str, list[Sentence]] = {b.source: [] for b in blocks}
    if all(with_column):
        by_name = {}
        for b in blocks:
            for name in b.names:
                by_name.setdefault(name, b)
        for path, (_, rows) in zip(paths, tables):
            for line, row in rows:
                b = by_name.get(row["recording"]) or by_name.get(Path(row["recording"]).name)
                if b is None:
                    raise UserError(f"{path}, line {line}: recording {row['recording']!r} is none of the inputs "
                                    f"({', '.join(b.names[-1] for b in blocks)})")
                found[b.source].append(_event(path, line, row))
        return found
    if any(with_column) or len(tables) != len(blocks):
        raise UserError(f"--events: give one TSV per recording, in the order of the recordings ({len(blocks)} "
                        f"recording{'s' * (len(blocks) != 1)}, {len(tables)} TSV{'s' * (len(tables) != 1)}), or TSVs "
                        "whose 'recording' column names each row's recording")
    for b, path, (_, rows) in zip(blocks, paths, tables):
        found[b.source] = [_event(path, line, row) for line, row in rows]
    return found


def _event(path: str, line: int, row: dict) -> Sentence:
    try:
        onset, duration = float(row["onset"]), float(row["duration"])
    except ValueError:
        raise UserError(f"{path}, line {line}: onset and duration must be numbers of seconds "
                        f"(got {row['onset']!r}, {row['duration']!r})") from None
    return Sentence(onset, duration, (row["sentence"] or "").strip())


def _read_tsv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row) of a tab-separated file with a header line; UserError if
    unreadable or missing a required column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {brief(error)}") from None
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} in its header line (tab-separated; found: "
                        f"{', '.join(header) or 'nothing'})")
    rows = []
    for n, row in enumerate(reader, start=2):
        if any((v or "").strip() for k, v in row.items() if k is not None):
            rows.append((n, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    return header, rows


# ---------------------------------------------------------------- channels and features

def _pick(b: Block, picks: tuple[str, ...] | None) -> list[int]:
    types = b.raw.get_channel_types()
    names = b.raw.ch_names
    if not picks:
        chosen = [i for i, t in enumerate(types) if t in DATA_TYPES]
        if not chosen:
            raise UserError(f"{b.source}: no data channel ({', '.join(DATA_TYPES)}; it has {', '.join(sorted(set(types)))}); "
                            "choose channels with --picks TYPE or NAME ...")
        return chosen
    chosen = set()
    for token in picks:
        wanted = PICK_GROUPS.get(token, (token,))
        selected = {i for i, t in enumerate(types) if t in wanted} | {i for i, n in enumerate(names) if n == token}
        if not selected:
            raise UserError(f"{b.source}: --picks {token} selects no channel (its channel types: "
                            f"{', '.join(sorted(set(types)))}; or name a channel, e.g. {names[0]})")
        chosen |= selected
    return sorted(chosen)


def _add_picks_and_kinds(blocks: list[Block], options: ConvertOptions) -> None:
    for b in blocks:
        b.picks = _pick(b, options.picks)
        b.kind = choose_kind(options.features, b.sfreq, b.channel_types, b.source)
    kinds = {b.kind for b in blocks}
    if len(kinds) > 1:
        first = {k: next(b for b in blocks if b.kind == k) for k in sorted(kinds)}
        raise UserError("--features auto chose different features: " + ", ".join(
            f"{k} for {b.source} ({b.sfreq:g} Hz)" for k, b in first.items()) + "; choose one with --features")


def _check_channels(sessions: dict[str, list[Block]]) -> None:
    widths = {}
    for name, blocks in sessions.items():
        first = blocks[0]
        for b in blocks[1:]:
            if b.channels != first.channels:
                raise UserError(f"session {name}: {b.source} has other channels than {first.source} "
                                f"({len(b.channels)} vs {len(first.channels)} picked); the blocks of a session need the "
                                "same channels (choose them with --picks)")
        widths[name] = (len(first.picks) * features_per_channel(first.kind), len(first.picks))
    if len({w for w, _ in widths.values()}) > 1:
        raise UserError("sessions of different channel counts: " + ", ".join(
            f"{s} has {c} channels ({w} features)" for s, (w, c) in widths.items())
            + "; every session needs the same number of features (choose the channels with --picks)")


# ---------------------------------------------------------------- labels

def _add_labels(blocks: list[Block], options: ConvertOptions) -> None:
    unknown, empty, too_long = [], [], []
    for b in blocks:
        for s in b.sentences:
            missing = oov_words(s.text)
            where = f"{Path(b.source).name} at {s.onset:g} s"
            if missing:
                unknown.append((missing, s, where))
            elif not words(s.text):
                empty.append(f"{s.text!r} ({where})")
            else:
                ids = sentence_ids(s.text)
                if (problem := label_too_long(s.text, ids)) is not None:
                    too_long.append(f"{where}: {problem}")
                s.phoneme_ids = tuple(ids)
    if empty:
        raise UserError(f"sentences without a word: {'; '.join(empty)}")
    if too_long:
        raise UserError(f"sentences too long for the format's 500-long labels: {'; '.join(too_long)}")
    if unknown and not options.skip_unknown_words:
        all_words = sorted({w for m, _, _ in unknown for w in m})
        raise UserError(f"words not in the CMU dictionary: {', '.join(all_words)} (in " + "; ".join(
            f"{s.text!r} ({where})" for _, s, where in unknown) + "); fix the sentences, or pass --skip-unknown-words "
            "to skip their trials")
    for missing, s, _ in unknown:
        s.skipped = f"words not in the CMU dictionary: {', '.join(missing)}"


# ---------------------------------------------------------------- sessions

def _make_sessions(blocks: list[Block], options: ConvertOptions) -> dict[str, list[Block]]:
    """Group blocks into sessions, name them, number their blocks; {name: blocks in order}."""
    groups: dict[tuple, list[Block]] = {}
    for index, b in enumerate(blocks):
        prefix = options.session_prefix or (f"sub-{b.subject}" if b.subject else DEFAULT_PREFIX)
        if b.bids_session is not None:
            key = (prefix, "ses", b.bids_session)
        elif b.start is not None:
            key = (prefix, "date", b.start.date())
        else:
            key = (prefix, "file", index)
        groups.setdefault(key, []).append(b)
    named: dict[str, list[Block]] = {}
    origin: dict[str, str] = {}
    undated = 0
    for key, members in groups.items():
        prefix, how, value = key
        dates = sorted(b.start for b in members if b.start is not None)
        if dates:
            name = f"{prefix}.{dates[0]:%Y.%m.%d}"
        elif how == "ses":
            name = f"{prefix}.{value}"
        else:
            undated += 1
            name = f"{prefix}.{undated:02d}"
        what = f"BIDS session {value!r}" if how == "ses" else f"{members[0].source}"
        if name in named:
            raise UserError(f"two sessions would both be named {name}: {origin[name]} and {what}; select one with "
                            "--subject/--session, or convert them separately")
        origin[name] = what
        ordered = sorted(members, key=lambda b: (b.start is None, b.start or datetime.datetime.min.replace(
            tzinfo=datetime.UTC)))  # sorted() is stable: input order within equal times
        for number, b in enumerate(ordered, start=1):
            b.session, b.block_num = name, number
        named[name] = ordered
    return dict(sorted(named.items()))


# ---------------------------------------------------------------- splits

def _match_specs(specs: tuple[str, ...], blocks: list[Block], option: str) -> set[int]:
    """Indices of the blocks that SESSION:BLOCK / BLOCK / recording specs name."""
    chosen = set()
    for spec in specs:
        spec = spec.strip()
        session, colon, number = spec.rpartition(":")
        if colon and number.isdigit() and any(b.session == session for b in blocks):
            hit = {i for i, b in enumerate(blocks) if b.session == session and b.block_num == int(number)}
        elif spec.isdigit():
            hit = {i for i, b in enumerate(blocks) if b.block_num == int(spec)}
        else:
            hit = {i for i, b in enumerate(blocks) if spec in b.names or Path(spec).name in b.names}
        if not hit:
            blocks_named = ", ".join(f"{b.session}:{b.block_num}" for b in blocks[:6]) + (", ..." if len(blocks) > 6 else "")
            raise UserError(f"{option} {spec}: no such block (name one as SESSION:BLOCK, a block number, or a "
                            f"recording's path or file name; the blocks are {blocks_named})")
        chosen |= hit
    return chosen


def _splits_from_tsv(path: str, blocks: list[Block]) -> dict[int, str]:
    header, rows = _read_tsv(Path(path), required=("split",))
    if "recording" not in header and not {"session", "block"} <= set(header):
        raise UserError(f"{path}: name each block by a 'recording' column, or by 'session' and 'block' columns")
    out = {}
    for line, row in rows:
        if row["split"] not in SPLITS:
            raise UserError(f"{path}, line {line}: split {row['split']!r} is none of {', '.join(SPLITS)}")
        spec = row.get("recording") or f"{row.get('session', '')}:{row.get('block', '')}"
        for i in _match_specs((spec,), blocks, f"{path}, line {line}:"):
            if out.get(i, row["split"]) != row["split"]:
                raise UserError(f"{path}, line {line}: block {blocks[i].session}:{blocks[i].block_num} is already "
                                f"{out[i]}")
            out[i] = row["split"]
    return out


def _assign_splits(sessions: dict[str, list[Block]], options: ConvertOptions) -> dict:
    """Set every sentence's split; returns how, for the report."""
    blocks = [b for members in sessions.values() for b in members]
    if options.splits:
        by_block = _splits_from_tsv(options.splits, blocks)
    else:
        by_block = {}
        val = _match_specs(options.val_blocks, blocks, "--val-blocks") if options.val_blocks else set()
        test = _match_specs(options.test_blocks, blocks, "--test-blocks") if options.test_blocks else set()
        if both := val & test:
            b = blocks[min(both)]
            raise UserError(f"block {b.session}:{b.block_num} ({b.source}) is named by both --val-blocks and --test-blocks")
        by_block = {**{i: "val" for i in val}, **{i: "test" for i in test}}
    for i, b in enumerate(blocks):
        for s in b.sentences:
            s.split = by_block.get(i, "train")
    val_by_blocks = "val" in by_block.values()
    method = {"test": "blocks" if "test" in by_block.values() else None,
              "val": "blocks" if val_by_blocks else ("seeded share of sentences" if options.val_fraction > 0 else None),
              "val_fraction": None if val_by_blocks else options.val_fraction, "seed": options.seed,
              "unlabeled_test": options.unlabeled_test, "splits_tsv": options.splits}
    if not val_by_blocks and options.val_fraction > 0:
        for members in sessions.values():
            _seeded_val(members, options.val_fraction, options.seed)
    method["blocks"] = {f"{b.session}:{b.block_num}": "+".join(s for s in SPLITS if any(
        t.split == s and t.skipped is None for t in b.sentences)) for b in blocks}
    return method


def _seeded_val(blocks: list[Block], fraction: float, seed: int) -> None:
    """Move a seeded share of the session's distinct train sentences (and all their trials) to val."""
    from sklearn.model_selection import train_test_split

    candidates = [s for b in blocks for s in b.sentences if s.split == "train" and s.skipped is None]
    keys = list(dict.fromkeys(sentence_key(s.text) for s in candidates))
    n_val = min(math.ceil(fraction * len(keys)), len(keys) - 1)
    if n_val < 1:
        return
    _, val_keys = train_test_split(keys, test_size=n_val, random_state=seed, shuffle=True)
    val_keys = set(val_keys)
    for s in candidates:
        if sentence_key(s.text) in val_keys:
            s.split = "val"


# ---------------------------------------------------------------- features and files

def _trial_bins(s: Sentence, bin_s: float, total: int) -> tuple[int, int]:
    first = min(int(math.floor(s.onset / bin_s + 1e-9)), total - 1)
    first = max(first, 0)
    count = max(1, int(round(s.duration / bin_s)))
    return first, min(first + count, total)


def _session_trials(blocks: list[Block], settings: FeatureSettings, report_blocks: list[dict]) -> list[tuple[str, TrialRecord]]:
    out = []
    for b in blocks:
        try:
            with _quiet():
                features = compute_block_features(b.raw, b.picks, b.kind, settings, b.source)
        except (OSError, EOFError) as error:  # a truncated or vanished file (headers were read already)
            raise UserError(f"cannot read the samples of recording {b.source}: {brief(error)}") from None
        lengths = []
        for s in b.sentences:
            if s.skipped is not None:
                continue
            first, end = _trial_bins(s, settings.bin_s, len(features))
            lengths.append(end - first)
            out.append((s.split, TrialRecord(b.session, b.block_num, s.trial_num, features[first:end],
                                             s.text, s.phoneme_ids)))
        report_blocks.append(_block_report(b, len(features), lengths))
    return out


def _block_report(b: Block, n_bins: int, lengths: list[int]) -> dict:
    kept = [s for s in b.sentences if s.skipped is None]
    return {"recording": b.source, "bids": b.bids, "session": b.session, "block_num": b.block_num,
            "meas_date": b.start.isoformat() if b.start else None, "sfreq": b.sfreq, "n_samples": int(b.raw.n_times),
            "seconds": round(b.seconds, 3), "n_bins": n_bins, "n_sentences": len(b.sentences),
            "n_trials": dict(Counter(s.split for s in kept)),
            "trial_bins": {"min": min(lengths), "mean": round(float(np.mean(lengths)), 1), "max": max(lengths)}
            if lengths else None}


def _write(out: Path, sessions: dict[str, list[Block]], options: ConvertOptions, split_method: dict) -> dict:
    settings = options.features
    first = next(iter(sessions.values()))[0]
    kind = first.kind
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # removed again if the writing fails
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".converting", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets the usual permissions
    try:
        report_blocks, per_session, n_trials = [], {}, Counter()
        for name, blocks in sessions.items():
            trials = _session_trials(blocks, settings, report_blocks)
            (tmp / name).mkdir()
            counts = {}
            for split in SPLITS:
                in_split = [t for s, t in trials if s == split]
                if in_split:
                    labeled = not (split == "test" and options.unlabeled_test)
                    write_split(tmp / name / f"data_{split}.hdf5", in_split, labeled=labeled)
                counts[split] = len(in_split)
                n_trials[split] += len(in_split)
            per_session[name] = {
                "date": f"{blocks[0].start:%Y-%m-%d}" if any(b.start for b in blocks) else None,
                "blocks": [b.block_num for b in blocks], "n_trials": counts,
                "channels": [{"name": c, "type": t} for c, t in zip(blocks[0].channels, blocks[0].channel_types)]}
        report = {
            "generator": "b2t-bench harness.convert (main.py convert)",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "inputs": list(options.inputs),
            "bids_filters": {k: list(v) for k, v in (("subject", options.subjects), ("session", options.sessions),
                                                     ("task", options.tasks), ("run", options.runs)) if v},
            "sentences_from": ({"events": list(options.events)} if options.events
                               else {"annotations": {"prefix": options.sentence_prefix}}),
            "features": _features_report(kind, first, settings),
            "sessions": per_session,
            "n_trials": {s: n_trials[s] for s in SPLITS},
            "splits": split_method,
            "skipped": [{"recording": b.source, "session": b.session, "block_num": b.block_num,
                         "trial_num": s.trial_num, "onset": s.onset, "sentence": s.text, "reason": s.skipped}
                        for members in sessions.values() for b in members for s in b.sentences if s.skipped],
            "blocks": report_blocks,
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1, default=str) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    report["report"] = str(out / REPORT_NAME)
    return report


def _features_report(kind: str, block: Block, settings: FeatureSettings) -> dict:
    names = feature_names(kind, block.channels)
    out = {"kind": kind, "requested": settings.kind, "bin_ms": settings.bin_ms, "n_features": len(names),
           "n_channels": len(block.channels), "zscore": "per block, per feature, over all of the block's bins",
           "dtype": "float32", "order": names}
    if kind == "high_gamma":
        out.update(band_hz=list(settings.band), power="mean square of the band-passed signal per bin")
    elif kind == "spikes":
        out.update(band_hz=list(settings.spike_band), threshold_rms=settings.threshold,
                   layout="threshold crossings of every channel, then spike-band power (mean square) of every channel")
    else:
        out.update(resampled_to_hz=settings.bin_rate, note="samples taken as they are, resampled by MNE where the "
                   "recording is not at the bin rate")
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """The finished folder replaces --out: an empty one, or a previous conversion (--overwrite)."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    os.rename(tmp, out)
