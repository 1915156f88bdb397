"""Experiment trackers: where a run's config, scalars, validation panels and final metrics go besides
the run folder (`output.trackers`: any of tensorboard, wandb, mlflow).

Each tracker is one small class with the same methods; `Trackers` hands every call to each of the
run's trackers. Rank 0 alone has any (the other ranks' `Trackers` is empty), and nothing here is
needed for the run itself: its results are the run folder's files.

- tensorboard: RUN_DIR/tensorboard/, the scalars, the config as hyperparameters (the HParams
  dashboard, in the same event files as the scalars), a text panel and figures at every validation.
- wandb: offline unless WANDB_MODE says otherwise; its files in RUN_DIR/wandb/ (`wandb sync` uploads
  them later). The project is WANDB_PROJECT, else b2t-bench.
- mlflow: a local file store in RUN_DIR/mlruns/ unless MLFLOW_TRACKING_URI names another; the
  experiment is MLFLOW_EXPERIMENT_NAME, else b2t-bench. The config goes in as flattened params.

wandb and MLflow are optional packages (check_trackers says how to install them). A resumed run
goes on logging into the same wandb and MLflow run: their ids are kept in RUN_DIR/trackers.json.
A tracker that fails while the run goes on is dropped with a warning; the run itself goes on.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np
import torch

from config import to_data
from harness import distributed, results
from harness.errors import UserError, brief

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
# tracker -> (module to import, what to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
IDS_FILE = "trackers.json"  # in the run folder: the wandb and MLflow run ids, so --resume logs into the same runs
EXPERIMENT = "b2t-bench"  # the wandb project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
EXAMPLES = 4  # validation trials whose reference and prediction are shown at every validation
FIGURE_RESAMPLES = 200  # bootstrap resamples of the per-session error bars at validation (cheap: a diagnostic)


def active_trackers(output) -> list[str]:
    """The trackers a run uses: output.trackers, without tensorboard when output.tensorboard is false."""
    return [name for name in dict.fromkeys(output.trackers) if name != "tensorboard" or output.tensorboard]


def check_trackers(names) -> None:
    """Every tracker named can be imported; else one line that says what to install (before the run folder)."""
    for name in names:
        if name not in PACKAGES:
            raise UserError(f"output.trackers: unknown tracker '{name}' (known: {', '.join(TRACKERS)})")
        module, package = PACKAGES[name]
        try:
            importlib.import_module(module)
        except Exception as error:  # not installed, or installed broken
            raise UserError(f"output.trackers names {name}, but {module} cannot be imported here ({brief(error)}): "
                            f"install the trackers extra (pip install -c constraints.txt -e '.[trackers]') or "
                            f"pip install {package}") from None


# ----------------------------------------------------------------------------------------------
# The fan-out


class Trackers:
    """The run's trackers: made before the step is known, started by `start(step)` (train() calls it
    once a resume has loaded the step; runner.run when nothing is trained), closed by `close` or at
    the end of a `with` block (a failed run marked so)."""

    def __init__(self, names, run_dir: Path, config):
        self.names, self.run_dir, self.config = list(names), Path(run_dir), config
        self.trackers: list = []
        self.started = False
        self.step = 0
        self.example_keys: list[tuple] | None = None  # the validation trials shown, fixed at the first validation
        self.model_figures = True  # False once the model's validation_figures failed

    @classmethod
    def for_run(cls, config, run_dir: Path) -> Trackers:
        return cls(active_trackers(config.output), run_dir, config)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def start(self, step: int = 0) -> Trackers:
        """Start every tracker (rank 0; once): `step` is where training starts (> 0 on a resume)."""
        if self.started:
            return self
        self.started, self.step = True, step
        if not distributed.is_main():
            return self
        ids_file = self.run_dir / IDS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        for name in self.names:
            tracker = TRACKER_TYPES[name]()
            try:
                kept = tracker.start(self.run_dir, self.config, step, ids.get(name) or {})
            except Exception as error:
                self.close(failed=True)
                raise UserError(f"output.trackers: {name} did not start ({brief(error)}): once it can, continue the "
                                f"run with --resume --out {self.run_dir}") from None
            self.trackers.append(tracker)
            if kept and kept != ids.get(name):
                ids[name] = kept
                results.write_json(ids_file, ids)
        return self

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # the run goes on: its results are the run folder's
                log.warning("output.trackers: %s failed (%s) and logs nothing more in this run", tracker.name,
                            brief(error))
                self.trackers.remove(tracker)
                try:
                    tracker.close(True)
                except Exception:
                    pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.step = max(self.step, step)
        if values:
            self._each("scalars", step, values)

    def table(self, step: int, tag: str, columns: list[str], rows: list[list[str]]) -> None:
        self._each("table", step, tag, columns, rows)

    def figure(self, step: int, tag: str, figure) -> None:
        """A matplotlib Figure, rendered once for every tracker."""
        if self.trackers:
            self._each("image", step, tag, figure_rgb(figure))

    def final(self, metrics: dict | None) -> None:
        """The run's final metrics (metrics.json's content; None on ranks other than 0)."""
        if metrics is None:
            return
        self._each("final", self.step, final_scalars(metrics), metrics)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as error:
                log.warning("output.trackers: %s did not close cleanly (%s)", tracker.name, brief(error))
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


# ----------------------------------------------------------------------------------------------
# What is logged


def flatten(data, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config data -> {"training_params.lr_max": 0.001, ...}: lists as JSON, None as "null"."""
    if isinstance(data, dict):
        if not data and prefix:
            return {prefix: "{}"}
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, (list, tuple)):
        return {prefix: json.dumps(data)}
    if data is None:
        return {prefix: "null"}
    return {prefix: data}


def is_number(value) -> bool:
    """A metric value to log as a scalar (bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def final_scalars(metrics: dict) -> dict[str, float]:
    """metrics.json's numbers as final/<split>/<key> (CIs as _low/_high; per-session values stay in
    metrics.json) and final/run/<key>."""
    out = {}
    for split, entry in metrics.items():
        for key, value in (entry or {}).items() if isinstance(entry, dict) else ():
            if is_number(value):
                out[f"final/{split}/{key}"] = float(value)
            elif key.endswith("_ci") and isinstance(value, list) and len(value) == 2 and all(map(is_number, value)):
                out[f"final/{split}/{key}_low"], out[f"final/{split}/{key}_high"] = map(float, value)
    return out


def hparam_metrics(config) -> list[str]:
    """The scalars the HParams dashboard shows beside the hyperparameters."""
    from harness.metrics import METRICS

    tags = ["val/loss", f"val/{config.training_params.best_metric}"]
    tags += [f"final/{split}/{m}" for split in config.evaluation.splits for m in METRICS]
    return list(dict.fromkeys(tags))


def _cell(value) -> str:
    return "" if value is None else str(value)


def example_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the example decodes: sentences when the model writes text, else phonemes."""
    text = any(r.get("predicted_text") is not None for r in rows)
    ref, hyp, edits, count, unit = (("reference_text", "predicted_text", "word_edits", "word_count", "words") if text
                                    else ("reference_phonemes", "predicted_phonemes", "phoneme_edits", "phoneme_count",
                                          "phonemes"))
    table = []
    for r in rows:
        errors = f"{r.get(edits)} / {r.get(count)} {unit}" if r.get(edits) is not None else ""
        table.append([f"{r['session']} block {r['block_num']} trial {r['trial_num']}", _cell(r.get(ref)),
                      _cell(r.get(hyp)) or "(nothing)", errors])
    return ["trial", "reference", "predicted", "errors"], table


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|") or " "

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _key(row_or_trial) -> tuple:
    get = row_or_trial.get if isinstance(row_or_trial, dict) else lambda k: getattr(row_or_trial, k)
    return get("session"), int(get("block_num")), int(get("trial_num"))


def pick_examples(rows: list[dict], n: int = EXAMPLES) -> list[tuple]:
    """The keys of `n` trials spread evenly over the rows (so over the sessions)."""
    if not rows:
        return []
    positions = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    return [_key(rows[i]) for i in positions]


def log_validation(trackers: Trackers, step: int, rows: list[dict], metrics: dict, *, model, trials, store,
                   preprocessors, device, config) -> None:
    """Rank 0, after a validation: the example decodes (the same trials every time), the error per
    session with the bootstrap error bars of the validation's `metrics` (FIGURE_RESAMPLES resamples when
    trackers are on), and the model's own figures (DecoderModel.validation_figures) for the first example trial."""
    if not trackers.active or not rows:
        return
    from harness.plots import per_group_figure

    if trackers.example_keys is None:
        trackers.example_keys = pick_examples(rows)
    by_key = {_key(r): r for r in rows}
    examples = [by_key[k] for k in trackers.example_keys if k in by_key]
    trackers.table(step, "val/examples", *example_table(examples))
    figure = per_group_figure([(f"step {step}", metrics)], "val", "by_session", "session")
    if figure is not None:
        trackers.figure(step, "val/per_session", figure)
    if trackers.model_figures and trackers.example_keys:
        for name, figure in model_figures(trackers, model, trackers.example_keys[0], trials, store, preprocessors,
                                          device, config).items():
            trackers.figure(step, f"val/{name}", figure)


def model_figures(trackers: Trackers, model, key: tuple, trials, store, preprocessors, device, config) -> dict:
    """model.validation_figures on a batch of the one trial `key`; a model whose hook fails is logged and
    not asked again (the run goes on)."""
    from harness.batching import TrialDataset, collate
    from harness.evaluation import apply_preprocessors, autocast

    index = next((i for i, t in enumerate(trials) if _key(t) == key), None)
    if index is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        batch = collate([TrialDataset(trials, store)[index]], pad_to_multiple=config.data_params.pad_to_multiple)
        batch = apply_preprocessors(batch.to(device), preprocessors, training=False)
        with torch.no_grad(), autocast(device, config.training_params.amp_bf16):
            return dict(model.validation_figures(batch) or {})
    except Exception:
        log.warning("%s.validation_figures failed: no model figures in the trackers from here on",
                    type(model).__name__, exc_info=True)
        trackers.model_figures = False
        return {}
    finally:
        model.train(was_training)


def figure_rgb(figure) -> np.ndarray:
    """A matplotlib Figure (object API, no pyplot) rendered to an (H, W, 3) uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ----------------------------------------------------------------------------------------------
# The trackers. start(run_dir, config, step, kept) takes what the last start kept (trackers.json) and
# returns what to keep for a resume, or None.


class TensorBoardTracker:
    name = "tensorboard"

    def start(self, run_dir: Path, config, step: int, kept: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run hides what the interrupted one logged after its last checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(to_data(config)).items()}
        metrics = hparam_metrics(config)
        # written by the run's own writer (add_hparams would make a run folder of its own): the HParams
        # dashboard then shows this run's scalars beside its hyperparameters
        for summary in hparams(flat, dict.fromkeys(metrics, 0.0)):
            self.writer.file_writer.add_summary(summary)
        return None

    def scalars(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def table(self, step, tag, columns, rows):
        self.writer.add_text(tag, markdown_table(columns, rows), step)

    def image(self, step, tag, rgb):
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def final(self, step, values, metrics):
        self.scalars(step, values)

    def close(self, failed):
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def start(self, run_dir: Path, config, step: int, kept: dict):
        import wandb

        offline = "WANDB_MODE" not in os.environ  # the user's WANDB_MODE (online, disabled...) wins
        if offline:  # the process's wandb settings too: nothing of wandb's own goes out either
            wandb.setup(settings=wandb.Settings(mode="offline"))
        run_id = kept.get("run_id") or secrets.token_hex(6)
        settings = wandb.Settings(console="off") if "WANDB_CONSOLE" not in os.environ else None  # run.log has it
        self.run = wandb.init(dir=str(run_dir), id=run_id, resume="allow", config=to_data(config), name=run_dir.name,
                              project=None if os.environ.get("WANDB_PROJECT") else EXPERIMENT,
                              mode="offline" if offline else None, settings=settings)
        return {"run_id": run_id}

    def scalars(self, step, values):
        self.run.log(dict(values), step=step)

    def table(self, step, tag, columns, rows):
        import wandb

        self.run.log({tag: wandb.Table(columns=columns, data=rows)}, step=step)

    def image(self, step, tag, rgb):
        import wandb

        self.run.log({tag: wandb.Image(rgb)}, step=step)

    def final(self, step, values, metrics):
        self.run.summary.update(values)

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    name = "mlflow"

    def start(self, run_dir: Path, config, step: int, kept: dict):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").absolute().as_uri()
            # MLflow 3 keeps its file store in maintenance and refuses it unless told: a local store needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = kept.get("run_id") if kept.get("tracking_uri") == uri else None
        if self.run_id:
            try:
                client.update_run(self.run_id, status="RUNNING")
                return {**kept, "tracking_uri": uri}
            except MlflowException as error:
                log.warning("mlflow: run %s is not in %s (%s): logging into a new run", self.run_id, uri, brief(error))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # made meanwhile by another run on the same tracking server
                experiment_id = client.get_experiment_by_name(name).experiment_id
        run = client.create_run(experiment_id, run_name=run_dir.name, tags={"b2t.run_dir": str(run_dir.absolute())})
        self.run_id = run.info.run_id
        self._params(flatten(to_data(config)))
        return {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    def _params(self, flat: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat.items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i: i + MAX_PARAMS_TAGS_PER_BATCH])

    def scalars(self, step, values):
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i: i + MAX_METRICS_PER_BATCH])

    def table(self, step, tag, columns, rows):
        self.client.log_text(self.run_id, markdown_table(columns, rows) + "\n", f"{tag}/step_{step:07d}.md")

    def image(self, step, tag, rgb):
        self.client.log_image(self.run_id, rgb, f"{tag}/step_{step:07d}.png")

    def final(self, step, values, metrics):
        self.scalars(step, values)
        self.client.log_dict(self.run_id, metrics, "metrics.json")

    def close(self, failed):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKER_TYPES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
