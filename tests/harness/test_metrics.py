"""Tests of harness.metrics: hand-computed edits, summed ratios, bootstrap CIs, split summaries."""

import json
import random
from collections import namedtuple

import jiwer
import numpy as np
import pytest

from harness import metrics
from harness.metrics import (
    bootstrap_ci,
    char_edits,
    normalize_text,
    phoneme_edits,
    split_metrics,
    summed_ratio,
    trial_error_columns,
    word_edits,
)


def dp_distance(a, b):
    """Oracle for the tests only: textbook Levenshtein (unit costs) over two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The cat, sat.", "the cat sat"),
        ("  Don't   stop-now!  ", "don't stop-now"),
        ("It's 5 o'clock", "it's o'clock"),  # digits dropped, the space run collapsed
        ("tab\tand\nnewline", "tab and newline"),  # any whitespace separates words
        ("...?!", ""),
        ("", ""),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


# --------------------------------------------------------------------------- hand-computed edits


def test_phoneme_edits_counts_sil():
    assert phoneme_edits("AA B SIL", "AA SIL") == (1, 3)
    assert phoneme_edits("AA B SIL", "AA B SIL") == (0, 3)
    assert phoneme_edits("AA SIL", "") == (2, 2)  # empty prediction: all deletions
    assert phoneme_edits("AA SIL", "AA SIL SIL") == (1, 2)  # an inserted SIL is an error too


def test_word_edits_after_normalisation():
    assert word_edits("The cat, sat.", "the bat sat") == (1, 3)
    assert word_edits("Hello, World!", "hello world") == (0, 2)
    assert word_edits("a b", "a b c d") == (2, 2)  # insertions can push WER above 1


def test_char_edits_include_spaces():
    assert char_edits("ab c", "abc") == (1, 4)  # the missing space is one deletion
    assert char_edits("The cat.", "the  cat") == (0, 7)
    assert char_edits("The cat, sat.", "the bat sat") == (1, 11)


@pytest.mark.parametrize("seed", range(5))
def test_edits_match_dp_oracle(seed):
    rng = random.Random(seed)
    symbols = ["AA", "B", "SIL", "K"]
    for _ in range(50):
        ref = [rng.choice(symbols) for _ in range(rng.randint(0, 12))]
        hyp = [rng.choice(symbols) for _ in range(rng.randint(0, 12))]
        edits, count = phoneme_edits(" ".join(ref), " ".join(hyp))
        assert (edits, count) == (dp_distance(ref, hyp), len(ref))
        ref_s = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 15)))
        hyp_s = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 15)))
        ref_n, hyp_n = normalize_text(ref_s), normalize_text(hyp_s)
        assert char_edits(ref_s, hyp_s) == (dp_distance(ref_n, hyp_n), len(ref_n))


def test_word_edits_match_jiwer():
    pairs = [
        ("the quick brown fox", "the quick brown box jumps"),
        ("i want to go home now", "want to go to home"),
        ("hello there", "goodbye"),
        ("one two three four five", "five four three two one"),
    ]
    for ref, hyp in pairs:
        out = jiwer.process_words(ref, hyp)
        assert word_edits(ref, hyp)[0] == out.substitutions + out.deletions + out.insertions
        chars = jiwer.process_characters(ref, hyp)
        assert char_edits(ref, hyp)[0] == chars.substitutions + chars.deletions + chars.insertions


# --------------------------------------------------------------------------- summed ratio


def test_summed_ratio_is_not_mean_of_rates():
    edits, counts = [1, 0], [2, 10]  # rates 0.5 and 0.0
    assert summed_ratio(edits, counts) == pytest.approx(1 / 12)
    assert np.mean(np.divide(edits, counts)) == pytest.approx(0.25)


def test_summed_ratio_undefined_without_counts():
    assert summed_ratio([], []) is None
    assert summed_ratio([2, 1], [0, 0]) is None


# --------------------------------------------------------------------------- bootstrap CI


def _fake_split(n, seed=0, rate=0.2):
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 40, n)
    return rng.binomial(counts, rate), counts


def test_ci_contains_estimate_and_is_reproducible():
    edits, counts = _fake_split(200)
    lo, hi = bootstrap_ci(edits, counts, seed=3)
    assert lo <= summed_ratio(edits, counts) <= hi
    assert lo < hi
    assert bootstrap_ci(edits, counts, seed=3) == (lo, hi)
    assert bootstrap_ci(edits, counts, seed=4) != (lo, hi)


def test_ci_narrows_with_more_trials():
    edits, counts = _fake_split(50)
    lo_small, hi_small = bootstrap_ci(edits, counts)
    # the same trials ten times over: same ratio, about sqrt(10) narrower interval
    lo_big, hi_big = bootstrap_ci(np.tile(edits, 10), np.tile(counts, 10))
    assert (hi_big - lo_big) < 0.5 * (hi_small - lo_small)


def test_ci_matches_plain_numpy_resampling():
    """scipy's paired percentile bootstrap against a few lines of numpy doing the same thing."""
    edits, counts = _fake_split(300, seed=7)
    rng = np.random.default_rng(123)
    idx = rng.integers(0, len(edits), (10_000, len(edits)))
    ratios = edits[idx].sum(axis=1) / counts[idx].sum(axis=1)
    expected = np.percentile(ratios, [2.5, 97.5])
    assert bootstrap_ci(edits, counts) == pytest.approx(expected, abs=2e-3)


def test_ci_degenerate_inputs():
    assert bootstrap_ci([], []) is None
    assert bootstrap_ci([3, 1], [0, 0]) is None  # no reference tokens at all
    assert bootstrap_ci([1], [4]) == (0.25, 0.25)  # one trial: every resample is that trial
    assert bootstrap_ci([0, 0, 0], [5, 6, 7]) == (0.0, 0.0)  # perfect decoder
    # some resamples draw only the zero-count trial: they are left out, not turned into NaN
    lo, hi = bootstrap_ci([0, 3], [0, 5])
    assert (lo, hi) == pytest.approx((0.6, 0.6))


def test_ci_switched_off_with_zero_resamples():
    assert bootstrap_ci([1, 2], [3, 4], n_resamples=0) is None
    out = split_metrics([_row("s1", (1, 4), (1, 2), (1, 8))] * 3, n_resamples=0)
    assert out["per"] == pytest.approx(0.25) and out["per_ci"] is None
    assert out["by_session"]["s1"]["wer_ci"] is None


def test_ci_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        bootstrap_ci([1, 2], [3])


# --------------------------------------------------------------------------- per-trial columns


def test_trial_error_columns_full():
    cols = trial_error_columns("The cat, sat.", "the bat sat", "DH AH SIL", "DH SIL")
    assert cols == {
        "phoneme_edits": 1, "phoneme_count": 3,
        "word_edits": 1, "word_count": 3,
        "char_edits": 1, "char_count": 11,
    }


def test_trial_error_columns_none_handling():
    # unlabeled test split: nothing can be scored
    assert set(trial_error_columns(None, "hi", None, "HH AY SIL").values()) == {None}
    assert set(trial_error_columns("", "hi", "", "HH AY SIL").values()) == {None}
    # a text-only model: words and characters, no phonemes
    cols = trial_error_columns("hi", "hi", "HH AY SIL", None)
    assert cols["phoneme_edits"] is None and cols["phoneme_count"] is None
    assert (cols["word_edits"], cols["word_count"]) == (0, 1)
    # an empty prediction is a prediction: all deletions
    cols = trial_error_columns("hi there", "", "HH AY SIL", "")
    assert (cols["phoneme_edits"], cols["phoneme_count"]) == (3, 3)
    assert (cols["word_edits"], cols["word_count"]) == (2, 2)


# --------------------------------------------------------------------------- split summaries


def _row(session, p, w, c):
    """A per-trial row from (edits, count) pairs; None for a pair the row lacks."""
    row = {"session": session}
    for (e_key, n_key), pair in zip(metrics.COLUMNS.values(), (p, w, c)):
        row[e_key], row[n_key] = pair if pair is not None else (None, None)
    return row


def test_split_metrics_summed_and_by_session():
    rows = [
        _row("s1", (1, 4), (0, 2), (1, 10)),
        _row("s1", (0, 6), (1, 3), (2, 12)),
        _row("s2", (3, 10), (2, 5), (4, 20)),
    ]
    out = split_metrics(rows, n_resamples=500)
    assert out["per"] == pytest.approx(4 / 20)
    assert out["wer"] == pytest.approx(3 / 10)
    assert out["cer"] == pytest.approx(7 / 42)
    assert out["n_trials"] == 3
    for name in metrics.METRICS:
        lo, hi = out[f"{name}_ci"]
        assert lo <= out[name] <= hi
    assert set(out["by_session"]) == {"s1", "s2"}
    s1, s2 = out["by_session"]["s1"], out["by_session"]["s2"]
    assert s1["per"] == pytest.approx(1 / 10) and s1["n_trials"] == 2
    assert s2["wer"] == pytest.approx(2 / 5) and s2["wer_ci"] == [s2["wer"], s2["wer"]]
    assert "by_session" not in s1
    json.dumps(out)  # metrics.json must be able to hold it as is


def test_split_metrics_nulls_where_not_applicable():
    # a text-only model on val: no PER
    rows = [_row("s1", None, (1, 3), (2, 9)), _row("s2", None, (0, 4), (0, 15))]
    out = split_metrics(rows, n_resamples=200)
    assert out["per"] is None and out["per_ci"] is None
    assert out["by_session"]["s1"]["per"] is None
    assert out["wer"] == pytest.approx(1 / 7)
    # the unlabeled test split: nothing at all, but the trials are still counted
    out = split_metrics([_row("s1", None, None, None)] * 4)
    assert all(out[k] is None for k in ("per", "per_ci", "wer", "wer_ci", "cer", "cer_ci"))
    assert out["n_trials"] == 4 and out["by_session"]["s1"]["n_trials"] == 4
    # no rows
    assert split_metrics([])["n_trials"] == 0


def test_split_metrics_reads_csv_strings_and_records():
    """Rows read back from per_trial.csv hold strings, "" for empty; records work like dicts."""
    csv_rows = [
        {"session": "s1", "phoneme_edits": "1", "phoneme_count": "4",
         "word_edits": "", "word_count": "", "char_edits": "", "char_count": ""},
        {"session": "s1", "phoneme_edits": "2", "phoneme_count": "6",
         "word_edits": "", "word_count": "", "char_edits": "", "char_count": ""},
    ]
    out = split_metrics(csv_rows, n_resamples=200)
    assert out["per"] == pytest.approx(0.3) and out["wer"] is None

    Record = namedtuple("Record", list(csv_rows[0]))
    records = [Record(**{k: (int(v) if v.isdigit() else None) if k != "session" else v
                         for k, v in r.items()}) for r in csv_rows]
    assert split_metrics(records, n_resamples=200) == out


# --------------------------------------------------------------------------- second implementation


def test_split_metrics_match_jiwer_corpus_rates():
    """jiwer's corpus-level rates over lists of sentences are summed ratios too (all errors / all
    reference tokens): an independent implementation of PER, WER and CER, overall and per session."""
    rng = random.Random(0)
    words = "the a cat dog sat ran on under big small".split()
    symbols = ["AA", "B", "K", "SIL"]

    def noisy(tokens, vocabulary):
        out = [t for t in tokens if rng.random() > 0.15]  # deletions
        out = [rng.choice(vocabulary) if rng.random() < 0.15 else t for t in out]  # substitutions
        return out + [rng.choice(vocabulary)] * (rng.random() < 0.2)  # an insertion now and then

    rows, data = [], {"s0": ([], [], [], []), "s1": ([], [], [], [])}
    for i in range(60):
        ref = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        ref_ph = [rng.choice(symbols) for _ in range(rng.randint(1, 12))]
        hyp, hyp_ph = " ".join(noisy(ref, words)), " ".join(noisy(ref_ph, symbols))
        session = f"s{i % 2}"
        rows.append({"session": session, **trial_error_columns(" ".join(ref), hyp, " ".join(ref_ph), hyp_ph)})
        for store, value in zip(data[session], (" ".join(ref), hyp, " ".join(ref_ph), hyp_ph)):
            store.append(value)
    out = split_metrics(rows, n_resamples=0)
    refs, hyps, ref_phs, hyp_phs = (data["s0"][j] + data["s1"][j] for j in range(4))
    assert out["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert out["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert out["per"] == pytest.approx(jiwer.wer(ref_phs, hyp_phs))
    for session, (r, h, rp, hp) in data.items():
        assert out["by_session"][session]["wer"] == pytest.approx(jiwer.wer(r, h))
        assert out["by_session"][session]["per"] == pytest.approx(jiwer.wer(rp, hp))


def test_percentile_bootstrap_resamples_trials_together():
    """Row i of every array is drawn together: a statistic comparing an array with itself never moves."""
    x = np.random.default_rng(0).normal(size=50)
    lo, hi = metrics.percentile_bootstrap((x, x.copy()), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis),
                                          n_resamples=500)
    assert lo == hi == 0.0
    lo, hi = metrics.percentile_bootstrap((x,), lambda a, axis=-1: a.mean(axis), n_resamples=2000)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(50), rel=0.2)


# --------------------------------------------------------------------------- bootstrap seed and level


def _spread_rows(n=120, seed=0):
    """Rows of two sessions with varied per/wer/cer errors."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        counts = rng.integers(3, 30, 3)
        edits = rng.binomial(counts, 0.3)
        rows.append(_row(f"s{i % 2}", *zip(edits.tolist(), counts.tolist())))
    return rows


def _cis(out):
    """Every interval of a split_metrics result, overall and per session."""
    keys = [f"{name}_ci" for name in metrics.METRICS]
    return {"all": [out[k] for k in keys],
            **{session: [m[k] for k in keys] for session, m in out["by_session"].items()}}


def test_split_metrics_honours_the_bootstrap_seed():
    rows = [{**row, "true_rank": 1 + 6 * (i % 3)} for i, row in enumerate(_spread_rows())]  # ranks 1, 7, 13
    seed0, seed7 = split_metrics(rows, seed=0, n_resamples=500), split_metrics(rows, seed=7, n_resamples=500)
    assert split_metrics(rows, seed=7, n_resamples=500) == seed7  # reproducible
    for part, intervals in _cis(seed0).items():  # every interval moves with the seed, sessions included
        for a, b in zip(intervals, _cis(seed7)[part]):
            assert a != b, part

    def retrieval_cis(out, session=None):  # hit rates are coarse (k / 60): one of the two may tie
        m = out if session is None else out["retrieval_by_session"][session]
        return m["retrieval_top1_ci"], m["retrieval_top10_ci"]

    for session in (None, "s0", "s1"):
        assert retrieval_cis(seed0, session) != retrieval_cis(seed7, session), session
    assert seed0["per"] == seed7["per"] and seed0["retrieval_top1"] == seed7["retrieval_top1"]  # estimates stay


def test_configured_bootstrap_seed_reaches_the_split_metrics(small_dataset):
    """evaluation.bootstrap_seed, through the config, decode_splits and evaluate_split, is the seed of
    every interval in metrics.json: the run's CIs are split_metrics' own with that seed."""
    import torch

    from config import load_config
    from harness import runner
    from harness.data import FeatureStore
    from harness.plugins import load_plugins
    from tests.conftest import TINY_CONFIG
    from tests.tiny_plugin import TinyCTC

    class TextTiny(TinyCTC):
        """TinyCTC's phonemes, and a text missing 0, 1 or 2 words of the reference."""

        def decode(self, batch):
            rows = super().decode(batch)
            for row, trial in zip(rows, batch.trials):
                row["predicted_text"] = " ".join(trial.sentence.split()[trial.trial_num % 3:])
            return rows

    load_plugins()

    def decode(seed):
        config = load_config(TINY_CONFIG, [f"data_params.data_dir={small_dataset}", "evaluation.splits=[val]",
                                           f"evaluation.bootstrap_seed={seed}", "evaluation.bootstrap_resamples=300"])
        trials, preprocessors = runner.prepare_data(config, ["val"])
        torch.manual_seed(0)
        model = TextTiny(config.model_params)
        stores = {"val": FeatureStore(trials["val"], "hdf5")}
        rows, out = runner.decode_splits(model, config, trials, stores, preprocessors, torch.device("cpu"))
        return rows, out["val"]

    rows, seed0 = decode(0)
    again, seed7 = decode(7)
    assert again == rows  # the same model and trials: only the seed differs
    expected0, expected7 = (split_metrics(rows, seed=s, n_resamples=300) for s in (0, 7))
    assert _cis(expected0)["all"] != _cis(expected7)["all"]  # the data can tell the seeds apart
    assert expected0["wer"] is not None and expected0["per"] is not None
    assert _cis(seed0) == _cis(expected0)
    assert _cis(seed7) == _cis(expected7)


def test_ci_is_a_95_percent_interval():
    """Hits of 1000 trials, 300 of them right: every bootstrap resample's ratio is Binomial(1000, 0.3)
    / 1000, whose 2.5% and 97.5% quantiles are 0.272 and 0.329 (0.276 and 0.324 for a 90% interval).
    Checked on every interval the harness reports: per/wer/cer, per session, retrieval top-1."""
    from scipy import stats

    n, hits = 1000, 300
    expected = stats.binom.ppf([0.025, 0.975], n, hits / n) / n
    ninety = stats.binom.ppf([0.05, 0.95], n, hits / n) / n
    assert np.abs(expected - ninety).min() >= 0.003  # what the tolerance below must tell apart
    right = np.arange(n) < hits
    rows = [{**_row("s1", *[(int(not r), 1)] * 3), "true_rank": 1 if r else 2} for r in right]
    out = split_metrics(rows, seed=0, n_resamples=10_000)
    for interval in _cis(out)["all"] + _cis(out)["s1"] + [out["retrieval_top1_ci"]]:
        lo, hi = interval
        if interval is out["retrieval_top1_ci"]:
            assert (lo, hi) == pytest.approx(expected, abs=0.0015)
        else:  # error rates: the misses, 0.7
            assert (lo, hi) == pytest.approx(1 - expected[::-1], abs=0.0015)
    assert bootstrap_ci(1 - right, np.ones(n), seed=1) == pytest.approx(1 - expected[::-1], abs=0.0015)


# --------------------------------------------------------------------------- retrieval


def test_retrieval_metrics_from_true_rank():
    ranks = {"s1": [1, 3, 12], "s2": [1, 1, None, 20]}  # None: the sentence was not a candidate
    rows = [{**_row(session, None, (0, 1), (0, 1)), "true_rank": rank}
            for session, rs in ranks.items() for rank in rs]
    rows[1]["true_rank"] = "3"  # as read back from per_trial.csv
    rows[5]["true_rank"] = ""
    out = split_metrics(rows, n_resamples=200)
    assert out["retrieval_top1"] == pytest.approx(3 / 6)  # six ranked trials
    assert out["retrieval_top10"] == pytest.approx(4 / 6)
    assert out["median_true_rank"] == 2.0  # of 1 1 1 3 12 20
    lo, hi = out["retrieval_top1_ci"]
    assert lo <= 0.5 <= hi and lo < hi
    s1, s2 = out["retrieval_by_session"]["s1"], out["retrieval_by_session"]["s2"]
    assert (s1["retrieval_top1"], s1["retrieval_top10"], s1["median_true_rank"]) == pytest.approx((1 / 3, 2 / 3, 3.0))
    assert (s2["retrieval_top1"], s2["retrieval_top10"], s2["median_true_rank"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert out == {**split_metrics([{k: v for k, v in r.items() if k != "true_rank"} for r in rows], n_resamples=200),
                   **metrics.retrieval_metrics(rows, n_resamples=200)}
    json.dumps(out)


def test_no_retrieval_keys_without_true_rank():
    plain = [_row("s1", (1, 4), (1, 2), (1, 8)), _row("s2", (0, 4), (0, 2), (0, 8))]
    unranked = [{**row, "true_rank": rank} for row, rank in zip(plain, (None, ""))]
    for rows in (plain, unranked):
        out = split_metrics(rows, n_resamples=100)
        assert not [key for key in out if "retrieval" in key or "rank" in key]


# --------------------------------------------------------------------------- per corpus


def test_split_metrics_by_corpus_from_known_edits():
    """Two corpora across two sessions; a row without a corpus ("" as read back from per_trial.csv,
    or None) counts in the split and its session, not in by_corpus."""
    rows = [
        {**_row("s1", (1, 4), (0, 2), (1, 10)), "corpus": "Switchboard"},
        {**_row("s2", (3, 6), (1, 3), (2, 12)), "corpus": "Switchboard"},
        {**_row("s1", (2, 10), (2, 5), (4, 20)), "corpus": "Harvard"},
        {**_row("s2", (5, 5), (1, 1), (5, 5)), "corpus": ""},
        {**_row("s2", (5, 5), (1, 1), (5, 5)), "corpus": None},
    ]
    out = split_metrics(rows, n_resamples=500)
    assert list(out["by_corpus"]) == ["Harvard", "Switchboard"]  # sorted, no group for the unknown
    sw, hv = out["by_corpus"]["Switchboard"], out["by_corpus"]["Harvard"]
    assert (sw["per"], sw["wer"], sw["cer"], sw["n_trials"]) == pytest.approx((4 / 10, 1 / 5, 3 / 22, 2))
    assert (hv["per"], hv["wer"], hv["cer"], hv["n_trials"]) == pytest.approx((2 / 10, 2 / 5, 4 / 20, 1))
    assert hv["per_ci"] == [0.2, 0.2]  # one trial: every resample is that trial
    lo, hi = sw["per_ci"]
    assert lo <= 0.4 <= hi and lo < hi
    assert set(sw) == set(out["by_session"]["s1"]) == {*(f"{m}{e}" for m in metrics.METRICS for e in ("", "_ci")),
                                                       "n_trials"}
    assert out["n_trials"] == 5 and out["per"] == pytest.approx(16 / 30)  # the split still has every row
    json.dumps(out)


def test_by_corpus_uses_the_seed_of_by_session_and_is_empty_without_corpora():
    rows = _spread_rows(n=60)
    labelled = [{**row, "corpus": f"corpus of {row['session']}"} for row in rows]  # each corpus is one session
    for seed in (0, 7):
        out = split_metrics(labelled, seed=seed, n_resamples=300)
        assert out["by_corpus"]["corpus of s0"] == out["by_session"]["s0"]  # same rows, same seed: same CIs
        assert out["by_corpus"]["corpus of s1"] == out["by_session"]["s1"]
    assert split_metrics(labelled, seed=0, n_resamples=300)["by_corpus"] != \
        split_metrics(labelled, seed=7, n_resamples=300)["by_corpus"]
    assert split_metrics(rows, n_resamples=100)["by_corpus"] == {}  # no corpus field at all
    assert split_metrics([{**r, "corpus": ""} for r in rows], n_resamples=100)["by_corpus"] == {}
    assert split_metrics([])["by_corpus"] == {}
