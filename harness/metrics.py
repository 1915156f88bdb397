"""Error rates of a decoder: PER, WER, CER with bootstrap confidence intervals.

Definitions follow docs/reference.md, section 6:
- every rate is a *summed ratio* over a split, sum(edits) / sum(reference counts), never the mean
  of per-trial rates (short sentences would otherwise weigh as much as long ones);
- PER counts SIL tokens; WER and CER compare normalised text (normalize_text), CER counts spaces;
- the 95% CI resamples trials with replacement 10,000 times and takes the 2.5 / 97.5 percentiles.

Edit distances come from rapidfuzz (Levenshtein on strings and on lists of tokens), not a
hand-written dynamic programme. `None` means "not applicable" throughout (no reference on the
test split, a model without phoneme output) and becomes null in metrics.json.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from scipy import stats

METRICS = ("per", "wer", "cer")
# metric name -> (edits column, count column) of per_trial.csv
COLUMNS = {
    "per": ("phoneme_edits", "phoneme_count"),
    "wer": ("word_edits", "word_count"),
    "cer": ("char_edits", "char_count"),
}

_WHITESPACE = re.compile(r"\s+")
# ASCII letters only, as the reference's re.sub(r"[^a-zA-Z\- ']", "", s) does.
_NOT_KEPT = re.compile(r"[^a-zA-Z\-' ]")


# --------------------------------------------------------------------------- edit distances


def normalize_text(s: str) -> str:
    """Text as WER/CER see it: letters, hyphen, apostrophe and space only; lowercase; single spaces.

    Any whitespace (tab, newline) counts as a space first, so that "cat\\nsat" stays two words
    (the reference deletes non-space whitespace, which only matters for generated text).
    """
    s = _WHITESPACE.sub(" ", s)
    s = _NOT_KEPT.sub("", s).lower()
    return _WHITESPACE.sub(" ", s).strip()


def phoneme_edits(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance, reference length) of space-separated ARPAbet strings, SIL included."""
    ref_tokens, hyp_tokens = ref.split(), hyp.split()
    return Levenshtein.distance(ref_tokens, hyp_tokens), len(ref_tokens)


def word_edits(ref_text: str, hyp_text: str) -> tuple[int, int]:
    """(word edit distance, reference word count) after normalize_text on both sides."""
    ref_words = normalize_text(ref_text).split()
    hyp_words = normalize_text(hyp_text).split()
    return Levenshtein.distance(ref_words, hyp_words), len(ref_words)


def char_edits(ref_text: str, hyp_text: str) -> tuple[int, int]:
    """(character edit distance, reference length) after normalize_text, spaces counted."""
    ref, hyp = normalize_text(ref_text), normalize_text(hyp_text)
    return Levenshtein.distance(ref, hyp), len(ref)


def _has_reference(text: str | None) -> bool:
    return text is not None and text.strip() != ""


def trial_error_columns(
    reference_text: str | None,
    predicted_text: str | None,
    reference_phonemes: str | None,
    predicted_phonemes: str | None,
) -> dict[str, int | None]:
    """The six per-trial error columns of per_trial.csv, None where they cannot be computed.

    A reference that is None or blank means "no label" (unlabeled test split): nothing is scored.
    A prediction of None means "this model does not produce it" (no phoneme head); an empty
    prediction "" is a real (empty) output and scores as all deletions.
    """
    out: dict[str, int | None] = {col: None for pair in COLUMNS.values() for col in pair}
    if _has_reference(reference_phonemes) and predicted_phonemes is not None:
        out["phoneme_edits"], out["phoneme_count"] = phoneme_edits(reference_phonemes, predicted_phonemes)
    if _has_reference(reference_text) and predicted_text is not None:
        out["word_edits"], out["word_count"] = word_edits(reference_text, predicted_text)
        out["char_edits"], out["char_count"] = char_edits(reference_text, predicted_text)
    return out


# --------------------------------------------------------------------------- ratios and CIs


def summed_ratio(edits: Sequence[float], counts: Sequence[float]) -> float | None:
    """sum(edits) / sum(counts); None when the counts sum to 0 (nothing to be wrong about)."""
    total = float(np.sum(counts))
    if total == 0:
        return None
    return float(np.sum(edits)) / total


def ratio_statistic(edits: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Vectorised summed ratio for scipy.stats.bootstrap; NaN where a resample's counts sum to 0."""
    num = np.sum(edits, axis=axis)
    den = np.sum(counts, axis=axis)
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def percentile_bootstrap(
    arrays: Sequence[np.ndarray],
    statistic,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of statistic(*arrays, axis=-1), resampling trials: row i of every
    array is drawn together (scipy.stats.bootstrap, paired=True). Needs at least 2 trials.

    statistic is vectorised and returns NaN for a resample where it is undefined (a ratio whose
    counts sum to 0); scipy then reports a NaN interval, and we take the percentiles over the
    defined resamples instead. The same seed gives the same interval.
    """
    with warnings.catch_warnings():
        # Raised only alongside a NaN interval, which is handled below.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            tuple(arrays),
            statistic,
            paired=True,
            vectorized=True,
            method="percentile",
            n_resamples=n_resamples,
            confidence_level=confidence,
            batch=1000,  # bounds memory at ~1000 x n_trials per array, whatever the split size
            rng=np.random.default_rng(seed),
        )
    lo, hi = res.confidence_interval.low, res.confidence_interval.high
    if math.isnan(lo) or math.isnan(hi):
        tail = 100 * (1 - confidence) / 2
        lo, hi = np.nanpercentile(res.bootstrap_distribution, [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_ci(
    edits: Sequence[float],
    counts: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the summed ratio, resampling trials (edit, count pairs) together.

    n_resamples=0 switches the bootstrap off and gives None (cheap validation during training).
    Degenerate inputs do not raise:
    - no trials, or counts summing to 0: None (the ratio itself is undefined);
    - one trial: (ratio, ratio), since every resample is that trial (scipy refuses n < 2);
    - a resample that happens to draw only zero-count trials has an undefined ratio and is left
      out (percentile_bootstrap).
    The same seed gives the same interval.
    """
    edits_arr = np.asarray(edits, dtype=np.float64)
    counts_arr = np.asarray(counts, dtype=np.float64)
    if edits_arr.shape != counts_arr.shape or edits_arr.ndim != 1:
        raise ValueError("edits and counts must be 1-D sequences of the same length")
    ratio = summed_ratio(edits_arr, counts_arr)
    if ratio is None or n_resamples == 0:
        return None
    if len(edits_arr) == 1:
        return (ratio, ratio)
    return percentile_bootstrap((edits_arr, counts_arr), ratio_statistic, n_resamples, seed, confidence)


# --------------------------------------------------------------------------- split summaries


def _field(row, key):
    """A row value from a dict or a record (namedtuple, dataclass); None when absent."""
    if isinstance(row, Mapping):
        return row.get(key)
    return getattr(row, key, None)


def as_number(value) -> float | None:
    """A per_trial value as a number; None for missing, empty ("" in a CSV) or NaN (pandas)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
    number = float(value)
    return None if math.isnan(number) else number


def _scored_pairs(rows, edits_key: str, count_key: str) -> tuple[list[float], list[float]]:
    """(edits, counts) of the rows where both columns are present; other rows are not scored."""
    edits, counts = [], []
    for row in rows:
        e, c = as_number(_field(row, edits_key)), as_number(_field(row, count_key))
        if e is not None and c is not None:
            edits.append(e)
            counts.append(c)
    return edits, counts


def _summary(rows: list, seed: int, n_resamples: int) -> dict:
    """per/wer/cer with CIs and n_trials for one group of rows (a split, one session, one corpus)."""
    out: dict = {}
    for name, (edits_key, count_key) in COLUMNS.items():
        edits, counts = _scored_pairs(rows, edits_key, count_key)
        ci = bootstrap_ci(edits, counts, n_resamples=n_resamples, seed=seed)
        out[name] = summed_ratio(edits, counts)
        out[f"{name}_ci"] = list(ci) if ci is not None else None
    out["n_trials"] = len(rows)
    return out


def _corpus(row) -> str | None:
    """The row's corpus; None where unknown (None, or "" as read back from per_trial.csv)."""
    value = _field(row, "corpus")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip() or None


def _by(rows: list, group, seed: int, n_resamples: int) -> dict:
    """_summary of each group of rows (sorted by name); rows whose group is None are left out."""
    groups: dict[str, list] = {}
    for row in rows:
        name = group(row)
        if name is not None:
            groups.setdefault(name, []).append(row)
    return {name: _summary(group_rows, seed, n_resamples) for name, group_rows in sorted(groups.items())}


def split_metrics(rows: Iterable, seed: int = 0, n_resamples: int = 10_000) -> dict:
    """The metrics.json entry of one split (docs/contracts.md, "metrics.json").

    rows: per-trial dicts or records with `session` and the six error columns of
    trial_error_columns. A metric is computed over the rows that have both its columns; with no
    such row it is None (null), as for PER of a text-only model or anything on the test split.
    n_resamples=0 leaves every *_ci None (no bootstrap, e.g. for validation during training).

    Returns {"per", "per_ci", "wer", "wer_ci", "cer", "cer_ci", "n_trials", "by_session",
    "by_corpus"}, where by_session maps each session (sorted) to the same keys without by_session
    and by_corpus, and by_corpus does the same for each corpus of the rows' `corpus` field (the
    block's corpus from the description CSV; rows without one are left out of by_corpus, which is
    {} when no row has a corpus). Every group and metric uses the same seed, so the intervals are
    reproducible run to run.
    """
    rows = list(rows)
    out = _summary(rows, seed, n_resamples)
    out["by_session"] = _by(rows, lambda row: str(_field(row, "session")), seed, n_resamples)
    out["by_corpus"] = _by(rows, _corpus, seed, n_resamples)
    if any(as_number(_field(row, "true_rank")) is not None for row in rows):
        out.update(retrieval_metrics(rows, seed, n_resamples))
    return out


RETRIEVAL_K = (1, 10)


def retrieval_metrics(rows: Iterable, seed: int = 0, n_resamples: int = 10_000) -> dict:
    """Retrieval accuracy from a model's per-trial `true_rank` (1 = its sentence ranked first;
    empty where the trial's sentence was not a candidate): top-1 and top-10 with bootstrap CIs over
    trials, the median rank, the same per session under `retrieval_by_session`."""
    ranked = [row for row in rows if as_number(_field(row, "true_rank")) is not None]

    def summary(subset) -> dict:
        ranks = np.array([as_number(_field(row, "true_rank")) for row in subset], dtype=float)
        out = {}
        for k in RETRIEVAL_K:
            hits = (ranks <= k).astype(float)
            out[f"retrieval_top{k}"] = float(hits.mean()) if len(hits) else None
            ci = bootstrap_ci(hits, np.ones_like(hits), n_resamples=n_resamples, seed=seed) if len(hits) else None
            out[f"retrieval_top{k}_ci"] = list(ci) if ci else None
        out["median_true_rank"] = float(np.median(ranks)) if len(ranks) else None
        return out

    by_session: dict[str, list] = {}
    for row in ranked:
        by_session.setdefault(str(_field(row, "session")), []).append(row)
    return {**summary(ranked),
            "retrieval_by_session": {session: summary(rs) for session, rs in sorted(by_session.items())}}
