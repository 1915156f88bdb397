"""The per-block description CSV (harness.description): date formats, where it is found, the join
with the trials read from HDF5 (corpus and days since implant), and one-line errors on bad files."""

import logging

import pytest

import main
from harness import description
from harness.data import Trial, read_trials
from harness.description import DESCRIPTION_NAME, BlockInfo, find_description, read_description
from harness.errors import UserError
from harness.evaluation import trial_row
from harness.results import BASE_COLUMNS, TRIAL_COLUMNS, write_rows_csv
from tests.conftest import TINY_CONFIG

SESSIONS = ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]
HEADER = "Date,Post-implant day,Block number,Number of sentences,Corpus,Split\n"
# the small_dataset fixture: train is block 1, val block 2, test block 3 (no val/test in the first session).
# 2023-08-18 block 3 (its 2 test trials) has no row on purpose.
SMALL_ROWS = [
    ("2023-08-11", 31, 1, 6, "Switchboard", "Train"),
    ("2023-08-13", 33, 1, 6, "Harvard", "Train"),
    ("2023-08-13", 33, 2, 3, "50-Word", "Val"),
    ("2023-08-13", 33, 3, 2, "Random", "Test"),
    ("2023-08-18", 38, 1, 6, "Openwebtext", "train"),
    ("2023-08-18", 38, 2, 3, "Freq words", "VAL"),
]
EXPECTED = {  # (session, block) -> (corpus, days since implant)
    ("t15.2023.08.11", 1): ("Switchboard", 31),
    ("t15.2023.08.13", 1): ("Harvard", 33),
    ("t15.2023.08.13", 2): ("50-Word", 33),
    ("t15.2023.08.13", 3): ("Random", 33),
    ("t15.2023.08.18", 1): ("Openwebtext", 38),
    ("t15.2023.08.18", 2): ("Freq words", 38),
    ("t15.2023.08.18", 3): (None, None),
}


def write_csv(path, rows, header=HEADER, encoding="utf-8"):
    text = header + "".join(",".join(str(cell) for cell in row) + "\n" for row in rows)
    path.write_text(text, encoding=encoding)
    return path


def read_all(data_dir):
    return {split: read_trials(data_dir, SESSIONS, split, 512) for split in ("train", "val", "test")}


# --------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("dates", [
    ("2023-08-11", "2024-01-05"),
    ("2023.08.11", "2024.01.05"),
    ("2023/08/11", "2024/01/05"),
    ("8/11/2023", "1/5/2024"),  # M/D/YYYY
    ("08/11/2023", "01/05/2024"),
], ids=["iso", "dots", "slashes", "month-first", "month-first-padded"])
def test_every_accepted_date_format_is_read(tmp_path, dates):
    path = write_csv(tmp_path / DESCRIPTION_NAME, [(dates[0], 31, 1, 40, "Switchboard", "Train"),
                                                  (dates[0], 31, 2, 20, "Freq words", "Test"),
                                                  (dates[1], 178, 1, 40, "Harvard", "val")])
    assert read_description(path) == {
        ("2023.08.11", 1): BlockInfo("Switchboard", 31, "train"),
        ("2023.08.11", 2): BlockInfo("Freq words", 31, "test"),
        ("2024.01.05", 1): BlockInfo("Harvard", 178, "val"),
    }


def test_bom_extra_columns_column_order_and_blank_lines(tmp_path):
    """A spreadsheet's export: BOM, other column order, an extra column, an empty corpus, a blank row."""
    header = "Corpus,Notes,Block number,Date,Split,Post-implant day\n"
    rows = [("Switchboard", "x", 3, "2023-08-11", "Train", 31), (",,,,,",), ("", "y", "4", "2023-08-11", "", "31.0")]
    path = write_csv(tmp_path / "d.csv", rows, header=header, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_description(path) == {("2023.08.11", 3): BlockInfo("Switchboard", 31, "train"),
                                      ("2023.08.11", 4): BlockInfo(None, 31, None)}


def test_session_dates():
    assert description.session_date("t15.2023.08.11") == "2023.08.11"
    assert description.session_date("synth.2024.1.5") == "2024.01.05"
    assert description.session_date("s1") is None and description.session_date("t15.2023.02.30") is None


@pytest.mark.parametrize("header,row,needles", [
    ("Date,Post-implant day,Number of sentences,Corpus,Split\n", ("2023-08-11", 31, 40, "Harvard", "Train"),
     ["no column 'Block number'"]),
    (HEADER, ("2023-08-11", "thirty", 1, 40, "Harvard", "Train"), ["line 2", "Post-implant day 'thirty' is not an integer"]),
    (HEADER, ("2023-08-11", 31.5, 1, 40, "Harvard", "Train"), ["line 2", "Post-implant day '31.5' is not an integer"]),
    (HEADER, ("2023-08-11", 31, "", 40, "Harvard", "Train"), ["line 2", "Block number '' is not an integer"]),
    (HEADER, ("11.08.2023", 31, 1, 40, "Harvard", "Train"), ["line 2", "Date '11.08.2023' is not a date"]),
    (HEADER, ("2023-02-30", 31, 1, 40, "Harvard", "Train"), ["line 2", "Date '2023-02-30' is not a date"]),
], ids=["missing-column", "word-day", "fractional-day", "empty-block", "day-first-date", "no-such-date"])
def test_a_malformed_file_is_one_line_naming_file_and_row(tmp_path, header, row, needles):
    path = write_csv(tmp_path / DESCRIPTION_NAME, [row], header=header)
    with pytest.raises(UserError) as error:
        read_description(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path))
    for needle in needles:
        assert needle in message, message


def test_a_duplicate_block_is_refused(tmp_path):
    path = write_csv(tmp_path / DESCRIPTION_NAME, [("2023-08-11", 31, 1, 40, "Harvard", "Train"),
                                                  ("2023-08-13", 33, 1, 40, "Harvard", "Train"),
                                                  ("8/11/2023", 31, 1, 20, "Random", "Test")])  # same day, other format
    with pytest.raises(UserError, match=r"line 4: date 2023\.08\.11 block 1 appears twice \(first at line 2\)") as error:
        read_description(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_read_once_per_file_version(tmp_path, monkeypatch):
    calls = []
    parse = description._parse
    monkeypatch.setattr(description, "_parse", lambda *a: calls.append(1) or parse(*a))
    description._read.cache_clear()
    path = write_csv(tmp_path / DESCRIPTION_NAME, SMALL_ROWS)
    first = read_description(path)
    assert read_description(path) == first and len(calls) == 1
    write_csv(path, SMALL_ROWS[:2])  # a new version of the file is read again
    path.touch()
    assert len(read_description(path)) == 2 and len(calls) == 2


# --------------------------------------------------------------------------- where it is and the join


def test_found_in_data_dir_first_then_in_its_parent(small_dataset):
    assert find_description(small_dataset) is None
    parent = write_csv(small_dataset.parent / DESCRIPTION_NAME, SMALL_ROWS)  # the real layout
    assert find_description(small_dataset) == parent
    inside = write_csv(small_dataset / DESCRIPTION_NAME, SMALL_ROWS[:1])  # synth's layout wins
    assert find_description(small_dataset) == inside


@pytest.mark.parametrize("where", ["inside", "parent"])
def test_trials_get_their_blocks_corpus_and_day(small_dataset, caplog, where):
    folder = small_dataset if where == "inside" else small_dataset.parent
    write_csv(folder / DESCRIPTION_NAME, SMALL_ROWS)
    with caplog.at_level(logging.WARNING, logger="harness.data"):
        trials = read_all(small_dataset)
    assert [len(trials[s]) for s in ("train", "val", "test")] == [18, 6, 4]
    for split_trials in trials.values():
        for t in split_trials:
            assert (t.corpus, t.days_since_implant) == EXPECTED[(t.session, t.block_num)], t
    # the one block without a row: its 2 test trials, counted in one warning; no split disagrees
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "no row for 2 test trials (t15.2023.08.18 block 3: 2 trials)" in warnings[0]
    assert DESCRIPTION_NAME in warnings[0]


def test_without_the_csv_nothing_is_guessed(small_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="harness.data"):
        trials = read_all(small_dataset)
    assert all(t.corpus is None and t.days_since_implant is None for ts in trials.values() for t in ts)
    assert not caplog.records


def test_a_block_the_csv_puts_in_another_split_keeps_its_file_split(small_dataset, caplog):
    rows = [row if row[:3] != ("2023-08-13", 33, 2) else (*row[:5], "Train") for row in SMALL_ROWS]
    write_csv(small_dataset / DESCRIPTION_NAME, rows)
    with caplog.at_level(logging.WARNING, logger="harness.data"):
        val = read_trials(small_dataset, SESSIONS, "val", 512)
    assert {t.split for t in val} == {"val"} and {t.corpus for t in val} == {"50-Word", "Freq words"}
    [warning] = [r.getMessage() for r in caplog.records]
    assert "hold 3 val trials (t15.2023.08.13 block 2 (CSV: train): 3 trials)" in warning


def test_a_bad_csv_stops_a_run_with_one_line(small_dataset, tmp_path, capsys):
    write_csv(small_dataset / DESCRIPTION_NAME, [*SMALL_ROWS, SMALL_ROWS[1]])
    out = tmp_path / "run"
    code = main.main(["run", "--config", str(TINY_CONFIG), "--set", f"data_params.data_dir={small_dataset}",
                      "--set", "training_params.num_steps=2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: {small_dataset / DESCRIPTION_NAME} line 8: date 2023.08.13 block 1 "
                                    "appears twice (first at line 3); the description has one row per block")
    assert not (out / "DONE").exists()


# --------------------------------------------------------------------------- per_trial.csv


def test_per_trial_rows_carry_corpus_and_day_after_the_base_columns(tmp_path):
    known = Trial("val", "t15.2023.08.13", 1, "p", "trial_0000", 2, 0, 30, (1, 40), "a b",
                  corpus="Harvard", days_since_implant=33)
    unknown = Trial("val", "t15.2023.08.18", 2, "p", "trial_0000", 3, 0, 30, (1, 40), "a b")
    rows = [trial_row(t, {"predicted_text": "a", "predicted_phonemes": "AA", "n_frames": 7}) for t in (known, unknown)]
    write_rows_csv(tmp_path / "per_trial.csv", rows)
    header, first, second = (tmp_path / "per_trial.csv").read_text().splitlines()
    assert header.split(",") == [*BASE_COLUMNS, "corpus", "days_since_implant", "n_time_steps", "n_frames"]
    assert first.split(",")[-4:] == ["Harvard", "33", "30", "7"]  # the model's columns after
    assert second.split(",")[-4:] == ["", "", "30", "7"]  # unknown: empty, not guessed
    write_rows_csv(tmp_path / "old.csv", [{"split": "val", "session": "s"}])  # rows without them: empty cells
    assert (tmp_path / "old.csv").read_text().splitlines()[0].split(",") == [*BASE_COLUMNS, *TRIAL_COLUMNS]
