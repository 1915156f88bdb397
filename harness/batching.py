"""Batches as the reference makes them, and the Batch every model receives.

Training: each batch draws `days_per_batch` sessions uniformly without replacement, then
`batch_size // days_per_batch` trials per session with replacement (docs/reference.md, section 4); when that
does not divide, the first sessions drawn give one more, so every batch holds batch_size trials. The draw
for step s depends only on (seed, s), so resuming at step s gives the same batches without saving
sampler state, and DataLoader workers never touch the sampling.
Several ranks (torchrun) and gradient accumulation share that one stream: each optimizer step
consumes `world_size * grad_accum_steps` consecutive batches of it (see TrainBatchSampler).
Evaluation: each session's trials in order, in chunks of at most `eval_batch_size`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from harness.data import FeatureStore, Trial
from harness.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A padded batch. Models read what they need; preprocessors return an updated copy."""

    features: torch.Tensor  # (B, T, C) float32, zero padded after each trial's length
    lengths: torch.Tensor  # (B,) int64 valid time steps
    day_indices: torch.Tensor  # (B,) int64 index into the run's session list
    phoneme_ids: torch.Tensor | None  # (B, L) int64 zero padded; None when the split is unlabeled
    phoneme_lengths: torch.Tensor | None  # (B,) int64
    sentences: list[str | None]
    trials: list[Trial]  # identity of each row (session, block, trial) for results

    def to(self, device) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def __len__(self) -> int:
        return len(self.trials)


class TrialDataset(Dataset):
    """Index -> (trial, features). Collation into a Batch happens in `collate`."""

    def __init__(self, trials: list[Trial], store: FeatureStore):
        self.trials = trials
        self.store = store

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: int):
        return self.trials[index], self.store[index]


def collate(items, pad_to_multiple: int = 1) -> Batch:
    """Pad a list of (trial, features) into a Batch.

    pad_to_multiple: the time axis is zero-padded up to a multiple of it (1: to the longest trial).
    `lengths` stay the true lengths, so nothing valid changes. What it buys is fewer distinct batch
    shapes, which bounds torch.compile's recompilations where shapes are static
    (data_params.pad_to_multiple; benchmarks/gpu_check.py counts them)."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be at least 1, got {pad_to_multiple}")
    trials = [t for t, _ in items]
    arrays = [np.asarray(x) for _, x in items]
    lengths = torch.tensor([len(x) for x in arrays], dtype=torch.int64)
    steps = max(len(x) for x in arrays)
    steps += -steps % pad_to_multiple
    # One copy of each trial, straight from where the store keeps it (the read-only memory-mapped cache,
    # or preloaded arrays) into the zero-padded batch: no per-trial tensor, no second copy to pad.
    padded = np.zeros((len(arrays), steps, arrays[0].shape[1]), dtype=arrays[0].dtype)
    for row, x in zip(padded, arrays):
        row[: len(x)] = x
    features = torch.from_numpy(padded)
    labelled = [t.phoneme_ids is not None for t in trials]
    phoneme_ids = phoneme_lengths = None
    if all(labelled):
        seqs = [torch.tensor(t.phoneme_ids, dtype=torch.int64) for t in trials]
        phoneme_lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        phoneme_ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True) if seqs else None
    return Batch(
        features=features,
        lengths=lengths,
        day_indices=torch.tensor([t.day for t in trials], dtype=torch.int64),
        phoneme_ids=phoneme_ids,
        phoneme_lengths=phoneme_lengths,
        sentences=[t.sentence for t in trials],
        trials=trials,
    )


def check_batching(trials: list[Trial], batch_size: int, days_per_batch: int, warn: bool = False) -> int:
    """The days each training batch draws: days_per_batch, or every session with training trials when
    there are fewer (said once with warn). Refuses what cannot make a batch of batch_size trials."""
    if not trials:
        raise UserError("no training trials: the train split of the selected sessions is empty")
    days = len({t.day for t in trials})
    if days_per_batch > days and warn:
        log.warning("data_params.days_per_batch is %d but %d sessions have training trials: each batch draws from "
                    "all %d, still %d trials", days_per_batch, days, days, batch_size)
    days_per_batch = min(days_per_batch, days)
    if batch_size < days_per_batch:
        raise UserError(f"data_params.batch_size {batch_size} is smaller than days_per_batch {days_per_batch}: "
                        "each day drawn needs at least one trial")
    return days_per_batch


class TrainBatchSampler:
    """Batch sampler yielding trial indices for optimizer steps [start_step, num_steps).

    One global, seeded stream of batches (`batch_for_step(i)` is its i-th batch, each drawn with
    `days_per_batch` as above). An optimizer step takes `world_size * grad_accum_steps` consecutive
    batches of it: micro-batch k of step s is global batch m = s * grad_accum_steps + k, and rank r
    trains on batch m * world_size + r. So the N ranks' batches of one micro-step are N consecutive
    batches of the one-process stream, the update sees N x grad_accum_steps x batch_size trials, and
    a 2-rank run sees exactly the batches of a 1-process run with grad_accum_steps=2. Resuming at a
    step needs nothing but that step.
    """

    def __init__(self, trials: list[Trial], batch_size: int, days_per_batch: int, seed: int,
                 num_steps: int, start_step: int = 0, *, rank: int = 0, world_size: int = 1,
                 grad_accum_steps: int = 1):
        self.by_day: dict[int, np.ndarray] = {}
        for i, t in enumerate(trials):
            self.by_day.setdefault(t.day, []).append(i)
        self.by_day = {d: np.asarray(ix) for d, ix in sorted(self.by_day.items())}
        self.days = np.asarray(list(self.by_day))
        self.days_per_batch = check_batching(trials, batch_size, days_per_batch)
        # batch_size trials in every batch: when days_per_batch does not divide it, the first days drawn
        # give one trial more (the reference's batch_size // days_per_batch would make every batch smaller)
        self.per_day, self.extra = divmod(batch_size, self.days_per_batch)
        self.seed, self.num_steps, self.start_step = seed, num_steps, start_step
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps

    def batch_for_step(self, step: int) -> list[int]:
        """The `step`-th batch of the global stream (one process, no accumulation: step `step`)."""
        rng = np.random.default_rng([self.seed, step])
        days = rng.choice(self.days, size=self.days_per_batch, replace=False)
        picks = [rng.choice(self.by_day[d], size=self.per_day + (i < self.extra), replace=True) for i, d in enumerate(days)]
        return np.concatenate(picks).tolist()

    def __iter__(self):
        k = self.grad_accum_steps
        for micro_step in range(self.start_step * k, self.num_steps * k):
            yield self.batch_for_step(micro_step * self.world_size + self.rank)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step) * self.grad_accum_steps


def eval_batches(trials: list[Trial], eval_batch_size: int) -> list[list[int]]:
    """Each session's trials in their order, in chunks of at most eval_batch_size."""
    by_session: dict[int, list[int]] = {}
    for i, t in enumerate(trials):
        by_session.setdefault(t.day, []).append(i)
    return [
        ix[start : start + eval_batch_size]
        for _, ix in sorted(by_session.items())
        for start in range(0, len(ix), eval_batch_size)
    ]
