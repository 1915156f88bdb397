"""`compare` refuses what it cannot compare honestly, and writes nowhere but --out: a per_trial.csv cut
short or at odds with metrics.json, split names that would make file names outside --out, an --out
that is a file or cannot be written. Each refusal is one line (exit status 2) and writes nothing.

Run folders are built by hand (tests.harness.test_compare.make_run), no training.
"""

import json
import os
import re

import pytest

from harness import results
from harness.compare_figures import write_plots
from harness.metrics import split_metrics
from harness.run_reader import Run
from tests.harness.test_compare import make_run, run_compare, trial_row


def files_under(root):
    """Every file and folder under root."""
    found = set()
    for folder, dirs, files in os.walk(root):
        found.update(os.path.join(folder, name) for name in dirs + files)
    return found


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("error: "), err
    return err.strip()


@pytest.fixture
def run(tmp_path):
    """A finished run of 6 val trials and 3 test trials."""
    rows = [trial_row(i, phonemes=(1, 5), words=(1, 4)) for i in range(6)]
    rows += [trial_row(10 + i, split="test") for i in range(3)]
    return make_run(tmp_path / "runs" / "a", rows)


# --------------------------------------------------------------------------- per_trial.csv cut short


def _cut_mid_row(text):  # killed mid-write without the atomic rename (a copy, a full disk)
    return text[: len(text) - len(text.splitlines()[-1]) // 2 - 1]


def _short_last_line(text):
    lines = text.splitlines(keepends=True)
    return "".join(lines[:-1]) + ",".join(lines[-1].split(",")[:5]) + "\n"


def _drop_last_rows(text):
    return "".join(text.splitlines(keepends=True)[:-2])  # two whole test rows gone


def _header_only(text):
    return text.splitlines(keepends=True)[0]


@pytest.mark.parametrize("damage, expected", [
    (_cut_mid_row, "cut short: its last line ends without a newline"),
    (_short_last_line, "line 10 has 5 fields where the header has {fields}"),
    (lambda text: "", "is empty"),
    (_header_only, "0 val trials, but metrics.json records 6"),
    (_drop_last_rows, "1 test trials, but metrics.json records 3"),
], ids=["cut-mid-row", "short-last-line", "empty", "header-only", "rows-missing"])
def test_a_per_trial_csv_cut_short_is_refused(run, tmp_path, capsys, damage, expected):
    csv_path = run / "per_trial.csv"
    expected = expected.format(fields=len(csv_path.read_text().splitlines()[0].split(",")))  # the header's own count
    csv_path.write_text(damage(csv_path.read_text()))
    assert run_compare(run, "--out", tmp_path / "cmp") == 2
    err = one_error_line(capsys)
    assert str(csv_path) in err and expected in err
    assert not (tmp_path / "cmp").exists()


def test_per_trial_csv_at_odds_with_metrics_json_is_refused(run, tmp_path, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["val"]["n_trials"] = 7
    results.write_json(run / "metrics.json", metrics)
    assert run_compare(run, "--out", tmp_path / "cmp") == 2
    assert f"error: {run / 'per_trial.csv'}: 6 val trials, but metrics.json records 7" in one_error_line(capsys)

    del metrics["test"]  # rows of a split metrics.json does not know
    metrics["val"]["n_trials"] = 6
    results.write_json(run / "metrics.json", metrics)
    assert run_compare(run, "--out", tmp_path / "cmp") == 2
    assert "3 test trials, but metrics.json has no test entry" in one_error_line(capsys)
    assert not (tmp_path / "cmp").exists()


def test_an_intact_run_still_compares(run, tmp_path):
    assert run_compare(run, "--out", tmp_path / "cmp") == 0
    assert (tmp_path / "cmp" / "per_session_val.png").is_file()


# --------------------------------------------------------------------------- nothing outside --out


@pytest.mark.parametrize("where", ["per_trial.csv", "metrics.json"])
@pytest.mark.parametrize("bad", ["../../../escaped", "ABSOLUTE"], ids=["dot-dot", "absolute"])
def test_split_names_cannot_write_outside_out(tmp_path, capsys, where, bad):
    bad = str(tmp_path / "escaped_abs") if bad == "ABSOLUTE" else bad
    rows = [trial_row(i, phonemes=(1, 5)) for i in range(4)]
    if where == "per_trial.csv":
        rows += [trial_row(10 + i, split=bad, phonemes=(2, 5)) for i in range(2)]
    run_dir = make_run(tmp_path / "runs" / "a", rows)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if where == "metrics.json":
        metrics[bad] = metrics["val"]
    else:  # the name in per_trial.csv only
        del metrics[bad]
    results.write_json(run_dir / "metrics.json", metrics)
    before = files_under(tmp_path)

    assert run_compare(run_dir, "--out", tmp_path / "cmp") == 2
    err = one_error_line(capsys)
    assert str(run_dir / where) in err and repr(bad) in err and "train, val, test" in err
    assert files_under(tmp_path) == before  # nothing written, inside --out or out


def test_plot_file_names_stay_in_out_whatever_the_split(tmp_path):
    """Behind the reader's check: plot names built from a split are plain file names in --out."""
    entry = split_metrics([trial_row(i, phonemes=(1, 5)) for i in range(4)], n_resamples=0)
    splits = ["../../../escaped", str(tmp_path / "abs"), ".hidden"]
    runs = [Run(dir=tmp_path / "r", metrics={s: entry for s in splits}, meta={}, rows=[], decoder="x")]
    out = tmp_path / "cmp"
    before = files_under(tmp_path)
    images = write_plots(runs, splits, out)
    created = files_under(tmp_path) - before
    assert created and all(path == str(out) or path.startswith(str(out) + os.sep) for path in created)
    assert {p.parent for p in images.values()} == {out}
    assert all(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", p.name) for p in images.values())


# --------------------------------------------------------------------------- --out that cannot be written


def test_out_that_is_a_file_is_refused(run, tmp_path, capsys):
    out = tmp_path / "report.md"
    out.write_text("mine\n")
    assert run_compare(run, "--out", out) == 2
    assert one_error_line(capsys) == f"error: --out {out} is a file, not a folder"
    assert out.read_text() == "mine\n"

    assert run_compare(run, "--out", out / "cmp") == 2  # a file on the way there
    assert one_error_line(capsys) == f"error: --out {out / 'cmp'}: {out} is a file, not a folder"


def test_out_under_proc_is_refused(run, tmp_path, capsys):
    assert run_compare(run, "--out", "/proc/b2t-comparison") == 2
    err = one_error_line(capsys)
    assert err.startswith("error: --out /proc/b2t-comparison: cannot write in /proc")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_out_in_a_read_only_folder_is_refused(run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert run_compare(run, "--out", locked / "cmp") == 2
        assert one_error_line(capsys) == f"error: --out {locked / 'cmp'}: cannot write in {locked} (Permission denied)"
        assert run_compare(run, "--out", locked) == 2
        assert one_error_line(capsys) == f"error: --out {locked}: cannot write in {locked} (Permission denied)"
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []
