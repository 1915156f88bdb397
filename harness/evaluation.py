"""Decode a split into per-trial rows and metrics (the results contract: docs/contracts.md)."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.data import DataLoader

from harness import distributed
from harness.batching import TrialDataset, collate, eval_batches
from harness.data import FeatureStore, Trial
from harness.metrics import split_metrics, trial_error_columns
from harness.phonemes import ids_to_text
from harness.progress import phase

PREDICTION_KEYS = ("predicted_text", "predicted_phonemes")


def apply_preprocessors(batch, preprocessors, training: bool):
    for preprocess in preprocessors:
        batch = preprocess(batch, training)
    return batch


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_split(model, split: str, trials: list[Trial], store: FeatureStore, preprocessors, *,
                   device: torch.device, eval_batch_size: int, num_workers: int = 0, amp: bool = False,
                   bootstrap_resamples: int = 10_000, bootstrap_seed: int = 0, with_loss: bool = False,
                   decode_words: bool = True, pad_to_multiple: int = 1, name: str | None = None,
                   show_progress: bool = True, split_trials: list[Trial] | None = None):
    """Returns (rows, metrics, mean_loss). Rows follow the per_trial.csv contract plus the model's
    own columns; the mean loss is over labelled batches (None if not asked or unlabeled).

    Each batch goes through `model.evaluate` once (one forward pass for models that override it);
    `decode_words=False` lets the model skip its word decoder (validation on greedy phonemes).
    `name` labels the progress bar and its log line (default "decode <split>"). `split_trials`: the
    whole split these trials are part of, for `model.prepare_split` (a retrieval model's candidates;
    default: `trials`), when only some of them are decoded (recalibration decodes each session apart).

    Under torchrun the evaluation batches are shared out (batch i to rank i % N) and gathered on
    rank 0 in the one-process order, so rank 0 gets exactly what one process would; the other ranks
    get ([], {}, None). Every rank's model sees the whole split in `prepare_split` (retrieval needs
    every candidate)."""
    was_training = model.training
    model.eval()
    model.prepare_split(split, trials if split_trials is None else split_trials)
    batches = eval_batches(trials, eval_batch_size)
    mine = list(range(distributed.rank(), len(batches), distributed.world_size()))
    loader = DataLoader(TrialDataset(trials, store), batch_sampler=[batches[i] for i in mine],
                        collate_fn=functools.partial(collate, pad_to_multiple=pad_to_multiple),
                        num_workers=num_workers,
                        generator=torch.Generator())  # leaves the global RNG (augmentation, dropout) alone
    decoded = []  # (batch index, rows, loss x trials or None)
    with phase(name or f"decode {split}", total=sum(len(batches[i]) for i in mine), unit="trial",
               show=show_progress) as bar:
        for index, batch in zip(mine, loader):
            batch = apply_preprocessors(batch.to(device), preprocessors, training=False)
            labelled = with_loss and batch.phoneme_ids is not None
            with autocast(device, amp):
                parts, predictions = model.evaluate(batch, with_loss=labelled, decode_words=decode_words)
            if len(predictions) != len(batch):
                raise RuntimeError(f"{type(model).__name__}.evaluate returned {len(predictions)} rows for "
                                   f"{len(batch)} trials")
            if labelled and parts is None:
                raise RuntimeError(f"{type(model).__name__}.evaluate(batch, with_loss=True) returned no loss "
                                   "for a labelled batch")
            loss = float(parts["loss"]) * len(batch) if labelled else None
            decoded.append((index, [trial_row(t, p) for t, p in zip(batch.trials, predictions)], loss))
            bar.update(len(batch))
    model.train(was_training)
    gathered = distributed.gather_object(decoded)
    if not distributed.is_main():
        return [], {}, None
    decoded = sorted((d for part in gathered for d in part), key=lambda d: d[0])
    rows = [row for _, batch_rows, _ in decoded for row in batch_rows]
    loss_sum, loss_n = 0.0, 0
    for _, batch_rows, loss in decoded:  # summed in batch order: the one-process float sum
        if loss is not None:
            loss_sum += loss
            loss_n += len(batch_rows)
    metrics = split_metrics(rows, n_resamples=bootstrap_resamples, seed=bootstrap_seed)
    metrics.update(model.split_metrics(split, rows))
    return rows, metrics, (loss_sum / loss_n if loss_n else None)


def trial_row(trial: Trial, prediction: dict) -> dict:
    reference_phonemes = ids_to_text(trial.phoneme_ids) if trial.phoneme_ids is not None else None
    predicted_text = prediction.get("predicted_text")
    predicted_phonemes = prediction.get("predicted_phonemes")
    row = {
        "split": trial.split,
        "session": trial.session,
        "block_num": trial.block_num,
        "trial_num": trial.trial_num,
        "reference_text": trial.sentence,
        "predicted_text": predicted_text,
        "reference_phonemes": reference_phonemes,
        "predicted_phonemes": predicted_phonemes,
    }
    row.update(trial_error_columns(trial.sentence, predicted_text, reference_phonemes, predicted_phonemes))
    row.update(corpus=trial.corpus, days_since_implant=trial.days_since_implant)  # None: no description CSV row
    row["n_time_steps"] = trial.n_time_steps
    row.update({k: v for k, v in prediction.items() if k not in PREDICTION_KEYS})
    return row
