"""One run, end to end, and the evaluation of a saved checkpoint.

config (+ --set) -> data -> preprocessors -> n_days/n_features filled, config setter -> model -> pre-flight
check -> training -> decoding of the evaluation splits -> per-trial rows -> metrics -> run folder, `DONE` last.

Under torchrun every rank runs these functions: all of them read the data, build the model, train
and decode their share; rank 0 alone makes the run folder (and tells the others its path), logs to
run.log and writes the results (harness/distributed.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import logging.handlers
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from config import HELD_OUT_PROTOCOLS, ExperimentConfig, OutputParams, dump_config, load_config
from harness import distributed, protocols, results
from harness.batching import check_batching
from harness.data import SPLITS, FeatureStore, data_width, find_sessions, fingerprint, open_feature_stores, read_trials
from harness.devices import pick_device
from harness.errors import UserError, brief
from harness.evaluation import evaluate_split
from harness.model_api import BuildContext, DataSummary, DecoderModel
from harness.plugins import REPO_ROOT, load_plugins, plugin_names, plugin_records
from harness.preflight import preflight
from harness.trackers import Trackers, active_trackers, check_trackers
from harness.train import load_checkpoint, train
from registry import CHECKPOINT_FORMATS, CONFIG_SETTERS, DATA_PREPROCESSORS, MODEL_CONSTRUCTORS

log = logging.getLogger("b2t")
CACHE_DIR = REPO_ROOT / ".cache"  # default home of model artefacts (target caches, LMs); B2T_CACHE_DIR overrides


# ----------------------------------------------------------------------------------------------
# Building blocks shared by `run` and `evaluate`


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_other_ranks(seed: int) -> None:
    """After the (identical) model init: ranks other than 0 reseed from (seed, rank), so their
    augmentation and dropout draws differ; rank 0 goes on as one process would."""
    if distributed.rank() > 0:
        seed_everything(int(np.random.SeedSequence([seed, distributed.rank()]).generate_state(1)[0]))


@contextlib.contextmanager
def claimed_run_dir(out: str | None, resume: bool, overwrite: bool, protected: dict, results_dir: str, name: str):
    """Rank 0 makes and claims the run folder: --out (results.prepare_out_dir), else a new folder
    results_dir/<name>_<time>; it holds the folder's lock until the run ends. Every rank gets its path."""
    folder = None
    if distributed.is_main():
        folder = (results.prepare_out_dir(out, resume, overwrite, protected) if out is not None
                  else results.new_run_dir(results_dir, name, claim=True))
    try:
        yield Path(distributed.broadcast_object(str(folder.path) if folder else None))
    finally:
        if folder is not None:
            folder.release()


def run_inputs(config: ExperimentConfig, config_path: str | None) -> dict:
    """What a run reads, which --out must never hold (--overwrite would delete it)."""
    return {"the config file": config_path, "data_params.data_dir": config.data_params.data_dir}


def check_output(out: str | None, resume: bool, overwrite: bool, results_dir: str, protected: dict) -> None:
    """Where the run folder will go: checked (never made) before the run's setup."""
    if out is not None:
        results.check_out_dir(out, resume, overwrite, protected)
    else:
        results.check_writable(results_dir, "output.results_dir")


def build_preprocessors(config: ExperimentConfig) -> list:
    return [DATA_PREPROCESSORS.build(spec, path=f"data_params.preprocessors[{i}]")
            for i, spec in enumerate(config.data_params.preprocessors)]


def output_width(preprocessors, n_features: int) -> int:
    """Feature width the model sees: preprocessors that change it say so via output_features()."""
    for preprocess in preprocessors:
        if hasattr(preprocess, "output_features"):
            n_features = preprocess.output_features(n_features)
    return n_features


def read_splits(config: ExperimentConfig, splits, day_index: dict[str, int] | None = None) -> dict:
    dp = config.data_params
    return {s: read_trials(dp.data_dir, dp.sessions, s, dp.n_features, day_index, artefact_cache_dir()) for s in splits}


def drop_short_trials(trials: dict, min_steps: int, policy: str) -> tuple[dict, dict]:
    """Trials the model cannot process (e.g. shorter than one patch): skipped and counted, or refused.
    Returns the kept trials and the number skipped per split."""
    kept, skipped = {}, {}
    for split, ts in trials.items():
        short = [t for t in ts if t.n_time_steps < min_steps]
        if short and policy == "error":
            t = short[0]
            raise UserError(f"{t.path} {t.group}: {t.n_time_steps} time steps, fewer than the model's minimum "
                            f"{min_steps} ({len(short)} such trials in {split}; set data_params.short_trials: skip)")
        kept[split] = [t for t in ts if t.n_time_steps >= min_steps]
        skipped[split] = len(short)
        if ts and not kept[split]:  # e.g. a patch_size longer than every trial
            raise UserError(f"every {split} trial ({len(ts)}, the longest {max(t.n_time_steps for t in ts)} time steps) "
                            f"is shorter than the model's minimum of {min_steps} time steps: check model_params "
                            "(e.g. patch_size)")
    return kept, skipped


def log_skipped(skipped: dict, min_steps: int) -> None:
    for split, n in skipped.items():
        if n:
            log.warning("skipped %d %s trials shorter than the model's minimum of %d time steps", n, split, min_steps)


def prepare_data(config: ExperimentConfig, splits) -> tuple[dict, list]:
    """Sessions (all found unless listed), the splits' trials (labels, no features), the
    preprocessors, the fields every model derives from the data, and the config setter run on
    them: everything a model is built from."""
    dp = config.data_params
    dp.sessions = dp.sessions or find_sessions(dp.data_dir)
    read = read_splits(config, splits)
    dp.n_features = data_width(read, dp.n_features)  # the width found (a given one was checked file by file)
    trials = protocols.select_trials(read, config)
    preprocessors = build_preprocessors(config)
    width = output_width(preprocessors, dp.n_features)
    fill_data_fields(config, len(dp.sessions), width)
    if config.config_setter_name:
        summary = DataSummary(sessions=list(dp.sessions), trials=trials, n_features=width)
        CONFIG_SETTERS.get(config.config_setter_name)(config, summary)
    return trials, preprocessors


DATA_FIELDS = ("n_days", "n_features")  # model_params fields the harness fills from the data


def fill_data_fields(config: ExperimentConfig, n_days: int, n_features: int) -> None:
    """Set `model_params.n_days` (sessions, one day layer each) and `model_params.n_features` (the
    width after the preprocessors) wherever the model's params have them: no config sets them, and
    config.yaml records what the model was built with."""
    params = config.model_params
    names = {f.name for f in dataclasses.fields(params)} if dataclasses.is_dataclass(params) else set()
    for name, value in zip(DATA_FIELDS, (n_days, n_features)):
        if name in names:
            setattr(params, name, value)


def artefact_cache_dir() -> Path:
    """Where models keep artefacts and the feature cache lives: B2T_CACHE_DIR, else .cache/ in the repository."""
    return Path(os.environ.get("B2T_CACHE_DIR", str(CACHE_DIR)))


def feature_stores(trials: dict, config: ExperimentConfig) -> dict:
    """The splits' features from where data_params.features says (harness.data.FeatureStore)."""
    return open_feature_stores(trials, config.data_params.features, artefact_cache_dir())


def build_model(config: ExperimentConfig, sessions, trials, device, n_features: int | None = None) -> DecoderModel:
    """The model the config names; n_features: the width it sees (default: after the config's preprocessors)."""
    if n_features is None:
        n_features = output_width(build_preprocessors(config), config.data_params.n_features)
    constructor = MODEL_CONSTRUCTORS.get(config.model_constructor_name)
    cache_dir = str(artefact_cache_dir())
    ctx = BuildContext(config=config, sessions=sessions, trials=trials, device=device, cache_dir=cache_dir,
                       n_features=n_features)
    try:
        model = constructor(config.model_params, ctx)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        # the CPU allocator says it with a RuntimeError; any other RuntimeError is a bug of the model
        if type(error) is RuntimeError and "allocate" not in str(error) and "out of memory" not in str(error):
            raise
        raise UserError(f"model {config.model_constructor_name} does not fit in memory on {device} with these "
                        f"model_params ({brief(error)})") from None
    if not isinstance(model, DecoderModel):
        raise TypeError(f"model constructor '{config.model_constructor_name}' returned {type(model).__name__}, "
                        "not a harness.model_api.DecoderModel")
    return model.to(device)


@contextlib.contextmanager
def console_logging(*extra: logging.Handler):
    """INFO and above to the console (through tqdm, so progress bars stay intact) and to `extra`."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.INFO)
    console = logging_redirect_tqdm()
    if not distributed.is_main():  # the other ranks: warnings and errors on the console, nothing else
        extra, console = (distributed.rank_console_handler(),), contextlib.nullcontext()
    for handler in extra:
        root.addHandler(handler)
    try:
        with console:
            yield
    finally:
        for handler in extra:
            root.removeHandler(handler)
        root.setLevel(previous)


@contextlib.contextmanager
def setup_logging():
    """Console logging while a run is set up; what is logged before the run folder exists (a model
    constructor filling a target cache or building an LM) is held for run.log (run_logging)."""
    held = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
    with console_logging(held):
        yield held


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def run_logging(run_dir: Path, held: logging.handlers.MemoryHandler | None = None):
    """Log to the console and to run_dir/run.log, which starts with what `held` kept (rank 0: the
    others only log their warnings to the console). An error that ends the run lands in run.log
    too, with its traceback: on slurm, run.log is what a user reads."""
    if not distributed.is_main():
        with console_logging():
            yield
        return
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if held is not None:
        held.setTarget(handler)
        held.flush()
        held.close()
    try:
        with console_logging(handler):
            try:
                yield
            except BaseException as error:
                _log_error_to_file(handler, error)
                raise
    finally:
        handler.close()


def _log_error_to_file(handler: logging.Handler, error: BaseException) -> None:
    """The error that ends a run, into run.log only (the console gets main.py's one line or the
    traceback already): a user mistake as one line, anything else with its traceback."""
    if isinstance(error, UserError):
        record = logging.makeLogRecord({"name": "b2t", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "msg": "%s", "args": (str(error),)})
    elif isinstance(error, KeyboardInterrupt):  # Ctrl-C or `kill PID` (main.py): no bug, no traceback
        record = logging.makeLogRecord({"name": "b2t", "levelno": logging.WARNING, "levelname": "WARNING",
                                        "msg": "the run was interrupted (%s): resume it with --resume --out RUN_DIR",
                                        "args": (str(error) or "Ctrl-C",)})
    else:
        record = logging.makeLogRecord({"name": "b2t", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "msg": "the run stopped: %s: %s (resume it with --resume --out RUN_DIR)",
                                        "args": (type(error).__name__, error),
                                        "exc_info": (type(error), error, error.__traceback__)})
    handler.handle(record)


def decode_splits(model, config, trials, stores, preprocessors, device) -> tuple[list, dict]:
    """Decode the evaluation splits: `evaluation.splits`, or under cross_session every held-out
    split (trials[held_out/<split>], decoded and reported as <split>)."""
    rows, metrics = [], {}
    held = protocols.held_out_splits(trials)
    keys = held if held else config.evaluation.splits
    for key in keys:
        split = key.removeprefix(protocols.HELD_OUT)
        if not trials.get(key):
            log.info("no %s trials to decode", split)
            continue
        split_rows, split_metrics, _ = evaluate_split(
            model, split, trials[key], stores[key], preprocessors, device=device,
            eval_batch_size=config.data_params.eval_batch_size, amp=config.training_params.amp_bf16,
            bootstrap_resamples=config.evaluation.bootstrap_resamples, bootstrap_seed=config.evaluation.bootstrap_seed,
            pad_to_multiple=config.data_params.pad_to_multiple, show_progress=config.training_params.progress_bar)
        rows += split_rows
        metrics[split] = split_metrics
        log.info("%s: %s", split, _summary(split_metrics))
    return rows, metrics


def _summary(metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def write_run_outputs(run_dir: Path, rows, metrics, meta) -> None:
    results.write_rows_csv(run_dir / "per_trial.csv", rows)
    results.write_json(run_dir / "metrics.json", metrics)
    results.write_json(run_dir / "meta.json", results.finish_meta(meta))
    results.mark_done(run_dir)


# ----------------------------------------------------------------------------------------------
# `run`


def load_run_config(config_path: str | None, overrides: list[str], out: str | None, resume: bool) -> ExperimentConfig:
    """`run`'s config: --config FILE, or with --resume and no --config the run folder's own config.yaml."""
    if config_path is not None:
        return load_config(config_path, overrides)
    if resume and out is not None:
        if (Path(out) / "config.yaml").is_file():
            return load_config(Path(out) / "config.yaml", overrides)
        results.check_out_dir(out, resume, False)  # a folder in use or of other files: say that first
        raise UserError(f"--resume: {out} holds no run to continue (no config.yaml): give --config FILE to start "
                        "one there")
    raise UserError("run needs --config FILE")


def run(config_path: str | None, overrides: list[str], out: str | None, resume: bool, overwrite: bool,
        check: bool = True) -> Path:
    """One run: setup (config, data, model, pre-flight check; all before the run folder exists),
    then training, then the decode-and-write tail shared with `evaluate`."""
    load_plugins()
    if resume and out is None:
        raise UserError("--resume needs --out RUN_DIR (the run folder to continue)")
    if out is not None and resume and results.is_finished(out):
        log.warning("%s is already finished (DONE): nothing to do", out)
        return Path(out)
    config = load_run_config(config_path, overrides, out, resume)
    check_trackers(active_trackers(config.output))  # wandb or mlflow named but not installed: said now
    protected = run_inputs(config, config_path)
    check_output(out, resume, overwrite, config.output.results_dir, protected)
    dp = config.data_params
    trials, preprocessors = prepare_data(config, needed_splits(config))
    width = output_width(preprocessors, dp.n_features)

    # Everything that can fail on bad input happens before the run folder exists.
    device = distributed.local_device(pick_device(config.training_params.device))
    resolved = dump_config(config)
    saved = Path(out) / "config.yaml" if out else None
    # Compared as loaded, not as text: a key added to the schema since the run began (its default) is no change
    if resume and saved.is_file() and dump_config(load_config(saved, source=str(saved))) != resolved:
        raise UserError(f"{saved} differs from the config given now: resume with the run's own config "
                        f"(omit --config and --set) or start a new run")
    with distributed.process_group(device):
        seed_everything(config.training_params.seed)
        with setup_logging() as held:
            with distributed.main_first():  # rank 0 fills shared caches first
                model = build_model(config, list(dp.sessions), trials, device, width)
            seed_other_ranks(config.training_params.seed)
            trials, skipped = drop_short_trials(trials, model.min_time_steps, dp.short_trials)
            if config.training_params.num_steps > 0:
                check_batching(trials["train"], dp.batch_size, dp.days_per_batch, warn=True)
            stores = feature_stores(trials, config)
            if check:
                log.info("pre-flight check of the model: %.1f s",
                         preflight(model, config, trials, stores, preprocessors, device, width))
        meta = start_meta(device, data_fingerprint=lambda: fingerprint(trials, stores))

        with (claimed_run_dir(out, resume, overwrite, protected, config.output.results_dir, config.trial_name) as run_dir,
              run_logging(run_dir, held),
              Trackers.for_run(config, run_dir) as trackers):
            log.info("run folder: %s", run_dir)
            if distributed.describe():
                log.info("torch.distributed: %s; each update sees %d x %d x %d trials (ranks x grad_accum_steps "
                         "x batch_size)", distributed.describe(), distributed.world_size(),
                         config.training_params.grad_accum_steps, dp.batch_size)
            if distributed.is_main():
                results.atomic_write_text(run_dir / "config.yaml", resolved)
            log_skipped(skipped, model.min_time_steps)
            log.info("model %s: %d trainable parameters; trials %s", config.model_constructor_name,
                     sum(p.numel() for p in model.parameters() if p.requires_grad), {s: len(t) for s, t in trials.items()})

            state = None
            if config.training_params.num_steps > 0:
                state = train(model, config, trials, stores, preprocessors, device, run_dir, resume=resume,
                              trackers=trackers)
            best = run_dir / "checkpoints" / "best.pt"
            if config.evaluation.use_best_checkpoint and best.is_file():
                model.load_state_dict(load_checkpoint(best)["model"])
                log.info("decoding with the best checkpoint (step %s)", state.best_step if state else "?")
            if meta is not None:
                meta["n_steps"] = state.step if state else 0
            run_info = {
                "trial_name": config.trial_name,
                "model": config.model_constructor_name,
                "steps": state.step if state else 0,
                "best_step": state.best_step if state else None,
                "n_train_trials": len(trials.get("train", [])),
                "validation_history": state.history if state else [],
            }
            trackers.start(state.step if state else 0)  # train() started them; without training, started here
            trackers.final(decode_and_write(run_dir, model, config, trials, stores, preprocessors, device, meta,
                                            run_info))
            if distributed.is_main() and not config.output.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            log.info("finished: %s", run_dir)
    return run_dir


def needed_splits(config: ExperimentConfig) -> list[str]:
    """The splits a run reads: train, val (it picks the checkpoint) and the decoded ones; every split
    under cross_session (the held-out sessions' labelled trials, whatever their split)."""
    if config.evaluation.protocol in HELD_OUT_PROTOCOLS:
        return list(SPLITS)
    needed = {"train", "val", *config.evaluation.splits}
    return [s for s in SPLITS if s in needed]


def check_model(config: ExperimentConfig) -> None:
    """The pre-flight check alone, on this machine's CPU, e.g. before a slurm job is submitted: the
    data read, the model built and one small batch through it."""
    config = copy.deepcopy(config)
    dp = config.data_params
    trials, preprocessors = prepare_data(config, needed_splits(config))
    width = output_width(preprocessors, dp.n_features)
    config.training_params.amp_bf16 = False  # CPU
    seed_everything(config.training_params.seed)
    model = build_model(config, list(dp.sessions), trials, torch.device("cpu"), width)
    trials, _ = drop_short_trials(trials, model.min_time_steps, dp.short_trials)
    stores = {s: FeatureStore(ts, "hdf5") for s, ts in trials.items()}  # reads 4 trials: no cache built here
    seconds = preflight(model, config, trials, stores, preprocessors, torch.device("cpu"), width)
    print(f"pre-flight check of {config.model_constructor_name} on this machine's CPU: passed in {seconds:.1f} s")


def start_meta(device, data_fingerprint) -> dict | None:
    """meta.json's start (rank 0 alone writes it: base_meta runs git and reads package metadata)."""
    if not distributed.is_main():
        return None
    meta = results.base_meta(str(device))
    meta["world_size"] = distributed.world_size()
    meta["plugins"] = plugin_records()
    meta["data_fingerprint"] = data_fingerprint()
    return meta


def decode_and_write(run_dir: Path, model, config, trials, stores, preprocessors, device, meta, run_info: dict,
                     kaggle_csv: str | None = None) -> dict | None:
    """The tail of `run` and `evaluate`: decode the evaluation splits, then (rank 0) per_trial.csv,
    metrics.json, meta.json, the Kaggle CSV if asked, and DONE last. Returns metrics.json's content
    (None on the other ranks)."""
    held_out = protocols.held_out_splits(trials)
    if held_out:  # cross_session: the held-out sessions' day layers first
        section = protocols.prepare_held_out(model, config)
        log.info("held-out sessions %s; their day layers: %s", ", ".join(section["held_out_sessions"]),
                 section["day_layer_sources"])
    rows, metrics = decode_splits(model, config, trials, stores, preprocessors, device)
    if not distributed.is_main():
        return None
    if held_out:
        protocols.add_days_since_training(rows, section)
        metrics["protocol"] = protocols.held_out_section(section, rows, config)
    metrics["run"] = run_info
    if kaggle_csv:
        write_kaggle_csv(Path(kaggle_csv), rows)
    write_run_outputs(run_dir, rows, metrics, meta)
    return metrics


# ----------------------------------------------------------------------------------------------
# `evaluate`


def load_any_checkpoint(path: Path) -> tuple[dict, Path]:
    """(payload with "config" and "model", the file read) from a run folder (its best, else last
    checkpoint), a checkpoint file, or a folder of a registered checkpoint format (e.g. the
    reference baseline's, registered by ctc_baseline)."""
    for name in CHECKPOINT_FORMATS.names():
        found = CHECKPOINT_FORMATS.get(name)(path)
        if found is not None:
            return {"config": found["config"], "model": found["model"]}, found["file"]
    candidates = [path] if path.is_file() else [path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        formats = ", ".join(CHECKPOINT_FORMATS.names()) or "none"
        raise UserError(f"no checkpoint found at {path}: give a run folder (with checkpoints/best.pt), a .pt file, "
                        f"or a folder of a registered checkpoint format ({formats})")
    try:
        payload = load_checkpoint(found)
    except Exception as error:  # pickle/zip errors of many kinds: all mean "not our checkpoint"
        raise UserError(f"{found}: not a readable checkpoint ({brief(error)})") from None
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise UserError(f"{found} is not a b2t-bench checkpoint (no config/model inside)")
    return payload, found


def evaluate(checkpoint: str, data_dir: str, split: str, out: str | None, kaggle_csv: str | None,
             overwrite: bool = False, check: bool = True) -> Path:
    load_plugins()
    payload, path = load_any_checkpoint(Path(checkpoint))
    require_plugin(payload)
    config = load_config(data=payload["config"], source=f"{path} (its config)")
    # A checkpoint is data: where the results go is this command's choice, never its config's.
    config.output.results_dir = OutputParams().results_dir
    protected = {"the checkpoint": path, "--data-dir": data_dir}
    check_output(out, False, overwrite, config.output.results_dir, protected)
    if kaggle_csv is not None:
        if Path(kaggle_csv).is_dir():
            raise UserError(f"--kaggle-csv {kaggle_csv} is a folder: give a file name")
        results.check_writable(Path(kaggle_csv).parent, "--kaggle-csv")
    known = list(config.data_params.sessions)
    config.data_params.data_dir = data_dir
    present = find_sessions(data_dir)
    unknown = [s for s in present if s not in known]
    if unknown:
        raise UserError(f"{data_dir} holds sessions the checkpoint was not trained on: {', '.join(unknown)} "
                        f"(it knows {len(known)} sessions: {known[0]} ... {known[-1]})")
    config.data_params.sessions = present
    config.evaluation.splits = [split]
    day_index = {s: known.index(s) for s in present}
    preprocessors = build_preprocessors(config)
    width = output_width(preprocessors, config.data_params.n_features)
    fill_data_fields(config, len(known), width)
    device = distributed.local_device(pick_device(config.training_params.device))
    with distributed.process_group(device):
        with setup_logging() as held:
            with distributed.main_first():  # rank 0 fills shared caches first
                model = build_model(config, known, {}, device, width)  # day layers: the checkpoint's sessions
            load_weights(model, payload["model"], path)
            if config.evaluation.protocol in HELD_OUT_PROTOCOLS:
                # held-out sessions' day layers, as the run decoded them (the checkpoint holds them untrained)
                trained_on = copy.deepcopy(config)
                trained_on.data_params.sessions = known
                log.info("held-out sessions' day layers: %s", protocols.prepare_held_out(model, trained_on)["day_layer_sources"])
            trials, skipped = drop_short_trials(read_splits(config, [split], day_index), model.min_time_steps,
                                                config.data_params.short_trials)
            stores = feature_stores(trials, config)
            if check:
                log.info("pre-flight check of the model: %.1f s",
                         preflight(model, config, trials, stores, preprocessors, device, width))
        meta = start_meta(device, data_fingerprint=lambda: fingerprint(trials, stores))
        if meta is not None:
            meta["checkpoint"] = str(path)
        with (claimed_run_dir(out, False, overwrite, protected, config.output.results_dir,
                              f"{config.trial_name}-eval-{split}") as run_dir, run_logging(run_dir, held)):
            log.info("run folder: %s", run_dir)
            if distributed.describe():
                log.info("torch.distributed: %s; each decodes its share of the batches", distributed.describe())
            if distributed.is_main():
                results.atomic_write_text(run_dir / "config.yaml", dump_config(config))
            log_skipped(skipped, model.min_time_steps)
            run_info = {"trial_name": config.trial_name, "model": config.model_constructor_name, "checkpoint": str(path)}
            decode_and_write(run_dir, model, config, trials, stores, preprocessors, device, meta, run_info, kaggle_csv)
            if kaggle_csv:
                log.info("Kaggle CSV: %s", kaggle_csv)
            log.info("finished: %s", run_dir)
    return run_dir


def load_weights(model: DecoderModel, weights, path: Path) -> None:
    """A checkpoint's weights into the model its config builds: a mismatch (another model, other sizes, a
    crafted file) is the checkpoint's fault, said in one line."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as error:
        # torch says it over several lines: "Error(s) in loading state_dict ...:\n\tsize mismatch for w: ..."
        detail = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
        raise UserError(f"{path}: its weights do not fit the {type(model).__name__} its config builds "
                        f"({detail[:300]})") from None


def require_plugin(payload: dict) -> None:
    """A checkpoint of a model no loaded plugin registers: say which plugin module made it."""
    name = (payload.get("config") or {}).get("model_constructor_name")
    if name is None or name in MODEL_CONSTRUCTORS:
        return
    made_by = [p for p in payload.get("plugins") or [] if p.get("module") not in plugin_names()]
    if made_by:
        where = "; ".join(f"{p['module']} ({p.get('file')}"
                          + (f", git {p['git_commit'][:12]}" if p.get("git_commit") else "") + ")" for p in made_by)
        raise UserError(f"the checkpoint's model '{name}' is registered by no loaded plugin; it was trained with "
                        f"{where}: set B2T_PLUGINS={','.join(p['module'] for p in made_by)} (importable from PYTHONPATH)")


def write_kaggle_csv(path: Path, rows: list[dict]) -> None:
    """id,text with ids 0..N-1 in session order then trial order (the order rows are decoded in)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "text"])
    for i, row in enumerate(rows):
        writer.writerow([i, row.get("predicted_text") or ""])
    results.atomic_write_text(path, buffer.getvalue())
