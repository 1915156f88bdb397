"""Reading finished run folders for `compare`: config, metrics, meta, per-trial rows, logged scalars.

Only the files of the results contract (docs/contracts.md) are read, so runs of any model, written by
`run` or `evaluate`, load the same way. Each run's per_trial.csv is also there as a typed pandas frame
(`Run.trials`, harness.analyses.trial_frame), and its config.yaml as a dict flattened to dotted keys
(`Run.flat_config`). A run group's folder (harness/groups.py: `group.json` beside one run folder per
member) stands for its member run folders (`expand`), and a run inside one knows its group's plan.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from config import SEED_KEYS
from harness.errors import UserError
from harness.results import GROUP_FILE, is_group

TRIAL_KEY = ("split", "session", "block_num", "trial_num")
NOT_SPLITS = ("run", "protocol")  # metrics.json's sections that are not a split's metrics
SPLITS = ("train", "val", "test")  # as harness.data.SPLITS (not imported: it pulls in h5py)


@dataclass
class Run:
    dir: Path
    metrics: dict
    meta: dict
    rows: list[dict]  # per_trial.csv as read (strings; "" for empty)
    decoder: str  # "<model constructor> (<trial name>)"
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    name: str = ""  # how tables and plots call the run: its folder name unless given
    config: dict = field(default_factory=dict)  # config.yaml as loaded ({} without one)
    group: Path | None = None  # the run group folder it belongs to (its parent holds group.json), if any
    group_plan: dict = field(default_factory=dict)  # that group's group.json

    def __post_init__(self):
        self.name = self.name or self.dir.name

    @cached_property
    def trials(self) -> pd.DataFrame:
        """per_trial.csv as a typed frame (harness.analyses.trial_frame: numbers as float, NaN for empty)."""
        from harness.analyses import trial_frame

        return trial_frame(self.rows)

    @cached_property
    def flat_config(self) -> dict:
        """config.yaml flattened to dotted keys ("training_params.lr_max"); lists stay values."""
        return flatten(self.config)

    @property
    def protocol_section(self) -> dict:
        section = self.metrics.get("protocol")
        return section if isinstance(section, dict) else {}

    @property
    def protocol(self) -> str:
        """The evaluation protocol: its group's (a data_scaling member is a plain run of a data_scaling
        group), else the name in metrics.json's `protocol` section, else "fixed"."""
        if self.group is not None and self.group_plan.get("protocol"):
            return str(self.group_plan["protocol"])
        return str(self.protocol_section.get("name") or "fixed")

    @property
    def k(self):
        """Recalibration's calibration sentences per held-out session: metrics.json's protocol k; 0 for
        the training run of a recalibration group; None outside recalibration."""
        if "k" in self.protocol_section:
            return self.protocol_section["k"]
        return 0 if self.protocol == "recalibration" else None

    @property
    def seed_identity(self) -> tuple:
        """What tells repeats of one decoder apart: the training and data seeds, and the recalibration draw."""
        return (*(self.flat_config.get(key) for key in SEED_KEYS), self.protocol_section.get("draw"))

    @property
    def is_retrieval(self) -> bool:
        """The model ranks candidate sentences (per_trial.csv has true_rank): its predicted_text is the
        candidate it ranked first, not decoded text."""
        return "true_rank" in self.trials

    def split_metrics(self) -> dict[str, dict]:
        """metrics.json without its "run" and "protocol" sections: split -> that split's metrics."""
        return {k: v for k, v in self.metrics.items() if k not in NOT_SPLITS and isinstance(v, dict)}

    def rows_by_key(self, split: str) -> dict[tuple, dict]:
        """The split's per-trial rows keyed by (split, session, block_num, trial_num)."""
        keyed = {}
        for row in self.rows:
            if row.get("split") != split:
                continue
            key = tuple(row.get(k, "").strip() for k in TRIAL_KEY)
            if key in keyed:
                raise UserError(f"{self.dir / 'per_trial.csv'}: trial {' '.join(key)} appears twice; "
                                "a run folder holds one row per trial")
            keyed[key] = row
        return keyed


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": [1, 2]}; an empty dict stays a value."""
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def find_runs(results_dir: Path) -> list[Path]:
    """Every folder under results_dir that looks like a run (has config.yaml), finished or not; run
    groups' member folders are among them."""
    if not results_dir.is_dir():
        return []
    return sorted(p.parent for p in results_dir.rglob("config.yaml"))


def group_members(group_dir: Path) -> list[Path]:
    """A group's run folders, finished or not: its subfolders that hold a config.yaml (the members of
    group.json and, for recalibration, their k-sentence fine-tunes), by name."""
    return sorted(p for p in group_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def expand(folders: list[Path]) -> list[Path]:
    """The run folders meant by folders given on the command line: a run group stands for its members."""
    out = []
    for folder in folders:
        if is_group(folder):
            members = group_members(folder)
            if not members:
                raise UserError(f"run group {folder} has no run folder yet (nothing to compare)")
            out += members
        else:
            out.append(folder)
    return out


def read_group_plan(group_dir: Path) -> dict:
    try:
        plan = json.loads((group_dir / GROUP_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{group_dir / GROUP_FILE}: not a readable group plan ({error})") from None
    if not isinstance(plan, dict):
        raise UserError(f"{group_dir / GROUP_FILE}: expected a JSON object")
    return plan


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from None
    return config if isinstance(config, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing, though {path.parent} is marked finished (DONE)") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_rows(path: Path) -> list[dict]:
    """per_trial.csv as dicts, refused where cut short: the harness ends every line with a newline
    and gives every row the header's number of fields, so a file without them was cut mid-write."""
    if not path.is_file():
        raise UserError(f"{path} is missing, though {path.parent} is marked finished (DONE)")
    with open(path, newline="") as f:
        text = f.read()
    if not text.strip():
        raise UserError(f"{path} is empty (cut short: a finished run's per_trial.csv has at least its header line)")
    if not text.endswith("\n"):
        raise UserError(f"{path} is cut short: its last line ends without a newline")
    reader = csv.reader(io.StringIO(text))
    rows = []
    try:
        header = next(reader)
        for fields in reader:
            if not fields:  # a blank line, as csv.DictReader skips it
                continue
            if len(fields) != len(header):
                raise UserError(f"{path}: line {reader.line_num} has {len(fields)} fields where the header has "
                                f"{len(header)} (the file is cut short or damaged)")
            rows.append(dict(zip(header, fields)))
    except csv.Error as error:
        raise UserError(f"{path}: line {reader.line_num} is not valid CSV ({error})") from None
    missing = [c for c in TRIAL_KEY if c not in header]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (see the results contract in the README)")
    return rows


def _check_splits(run_dir: Path, metrics: dict, rows: list[dict]) -> None:
    """Split names end up in file names of compare's output (per_session_<split>.png), so only
    train/val/test pass; and per_trial.csv must hold as many trials per split as metrics.json
    counts, else a file cut at a row boundary (or from another run) would be compared as whole."""
    for split, entry in metrics.items():
        if split not in NOT_SPLITS and isinstance(entry, dict) and split not in SPLITS:
            raise UserError(f"{run_dir / 'metrics.json'}: split {split!r} is not one of {', '.join(SPLITS)}")
    counts: dict[str, int] = {}
    for row in rows:
        if row["split"] not in SPLITS:
            raise UserError(f"{run_dir / 'per_trial.csv'}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        counts[row["split"]] = counts.get(row["split"], 0) + 1
    for split in SPLITS:
        entry = metrics.get(split)
        recorded = entry.get("n_trials") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) and split in counts:
            raise UserError(f"{run_dir / 'per_trial.csv'}: {counts[split]} {split} trials, but metrics.json has no "
                            f"{split} entry (the files are not from the same run)")
        if recorded is not None and counts.get(split, 0) != recorded:
            raise UserError(f"{run_dir / 'per_trial.csv'}: {counts.get(split, 0)} {split} trials, but metrics.json "
                            f"records {recorded} (the file is cut short or not from the same run)")


def _decoder_name(metrics: dict, config: dict) -> str:
    info = metrics.get("run") or {}
    model, trial = info.get("model"), info.get("trial_name")
    if model is None:  # older runs: the resolved config says it
        model, trial = config.get("model_constructor_name"), config.get("trial_name")
    return f"{model} ({trial})" if trial and trial != model else str(model)


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged: tag -> [(step, value)] sorted by step.

    Read with TensorBoard's own EventAccumulator (it walks every event file of the folder; a
    resumed run has several). A step logged twice (the steps redone after a resume) keeps the
    value written last.
    """
    if not tensorboard_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})  # 0: keep all
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {}
        for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
            by_step[event.step] = event.value
        out[tag] = sorted(by_step.items())
    return out


def _check_unique_trials(run: Run) -> None:
    """One row per trial: a trial twice would count twice in every pooled and paired figure."""
    twice = run.trials.duplicated(list(TRIAL_KEY), keep="first")
    if twice.any():
        row = run.rows[int(twice.to_numpy().nonzero()[0][0])]
        key = " ".join(str(row.get(k, "")).strip() for k in TRIAL_KEY)
        raise UserError(f"{run.dir / 'per_trial.csv'}: trial {key} appears twice; a run folder holds one row per trial")


def load_run(run_dir: Path, with_scalars: bool = True) -> Run:
    metrics = _read_json(run_dir / "metrics.json")
    rows = _read_rows(run_dir / "per_trial.csv")
    _check_splits(run_dir, metrics, rows)
    config = _read_config(run_dir / "config.yaml")
    group = run_dir.parent if is_group(run_dir.parent) else None
    run = Run(
        dir=run_dir,
        metrics=metrics,
        meta=_read_json(run_dir / "meta.json"),
        rows=rows,
        decoder=_decoder_name(metrics, config),
        scalars=read_scalars(run_dir / "tensorboard") if with_scalars else {},
        config=config,
        group=group,
        group_plan=read_group_plan(group) if group is not None else {},
    )
    _check_unique_trials(run)
    return run
