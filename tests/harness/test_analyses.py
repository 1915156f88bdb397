"""harness.analyses and harness.analysis_plots on hand-made per_trial rows with answers worked out by hand."""

from __future__ import annotations

import csv
import io
import math
import warnings
from datetime import date

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness import analyses
from harness.analyses import (
    GAP,
    SECOND_EDGES,
    WORD_EDGES,
    aligned_phoneme_pairs,
    days_since_implant,
    edit_operations,
    error_by,
    few_trials,
    length_bins,
    phoneme_confusion,
    rank_histogram,
    sentence_length,
    session_date,
    session_forest,
    top_k_curve,
    trial_frame,
    trial_seconds,
)
from harness.analysis_plots import confusion_figure, edit_operations_figure, error_by_figure, forest_figure, rank_figure
from harness.metrics import trial_error_columns
from harness.paired_stats import paired_comparison
from harness.phonemes import ARPABET, SIL
from harness.results import rows_to_csv


def trial(reference_text="", predicted_text=None, reference_phonemes="", predicted_phonemes=None, *,
          session="t15.2023.08.11", split="val", block=1, number=0, **extra) -> dict:
    """A per_trial row whose error columns harness.metrics computes from the texts."""
    row = {"split": split, "session": session, "block_num": block, "trial_num": number,
           "reference_text": reference_text, "predicted_text": predicted_text,
           "reference_phonemes": reference_phonemes, "predicted_phonemes": predicted_phonemes}
    row.update(trial_error_columns(reference_text, predicted_text, reference_phonemes, predicted_phonemes))
    row.update(corpus=None, days_since_implant=None)
    row.update(extra)
    return row


def scored(wer=None, per=None, *, group=None, **keys) -> dict:
    """A row with given (edits, count) pairs instead of texts."""
    row = {"session": "t15.2023.08.11", **keys}
    if wer is not None:
        row["word_edits"], row["word_count"] = wer
    if per is not None:
        row["phoneme_edits"], row["phoneme_count"] = per
    return row


def via_csv(rows: list[dict]) -> list[dict]:
    """The rows as `compare` reads them back from per_trial.csv: all strings, "" for empty."""
    return list(csv.DictReader(io.StringIO(rows_to_csv(rows))))


# --------------------------------------------------------------------------- the trial frame


def test_trial_frame_types_csv_strings():
    rows = via_csv([trial("the cat", "the bat", "DH AH SIL", "DH SIL", n_time_steps=150),
                    trial("", None, "", None, split="test", number=1, n_time_steps="")])
    df = trial_frame(rows)
    assert df["word_edits"].tolist()[0] == 1.0 and math.isnan(df["word_edits"].tolist()[1])
    assert df["phoneme_count"].tolist()[0] == 3.0
    assert df["n_time_steps"].tolist()[0] == 150.0 and math.isnan(df["n_time_steps"].tolist()[1])
    for column in analyses.NUMERIC_COLUMNS:
        if column in df:
            assert df[column].dtype == np.float64, column
    assert df["predicted_text"].tolist() == ["the bat", ""]
    assert df["corpus"].tolist() == ["", ""]
    assert "true_rank" not in df  # optional columns only where the rows have them
    assert df["days_since_implant"].isna().all()


def test_trial_frame_dicts_with_none_and_missing_columns():
    df = trial_frame([{"session": "s.2023.01.02", "word_edits": 2, "word_count": None, "true_rank": 3},
                      {"session": None, "word_edits": None, "true_rank": None}])
    assert df["session"].tolist() == ["s.2023.01.02", ""]
    assert df["word_edits"].tolist()[0] == 2.0 and df["word_count"].isna().all()
    assert df["true_rank"].tolist()[0] == 3.0 and math.isnan(df["true_rank"].tolist()[1])
    assert df["reference_text"].tolist() == ["", ""]  # absent text column: "" everywhere
    assert "n_time_steps" not in df


def test_trial_frame_empty():
    df = trial_frame([])
    assert df.empty and {"session", "word_edits", "reference_phonemes"} <= set(df.columns)
    assert edit_operations(df).empty
    assert error_by(df, pd.Series([], dtype=float)).empty
    assert rank_histogram(df).empty and top_k_curve(df).empty
    labels, matrix = phoneme_confusion(df)
    assert len(labels) == 41 and matrix.shape == (41, 41) and matrix.sum() == 0


# --------------------------------------------------------------------------- trial properties


def test_session_date():
    assert session_date("t15.2023.08.11") == date(2023, 8, 11)
    assert session_date("synth.2024.02.29") == date(2024, 2, 29)
    assert session_date("t15.2023.13.40") is None
    assert session_date("no_date") is None
    assert session_date("") is None


def test_days_since_implant_from_column():
    df = trial_frame([scored(session="t15.2023.08.11", days_since_implant=100),
                      scored(session="t15.2023.08.20", days_since_implant="109")])
    assert days_since_implant(df).tolist() == [100.0, 109.0]


def test_days_since_implant_from_session_dates():
    df = trial_frame([scored(session="t15.2023.08.20"), scored(session="t15.2023.08.11"),
                      scored(session="t15.2023.09.01"), scored(session="undated")])
    days = days_since_implant(df).tolist()
    assert days[:3] == [9.0, 0.0, 21.0]  # from the earliest session, 2023-08-11
    assert math.isnan(days[3])


def test_days_since_implant_mixed_uses_the_implied_implant_day():
    # 2023-08-11 is day 100, so 2023-08-21 without the column is day 110 (not 10, days since the first session)
    df = trial_frame([scored(session="t15.2023.08.11", days_since_implant=100), scored(session="t15.2023.08.21")])
    assert days_since_implant(df).tolist() == [100.0, 110.0]


def test_sentence_length_and_trial_seconds():
    df = trial_frame([trial("Hello, world!", "hello"), trial("  ", "x"), trial("It's a well-known fact.", "")])
    lengths = sentence_length(df).tolist()
    assert lengths[0] == 2.0 and math.isnan(lengths[1]) and lengths[2] == 4.0
    assert trial_seconds(df).isna().all()  # an old run without n_time_steps
    timed = trial_frame([scored(n_time_steps=150), scored(n_time_steps="")])
    seconds = trial_seconds(timed).tolist()
    assert seconds[0] == pytest.approx(3.0) and math.isnan(seconds[1])


def test_length_bins_labels():
    words = length_bins(pd.Series([1, 5, 6, 10, 11, 20, 21, 100, np.nan]), WORD_EDGES, whole_numbers=True)
    assert list(words.cat.categories) == ["1-5", "6-10", "11-20", "21+"]
    assert words.tolist()[:8] == ["1-5", "1-5", "6-10", "6-10", "11-20", "11-20", "21+", "21+"]
    assert pd.isna(words.tolist()[8])
    seconds = length_bins(pd.Series([0.0, 3.0, 3.02, 12.5]), SECOND_EDGES, whole_numbers=False, unit="s")
    assert list(seconds.cat.categories) == ["0-3 s", "3-6 s", "6-9 s", "9-12 s", "12+ s"]
    assert seconds.tolist() == ["0-3 s", "0-3 s", "3-6 s", "12+ s"]
    assert length_bins(pd.Series([1, 2]), (0, 1, 2), whole_numbers=True).tolist() == ["1", "2"]


# --------------------------------------------------------------------------- error per group


def test_error_by_hand_computed():
    df = trial_frame([scored((1, 3), (2, 10)), scored((0, 2)), scored((2, 4)), scored((5, 5))])
    groups = pd.Series(["a", "a", "b", np.nan])  # the last trial has no group and is left out
    out = error_by(df, groups, n_resamples=1000, seed=0)
    assert list(out.columns) == ["group", "metric", "value", "ci_low", "ci_high", "n_trials"]
    assert list(zip(out["group"], out["metric"])) == [("a", "wer"), ("a", "per"), ("b", "wer")]  # b has no PER
    assert out["value"].tolist() == pytest.approx([0.2, 0.2, 0.5])
    assert out["n_trials"].tolist() == [2, 1, 1]
    # group a's WER resamples are (1+1)/6, (0+0)/4 or 1/5, each of the extremes a quarter of the time
    assert (out.loc[0, "ci_low"], out.loc[0, "ci_high"]) == pytest.approx((0.0, 1 / 3))
    assert (out.loc[2, "ci_low"], out.loc[2, "ci_high"]) == (0.5, 0.5)  # one trial
    no_ci = error_by(df, groups, n_resamples=0)
    assert no_ci["ci_low"].isna().all() and no_ci["value"].tolist() == pytest.approx([0.2, 0.2, 0.5])


def test_error_by_bins_in_bin_order():
    df = trial_frame([trial("one two three four five six seven", "one two"),  # 7 words, 5 deletions
                      trial("a b c d e f g h i j k l m n o p q r s t u v", "a b c d e f g h i j k l m n o p q r s t u v"),
                      trial("hi there", "hi where")])
    bins = length_bins(sentence_length(df), WORD_EDGES, whole_numbers=True)
    out = error_by(df, bins, metrics=("wer",), n_resamples=0)
    assert out["group"].tolist() == ["1-5", "6-10", "21+"]  # not the alphabetical 1-5, 21+, 6-10
    assert out["value"].tolist() == pytest.approx([0.5, 5 / 7, 0.0])


# --------------------------------------------------------------------------- edit operations


def edit_rows() -> list[dict]:
    return [
        # words: "the cat sat" -> "the bat sat on": 1 substitution, 1 insertion; phonemes: 1 deletion
        trial("The cat sat.", "the bat sat on", "DH AH SIL", "DH SIL", number=0),
        # words: 1 substitution (hello -> yellow), 1 deletion; phonemes: EH -> AH, AH inserted
        trial("hello big world", "yellow world", "HH EH SIL", "HH AH AH SIL", number=1),
        trial("no phoneme output", "no phoneme output", "N OW SIL", None, number=2),  # text right, PER not scored
        trial("", "unlabeled", "", "AH", split="test", number=3),  # nothing scored
    ]


def test_edit_operations_hand_computed():
    df = trial_frame(via_csv(edit_rows()))
    out = edit_operations(df).set_index("level")
    assert list(out.index) == ["word", "phoneme"]
    word, phoneme = out.loc["word"], out.loc["phoneme"]
    assert (word.substitutions, word.deletions, word.insertions, word.reference_count) == (2, 1, 1, 9)
    assert word.error_rate == pytest.approx(4 / 9) and word.n_trials == 3
    assert (phoneme.substitutions, phoneme.deletions, phoneme.insertions, phoneme.reference_count) == (1, 1, 1, 6)
    assert phoneme.error_rate == pytest.approx(0.5) and phoneme.n_trials == 2
    # the same edits harness.metrics counts for WER / PER
    assert word.substitutions + word.deletions + word.insertions == df["word_edits"].sum()
    assert word.reference_count == df["word_count"].sum()
    assert phoneme.substitutions + phoneme.deletions + phoneme.insertions == df["phoneme_edits"].sum()


def test_edit_operations_text_only_model():
    df = trial_frame([trial("the cat", "a cat", "DH AH K AE T", None)])
    out = edit_operations(df)
    assert out["level"].tolist() == ["word"] and out["substitutions"].tolist() == [1]


# --------------------------------------------------------------------------- phoneme confusions


def test_aligned_pairs_follow_the_alignment_not_the_position():
    # by position this would be AA/B, B/CH, CH/D, D/nothing: three substitutions instead of one deletion
    assert aligned_phoneme_pairs(["AA", "B", "CH", "D"], ["B", "CH", "D"]) == [("AA", GAP), ("B", "B"), ("CH", "CH"), ("D", "D")]
    assert aligned_phoneme_pairs([], ["AA"]) == [(GAP, "AA")]


def test_phoneme_confusion_one_deletion():
    labels, matrix = phoneme_confusion(trial_frame([trial(reference_phonemes="DH AH SIL", predicted_phonemes="DH SIL")]))
    assert labels == [*ARPABET, SIL, GAP]
    at = labels.index
    assert matrix[at("DH"), at("DH")] == 1 and matrix[at("SIL"), at("SIL")] == 1 and matrix[at("AH"), at(GAP)] == 1
    assert matrix.sum() == 3


def test_phoneme_confusion_all_trials():
    df = trial_frame(via_csv(edit_rows()))
    labels, matrix = phoneme_confusion(df)
    at = labels.index
    assert matrix[at("EH"), at("AH")] == 1  # substitution: row true, column predicted
    assert matrix[at(GAP), at("AH")] == 1  # insertion
    assert matrix[at("AH"), at(GAP)] == 1  # deletion
    assert matrix[at("HH"), at("HH")] == 1 and matrix[at("SIL"), at("SIL")] == 2
    assert matrix.sum() == 7  # two scored trials, 3 + 4 aligned pairs; the unscored N OW SIL is not in
    assert matrix.sum() - np.trace(matrix) == df["phoneme_edits"].sum()


def test_phoneme_confusion_keeps_unknown_symbols():
    labels, matrix = phoneme_confusion(trial_frame([trial(reference_phonemes="DH XX", predicted_phonemes="DH XX")]))
    assert labels[-2:] == ["XX", GAP]
    assert matrix[labels.index("XX"), labels.index("XX")] == 1


# --------------------------------------------------------------------------- retrieval


def ranked_frame() -> pd.DataFrame:
    return trial_frame(via_csv([scored(true_rank=r, trial_num=i) for i, r in enumerate([1, 1, 3, 7, 60, 200, None])]))


def test_rank_histogram():
    out = rank_histogram(ranked_frame())
    assert out["rank"].tolist() == ["1", "2-5", "6-10", "11-50", "51-100", ">100"]
    assert out["n_trials"].tolist() == [2, 1, 1, 0, 1, 1]  # the trial without a rank is not counted
    assert out["share"].tolist() == pytest.approx([2 / 6, 1 / 6, 1 / 6, 0, 1 / 6, 1 / 6])


def test_top_k_curve():
    out = top_k_curve(ranked_frame(), ks=(1, 5, 10, 100, 1000))
    assert out["k"].tolist() == [1, 5, 10, 100, 1000]
    assert out["accuracy"].tolist() == pytest.approx([2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert out["n_trials"].tolist() == [6] * 5


def test_retrieval_without_ranks_is_empty():
    no_column = trial_frame([scored((1, 2))])
    all_empty = trial_frame(via_csv([scored((1, 2), true_rank="")]))
    for df in (no_column, all_empty):
        assert rank_histogram(df).empty and top_k_curve(df).empty
        assert list(rank_histogram(df).columns) == ["rank", "n_trials", "share"]


# --------------------------------------------------------------------------- paired per session


def forest_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    a_pairs = {("s1.2023.01.01", 0): (1, 4), ("s1.2023.01.01", 1): (0, 4), ("s1.2023.01.01", 2): (2, 4),
               ("s2.2023.01.05", 0): (1, 5), ("s2.2023.01.05", 1): (1, 5), ("s2.2023.01.05", 2): None}
    b_pairs = {("s1.2023.01.01", 0): (0, 4), ("s1.2023.01.01", 1): (0, 4), ("s1.2023.01.01", 2): (1, 4),
               ("s2.2023.01.05", 0): (2, 5), ("s2.2023.01.05", 1): (0, 5), ("s2.2023.01.05", 2): (3, 5),
               ("s2.2023.01.05", 9): (1, 5)}  # trial 9 only B decoded; trial 2 only B scored

    def frame(pairs):
        return trial_frame(via_csv([scored(wer, split="val", session=s, block_num=1, trial_num=n)
                                    for (s, n), wer in pairs.items()]))
    return frame(a_pairs), frame(b_pairs)


def test_session_forest_hand_computed():
    a, b = forest_frames()
    out = session_forest(a, b, "wer", n_resamples=500, seed=1)
    assert list(out.columns) == ["session", "difference", "ci_low", "ci_high", "n_trials", "a", "b"]
    assert out["session"].tolist() == ["all", "s1.2023.01.01", "s2.2023.01.05"]
    assert out["n_trials"].tolist() == [5, 3, 2]
    assert out["a"].tolist() == pytest.approx([5 / 22, 3 / 12, 2 / 10])
    assert out["b"].tolist() == pytest.approx([3 / 22, 1 / 12, 2 / 10])
    assert out["difference"].tolist() == pytest.approx([-2 / 22, -2 / 12, 0.0])


def test_session_forest_rows_equal_paired_comparison():
    a, b = forest_frames()
    out = session_forest(a, b, "wer", n_resamples=500, seed=1).set_index("session")
    trials = {"all": ([1, 0, 2, 1, 1], [4, 4, 4, 5, 5], [0, 0, 1, 2, 0], [4, 4, 4, 5, 5]),
              "s1.2023.01.01": ([1, 0, 2], [4, 4, 4], [0, 0, 1], [4, 4, 4]),
              "s2.2023.01.05": ([1, 1], [5, 5], [2, 0], [5, 5])}
    for session, arrays in trials.items():
        expected = paired_comparison(*arrays, n_resamples=500, seed=1)
        row = out.loc[session]
        assert row.difference == pytest.approx(expected["difference"])
        assert [row.ci_low, row.ci_high] == pytest.approx(expected["difference_ci"])
        assert row.n_trials == expected["n_trials"]


def test_session_forest_edge_cases():
    a, b = forest_frames()
    assert session_forest(a, b, "per").empty  # no PER on either side
    assert session_forest(a.iloc[:0], b, "wer").empty
    with pytest.raises(ValueError):
        session_forest(pd.concat([a, a.iloc[:1]]), b, "wer")  # a trial twice


def test_few_trials():
    assert analyses.TOO_FEW_TRIALS == 30
    assert few_trials(29) and not few_trials(30)


# --------------------------------------------------------------------------- figures


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


def error_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["group", "metric", "value", "ci_low", "ci_high", "n_trials"])


def test_error_by_figure_categories():
    a = error_frame([("1-5", "wer", 0.2, 0.1, 0.3, 40), ("6-10", "wer", 0.3, 0.2, 0.4, 10),
                     ("1-5", "per", 0.1, 0.05, 0.15, 40), ("6-10", "per", 0.15, 0.1, 0.2, 10)])
    b = error_frame([("1-5", "wer", 0.25, 0.2, 0.3, 50)])
    title = "Word and phoneme error rates by sentence length on the validation split"  # as wide as the figure
    fig = error_by_figure([("A", a), ("B", b)], "sentence length (words)", title)
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # one panel per metric
    wer_ax, per_ax = fig.axes
    assert len(wer_ax.containers) == 3  # A filled, A hollow (10 trials), B
    assert len(per_ax.containers) == 2
    assert [t.get_text() for t in per_ax.get_xticklabels()] == ["1-5", "6-10"]
    assert wer_ax.get_ylabel() == "WER" and per_ax.get_ylabel() == "PER"
    assert fig.get_suptitle().startswith(title)
    assert png(fig).startswith(b"\x89PNG")
    # the one legend lies outside every panel and below nothing: it covers neither the data nor the title
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert not legend.overlaps(fig._suptitle.get_window_extent(renderer))


def test_error_by_figure_numeric_groups():
    a = error_frame([(0.0, "wer", 0.2, 0.1, 0.3, 40), (30.0, "wer", 0.3, 0.2, 0.4, 40)])
    fig = error_by_figure([("A", a)], "days since implant", "WER over time")
    (ax,) = fig.axes
    line = ax.containers[0].lines[0]
    assert line.get_xdata().tolist() == [0.0, 30.0]  # one decoder: no offset, days as they are
    assert line.get_ydata().tolist() == [0.2, 0.3]


def test_error_by_figure_empty():
    assert error_by_figure([], "x", "t") is None
    assert error_by_figure([("A", error_frame([]))], "x", "t") is None


def test_edit_operations_figure():
    df = trial_frame(via_csv(edit_rows()))
    fig = edit_operations_figure([("A", edit_operations(df)), ("B", edit_operations(df.iloc[:1]))])
    assert len(fig.axes) == 2  # word, phoneme
    word_ax = fig.axes[0]
    assert len(word_ax.patches) == 6  # S, D, I for each decoder
    heights = [p.get_height() for p in word_ax.patches[:3]]
    assert heights == pytest.approx([2 / 9, 1 / 9, 1 / 9])
    tops = [p.get_y() + p.get_height() for p in word_ax.patches]
    assert tops[2] == pytest.approx(4 / 9) and tops[5] == pytest.approx(2 / 3)  # stacks reach the WER
    assert [t.get_text() for t in word_ax.get_xticklabels()] == ["1", "2"]  # numbered bars, named in the legend
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["1: A", "2: B"]
    assert png(fig).startswith(b"\x89PNG")
    assert edit_operations_figure([("A", edit_operations(trial_frame([])))]) is None


def test_edit_operations_figure_with_long_labels_keeps_its_panels():
    """Four decoders named by full paths: constrained layout still applies (no warning) and each panel
    keeps a real width."""
    operations = edit_operations(trial_frame(via_csv(edit_rows())))
    folder = "/tmp/pytest-of-someone/pytest-123/test_runs_with_the_same_folder0/results/group"
    fig = edit_operations_figure([(f"{folder}/run_{i}", operations) for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied" is a UserWarning
        png(fig)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    widths = [ax.get_window_extent(canvas.get_renderer()).width / fig.dpi for ax in fig.axes]
    assert len(widths) == 2 and min(widths) > 2.0  # inches


def test_confusion_figure():
    labels, matrix = phoneme_confusion(trial_frame([trial(reference_phonemes="DH AH SIL AH", predicted_phonemes="DH SIL AA")]))
    fig = confusion_figure(labels, matrix, "phoneme confusions")
    assert len(fig.axes) == 2  # the heat map and its colour bar
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == ["AA", "AH", "DH", "SIL", GAP]  # inventory order, unused phonemes dropped, gap kept
    shares = ax.images[0].get_array()
    assert shares[names.index("AH")].tolist() == pytest.approx([0.5, 0, 0, 0, 0.5])  # AH -> AA once, deleted once
    assert shares[names.index(GAP)].tolist() == [0] * 5  # no insertion
    assert shares[names.index("AA")].tolist() == [0] * 5  # AA never true: kept as a predicted column
    assert png(fig).startswith(b"\x89PNG")
    assert confusion_figure(labels, np.zeros_like(matrix), "t") is None


def test_rank_figure():
    ranked, unranked = ranked_frame(), trial_frame([scored((1, 2))])
    fig = rank_figure([("A", rank_histogram(ranked), top_k_curve(ranked)),
                       ("B", rank_histogram(unranked), top_k_curve(unranked))])
    bars, curves = fig.axes
    assert len(bars.patches) == 6 and len(curves.lines) == 1
    assert curves.get_xscale() == "log"
    assert curves.lines[0].get_color() == "C0"
    assert png(fig).startswith(b"\x89PNG")
    assert rank_figure([("B", rank_histogram(unranked), top_k_curve(unranked))]) is None


def test_forest_figure():
    a, b = forest_frames()
    forest = session_forest(a, b, "wer", n_resamples=200)
    fig = forest_figure(forest, "old", "new", "wer")
    (ax,) = fig.axes
    assert len(ax.containers) == 3  # all + two sessions
    first = ax.containers[0].lines[0]
    assert first.get_xdata().tolist() == pytest.approx([-200 / 22])  # percentage points
    assert first.get_ydata().tolist() == [2]  # "all" at the top
    rows = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    assert rows == {2: "all (n=5)", 1: "s1.2023.01.01 (n=3)", 0: "s2.2023.01.05 (n=2)"}
    assert ax.get_xlabel() == "B − A (WER points)"
    assert any(line.get_xdata()[0] == 0 for line in ax.lines if len(line.get_xdata()) == 2)  # the line at 0
    assert png(fig).startswith(b"\x89PNG")
    assert forest_figure(forest.iloc[:0], "old", "new", "wer") is None
