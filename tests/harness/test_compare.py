"""Tests of `compare` and the run folders it reads: atomic writes under a killed writer, refusal on
different data, unfinished runs, the tables, paired statistics, plots and example sentences.

Run folders are built by hand in tmp dirs with the contract's files (no training), so these stay fast.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

import main
from harness import plots, results
from harness.compare import compare
from harness.errors import UserError
from harness.metrics import split_metrics
from harness.paired_stats import paired_comparison, wilcoxon_signed_rank
from harness.run_reader import read_scalars
from tests.conftest import REPO_ROOT

N_RESAMPLES = 2000  # enough for stable intervals, cheap enough for the suite
# test -> the PNGs it looks at (their name prefixes; None: every PNG, end to end): drawn for real
RENDERED = {"test_plots_are_written_and_not_empty": None,
            "test_training_curves_fall_back_to_the_validation_history": ("training_curves",),
            "test_per_corpus_results_come_from_metrics_json": ("per_corpus_",)}


@pytest.fixture(autouse=True)
def unrendered(request, monkeypatch):
    """Figures are built but not rendered (savefig is most of a comparison's time): each PNG is a stub,
    but those a test looks at (RENDERED)."""
    name = request.function.__name__
    if name in RENDERED and RENDERED[name] is None:
        return
    real_save = plots._save

    def save(fig, path):
        if path.name.startswith(RENDERED.get(name, ())):
            return real_save(fig, path)
        path.write_bytes(b"not rendered")
        return path

    monkeypatch.setattr("harness.plots._save", save)


# --------------------------------------------------------------------------- fake run folders


def trial_row(i, *, split="val", session=None, phonemes=None, words=None, predicted_text="", true_rank=None):
    """One per_trial.csv row; phonemes / words are (edits, count) or None."""
    row = {"split": split, "session": session or f"s{i % 2}", "block_num": 1, "trial_num": i,
           "reference_text": f"sentence {i}", "predicted_text": predicted_text,
           "reference_phonemes": "S EH N SIL", "predicted_phonemes": f"pred {i}" if phonemes else "",
           "phoneme_edits": None, "phoneme_count": None, "word_edits": None, "word_count": None,
           "char_edits": None, "char_count": None}
    if phonemes:
        row["phoneme_edits"], row["phoneme_count"] = phonemes
    if words:
        row["word_edits"], row["word_count"] = words
        row["char_edits"], row["char_count"] = words[0] * 3, words[1] * 5
    if true_rank is not None:
        row["true_rank"] = true_rank
    return row


def make_run(path, rows, *, keys_hash="data-1", content_hash=None, by_split=None, done=True, model="ctc",
             trial="tiny", extra_metrics=None, wall_seconds=61.0, history=None, hash_version=None):
    """A run folder per the results contract; metrics.json computed from the rows as the runner does."""
    path.mkdir(parents=True)
    results.atomic_write_text(path / "config.yaml", f"trial_name: {trial}\nmodel_constructor_name: {model}\n")
    results.write_rows_csv(path / "per_trial.csv", rows)
    metrics = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        metrics[split] = split_metrics([r for r in rows if r["split"] == split], n_resamples=N_RESAMPLES)
        metrics[split].update((extra_metrics or {}).get(split, {}))
    metrics["run"] = {"trial_name": trial, "model": model, "steps": 100, "best_step": 100,
                      "validation_history": history or []}
    results.write_json(path / "metrics.json", metrics)
    results.write_json(path / "meta.json", {
        "wall_seconds": wall_seconds, "device": "cpu",
        "data_fingerprint": {"sessions": ["s0", "s1"], "n_trials": {"val": len(rows)},
                             "keys_hash": keys_hash, "content_hash": content_hash, "by_split": by_split,
                             **({"features_hash_version": hash_version} if hash_version else {})}})
    if done:
        results.mark_done(path)
    return path


def squeeze(text):
    """comparison.md with its tables' cells unpadded ("| a | b |"): DataFrame.to_markdown pads every
    cell to its column's width, which these tests do not pin down. Escaped pipes (\\|) stay."""
    return "\n".join(line if set(line) <= set("|:- ") else re.sub(r" *(?<!\\)\| *", " | ", line).strip()
                     for line in text.splitlines())


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def better_by_known_amount(n=200, count=15, improved=60, seed=0):
    """Edits of decoders A and B on the same n trials of `count` phonemes each: B has exactly one
    edit fewer on `improved` trials, so B's PER is lower by improved / (n * count) exactly."""
    rng = np.random.default_rng(seed)
    a = rng.binomial(count, 0.3, n) + 1  # at least one edit, so B can have one fewer
    b = a.copy()
    b[rng.choice(n, improved, replace=False)] -= 1
    return a, b, np.full(n, count)


@pytest.fixture
def two_runs(tmp_path):
    a, b, counts = better_by_known_amount()
    run_a = make_run(tmp_path / "runs" / "a", [trial_row(i, phonemes=(a[i], counts[i])) for i in range(len(a))],
                     trial="worse")
    run_b = make_run(tmp_path / "runs" / "b", [trial_row(i, phonemes=(b[i], counts[i])) for i in range(len(b))],
                     trial="better", model="gru_align", wall_seconds=3725.0)
    return run_a, run_b


def run_compare(*args):
    """main.main in process; returns (exit status, stdout, stderr) through capsys in the caller."""
    return main.main(["compare", *map(str, args)])


# --------------------------------------------------------------------------- atomic writes


WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from harness import results

    run_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
    real_fsync = os.fsync

    def stall(fd):  # the data is written, not yet renamed: be killed here
        ready.write_text("writing")
        time.sleep(60)

    results.write_rows_csv(run_dir / "per_trial.csv", [{"split": "val", "session": "s0"}] * 3)
    os.fsync = stall
    results.write_json(run_dir / "metrics.json", {"val": {"per": 0.25, "pad": "x" * 1_000_000}})
    results.mark_done(run_dir)
""")


@pytest.mark.parametrize("metrics_before", [None, '{"val": {"per": 0.5}}\n'], ids=["new-file", "replacing"])
def test_killed_writer_leaves_no_half_file_and_no_done(tmp_path, capsys, metrics_before):
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("trial_name: x\n")
    if metrics_before:
        (run_dir / "metrics.json").write_text(metrics_before)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(ready)], cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 60
    while not ready.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the writer never reached the write of metrics.json"
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    assert len(read_csv(run_dir / "per_trial.csv")) == 3  # written before: whole
    if metrics_before:
        assert (run_dir / "metrics.json").read_text() == metrics_before  # the old file, untouched
    else:
        assert not (run_dir / "metrics.json").exists()  # no half file under the real name
    assert not (run_dir / "DONE").exists()
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(name.startswith(".metrics.json.") for name in leftovers)

    with pytest.raises(UserError, match="no finished run"):
        compare([str(run_dir)], str(tmp_path / "cmp"))
    assert f"unfinished (no DONE), left out: {run_dir}" in capsys.readouterr().out


def test_written_files_get_the_usual_permissions(tmp_path):
    """Like any file the user creates (umask applies), not owner-only as a bare temporary file is."""
    mask = os.umask(0o027)
    try:
        results.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- which runs are compared


def test_refuses_runs_on_different_data_unless_forced(two_runs, tmp_path, capsys):
    run_a, _ = two_runs
    other = make_run(tmp_path / "runs" / "other", [trial_row(i, phonemes=(1, 10)) for i in range(5)],
                     keys_hash="data-2")
    assert run_compare(run_a, other, "--out", tmp_path / "cmp") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: these runs read different data") and "--force" in err
    assert "a (data data-1)" in err and "other (data data-2)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cmp").exists()

    assert run_compare(run_a, other, "--out", tmp_path / "cmp", "--force") == 0
    assert "warning: comparing runs on different data" in capsys.readouterr().out
    assert "**Warning: compared with --force" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_content_hash_missing_on_one_side_is_not_a_difference(two_runs, tmp_path):
    run_a, _ = two_runs
    rows = [trial_row(i, phonemes=(1, 10)) for i in range(5)]
    hashed = make_run(tmp_path / "runs" / "hashed", rows, content_hash="features-1")
    compare([str(run_a), str(hashed)], str(tmp_path / "cmp"), n_resamples=200)  # None vs features-1: fine
    changed = make_run(tmp_path / "runs" / "changed", rows, content_hash="features-2")
    with pytest.raises(UserError, match="different data"):
        compare([str(hashed), str(changed)], str(tmp_path / "cmp2"), n_resamples=200)


def test_runs_that_read_more_splits_of_the_same_data_are_compared(tmp_path):
    """A run that also decoded test (or an `evaluate` run that read val only) read the same data as
    one that did not: per-split hashes are compared on the splits both read."""
    rows = [trial_row(i, phonemes=(1, 5)) for i in range(4)]
    same = {"train": {"keys_hash": "k-train", "features_hash": None}, "val": {"keys_hash": "k-val", "features_hash": "f"}}
    run_a = make_run(tmp_path / "a", rows, keys_hash="all-1", by_split=same)
    run_b = make_run(tmp_path / "b", rows, keys_hash="all-2",
                     by_split={**same, "test": {"keys_hash": "k-test", "features_hash": None}})
    run_eval = make_run(tmp_path / "eval", rows, keys_hash="all-3", by_split={"val": same["val"]})
    compare([str(run_a), str(run_b), str(run_eval)], str(tmp_path / "cmp"), n_resamples=200)
    assert len(read_csv(tmp_path / "cmp" / "comparison.csv")) == 3

    other_val = make_run(tmp_path / "other", rows, keys_hash="all-1",
                         by_split={**same, "val": {"keys_hash": "k-val", "features_hash": "g"}})
    with pytest.raises(UserError, match="different data"):
        compare([str(run_a), str(other_val)], str(tmp_path / "cmp2"), n_resamples=200)


def test_features_hashes_of_different_versions_are_not_compared(tmp_path):
    """A 0.2 run folder (features hashed as one stream, no version) against a 0.3 one (per-trial digests,
    version 2) on the same data: the keys and labels decide; two version-2 hashes that differ do not match."""
    rows = [trial_row(i, phonemes=(1, 5)) for i in range(4)]
    val = {"keys_hash": "k-val"}
    old = make_run(tmp_path / "old", rows, by_split={"val": {**val, "features_hash": "stream"}})
    new = make_run(tmp_path / "new", rows, by_split={"val": {**val, "features_hash": "digests"}}, hash_version=2)
    compare([str(old), str(new)], str(tmp_path / "cmp"), n_resamples=200)
    other = make_run(tmp_path / "other", rows, by_split={"val": {**val, "features_hash": "other"}}, hash_version=2)
    with pytest.raises(UserError, match="different data"):
        compare([str(new), str(other)], str(tmp_path / "cmp2"), n_resamples=200)


def test_fingerprint_of_a_split_does_not_depend_on_the_other_splits_read(small_dataset):
    from harness.data import FeatureStore, find_sessions, fingerprint, read_trials

    sessions = find_sessions(small_dataset)
    trials = {s: read_trials(small_dataset, sessions, s, 512) for s in ("train", "val", "test")}
    stores = {s: FeatureStore(ts, "memory") for s, ts in trials.items()}
    with_test = fingerprint(trials, stores)
    without = fingerprint({s: trials[s] for s in ("train", "val")}, {s: stores[s] for s in ("train", "val")})
    assert with_test["keys_hash"] != without["keys_hash"]
    assert set(with_test["by_split"]) == {"train", "val", "test"} and set(without["by_split"]) == {"train", "val"}
    for split in ("train", "val"):
        assert with_test["by_split"][split] == without["by_split"][split]
        assert with_test["by_split"][split]["features_hash"] is not None
    assert with_test["by_split"]["train"]["keys_hash"] != with_test["by_split"]["val"]["keys_hash"]


def test_unfinished_runs_are_listed_not_used(two_runs, tmp_path, capsys):
    unfinished = make_run(tmp_path / "runs" / "c_unfinished", [trial_row(0, phonemes=(0, 4))], done=False)
    out = tmp_path / "runs" / "comparison"  # inside the results folder: never taken for a run
    assert run_compare("--results-dir", tmp_path / "runs", "--out", out) == 0
    assert f"unfinished (no DONE), left out: {unfinished}" in capsys.readouterr().out
    assert [r["run"] for r in read_csv(out / "comparison.csv")] == ["a", "b"]
    assert f"- `{unfinished}`" in (out / "comparison.md").read_text()
    assert run_compare("--results-dir", tmp_path / "runs", "--out", out) == 0  # a second time too


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    rows = [trial_row(i, phonemes=(i, 5)) for i in range(4)]
    first, second = make_run(tmp_path / "x" / "run", rows), make_run(tmp_path / "y" / "run", rows)
    compare([str(first), str(second)], str(tmp_path / "cmp"), n_resamples=200)
    assert [r["run"] for r in read_csv(tmp_path / "cmp" / "comparison.csv")] == [str(first), str(second)]
    (pair,) = read_csv(tmp_path / "cmp" / "paired.csv")
    assert (pair["run_a"], pair["run_b"]) == (str(first), str(second))


def test_a_duplicated_trial_is_refused(tmp_path):
    rows = [trial_row(0, phonemes=(1, 4)), trial_row(0, phonemes=(2, 4))]
    run = make_run(tmp_path / "dup", rows)
    with pytest.raises(UserError, match="appears twice"):
        compare([str(run)], str(tmp_path / "cmp"), n_resamples=200)


# --------------------------------------------------------------------------- the tables


def test_comparison_table_from_hand_made_runs(tmp_path):
    rows_a = [trial_row(0, phonemes=(1, 4), words=(1, 2)), trial_row(1, phonemes=(3, 6), words=(0, 3)),
              trial_row(2, split="test")]  # unlabeled: nothing scored
    rows_b = [trial_row(0, phonemes=(0, 4)), trial_row(1, phonemes=(2, 6))]  # a phoneme-only model
    run_a = make_run(tmp_path / "a", rows_a, model="llm", trial="big")
    run_b = make_run(tmp_path / "b", rows_b, wall_seconds=3725)
    compare([str(run_a), str(run_b)], str(tmp_path / "cmp"), n_resamples=N_RESAMPLES)

    table = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert [(r["run"], r["split"]) for r in table] == [("a", "val"), ("b", "val")]  # test: no labels, left out
    a, b = table
    assert a["decoder"] == "llm (big)" and b["decoder"] == "ctc (tiny)"
    assert float(a["per"]) == pytest.approx(4 / 10) and float(a["wer"]) == pytest.approx(1 / 5)
    assert float(a["cer"]) == pytest.approx(3 / 25)
    assert float(b["per"]) == pytest.approx(2 / 10) and b["wer"] == "" and b["wer_ci_low"] == ""
    for row in (a, b):
        assert float(row["per_ci_low"]) <= float(row["per"]) <= float(row["per_ci_high"])
    assert a["n_trials"] == "2" and b["wall_seconds"] == "3725" and a["steps"] == "100"
    assert "retrieval_top1" not in a  # no retrieval anywhere: no such column

    report = squeeze((tmp_path / "cmp" / "comparison.md").read_text())
    assert "| a | llm (big) | val | 40.0% [" in report
    assert "| b | ctc (tiny) | val | 20.0% [" in report and "| 1 h 2 min |" in report
    assert "top-1" not in report


def test_retrieval_accuracy_where_present(tmp_path):
    ranks_a = [1, 3, 1, 12, 2, 1]
    ranks_b = [1, 1, 1, 1, 2, 1]
    runs = []
    for name, ranks in (("a", ranks_a), ("b", ranks_b)):
        rows = [trial_row(i, phonemes=(1, 5), true_rank=r) for i, r in enumerate(ranks)]
        top1 = sum(r == 1 for r in ranks) / len(ranks)
        top10 = sum(r <= 10 for r in ranks) / len(ranks)
        own_ci = {"retrieval_top1_ci": [0.5, 1.0]} if name == "b" else {}  # the run's own CI, when it has one
        runs.append(make_run(tmp_path / name, rows, extra_metrics={
            "val": {"retrieval_top1": top1, "retrieval_top10": top10, "n_candidates": 50, **own_ci}}))
    plain = make_run(tmp_path / "plain", [trial_row(i, phonemes=(2, 5)) for i in range(6)])
    compare([str(r) for r in (*runs, plain)], str(tmp_path / "cmp"), n_resamples=N_RESAMPLES)

    table = {r["run"]: r for r in read_csv(tmp_path / "cmp" / "comparison.csv")}
    assert float(table["a"]["retrieval_top1"]) == pytest.approx(0.5)
    assert float(table["a"]["retrieval_top10"]) == pytest.approx(5 / 6)
    assert float(table["b"]["retrieval_top1"]) == pytest.approx(5 / 6) and table["b"]["n_candidates"] == "50"
    lo, hi = float(table["a"]["retrieval_top1_ci_low"]), float(table["a"]["retrieval_top1_ci_high"])
    assert lo < 0.5 < hi  # resampled from true_rank
    assert (table["b"]["retrieval_top1_ci_low"], table["b"]["retrieval_top1_ci_high"]) == ("0.5", "1.0")
    assert table["plain"]["retrieval_top1"] == "" and table["plain"]["n_candidates"] == ""

    paired = read_csv(tmp_path / "cmp" / "paired.csv")
    top1 = next(p for p in paired if (p["run_a"], p["run_b"], p["metric"]) == ("a", "b", "retrieval_top1"))
    assert float(top1["difference"]) == pytest.approx(2 / 6)  # B finds the sentence first 2 more times in 6
    assert (top1["b_better"], top1["a_better"], top1["equal"]) == ("2", "0", "4")
    assert not any(p["metric"].startswith("retrieval") and "plain" in (p["run_a"], p["run_b"]) for p in paired)
    assert "top-1 accuracy" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_ranks_counted_from_zero_are_refused(tmp_path):
    run = make_run(tmp_path / "a", [trial_row(i, phonemes=(1, 5), true_rank=i) for i in range(3)])
    with pytest.raises(UserError, match="ranks count from 1"):
        compare([str(run)], str(tmp_path / "cmp"), n_resamples=200)


# --------------------------------------------------------------------------- paired statistics


def test_paired_difference_of_a_known_amount():
    a, b, counts = better_by_known_amount()
    out = paired_comparison(a, counts, b, counts, n_resamples=N_RESAMPLES)
    assert out["difference"] == pytest.approx(-60 / 3000)  # exactly 60 edits fewer in 3000 phonemes
    lo, hi = out["difference_ci"]
    assert lo <= -0.02 <= hi and hi < 0  # B is better, and the trials say so
    assert (out["b_better"], out["a_better"], out["equal"]) == (60, 0, 140)
    assert out["wilcoxon_p"] < 1e-6

    swapped = paired_comparison(b, counts, a, counts, n_resamples=N_RESAMPLES)
    assert swapped["difference"] == pytest.approx(0.02)
    assert swapped["difference_ci"] == pytest.approx([-hi, -lo])
    assert swapped["wilcoxon_p"] == pytest.approx(out["wilcoxon_p"])
    assert (swapped["b_better"], swapped["a_better"]) == (0, 60)


def test_paired_ci_matches_plain_numpy_resampling():
    a, b, counts = better_by_known_amount(seed=3)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, len(a), (10_000, len(a)))
    diffs = b[idx].sum(1) / counts[idx].sum(1) - a[idx].sum(1) / counts[idx].sum(1)
    expected = np.percentile(diffs, [2.5, 97.5])
    assert paired_comparison(a, counts, b, counts)["difference_ci"] == pytest.approx(expected, abs=1e-3)


def test_pairing_narrows_the_interval():
    """Two decoders that fail on the same hard trials: the paired CI of the difference is far
    narrower than what the two separate CIs would suggest."""
    rng = np.random.default_rng(0)
    counts = np.full(300, 20)
    a = rng.binomial(counts, rng.uniform(0.05, 0.6, 300))  # trial difficulty varies a lot
    b = np.clip(a + rng.integers(-1, 2, 300), 0, None)
    out = paired_comparison(a, counts, b, counts, n_resamples=N_RESAMPLES)
    from harness.metrics import bootstrap_ci

    (a_lo, a_hi), (b_lo, b_hi) = bootstrap_ci(a, counts, N_RESAMPLES), bootstrap_ci(b, counts, N_RESAMPLES)
    unpaired_width = np.hypot(a_hi - a_lo, b_hi - b_lo)
    lo, hi = out["difference_ci"]
    assert hi - lo < 0.3 * unpaired_width


def test_paired_statistics_of_identical_decoders():
    a, _, counts = better_by_known_amount()
    out = paired_comparison(a, counts, a, counts, n_resamples=N_RESAMPLES)
    assert out["difference"] == 0 and out["difference_ci"] == [0.0, 0.0]
    assert out["equal"] == len(a) and out["wilcoxon_p"] is None and out["wilcoxon_statistic"] is None


def test_wilcoxon_drops_ties_and_matches_scipy_on_the_rest():
    from scipy.stats import wilcoxon

    a = [3, 2, 5, 1, 4, 4, 2, 6]
    b = [2, 2, 3, 1, 1, 5, 0, 6]  # three ties
    stat, p = wilcoxon_signed_rank(a, b)
    nonzero = [y - x for x, y in zip(a, b) if y != x]
    assert (stat, p) == pytest.approx(tuple(wilcoxon(nonzero)))
    assert 0 < p < 1


def test_paired_csv_and_report_from_runs(two_runs, tmp_path):
    run_a, run_b = two_runs
    compare([str(run_a), str(run_b)], str(tmp_path / "cmp"), n_resamples=N_RESAMPLES)
    (row,) = read_csv(tmp_path / "cmp" / "paired.csv")  # one split, one shared metric
    assert (row["split"], row["run_a"], row["run_b"], row["metric"]) == ("val", "a", "b", "per")
    assert float(row["difference"]) == pytest.approx(-0.02) and row["n_trials"] == "200"
    assert float(row["difference_ci_high"]) < 0 and float(row["wilcoxon_p"]) < 1e-6
    report = squeeze((tmp_path / "cmp" / "comparison.md").read_text())
    assert "| a | b | PER | 200 |" in report and "-2.0 pts [" in report and "| 60 / 0 / 140 | < 0.0001 |" in report


def test_pairs_join_on_trial_keys_not_row_order(tmp_path):
    rows = [trial_row(i, phonemes=(i % 3, 5)) for i in range(6)]
    run_a = make_run(tmp_path / "a", rows)
    run_b = make_run(tmp_path / "b", list(reversed(rows[1:])))  # other order, one trial missing
    compare([str(run_a), str(run_b)], str(tmp_path / "cmp"), n_resamples=200)
    (row,) = read_csv(tmp_path / "cmp" / "paired.csv")
    assert row["n_trials"] == "5" and float(row["difference"]) == 0 and row["equal"] == "5"


# --------------------------------------------------------------------------- plots and examples


def _assert_real_png(path):
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plots_are_written_and_not_empty(two_runs, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_a, run_b = two_runs
    for run, scale in ((run_a, 1.0), (run_b, 0.8)):
        writer = SummaryWriter(str(run / "tensorboard"))
        for step in range(10, 110, 10):
            writer.add_scalar("train/loss", scale * 100 / step, step)
            if step % 50 == 0:
                writer.add_scalar("val/per", scale * 5 / step, step)
        writer.close()
    compare([str(run_a), str(run_b)], str(tmp_path / "cmp"), n_resamples=200)
    for name in ("per_session_val.png", "training_curves.png"):
        _assert_real_png(tmp_path / "cmp" / name)
        assert f"]({name})" in (tmp_path / "cmp" / "comparison.md").read_text()
        pixels = imread(tmp_path / "cmp" / name)[..., :3].reshape(-1, 3)
        for colour in ("C0", "C1"):  # each run in its own colour
            assert (np.abs(pixels - to_rgb(colour)).max(axis=1) < 0.02).sum() > 50, (name, colour)


def test_training_curves_fall_back_to_the_validation_history(tmp_path):
    history = [{"step": 50, "loss": 3.0, "per": 0.6}, {"step": 100, "loss": 2.0, "per": 0.4}]
    run = make_run(tmp_path / "a", [trial_row(i, phonemes=(1, 4)) for i in range(4)], history=history)
    compare([str(run)], str(tmp_path / "cmp"), n_resamples=200)
    _assert_real_png(tmp_path / "cmp" / "training_curves.png")
    assert (tmp_path / "cmp" / "paired.csv").read_text().startswith("split,run_a,run_b,metric,")  # header, no pairs

    no_curves = make_run(tmp_path / "b", [trial_row(i, phonemes=(1, 4)) for i in range(4)])  # e.g. `evaluate`
    compare([str(no_curves)], str(tmp_path / "cmp"), n_resamples=200)
    assert not (tmp_path / "cmp" / "training_curves.png").exists()  # the earlier one would mislead
    assert "training_curves.png" not in (tmp_path / "cmp" / "comparison.md").read_text()


def test_read_scalars_keeps_the_last_value_of_a_step_logged_twice(tmp_path):
    """A resumed run has two event files that both hold the steps redone after the checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path))
    for step in (10, 20, 30):
        first.add_scalar("train/loss", float(step), step)
    first.close()
    time.sleep(1.1)  # event file names carry the second they were made
    second = SummaryWriter(str(tmp_path))
    for step in (30, 40):
        second.add_scalar("train/loss", step + 0.5, step)
    second.close()
    assert read_scalars(tmp_path)["train/loss"] == [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]


def test_example_sentences_show_where_decoders_disagree_most(tmp_path):
    rows_a = [trial_row(i, phonemes=(1, 5)) for i in range(10)]
    rows_b = [trial_row(i, phonemes=(1, 5), words=(0, 2), predicted_text=f"words {i}") for i in range(10)]
    rows_b[7]["phoneme_edits"] = 5  # the one trial where they disagree
    rows_b[7]["predicted_phonemes"] = "AA | AA"  # a pipe must not break the table
    compare([str(make_run(tmp_path / "a", rows_a)), str(make_run(tmp_path / "b", rows_b))],
            str(tmp_path / "cmp"), n_resamples=200)
    examples = squeeze((tmp_path / "cmp" / "comparison.md").read_text()).split("## Example sentences (val)")[1]
    assert "The trial where the decoders' per-trial PER differ most, then the first 3 trials." in examples
    shown = [line.split("|")[1].strip() for line in examples.splitlines() if "| reference |" in line]
    assert shown == ["s1 block 1 trial 7", "s0 block 1 trial 0", "s1 block 1 trial 1", "s0 block 1 trial 2"]
    assert "| sentence 7 |" in examples and "| b (phonemes) | AA \\| AA | 5/5 PER |" in examples
    assert "| b (text) | words 7 | 0/2 WER |" in examples and "| a | pred 7 | 1/5 PER |" in examples
    assert "| reference phonemes | S EH N SIL |" in examples


# --------------------------------------------------------------------------- per corpus


def test_per_corpus_results_come_from_metrics_json(tmp_path):
    def rows(edits):  # trials 0-3 Switchboard, 4-5 Harvard, 6 without a corpus; 5 phonemes each
        out = [trial_row(i, phonemes=(e, 5)) for i, e in enumerate(edits)]
        for row in out:
            row["corpus"] = "Switchboard" if row["trial_num"] < 4 else "Harvard" if row["trial_num"] < 6 else None
        return out

    run_a = make_run(tmp_path / "a", rows([1, 2, 0, 1, 3, 3, 5]))
    run_b = make_run(tmp_path / "b", rows([0, 1, 0, 1, 2, 1, 5]), trial="better")
    metrics_b = json.loads((run_b / "metrics.json").read_text())
    metrics_b["val"]["by_corpus"]["Harvard"].update(per=0.123, per_ci=[0.1, 0.15])  # shown as is, not recomputed (3/10)
    results.write_json(run_b / "metrics.json", metrics_b)
    old = make_run(tmp_path / "old", rows([1, 1, 1, 1, 1, 1, 1]), trial="old")  # written before by_corpus
    metrics_old = json.loads((old / "metrics.json").read_text())
    del metrics_old["val"]["by_corpus"]
    results.write_json(old / "metrics.json", metrics_old)
    unlabelled = make_run(tmp_path / "nocsv", [trial_row(i, phonemes=(1, 5)) for i in range(7)], trial="nocsv")
    out = tmp_path / "cmp"
    compare([str(run_a), str(run_b), str(old), str(unlabelled)], str(out), n_resamples=N_RESAMPLES)

    table = read_csv(out / "per_corpus.csv")
    assert list(table[0])[:4] == ["run", "decoder", "split", "corpus"]
    assert [(r["run"], r["corpus"]) for r in table] == [("a", "Harvard"), ("a", "Switchboard"),
                                                        ("b", "Harvard"), ("b", "Switchboard")]
    by = {(r["run"], r["corpus"]): r for r in table}
    assert float(by["a", "Switchboard"]["per"]) == pytest.approx(4 / 20) and by["a", "Switchboard"]["n_trials"] == "4"
    assert float(by["a", "Harvard"]["per"]) == pytest.approx(6 / 10) and by["a", "Harvard"]["n_trials"] == "2"
    assert (by["b", "Harvard"]["per"], by["b", "Harvard"]["per_ci_low"], by["b", "Harvard"]["per_ci_high"]) == \
        ("0.123", "0.1", "0.15")  # from metrics.json
    assert by["a", "Switchboard"]["wer"] == "" and by["a", "Switchboard"]["per_ci_low"] != ""
    ci = metrics_b["val"]["by_corpus"]["Switchboard"]["per_ci"]
    assert [float(by["b", "Switchboard"][f"per_ci_{end}"]) for end in ("low", "high")] == ci

    report = squeeze((out / "comparison.md").read_text())
    section = report.split("## Error per corpus (val)")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "corpus" not in line]
    assert [line.split("|")[1:3] for line in lines] == [[" Harvard ", " a "], [" Harvard ", " b "],
                                                        [" Switchboard ", " a "], [" Switchboard ", " b "]]
    assert "| Harvard | b | 12.3% [10.0, 15.0] |" in section and "| Switchboard | a | 20.0% [" in section
    assert "- old: no by_corpus in its metrics.json" in section
    assert "- nocsv: no corpus labels" in section
    assert "](per_corpus_val.png)" in section
    _assert_real_png(out / "per_corpus_val.png")


def test_runs_without_per_corpus_figures_show_none(tmp_path):
    out = tmp_path / "cmp"
    labelled = [{**trial_row(i, phonemes=(1, 5)), "corpus": "Harvard"} for i in range(4)]
    compare([str(make_run(tmp_path / "new", labelled))], str(out), n_resamples=200)
    assert (out / "per_corpus_val.png").exists()

    old = make_run(tmp_path / "old", [trial_row(i, phonemes=(1, 5)) for i in range(4)])
    metrics_old = json.loads((old / "metrics.json").read_text())
    del metrics_old["val"]["by_corpus"]
    results.write_json(old / "metrics.json", metrics_old)
    compare([str(old)], str(out), n_resamples=200)
    assert (out / "per_corpus.csv").read_text().startswith("run,decoder,split,corpus,per,")
    assert read_csv(out / "per_corpus.csv") == []
    assert "Error per corpus" not in (out / "comparison.md").read_text()
    assert not (out / "per_corpus_val.png").exists()  # the earlier one would not match this report
    assert (out / "per_session_val.png").exists()
