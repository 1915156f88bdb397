"""Analyses of one decoder's per-trial results for the `compare` report: pure functions on pandas frames.

Each function takes the frame of trial_frame(per_trial rows) and returns a small frame (or array) to
tabulate or plot (harness/analysis_plots.py): error against a trial property (sentence length, trial
duration, days since implant), the edit operations behind the error rates, the phoneme confusion
matrix, retrieval ranks, and the paired per-session difference of two decoders. No I/O here.

Every error rate is a summed ratio over trials with a percentile bootstrap CI over trials, from
harness.metrics, so these numbers agree with metrics.json on the same trials.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import date

import numpy as np
import pandas as pd
from rapidfuzz.distance import Levenshtein
from sklearn.metrics import confusion_matrix

from config import parse_date
from harness import run_reader
from harness.metrics import COLUMNS, as_number, bootstrap_ci, normalize_text, summed_ratio
from harness.paired_stats import paired_comparison
from harness.phonemes import ARPABET, SIL

NUMERIC_COLUMNS = ("block_num", "trial_num", "phoneme_edits", "phoneme_count", "word_edits", "word_count",
                   "char_edits", "char_count", "days_since_implant", "n_time_steps", "true_rank")
TEXT_COLUMNS = ("split", "session", "reference_text", "predicted_text", "reference_phonemes", "predicted_phonemes",
                "corpus")
OPTIONAL_COLUMNS = ("n_time_steps", "true_rank")  # absent from old runs and from non-retrieval models
TRIAL_KEY = list(run_reader.TRIAL_KEY)  # one trial, the same for every decoder

# Below this many trials a bootstrap CI of a summed ratio says little: the resamples draw from so few
# distinct trials that the interval comes out too narrow and moves a lot when one trial is added or
# removed. Show such a group, but mark it as too small to conclude anything from.
TOO_FEW_TRIALS = 30


def few_trials(n: int) -> bool:
    return n < TOO_FEW_TRIALS


# --------------------------------------------------------------------------- the trial frame


def trial_frame(rows: list[dict]) -> pd.DataFrame:
    """per_trial rows (read from the CSV, all strings with "" for empty; or dicts with numbers and
    None) as a typed frame, one row per trial in the given order.

    The numeric columns are float with NaN for empty; the text columns are str with "" for missing.
    Every per_trial column is there even if the rows lack it (an old run without corpus), except
    n_time_steps and true_rank, which are there only when the rows have them. Other (model-specific)
    columns are kept as given.
    """
    df = pd.DataFrame(rows)
    for column in NUMERIC_COLUMNS:
        if column in df:
            df[column] = pd.Series([as_number(v) for v in df[column]], index=df.index, dtype=float)
        elif column not in OPTIONAL_COLUMNS:
            df[column] = pd.Series(np.nan, index=df.index, dtype=float)
    for column in TEXT_COLUMNS:
        if column in df:
            df[column] = pd.Series(["" if pd.isna(v) else str(v) for v in df[column]], index=df.index, dtype=str)
        else:
            df[column] = pd.Series("", index=df.index, dtype=str)
    return df


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, or all NaN where the frame has none."""
    return df[name] if name in df else pd.Series(np.nan, index=df.index, dtype=float)


# --------------------------------------------------------------------------- trial properties

BIN_SECONDS = 0.02  # one time step of the neural features


def session_date(name: str) -> date | None:
    """The date at the end of a session name ("t15.2023.08.11" -> 2023-08-11); None if it has none."""
    return parse_date(name.strip()) if name else None


def days_since_implant(df: pd.DataFrame) -> pd.Series:
    """Days since implant per trial (float, NaN where unknown).

    The days_since_implant column (from the description CSV) where it has a value. Other trials count
    from their session's date: from the implant day implied by the trials that have both (session date
    minus days, the most common value), else, when no trial has the column, from the earliest session
    date in the frame, which makes it days since the first session rather than since implant.
    """
    known = _column(df, "days_since_implant").astype(float)
    sessions = df["session"] if "session" in df else pd.Series("", index=df.index)
    ordinals = pd.Series([d.toordinal() if (d := session_date(s)) else np.nan for s in sessions],
                         index=df.index, dtype=float)
    if ordinals.isna().all():
        return known.copy()
    both = known.notna() & ordinals.notna()
    day_zero = (ordinals[both] - known[both]).mode().iloc[0] if both.any() else ordinals.min()
    return known.fillna(ordinals - day_zero)


def sentence_length(df: pd.DataFrame) -> pd.Series:
    """Words in the normalised reference text (as WER counts them); NaN where there is no reference."""
    return pd.Series([len(normalize_text(t).split()) if t.strip() else np.nan for t in df["reference_text"]],
                     index=df.index, dtype=float)


def trial_seconds(df: pd.DataFrame) -> pd.Series:
    """Trial duration in seconds from n_time_steps; NaN where unknown (runs from before the column)."""
    return _column(df, "n_time_steps") * BIN_SECONDS


WORD_EDGES = (0, 5, 10, 20, math.inf)  # -> "1-5", "6-10", "11-20", "21+"
SECOND_EDGES = (0, 3, 6, 9, 12, math.inf)  # -> "0-3 s", "3-6 s", "6-9 s", "9-12 s", "12+ s"


def _label(low: float, high: float, whole_numbers: bool, unit: str) -> str:
    suffix = f" {unit}" if unit else ""
    first = low + 1 if whole_numbers else low  # bins are (low, high]: whole numbers start at low + 1
    if math.isinf(high):
        return f"{first:g}+{suffix}"
    if whole_numbers and first == high:
        return f"{high:g}{suffix}"
    return f"{first:g}-{high:g}{suffix}"


def length_bins(values: pd.Series, edges=WORD_EDGES, *, whole_numbers: bool = True, unit: str = "") -> pd.Series:
    """values cut into the bins (edges[i], edges[i+1]] as an ordered categorical with readable labels
    (NaN outside the edges or where the value is NaN), for error_by.

    whole_numbers=True for counts (sentence length): (0, 5] is "1-5", the last bin "21+".
    whole_numbers=False for measures (seconds, unit="s"): (0, 3] is "0-3 s", and 0 itself falls in it.
    """
    edges = list(edges)
    labels = [_label(lo, hi, whole_numbers, unit) for lo, hi in zip(edges, edges[1:])]
    return pd.cut(values, edges, labels=labels, include_lowest=not whole_numbers)


# --------------------------------------------------------------------------- error per group

ERROR_BY_COLUMNS = ["group", "metric", "value", "ci_low", "ci_high", "n_trials"]


def _group_order(groups: pd.Series) -> list:
    """The group values present: in category order for a categorical (bins), else sorted."""
    present = set(groups.dropna().unique())
    if isinstance(groups.dtype, pd.CategoricalDtype):
        return [c for c in groups.cat.categories if c in present]
    return sorted(present)


def _scored(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The trials that have this metric's edits and count: the ones harness.metrics scores."""
    edits, count = COLUMNS[metric]
    return df[df[edits].notna() & df[count].notna()]


def error_by(df: pd.DataFrame, groups, metrics=("wer", "per"), n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Error rate per group of trials with its 95% bootstrap CI.

    groups: one value per trial of df (a Series on df's index, e.g. length_bins(sentence_length(df)));
    trials with a NaN group are left out. One row per group (category order for a categorical, else
    sorted) and metric: value (summed ratio over the group's scored trials), ci_low, ci_high (NaN when
    n_resamples=0), n_trials (scored trials). No row where the group has no scored trial for a metric
    or their reference counts sum to 0.
    """
    groups = groups.reindex(df.index) if isinstance(groups, pd.Series) else pd.Series(groups, index=df.index)
    rows = []
    for group in _group_order(groups):
        in_group = df[groups == group]
        for metric in metrics:
            edits, count = COLUMNS[metric]
            scored = _scored(in_group, metric)
            value = summed_ratio(scored[edits], scored[count])
            if value is None:
                continue
            ci = bootstrap_ci(scored[edits], scored[count], n_resamples=n_resamples, seed=seed) or (np.nan, np.nan)
            rows.append({"group": group, "metric": metric, "value": value, "ci_low": ci[0], "ci_high": ci[1],
                         "n_trials": len(scored)})
    return pd.DataFrame(rows, columns=ERROR_BY_COLUMNS)


# --------------------------------------------------------------------------- edit operations


def _words(text: str) -> list[str]:
    return normalize_text(text).split()


def _phonemes(text: str) -> list[str]:
    return text.split()


# level -> (reference column, prediction column, metric, tokens as harness.metrics compares them)
LEVELS = {
    "word": ("reference_text", "predicted_text", "wer", _words),
    "phoneme": ("reference_phonemes", "predicted_phonemes", "per", _phonemes),
}
EDIT_OPERATION_COLUMNS = ["level", "substitutions", "deletions", "insertions", "reference_count", "error_rate", "n_trials"]


def edit_operations(df: pd.DataFrame) -> pd.DataFrame:
    """Substitutions, deletions and insertions per level ("word", "phoneme"), summed over the trials
    scored at that level (those with its edits column, as harness.metrics scores them).

    Counts come from one minimal alignment per trial, so substitutions + deletions + insertions is the
    summed edit distance and error_rate their sum / reference_count, the WER / PER of these trials.
    A level without a scored trial has no row.
    """
    rows = []
    for level, (ref_column, hyp_column, metric, tokens) in LEVELS.items():
        scored = _scored(df, metric)
        if scored.empty:
            continue
        operations: Counter = Counter()
        reference_count = 0
        for ref, hyp in zip(scored[ref_column], scored[hyp_column]):
            ref_tokens = tokens(ref)
            operations.update(op.tag for op in Levenshtein.editops(ref_tokens, tokens(hyp)))
            reference_count += len(ref_tokens)
        edits = sum(operations.values())
        rows.append({"level": level, "substitutions": operations["replace"], "deletions": operations["delete"],
                     "insertions": operations["insert"], "reference_count": reference_count,
                     "error_rate": edits / reference_count if reference_count else np.nan, "n_trials": len(scored)})
    return pd.DataFrame(rows, columns=EDIT_OPERATION_COLUMNS)


# --------------------------------------------------------------------------- phoneme confusions

GAP = "∅"  # the other side of a deleted or inserted phoneme
INVENTORY = [*ARPABET, SIL]  # harness/phonemes.py order, without the CTC blank


def aligned_phoneme_pairs(reference: list[str], predicted: list[str]) -> list[tuple[str, str]]:
    """(true, predicted) pairs of one trial along a minimal edit alignment.

    The alignment is needed because insertions and deletions shift the prediction: its i-th phoneme is
    not what the decoder made of the reference's i-th, so comparing by position would count a shifted
    tail as a run of substitutions. (Of several minimal alignments, rapidfuzz picks one, always the same.)
    """
    pairs: list[tuple[str, str]] = []
    for op in Levenshtein.opcodes(reference, predicted):
        ref, hyp = reference[op.src_start:op.src_end], predicted[op.dest_start:op.dest_end]
        if op.tag == "delete":
            pairs += [(phoneme, GAP) for phoneme in ref]
        elif op.tag == "insert":
            pairs += [(GAP, phoneme) for phoneme in hyp]
        else:  # equal or replace: one for one
            pairs += zip(ref, hyp)
    return pairs


def phoneme_confusion(df: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(labels, counts) of aligned (true, predicted) phonemes over the trials scored for PER.

    labels: the 40 phonemes in harness/phonemes.py order (SIL last), then any other symbol found
    (sorted, so nothing is silently dropped), then GAP. counts[i, j]: how often true labels[i] was
    predicted as labels[j]; the GAP column holds deletions, the GAP row insertions. All zeros when no
    trial is scored. Off the diagonal the counts sum to the summed phoneme edits.
    """
    pairs = []
    scored = _scored(df, "per")
    for ref, hyp in zip(scored["reference_phonemes"], scored["predicted_phonemes"]):
        pairs += aligned_phoneme_pairs(ref.split(), hyp.split())
    others = sorted({p for pair in pairs for p in pair} - {*INVENTORY, GAP})
    labels = [*INVENTORY, *others, GAP]
    if not pairs:
        return labels, np.zeros((len(labels), len(labels)), dtype=np.int64)
    true, predicted = zip(*pairs)
    return labels, confusion_matrix(true, predicted, labels=labels)


# --------------------------------------------------------------------------- retrieval

RANK_EDGES = (0, 1, 5, 10, 50, 100, math.inf)
RANK_LABELS = ["1", "2-5", "6-10", "11-50", "51-100", ">100"]


def _ranks(df: pd.DataFrame) -> pd.Series:
    """true_rank of the trials that have one (the trial's sentence was a candidate)."""
    return _column(df, "true_rank").dropna()


def rank_histogram(df: pd.DataFrame) -> pd.DataFrame:
    """Ranked trials per true_rank bin (every bin, empty ones too): rank (bin label), n_trials, share
    (of ranked trials). Empty frame when no trial has a rank."""
    ranks = _ranks(df)
    if ranks.empty:
        return pd.DataFrame(columns=["rank", "n_trials", "share"])
    counts = pd.cut(ranks, RANK_EDGES, labels=RANK_LABELS).value_counts(sort=False)
    return pd.DataFrame({"rank": RANK_LABELS, "n_trials": counts[RANK_LABELS].to_numpy(),
                         "share": counts[RANK_LABELS].to_numpy() / len(ranks)})


def top_k_curve(df: pd.DataFrame, ks=(1, 2, 5, 10, 20, 50, 100)) -> pd.DataFrame:
    """Top-k retrieval accuracy: k, accuracy (share of ranked trials with true_rank <= k), n_trials
    (ranked trials). Empty frame when no trial has a rank."""
    ranks = _ranks(df)
    if ranks.empty:
        return pd.DataFrame(columns=["k", "accuracy", "n_trials"])
    return pd.DataFrame({"k": list(ks), "accuracy": [float((ranks <= k).mean()) for k in ks], "n_trials": len(ranks)})


# --------------------------------------------------------------------------- paired, per session

FOREST_COLUMNS = ["session", "difference", "ci_low", "ci_high", "n_trials", "a", "b"]


def session_forest(a: pd.DataFrame, b: pd.DataFrame, metric: str, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired difference B - A of a metric ("per", "wer", "cer") on the trials both decoders scored,
    overall (session "all", first row) and per session (sorted), via paired_comparison.

    Columns: session, difference (b - a, as fractions like the rates), ci_low, ci_high (paired
    bootstrap 95% CI; NaN with one trial or n_resamples=0), n_trials, a, b (each decoder's summed
    ratio on these trials). Empty when no trial is scored by both. Raises ValueError if a decoder
    has a trial twice.
    """
    edits, count = COLUMNS[metric]
    joined = pd.merge(a[[*TRIAL_KEY, edits, count]], b[[*TRIAL_KEY, edits, count]], on=TRIAL_KEY,
                      suffixes=("_a", "_b"), validate="one_to_one")
    joined = joined.dropna(subset=[f"{edits}_a", f"{count}_a", f"{edits}_b", f"{count}_b"])
    if joined.empty:
        return pd.DataFrame(columns=FOREST_COLUMNS)
    groups = [("all", joined)] + [(session, trials) for session, trials in joined.groupby("session", sort=True)]
    rows = []
    for session, trials in groups:
        result = paired_comparison(trials[f"{edits}_a"], trials[f"{count}_a"], trials[f"{edits}_b"], trials[f"{count}_b"],
                                   n_resamples=n_resamples, seed=seed)
        ci = result["difference_ci"] or (np.nan, np.nan)
        rows.append({"session": session, "difference": result["difference"], "ci_low": ci[0], "ci_high": ci[1],
                     "n_trials": result["n_trials"], "a": result["a"], "b": result["b"]})
    return pd.DataFrame(rows, columns=FOREST_COLUMNS)
