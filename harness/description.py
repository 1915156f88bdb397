"""The dataset's per-block description CSV: each block's corpus and post-implant day.

The real dataset ships `t15_copyTaskData_description.csv` beside `hdf5_data_final/` (so in the
parent of `data_params.data_dir`); `main.py synth` writes the same file inside its output folder,
beside the session folders. One row per recorded block, with the columns `Date`, `Post-implant day`,
`Block number`, `Number of sentences`, `Corpus`, `Split`; a trial's row is the one with its
session's date (the last three dot-separated fields of the session name, `t15.2023.08.11`) and its
`block_num`. Only `Date`, `Block number`, `Post-implant day` and `Corpus` are needed; `Split` is
only compared with the HDF5 file a trial comes from (the file decides the split), other columns are
ignored. A malformed file is a UserError naming the file and the line.

The csv module is all this needs: one small table (a row per block, a few hundred rows), read once.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError

DESCRIPTION_NAME = "t15_copyTaskData_description.csv"
DATE, DAY, BLOCK, CORPUS, SPLIT = "Date", "Post-implant day", "Block number", "Corpus", "Split"
REQUIRED = (DATE, DAY, BLOCK, CORPUS)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}

# YYYY-MM-DD, YYYY.MM.DD, YYYY/MM/DD (one separator throughout), and M/D/YYYY (US spreadsheets)
_YEAR_FIRST = re.compile(r"(\d{4})([-./])(\d{1,2})\2(\d{1,2})")
_MONTH_FIRST = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")


@dataclass(frozen=True)
class BlockInfo:
    corpus: str | None  # None where the cell is empty
    days_since_implant: int
    split: str | None = None  # the CSV's Split as train/val/test; None if absent or not one of those


def date_key(year: int, month: int, day: int) -> str:
    """The join key of a date, "YYYY.MM.DD" (as in session names); ValueError if no such date."""
    return datetime.date(year, month, day).strftime("%Y.%m.%d")


def parse_date(text: str) -> str | None:
    """A CSV date in any accepted format as "YYYY.MM.DD"; None if it is none of them or no real date."""
    text = text.strip()
    try:
        if m := _YEAR_FIRST.fullmatch(text):
            return date_key(int(m[1]), int(m[3]), int(m[4]))
        if m := _MONTH_FIRST.fullmatch(text):
            return date_key(int(m[3]), int(m[1]), int(m[2]))
    except ValueError:  # 2023-02-30
        return None
    return None


def session_date(session: str) -> str | None:
    """"YYYY.MM.DD" from a session name `<prefix>.YYYY.MM.DD`; None if its last three fields are no date."""
    fields = session.split(".")[-3:]
    if len(fields) != 3 or not all(f.isdigit() for f in fields) or len(fields[0]) != 4:
        return None
    try:
        return date_key(*(int(f) for f in fields))
    except ValueError:
        return None


def find_description(data_dir: Path | str) -> Path | None:
    """The description CSV in data_dir (synthetic data), else in its parent (the real layout,
    `<root>/hdf5_data_final/` beside `<root>/t15_copyTaskData_description.csv`); None if neither.
    The parent is data_dir's as written and, if data_dir is a link, the parent of where it points."""
    data_dir = Path(data_dir)
    candidates = [data_dir / DESCRIPTION_NAME, Path(os.path.abspath(data_dir)).parent / DESCRIPTION_NAME,
                  data_dir.resolve().parent / DESCRIPTION_NAME]
    return next((path for path in candidates if path.is_file()), None)


def read_description(path: Path | str) -> dict[tuple[str, int], BlockInfo]:
    """(date "YYYY.MM.DD", block number) -> BlockInfo for every row of the CSV. Parsed once per
    file version (path, modification time, size): a run reads it once, whatever the splits."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise UserError(f"cannot read the description CSV {path}: {error.strerror or error}") from None
    return dict(_read(str(path), stat.st_mtime_ns, stat.st_size))


def _int(text: str) -> int | None:
    """An integer cell; "12.0" (a spreadsheet's float) counts, "12.5" and "" do not."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


@functools.lru_cache(maxsize=8)
def _read(path_text: str, _mtime_ns: int, _size: int) -> dict[tuple[str, int], BlockInfo]:
    path = Path(path_text)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM is dropped
            return _parse(path, csv.reader(f))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise UserError(f"{path}: not a readable CSV ({error})") from None
    except OSError as error:
        raise UserError(f"cannot read the description CSV {path}: {error.strerror or error}") from None


def _parse(path: Path, reader) -> dict[tuple[str, int], BlockInfo]:
    header = next(reader, None)
    if header is None:
        raise UserError(f"{path}: empty file, expected a header with the columns {', '.join(REQUIRED)}")
    names = [" ".join(name.split()).lower() for name in header]  # spacing and case of a header do not matter
    column = {name: names.index(name.lower()) for name in (*REQUIRED, SPLIT) if name.lower() in names}
    missing = [name for name in REQUIRED if name not in column]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (the header has: {', '.join(h.strip() for h in header)}; "
                        f"needed: {', '.join(REQUIRED)})")
    blocks: dict[tuple[str, int], BlockInfo] = {}
    first_line: dict[tuple[str, int], int] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):  # blank line, or a spreadsheet's empty row
            continue
        line = reader.line_num
        where = f"{path} line {line}"
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        date_text, day_text, block_text = row[column[DATE]], row[column[DAY]], row[column[BLOCK]]
        date = parse_date(date_text)
        if date is None:
            raise UserError(f"{where}: {DATE} {date_text.strip()!r} is not a date "
                            "(accepted: YYYY-MM-DD, YYYY.MM.DD, YYYY/MM/DD, M/D/YYYY)")
        block = _int(block_text)
        if block is None:
            raise UserError(f"{where}: {BLOCK} {block_text.strip()!r} is not an integer")
        day = _int(day_text)
        if day is None:
            raise UserError(f"{where}: {DAY} {day_text.strip()!r} is not an integer")
        key = (date, block)
        if key in blocks:
            raise UserError(f"{where}: date {date} block {block} appears twice (first at line {first_line[key]}); "
                            "the description has one row per block")
        corpus = row[column[CORPUS]].strip() or None
        split = SPLIT_NAMES.get(row[column[SPLIT]].strip().lower()) if SPLIT in column else None
        blocks[key] = BlockInfo(corpus=corpus, days_since_implant=day, split=split)
        first_line[key] = line
    return blocks
