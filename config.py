"""Experiment configuration: nested dataclasses, strict YAML loading, `--set` overrides.

Every knob of a run lives here or in the params dataclass of the model constructor or preprocessor
it names. `model_params` and each preprocessor's `params` are typed by the registered function's
first parameter annotation, so they are validated as strictly as the rest:

    @register_model_constructor()
    def my_model(params: MyModelParams, ctx): ...

Loading is strict: an unknown key or a value of the wrong type is a UserError that names the key path
and the file, with a suggestion for typos. Why not dacite/pydantic: their errors name neither the
file nor a "did you mean", and the model section's type is only known after reading the model name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.errors import UserError
from registry import CONFIG_SETTERS, DATA_PREPROCESSORS, MODEL_CONSTRUCTORS, Registry

# ----------------------------------------------------------------------------------------------
# The schema


@dataclass
class ComponentSpec:
    """A registered component and its params, e.g. {name: gaussian_smoothing, params: {std: 2.0}}.

    Every config key that names a component (preprocessors, word decoders, TTS engines, audio
    encoders, and any a plugin defines) is one of these, declared with `component()` or
    `components()`: loading the config looks the name up in the field's registry and types the params
    by the registered function's params dataclass, with the key path and file in every error."""

    name: str
    params: Any = field(default_factory=dict)


def component(registry: Registry, default: str):
    """A dataclass field holding one ComponentSpec of `registry`, `default` named when absent."""
    return field(default_factory=lambda: ComponentSpec(default), metadata={"registry": registry})


def components(registry: Registry):
    """A dataclass field holding a list of ComponentSpecs of `registry` (empty by default)."""
    return field(default_factory=list, metadata={"registry": registry})


# Value checks. A config dataclass may define `problems(self)`, yielding (field name, problem) for
# values its type allows but a run cannot use (a batch size of 0, a dropout of 1.5). Loading calls it
# on every section and component params, so the error names the file (or --set) and the key path
# before anything is made. These helpers write the common checks.


def at_least(obj, minimum, *names):
    """Each named field (None allowed: it means a default) is a number >= minimum."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= minimum:  # `not >=` also catches NaN
            yield name, f"is {value}: it must be at least {minimum}"


def above(obj, minimum, *names):
    """Each named field (None allowed) is a finite number > minimum."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (value > minimum and math.isfinite(value)):
            yield name, f"is {value}: it must be a finite number above {minimum}"


def non_negative(obj, *names):
    """Each named field (None allowed) is a finite number >= 0."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            yield name, f"is {value}: it must be a finite number, 0 or more"


def fraction(obj, *names):
    """Each named field (None allowed) is in [0, 1): a probability of dropping, a decay rate."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not 0 <= value < 1:
            yield name, f"is {value}: it must be at least 0 and below 1"


def check_values(obj) -> list[tuple[str, str]]:
    """The (field, problem) pairs obj.problems() reports; none for a class without value checks."""
    return list(obj.problems()) if hasattr(obj, "problems") else []


@dataclass
class DataParams:
    data_dir: str = "data/synthetic"  # the folder holding the session folders (hdf5_data_final/)
    sessions: list[str] | None = None  # None: every session folder found; the order fixes day indices
    # width of input_features; None: the width the data has (every session must have the same), which
    # config.yaml records; a number: a file of another width is an error
    n_features: int | None = None
    preprocessors: list[ComponentSpec] = components(DATA_PREPROCESSORS)  # applied in order, every batch
    batch_size: int = 64
    days_per_batch: int = 4  # sessions per training batch; trials drawn per session with replacement
    eval_batch_size: int = 64  # evaluation: each session's trials in order, chunks of at most this
    seed: int = 1  # data sampling seed
    num_workers: int = 0  # DataLoader workers
    # Where features are read from (harness/feature_cache.py): "cache", a read-only memory-mapped copy
    # built once per data file and shared by every rank and worker of a machine; "memory", every
    # trial read into this process at start; "hdf5", read from the HDF5 files batch by batch.
    features: Literal["cache", "memory", "hdf5"] = "cache"
    preload: bool | None = None  # retired in 0.3 (true: features memory, false: features hdf5)
    # Pad each batch's time axis up to a multiple of this (1: to the longest trial). With
    # training_params.compile, a multiple such as 64 bounds the shapes torch.compile sees.
    pad_to_multiple: int = 1
    short_trials: Literal["skip", "error"] = "skip"  # trials shorter than the model's minimum
    # Share of each session's training trials trained on: a seeded (data_params.seed) subset, nested
    # (a smaller share is part of every larger one); the data_scaling protocol sets it per run
    train_fraction: float = 1.0

    def problems(self):
        yield from at_least(self, 1, "n_features", "batch_size", "days_per_batch", "eval_batch_size", "pad_to_multiple")
        yield from at_least(self, 0, "num_workers")
        if not 0 < self.train_fraction <= 1:  # `not` also catches NaN
            yield "train_fraction", f"is {self.train_fraction}: it must be above 0 and at most 1"


@dataclass
class ParamGroupParams:
    """Overrides for one optimizer parameter group; None keeps the training_params value."""

    lr_max: float | None = None
    lr_min: float | None = None
    lr_warmup_steps: int | None = None
    lr_decay_steps: int | None = None
    weight_decay: float | None = None

    def problems(self):
        yield from learning_rate_problems(self)


def learning_rate_problems(params):
    """The learning-rate schedule's values (TrainingParams and ParamGroupParams share them)."""
    yield from non_negative(params, "lr_max", "lr_min", "weight_decay")
    yield from at_least(params, 0, "lr_warmup_steps")
    yield from at_least(params, 1, "lr_decay_steps")


@dataclass
class TrainingParams:
    num_steps: int = 1000  # optimizer updates; each takes grad_accum_steps batches per rank (0: decode the initial weights)
    # Gradient accumulation: the optimizer steps once per grad_accum_steps batches (losses scaled so
    # the update is that of one step on their concatenation). Under torchrun each of N ranks takes its
    # own batches: one update sees N x grad_accum_steps x batch_size trials (harness/batching.py).
    grad_accum_steps: int = 1
    # DDP (torchrun): some parameters get no gradient in a step (the day layers of sessions not in the
    # batch), which DDP must be told about; false saves a graph walk per step where every one is used
    find_unused_parameters: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 10  # model init, dropout and augmentation seed
    # AdamW
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # learning rate: linear warmup from 0, then cosine (or linear) to lr_min at lr_decay_steps, flat after
    lr_max: float = 1e-3
    lr_min: float = 1e-4
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None  # None: num_steps
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    param_groups: dict[str, ParamGroupParams] = field(default_factory=dict)  # model names the groups
    grad_norm_clip: float | None = None
    amp_bf16: bool = False  # bf16 autocast (CUDA only)
    compile: bool = False  # torch.compile the model
    # Exponential moving average of the weights, updated after every optimizer step (harness/train.py,
    # WeightAverage): average = decay * average + (1 - decay) * weights, the weights themselves after
    # step 1. Validation, best.pt (its "model") and the final decoding use the average; last.pt keeps
    # the trained weights and the average ("ema"), so --resume is exact. None: off. 0.999 averages
    # over about the last 1/(1 - decay) = 1000 steps.
    ema_decay: float | None = None
    # validation, checkpoints, logs
    val_every: int = 200  # steps between validations (0: only at the end)
    # Word decoding (a lexicon + n-gram search) at every validation: off in the published recipe, which
    # validates on greedy PER and decodes words once, at the end, with the best checkpoint.
    val_decode_words: bool = False
    best_metric: str = "per"  # key of the model's validation metrics that picks the best checkpoint
    best_mode: Literal["min", "max"] = "min"
    early_stop_patience: int | None = None  # validations without improvement before stopping (None or 0: never)
    checkpoint_every: int = 200  # steps between resumable checkpoints (0: never)
    log_every: int = 20
    progress_bar: bool = True

    def problems(self):
        yield from at_least(self, 0, "num_steps", "val_every", "checkpoint_every")
        yield from at_least(self, 1, "grad_accum_steps", "log_every")
        yield from at_least(self, 0, "early_stop_patience")
        yield from learning_rate_problems(self)
        yield from above(self, 0, "eps", "grad_norm_clip")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"is {self.betas}: it must be two numbers, each at least 0 and below 1"
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:  # `not` also catches NaN
            yield "ema_decay", f"is {self.ema_decay}: it must be above 0 and below 1 (null: no average)"


@dataclass
class HeldOutParams:
    """cross_session and recalibration: the sessions after a cut are held out of training
    (harness/protocols.py). Give one of last_sessions and from_date."""

    last_sessions: int | None = None  # the last K sessions (in date order) are held out
    from_date: str | None = None  # "YYYY.MM.DD" (or YYYY-MM-DD): sessions dated on or after it are held out
    # The day layer of a session the model was not trained on: copied from the nearest earlier
    # training session (nearest_previous), the mean of every training session's (mean), or the
    # identity (identity: x @ I + 0)
    day_layer: Literal["nearest_previous", "mean", "identity"] = "nearest_previous"

    def problems(self):
        yield from at_least(self, 1, "last_sessions")
        if self.from_date is not None and parse_date(self.from_date) is None:
            yield "from_date", f"is {self.from_date!r}: expected a date as YYYY.MM.DD or YYYY-MM-DD"
        if self.last_sessions is not None and self.from_date is not None:
            yield "last_sessions", "and from_date are both given: give one cut"


def parse_date(text: str):
    """A "YYYY.MM.DD" or "YYYY-MM-DD" date (the end of a session name, a cut); None if it is none."""
    import datetime
    import re

    found = re.search(r"(\d{4})[.-](\d{2})[.-](\d{2})$", str(text))
    try:
        return datetime.date(*map(int, found.groups())) if found else None
    except ValueError:
        return None


@dataclass
class RecalibrationParams:
    """recalibration: after training on the sessions before the cut, for each held-out session, each
    k and each draw, fine-tune on k of its labelled sentences and decode the rest."""

    k: list[int] = field(default_factory=lambda: [0, 10, 20, 50])  # calibration sentences per session
    draws: int = 3  # random draws of the k sentences (k = 0 has one)
    seed: int = 0  # seeds the draws
    fine_tune: Literal["day_layer", "all"] = "day_layer"  # what the k sentences train
    steps: int = 100  # optimizer updates per fine-tune (AdamW, constant learning rate)
    lr: float = 0.005
    batch_size: int = 16  # trials per update, drawn with replacement from the k

    def problems(self):
        if not self.k or any(not isinstance(k, int) or k < 0 for k in self.k) or len(set(self.k)) != len(self.k):
            yield "k", f"is {self.k}: it must list distinct whole numbers, 0 or more"
        yield from at_least(self, 1, "draws", "steps", "batch_size")
        yield from above(self, 0, "lr")


@dataclass
class DataScalingParams:
    """data_scaling: one training run per fraction of each session's training trials."""

    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])

    def problems(self):
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or len(set(self.fractions)) != len(self.fractions):
            yield "fractions", f"is {self.fractions}: it must list distinct numbers above 0 and at most 1"


HELD_OUT_PROTOCOLS = ("cross_session", "recalibration")  # the protocols that hold sessions out of training
SEED_KEYS = ("training_params.seed", "data_params.seed")  # what `run --seeds` sets (and compare pools over)


@dataclass
class EvaluationParams:
    splits: list[Literal["train", "val", "test"]] = field(default_factory=lambda: ["val", "test"])
    use_best_checkpoint: bool = True  # decode with the best validated weights, not the last
    bootstrap_resamples: int = 10_000
    bootstrap_seed: int = 0
    # What is trained on and what is decoded (README, "Protocols"): fixed, the dataset's own
    # train/val/test split; cross_session, train on the sessions before a cut and decode every
    # labelled trial of the sessions after it; recalibration, cross_session and then k-sentence
    # fine-tunes of each held-out session; data_scaling, one run per fraction of the training trials
    protocol: Literal["fixed", "cross_session", "recalibration", "data_scaling"] = "fixed"
    held_out: HeldOutParams = field(default_factory=HeldOutParams)
    recalibration: RecalibrationParams = field(default_factory=RecalibrationParams)
    data_scaling: DataScalingParams = field(default_factory=DataScalingParams)

    def problems(self):
        yield from at_least(self, 0, "bootstrap_resamples")
        if not self.splits:
            yield "splits", "is empty: name at least one of train, val, test"
        if self.protocol in HELD_OUT_PROTOCOLS and (
                self.held_out.last_sessions is None and self.held_out.from_date is None):
            yield "protocol", (f"{self.protocol} needs a cut: set evaluation.held_out.last_sessions (the last K "
                               "sessions) or evaluation.held_out.from_date (YYYY.MM.DD)")


@dataclass
class OutputParams:
    results_dir: str = "results"  # runs without --out go to results_dir/<trial_name>_<time>
    # Experiment trackers (harness/trackers.py): each gets the config, the scalars, the validation
    # panels and the final metrics. wandb (offline by default) and mlflow (a file store in the run
    # folder by default) are optional packages: pip install -e '.[trackers]'.
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false: no TensorBoard, whatever `trackers` says (as before trackers)
    keep_checkpoints: bool = True  # False: delete checkpoints/ once the run is DONE

    def problems(self):
        if len(set(self.trackers)) != len(self.trackers):
            yield "trackers", f"is {self.trackers}: it names a tracker twice"


@dataclass
class SlurmParams:
    """Resources of `run --launcher slurm` (harness/launch.py); one task per GPU, DDP across them."""

    partition: str | None = None
    account: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem_gb: float | None = None  # per node; None: the partition's default
    time_min: int = 60  # wall time; the job requeues itself before it runs out
    max_timeouts: int = 3  # time-outs to requeue after (preemptions always requeue)
    array_parallelism: int = 8  # --sweep: array elements that may run at once
    log_dir: str = "results/slurm"  # submitit's job folders: <log_dir>/<job id>/
    sbatch: dict[str, str | int | bool] = field(default_factory=dict)  # other sbatch options, e.g. {qos: high}

    def problems(self):
        yield from at_least(self, 1, "nodes", "cpus_per_task", "time_min", "array_parallelism")
        yield from at_least(self, 0, "gpus_per_node", "max_timeouts")
        yield from above(self, 0, "mem_gb")


@dataclass
class ExperimentConfig:
    trial_name: str
    model_constructor_name: str
    config_setter_name: str | None = None
    model_params: Any = field(default_factory=dict)
    data_params: DataParams = field(default_factory=DataParams)
    training_params: TrainingParams = field(default_factory=TrainingParams)
    evaluation: EvaluationParams = field(default_factory=EvaluationParams)
    output: OutputParams = field(default_factory=OutputParams)
    slurm: SlurmParams = field(default_factory=SlurmParams)

    def problems(self):
        problem = name_problem(self.trial_name)
        if problem:
            yield "trial_name", problem


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a folder name inside results_dir (None if it can): run folders are named
    after trial_name, so a separator, '..' or an absolute path would put one somewhere else."""
    if not name.strip():
        return "is empty: it names the run folder"
    if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 for c in name):
        return f"{name!r} is not a plain name (no '/', '\\', control characters, '.' or '..'): it names the run folder"
    return None


# ----------------------------------------------------------------------------------------------
# Strict conversion from plain data (YAML) to dataclasses


class KeyPath:
    """Errors that name the key path only: values given in code, not read from a file."""

    def error(self, path: str, problem: str) -> UserError:
        return UserError(f"{path}: {problem}")


class _Where:
    """Where a value came from, for error messages."""

    def __init__(self, source: str, overridden: set[str] = frozenset()):
        self.source = source
        self.overridden = overridden

    def error(self, path: str, problem: str) -> UserError:
        if any(path == o or path.startswith((o + ".", o + "[")) or o.startswith((path + ".", path + "["))
               for o in self.overridden):
            return UserError(f"--set {path}: {problem}")
        return UserError(f"{self.source}: {path}: {problem}")


def from_data(cls, data: Any, where: _Where, path: str = ""):
    """Build `cls` (a dataclass or a typing form) from plain data, strictly."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if cls is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return from_data(option, data, where, path)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if data not in args:
            choices = ", ".join(repr(a) for a in args)
            close = difflib.get_close_matches(str(data), [str(a) for a in args], n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise where.error(path, f"{data!r} is not one of {choices}{hint}")
        return data
    if origin is list:
        if not isinstance(data, list):
            raise where.error(path, f"expected a list, got {_describe(data)}")
        return [from_data(args[0], item, where, f"{path}[{i}]") for i, item in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise where.error(path, f"expected a mapping, got {_describe(data)}")
        return {str(k): from_data(args[1], v, where, _join(path, str(k))) for k, v in data.items()}
    if dataclasses.is_dataclass(cls):
        return _dataclass_from_data(cls, data, where, path)
    return _scalar(cls, data, where, path)


def _dataclass_from_data(cls, data, where, path):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise where.error(path or "(top level)", f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise where.error(_join(path, str(key)), f"unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = from_data(hints[name], data[name], where, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise where.error(_join(path, name), "required key is missing")
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(default := f.default_factory()):
            # a section left out: its defaults checked like given values (component params typed)
            values[name] = from_data(hints[name], to_data(default), where, _join(path, name))
        if "registry" in f.metadata and name in values:
            values[name] = _typed_specs(f.metadata["registry"], values[name], where, _join(path, name))
    obj = cls(**values)
    for name, problem in check_values(obj):
        raise where.error(_join(path, name), problem)
    return obj


def _typed_specs(registry: Registry, value, where, path):
    """A component field's value (one ComponentSpec or a list of them) with every spec's name
    looked up and its params typed."""
    if isinstance(value, list):
        return [_typed_spec(registry, spec, where, f"{path}[{i}]") for i, spec in enumerate(value)]
    return _typed_spec(registry, value, where, path)


def _typed_spec(registry: Registry, spec: ComponentSpec, where, path: str) -> ComponentSpec:
    fn = _lookup(registry, spec.name, where, f"{path}.name")
    cls = params_type(fn)
    if cls is not None and isinstance(spec.params, cls):
        return spec
    return ComponentSpec(spec.name, _typed(cls, spec.params, where, f"{path}.params"))


def typed_spec(registry: Registry, spec: ComponentSpec, path: str) -> ComponentSpec:
    """`spec` with its params typed by `registry`'s function (Registry.build uses it for specs made
    in code; a loaded config's specs are typed already). Errors name `path`."""
    if isinstance(spec, dict):
        spec = from_data(ComponentSpec, spec, KeyPath(), path)
    return _typed_spec(registry, spec, KeyPath(), path)


def _scalar(cls, data, where, path):
    if cls is bool:
        if isinstance(data, bool):
            return data
    elif cls is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
    elif cls is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        if isinstance(data, str):  # PyYAML reads "1e-3" (no dot) as a string: accept it as a number
            try:
                return float(data)
            except ValueError:
                pass
    elif cls is str:
        if isinstance(data, str):
            return data
    else:
        raise TypeError(f"config schema uses an unsupported type {cls!r} at {path}")
    raise where.error(path, f"expected {cls.__name__}, got {_describe(data)}")


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_data(obj) -> Any:
    """Dataclasses to plain YAML-safe data (inverse of from_data)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Loading, overrides, typed sections


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder: give a YAML file, e.g. configs/ctc_baseline/tiny.yml")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text file in UTF-8 (byte {error.start}): a config is YAML text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> set[str]:
    """Apply `a.b=VALUE` strings (VALUE parsed as YAML) to nested dict `data`; returns the paths.
    A list element is named by its index: `training_params.betas.0=0.8` or `data_params.preprocessors[0].name=x`,
    in a list the file (or an earlier --set) gives."""
    paths = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set training_params.num_steps=100")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: VALUE is not valid YAML") from None
        parts = _key_parts(key)
        node = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = _parts_path(parts[: i + 1])
            if isinstance(node, list):
                if not isinstance(part, int):
                    raise UserError(f"--set {key}: {_parts_path(parts[:i])} is a list: name an element by its index, "
                                    f"e.g. {_parts_path(parts[:i])}[0]")
                if not -len(node) <= part < len(node):
                    raise UserError(f"--set {key}: {_parts_path(parts[:i])} has {len(node)} elements, no [{part}]")
            elif isinstance(part, int):
                raise UserError(f"--set {key}: {_parts_path(parts[:i]) or '(top level)'} is not a list")
            if last:
                node[part] = value
                break
            child = node[part] if isinstance(node, list) else node.get(part)
            if child is None and not isinstance(parts[i + 1], int):
                child = node[part] = {}
            if child is None:  # a list left at its default: the file does not hold it to index into
                raise UserError(f"--set {key}: {where} is not in the config given: set the whole list, "
                                f"e.g. --set {where}=[...]")
            if not isinstance(child, (dict, list)):
                raise UserError(f"--set {key}: {where} is not a mapping or a list")
            node = child
        paths.add(_parts_path(parts))
    return paths


def _key_parts(key: str) -> list[str | int]:
    """'a.b[0].c' and 'a.b.0.c' -> ['a', 'b', 0, 'c']."""
    parts: list[str | int] = []
    for piece in key.replace("[", ".[").split("."):
        if piece.startswith("[") and piece.endswith("]") and piece[1:-1].lstrip("-").isdigit():
            parts.append(int(piece[1:-1]))
        elif piece.lstrip("-").isdigit():
            parts.append(int(piece))
        elif piece and "[" not in piece and "]" not in piece:
            parts.append(piece)
        else:
            raise UserError(f"--set {key}: expected KEY.PATH of names and list indices, e.g. "
                            "data_params.preprocessors[0].params.std")
    return parts


def _parts_path(parts) -> str:
    """The key path as error messages write it: a.b[0].c."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def params_type(fn) -> type | None:
    """The dataclass annotated on a registered function's first parameter, if any."""
    parameters = list(inspect.signature(fn).parameters)
    if not parameters:
        return None
    cls = typing.get_type_hints(fn).get(parameters[0])
    return cls if dataclasses.is_dataclass(cls) else None


def load_config(path: Path | str | None = None, overrides: list[str] = (), data: dict | None = None,
                source: str | None = None) -> ExperimentConfig:
    """Read a YAML config (or a dict), apply `--set` overrides, validate everything, type the
    model and preprocessor params by their registered functions. Errors name `source` (default: the file)."""
    source = source or (str(path) if path is not None else "config")
    raw = read_yaml(Path(path)) if data is None else copy.deepcopy(data)
    overridden = apply_overrides(raw, list(overrides))
    where = _Where(source, overridden)
    config = from_data(ExperimentConfig, raw, where)

    try:
        constructor = _lookup(MODEL_CONSTRUCTORS, config.model_constructor_name, where, "model_constructor_name")
    except UserError as error:  # the commonest cause of an unknown model: a plugin that was not loaded
        raise UserError(f"{error} (a model folder outside the repository is loaded with B2T_PLUGINS=module, "
                        "importable from PYTHONPATH)") from None
    config.model_params = _typed(params_type(constructor), config.model_params, where, "model_params")
    if config.data_params.preload is not None:
        dp = config.data_params
        dp.features = "memory" if dp.preload else "hdf5"
        warnings.warn(f"{source}: data_params.preload is retired: it means data_params.features: {dp.features} (the "
                      "default, cache, shares one memory-mapped copy among all processes)", RetiredKeyWarning, stacklevel=2)
        dp.preload = None
    if config.config_setter_name in RETIRED_SETTERS:
        warnings.warn(f"{source}: config_setter_name {config.config_setter_name} is no longer needed (the harness "
                      "fills n_days and n_features itself): drop the key", RetiredKeyWarning, stacklevel=2)
        config.config_setter_name = None
    if config.config_setter_name is not None:
        _lookup(CONFIG_SETTERS, config.config_setter_name, where, "config_setter_name")
    return config


class RetiredKeyWarning(DeprecationWarning):
    """A config key or value that still works but is retired. Python hides a DeprecationWarning unless it
    is raised by __main__ (these come from load_config's callers), so main.py shows this one to users."""


# Setters of the shipped models that only filled n_days and n_features, which the harness now fills
# for every model: configs and checkpoints of version 0.1 still name them. Accepted until 0.3.
RETIRED_SETTERS = {"ctc_baseline_setter", "gru_align_setter", "llm_decoder_setter"}


def _lookup(registry, name, where, path):
    try:
        return registry.get(name)
    except UserError as error:
        raise where.error(path, str(error)) from None


def _typed(cls, value, where, path):
    if cls is None:
        if value not in ({}, None):
            raise where.error(path, "this function takes no params")
        return {}
    return from_data(cls, {} if value is None else value, where, path)


def dump_config(config: ExperimentConfig) -> str:
    data = to_data(config)
    if data["data_params"].get("preload") is None:  # retired (load_config maps it): not written any more
        data["data_params"].pop("preload", None)
    return yaml.safe_dump(data, sort_keys=False)
