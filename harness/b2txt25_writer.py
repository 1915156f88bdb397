"""The one writer of Brain-to-Text '25 session files (docs/reference.md, section 1).

`write_split(path, trials, labeled)` writes one `data_<split>.hdf5`: a group `trial_0000`,
`trial_0001`, ... per trial, in the given order, with `input_features` (T, F) float32 and the
attributes `n_time_steps`, `session`, `block_num`, `trial_num`; a labeled split adds
`seq_class_ids` and `transcription` (int32, zero padded to PAD_LEN) and the attributes `seq_len`
and `sentence_label`. The unlabeled test split has none of those four.

Both producers of session files use it: `harness.synthetic` (its `SynthTrial`s) and
`harness.convert` (`TrialRecord`s from recordings). A trial is anything with the attributes of
`TrialRecord`. No timestamps are stored in the object headers, so the same trials give the same
bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

PAD_LEN = 500  # the real data pads seq_class_ids and transcription to 500


class TrialLike(Protocol):
    session: str
    block_num: int
    trial_num: int
    features: np.ndarray
    sentence_label: str | None
    phoneme_ids: Sequence[int] | None


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the files hold it. `sentence_label` and `phoneme_ids` may be None only for
    trials written to an unlabeled split."""

    session: str
    block_num: int
    trial_num: int
    features: np.ndarray  # (T, F) float32, z-scored per block
    sentence_label: str | None = None
    phoneme_ids: tuple[int, ...] | None = None


def label_too_long(sentence: str, phoneme_ids: Sequence[int]) -> str | None:
    """Why the labels do not fit the PAD_LEN padding, or None when they do."""
    if len(sentence) > PAD_LEN:
        return f"{len(sentence)} characters, more than {PAD_LEN}"
    if len(phoneme_ids) > PAD_LEN:
        return f"{len(phoneme_ids)} phonemes, more than {PAD_LEN}"
    return None


def padded(values: Sequence[int]) -> np.ndarray:
    """int32, zero-padded to PAD_LEN (callers check that the values fit: `label_too_long`)."""
    out = np.zeros(PAD_LEN, np.int32)
    out[:len(values)] = values
    return out


def write_split(path: str | Path, trials: Sequence[TrialLike], labeled: bool) -> None:
    """One data_<split>.hdf5. No timestamps in object headers, so same input -> same bytes."""
    with h5py.File(path, "w", libver="earliest") as f:
        for n, t in enumerate(trials):
            g = f.create_group(f"trial_{n:04d}")
            g.create_dataset("input_features", data=t.features, track_times=False)
            g.attrs["n_time_steps"] = np.int64(len(t.features))
            g.attrs["session"] = t.session
            g.attrs["block_num"] = np.int64(t.block_num)
            g.attrs["trial_num"] = np.int64(t.trial_num)
            if labeled:
                if t.sentence_label is None or t.phoneme_ids is None:
                    raise ValueError(f"trial {n} of {path} has no labels but the split is labeled")
                g.create_dataset("seq_class_ids", data=padded(t.phoneme_ids),
                                 track_times=False)
                g.create_dataset("transcription", track_times=False,
                                 data=padded([ord(c) for c in t.sentence_label]))
                g.attrs["seq_len"] = np.int64(len(t.phoneme_ids))
                g.attrs["sentence_label"] = t.sentence_label
