"""The interface between the main loop and a model, shared by every decoder family.

A registered model constructor returns a `DecoderModel`. The loop only ever calls:

- `loss(batch) -> dict[str, Tensor]`: the training objective under key "loss", plus any other
  scalars the model wants logged (e.g. "ctc", "cosine", "infonce"). Also used for validation loss.
- `decode(batch) -> list[dict]`: one dict per trial, with any of `predicted_text` (str),
  `predicted_phonemes` (space-separated ARPAbet with SIL) and model-specific columns (e.g.
  `true_rank`). The loop adds the reference columns, per-trial error counts and metrics.
- `evaluate(batch, *, with_loss, decode_words=True) -> (loss parts | None, rows)`: what validation
  and the final decoding call, once per batch: the loss parts as `loss` returns them (None unless
  `with_loss` and the batch is labelled) and the rows as `decode` returns them. The default calls
  `loss` then `decode`, two forward passes; a model that overrides it to share one forward makes
  every validation cheaper. `decode_words=False` (validation with
  `training_params.val_decode_words: false`) lets a model skip its word decoder, the expensive
  search, and write only what is cheap (e.g. greedy phonemes); a model without one ignores it.
- `param_group(name) -> str`: which optimizer group a parameter belongs to; groups get their
  hyper-parameters from `training_params.param_groups.<group>` (default: one group).
- `prepare_split(split, trials)`: called once before a split is decoded (e.g. to build the
  candidate set for retrieval).
- `split_metrics(split, rows) -> dict`: extra split-level metrics for metrics.json (e.g.
  retrieval accuracy).
- `min_time_steps`: trials shorter than this are skipped (or refused) before anything runs.
- `day_layer_parameters(day) -> (W, b) | None` (optional): the input layer of session `day`
  (x @ W + b, W of shape (C, C), b of (1, C)), which the cross-session protocols set for a session
  the model was not trained on (copied, averaged, or W = I and b = 0) and which recalibration may
  fine-tune alone; None (the default): the model has no per-session layer.
- `validation_figures(batch) -> dict[str, Figure]` (optional): matplotlib figures (object API,
  `matplotlib.figure.Figure`, no pyplot) that show something of the model on one validation trial,
  drawn at every validation for the experiment trackers (TensorBoard's `val/<name>`); e.g.
  gru_align's brain-vs-target frame similarity. Called on rank 0 only, in eval mode under
  no_grad, with a batch of the same trial every time; the default draws none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.batching import Batch
from harness.data import Trial, find_sessions, read_trials

log = logging.getLogger(__name__)


class DecoderModel(nn.Module):
    min_time_steps: int = 1

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch)")

    def decode(self, batch: Batch) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement decode(batch)")

    def evaluate(self, batch: Batch, *, with_loss: bool,
                 decode_words: bool = True) -> tuple[dict[str, torch.Tensor] | None, list[dict]]:
        """(loss parts or None, rows) of one evaluation batch. This default runs the model twice
        (`loss`, then `decode`) and always decodes words; override it to share one forward pass."""
        parts = self.loss(batch) if with_loss and batch.phoneme_ids is not None else None
        return parts, self.decode(batch)

    def param_group(self, name: str) -> str:
        return "default"

    def prepare_split(self, split: str, trials: list[Trial]) -> None:
        pass

    def split_metrics(self, split: str, rows: list[dict]) -> dict:
        return {}

    def day_layer_parameters(self, day: int) -> tuple[nn.Parameter, nn.Parameter] | None:
        """Session `day`'s input layer (W, b) of x @ W + b; None: no per-session layer."""
        return None

    def validation_figures(self, batch: Batch) -> dict:
        """{name: matplotlib Figure} for one validation trial (harness/trackers.py); none by default."""
        return {}


@dataclass
class BuildContext:
    """What a model constructor may use besides its params: what the harness derives from the data,
    the same in `run` and `evaluate`. (`model_params.n_days` and `n_features`, where a model's params
    have them, are filled from `sessions` and `n_features` before the constructor runs.)"""

    config: object  # the ExperimentConfig (config setters have already run)
    sessions: list[str]  # the run's session list; position = day index
    trials: dict[str, list[Trial]]  # trials by split (labels, no features); empty in `evaluate`
    device: torch.device
    cache_dir: str  # where the model may keep artefacts (e.g. target caches), shared across runs
    n_features: int = 0  # the input width the model sees: data_params.n_features after the preprocessors
    _train: list[Trial] | None = field(default=None, repr=False)

    def training_trials(self) -> list[Trial]:
        """The training trials (labels only, no features): the run's train split, or in `evaluate`
        (built without data) the train split of the data being decoded, read once."""
        if "train" in self.trials:
            return self.trials["train"]
        if self._train is None:
            dp = self.config.data_params
            self._train = read_trials(dp.data_dir, dp.sessions or find_sessions(dp.data_dir), "train", dp.n_features,
                                      cache_dir=self.cache_dir)
            log.info("training transcriptions: the %d training trials in %s", len(self._train), dp.data_dir)
        return self._train

    def training_sentences(self) -> list[str]:
        """The training transcriptions (e.g. a word decoder's vocabulary and LM text)."""
        return [t.sentence for t in self.training_trials() if t.sentence]


@dataclass
class DataSummary:
    """What a config setter may use to fill run-time fields (number of days, widths, ...)."""

    sessions: list[str]
    trials: dict[str, list[Trial]]
    n_features: int
