"""Run folders: where a run goes, atomic writes, per_trial.csv, metrics.json, meta.json, DONE.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
its final name, so a reader never sees half a file. `DONE` is written last: a folder without it is
an unfinished run.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import fnmatch
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

from harness import project
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
# then the trial's length in 20 ms bins (compare's error against trial duration)
TRIAL_COLUMNS = [*DESCRIPTION_COLUMNS, "n_time_steps"]


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
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
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
    """per_trial.csv: the contract columns first, the block's corpus and post-implant day, the trial's
    length, then any model-specific columns."""
    atomic_write_text(path, rows_to_csv(rows, [*BASE_COLUMNS, *TRIAL_COLUMNS]))


def is_finished(run_dir: Path | str) -> bool:
    return (Path(run_dir) / DONE).is_file()


def mark_done(run_dir: Path | str) -> None:
    atomic_write_text(Path(run_dir) / DONE, datetime.now(UTC).isoformat() + "\n")


LOCK = ".lock"  # held (flock) by the one process writing the folder; the OS lets go when it dies
# What a run folder holds (docs/contracts.md): --overwrite empties only a folder of these. The files at its
# top, and its folders with the names of what each holds (None: a tool's own layout, whatever it writes).
RUN_FOLDER_FILES = {"config.yaml", "run.log", "per_trial.csv", "metrics.json", "meta.json", DONE, LOCK,
                    "trackers.json"}  # trackers.json: the wandb and MLflow run ids a --resume goes on with
RUN_FOLDER_DIRS: dict[str, tuple[str, ...] | None] = {"checkpoints": ("*.pt",), "tensorboard": ("events.out.tfevents.*",),
                                                      "wandb": None, "mlruns": None}


# A group of runs (harness/groups.py): its own files, and run folders (its members) inside
GROUP_FILE, GROUP_CONFIG = "group.json", "group.yaml"  # the plan, and the group's resolved config
GROUP_FILES = {GROUP_FILE, GROUP_CONFIG, "summary.json", "summary.csv", "summary.md", "summary.png", DONE, LOCK}


def is_group(folder: Path | str) -> bool:
    return (Path(folder) / GROUP_FILE).is_file()


class RunFolder:
    """A run folder claimed by this process: it holds the folder's lock until release() (or its death),
    so a second run, evaluate or --resume on the same folder is refused instead of writing beside it."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._fd = path, lock_fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.release()


def _claim(folder: Path) -> RunFolder:
    """Take `folder`'s lock or refuse. flock, not a lock file's existence: a kill -9 never leaves it stuck,
    and flock on a file opened for writing also works on NFS (Linux maps it onto fcntl locks there)."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    holder = _lock_or_holder(fd)
    if holder is not None:
        os.close(fd)
        raise in_use(folder, holder)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunFolder(folder, fd)


def in_use(folder: Path, holder: str) -> UserError:
    return UserError(f"{folder} is in use by another b2t-bench process (pid {holder}): one run folder, one writer; "
                     "wait for it to end or use another --out")


def new_run_dir(results_dir: Path | str, trial_name: str, claim: bool = False) -> Path | RunFolder:
    """A new folder results_dir/<trial_name>_<UTC time>; never reuses an existing one. With claim,
    the RunFolder holding its lock."""
    results_dir = Path(results_dir)
    check_writable(results_dir, "output.results_dir")
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = f"{trial_name}_{stamp}" + (f"-{attempt}" if attempt else "")
        try:
            (results_dir / name).mkdir()  # atomic: two runs starting together get different folders
        except FileExistsError:
            continue
        return _claim(results_dir / name) if claim else results_dir / name
    raise RuntimeError(f"could not make a new run folder under {results_dir}")


def check_writable(folder: Path | str, what: str = "--out") -> None:
    """`folder` can be made (or is) a folder this process writes in: refused in one line before anything is
    made if a part of it is a file, or its nearest existing parent cannot be written (read-only, /proc)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UserError(f"{what} {folder}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder")
    try:  # the one sure test (permissions, read-only mounts, /proc, root's exemptions): make and remove a folder
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=WRITE_PROBE))
    except OSError as error:  # (/proc answers "No such file or directory": no use to a reader)
        why = f" ({error.strerror})" if error.errno not in (errno.ENOENT, None) else ""
        raise UserError(f"{what} {folder}: cannot write in {existing}{why}") from None


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds that a run folder does not, as paths relative to it (the partial writes of a killed
    run are its own). Looks into checkpoints/ and tensorboard/ too: a file of the user's there is not a run's."""
    if is_group(folder):
        return _group_foreign_entries(folder)
    foreign = []
    for entry in sorted(folder.iterdir()):
        if _partial(entry.name) or _transient(entry) or (
                entry.name in RUN_FOLDER_FILES and entry.is_file() and not entry.is_symlink()):
            continue
        if entry.name not in RUN_FOLDER_DIRS or not entry.is_dir() or entry.is_symlink():
            foreign.append(entry.name)
            continue
        patterns = RUN_FOLDER_DIRS[entry.name]
        if patterns is not None:
            foreign += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir())
                        if not (p.is_file() and not p.is_symlink() and (_partial(p.name) or
                                                                         any(fnmatch.fnmatch(p.name, g) for g in patterns)))]
    return foreign


def _group_foreign_entries(folder: Path) -> list[str]:
    """What a group folder holds besides its own files and its members' run folders (a member
    claimed but killed before it wrote anything holds only its lock)."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if _partial(entry.name) or _transient(entry) or (
                entry.name in GROUP_FILES and entry.is_file() and not entry.is_symlink()):
            continue
        if entry.is_dir() and not entry.is_symlink() and (
                is_run_folder(entry) or all(p.name == LOCK for p in entry.iterdir())):
            continue
        foreign.append(entry.name)
    return foreign


WRITE_PROBE = ".b2t-write-test-"  # check_writable's folder, made and removed at once


def _transient(entry: Path) -> bool:
    """Another b2t-bench process's write probe (check_writable), there for an instant: a run starting
    on the same --out at the same moment must not take it for the user's files."""
    return entry.name.startswith(WRITE_PROBE)


def _partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # atomic_write_bytes's temporary names


def lock_holder(folder: Path) -> str | None:
    """The pid (as written) of the process that holds `folder`'s lock, or None when no process does."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        return _lock_or_holder(fd)
    finally:
        os.close(fd)  # also drops the lock if it was taken


def _lock_or_holder(fd: int) -> str | None:
    """Take the exclusive lock on `fd` (None), or the pid written in the file of the process that holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    return None


def check_out_dir(out: Path | str, resume: bool, overwrite: bool, protected: dict[str, Path | str | None] = None,
                  locked_here: bool = False) -> None:
    """An explicit --out folder: writable, and when it holds anything, only a run folder, resumed or
    overwritten as asked; never one that is or holds `protected` paths (the data, the config, the
    checkpoint: --overwrite would delete them). Makes nothing."""
    out = Path(out)
    check_writable(out)
    if not out.exists():
        return
    held = [p for p in out.iterdir() if p.name != LOCK and not _transient(p)]
    if not held:
        return
    holder = None if locked_here else lock_holder(out)  # (our own lock would look like another process's)
    if holder is not None:  # a run is writing it now: neither --resume nor --overwrite may touch it
        raise in_use(out, holder)
    if not (resume or overwrite):
        state = "a finished run" if is_finished(out) else "an unfinished run" if is_run_folder(out) else "other files"
        raise UserError(f"{out} already holds {state}: pass --resume to continue it or --overwrite to replace it"
                        if state != "other files" else f"{out} already holds files that are not a run's: choose another --out")
    for what, path in (protected or {}).items() if overwrite else ():
        if path is not None and _inside(Path(path), out):
            raise UserError(f"--out {out} holds {what} {path}: --overwrite would delete it")
    foreign = foreign_entries(out)
    if foreign or not is_run_folder(out):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"{out} is not a b2t-bench run folder ({f'it holds {shown}' if foreign else 'no config.yaml or run.log'}): "
                        f"{'--overwrite' if overwrite else '--resume'} works only on run folders; choose another --out")


def _inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies in it, as written or with links followed."""
    return (path.absolute().is_relative_to(folder.absolute())
            or path.exists() and path.resolve().is_relative_to(folder.resolve()))


def is_run_folder(folder: Path | str) -> bool:
    """Only a run's entries, and one that a run writes first (a run killed before its config.yaml has run.log);
    or a group of runs (group.json and its members' run folders)."""
    folder = Path(folder)
    return (any((folder / name).is_file() for name in ("config.yaml", "run.log", DONE, GROUP_FILE))
            and not foreign_entries(folder))


def prepare_out_dir(out: Path | str, resume: bool, overwrite: bool, protected: dict | None = None) -> RunFolder:
    """Claim the --out folder (made if needed; emptied first with --overwrite): call it once every check of
    the run has passed. The checks are made again under the lock, which a second writer cannot take."""
    check_out_dir(out, resume, overwrite, protected)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = _claim(out)
    try:
        check_out_dir(out, resume, overwrite, protected, locked_here=True)  # written by another process meanwhile?
        if resume and is_finished(out):
            raise UserError(f"{out} was finished (DONE) by another process meanwhile: nothing to resume")
        if overwrite:
            for entry in out.iterdir():  # the folder itself stays: its lock is ours
                if entry.name == LOCK:
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    except BaseException:
        folder.release()
        raise
    return folder


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions(requirements: list[str] | None = None) -> dict[str, str | None]:
    """The installed version of every package that can change a result: each of b2t-bench's
    dependencies (pyproject.toml's [project] dependencies, or `requirements`) and, through the
    installed packages' own metadata, everything they need in turn (torch's CUDA libraries and
    triton where torch has them, transformers' tokenizers and huggingface_hub, peft's accelerate,
    ...). A needed package that is not installed is None. Keys are the packages' own names (as
    `pip list` shows them), sorted case-insensitively; the dev extra (pytest, ruff, jiwer) is not
    among them."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    installed: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():  # in sys.path order: the first of a name is the one imported
        name = dist.metadata["Name"]
        if name:
            installed.setdefault(canonicalize_name(name), dist)

    versions: dict[str, str | None] = {}
    walked: dict[str, set[str]] = {}  # canonical name -> extras whose requirements were followed
    pending = [(r, "") for r in (project.requirements() if requirements is None else requirements)]
    while pending:
        text, extra = pending.pop()
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        key = canonicalize_name(requirement.name)
        dist = installed.get(key)
        if dist is None:
            versions.setdefault(requirement.name, None)
            continue
        versions[dist.metadata["Name"]] = dist.version
        wanted = {""} | {canonicalize_name(e) for e in requirement.extras}
        new = wanted - walked.setdefault(key, set())
        walked[key] |= new
        pending += [(r, e) for e in new for r in dist.requires or []]
    return dict(sorted(versions.items(), key=lambda item: canonicalize_name(item[0])))


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
