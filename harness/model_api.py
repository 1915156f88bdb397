"""The interface between the main loop and a model, shared by every decoder family.

A registered model constructor returns a `DecoderModel`. The loop only ever calls:

- `loss(batch) -> dict[str, Tensor]`: the training objective under key "loss", plus any other
  scalars the model wants logged (e.g. "ctc", "cosine", "infonce"). Also used for validation loss.
- `decode(batch) -> list[dict]`: one dict per trial, with any of `predicted_text` (str),
  `predicted_phonemes` (space-separated ARPAbet with SIL) and model-specific columns (e.g.
  `true_rank`). The loop adds the reference columns, per-trial error counts and metrics.
- `param_group(name) -> str`: which optimizer group a parameter belongs to; groups get their
  hyper-parameters from `training_params.param_groups.<group>` (default: one group).
- `prepare_split(split, trials)`: called once before a split is decoded (e.g. to build the
  candidate set for retrieval).
- `split_metrics(split, rows) -> dict`: extra split-level metrics for metrics.json (e.g.
  retrieval accuracy).
- `min_time_steps`: trials shorter than this are skipped (or refused) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.batching import Batch
from harness.data import Trial


class DecoderModel(nn.Module):
    min_time_steps: int = 1

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch)")

    def decode(self, batch: Batch) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement decode(batch)")

    def param_group(self, name: str) -> str:
        return "default"

    def prepare_split(self, split: str, trials: list[Trial]) -> None:
        pass

    def split_metrics(self, split: str, rows: list[dict]) -> dict:
        return {}


@dataclass
class BuildContext:
    """What a model constructor may use besides its params."""

    config: object  # the ExperimentConfig (config setters have already run)
    sessions: list[str]  # the run's session list; position = day index
    trials: dict[str, list[Trial]]  # trials by split (labels, no features)
    device: torch.device
    cache_dir: str  # where the model may keep artefacts (e.g. target caches), shared across runs


@dataclass
class DataSummary:
    """What a config setter may use to fill run-time fields (number of days, widths, ...)."""

    sessions: list[str]
    trials: dict[str, list[Trial]]
    n_features: int
