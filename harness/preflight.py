"""The pre-flight check: before a run folder exists, put one small training batch through the model's
`loss` and one small validation batch through its decoding, and check the model API contract
(harness/model_api.py), so that a plugin's mistake ends in one line naming the function and what it
returned, not in a traceback at the first validation with an unfinished run folder behind it.

The training batch goes through `loss` as training runs it (train mode, training-time preprocessors),
the validation batch through `evaluate` as validation runs it (eval mode, the loss on labelled trials,
words decoded only with `training_params.val_decode_words`), and again as the final decoding runs it
(no loss, words decoded). It leaves no trace: no gradient
is kept, the model is back in its mode, and every random number generator (torch, numpy, random) is
restored, so a run's results are the same with or without it.
"""

from __future__ import annotations

import contextlib
import math
import random
import time

import numpy as np
import torch

from harness.batching import TrialDataset, collate
from harness.errors import UserError
from harness.evaluation import apply_preprocessors, autocast, trial_row
from harness.metrics import split_metrics
from harness.phonemes import PHONEMES

BATCH_TRIALS = 4  # trials per checked batch: enough to see batching, cheap at any model size
KNOWN_PHONEMES = set(PHONEMES[1:])  # ARPAbet and SIL (never the blank)


class ContractError(UserError):
    """A model broke the model API contract (one line: the function and what it returned)."""


def preflight(model, config, trials: dict, stores: dict, preprocessors, device, n_features: int) -> float:
    """Check the model on a few trials of the run; returns the seconds it took. Raises ContractError."""
    started = time.perf_counter()
    name = type(model).__name__
    was_training = model.training
    with _rng_kept(), torch.no_grad():
        try:
            if config.training_params.num_steps > 0 and trials.get("train"):
                model.train()  # as training runs it: augmentation and dropout on (their draws are undone)
                batch = _batch(trials["train"], stores["train"], preprocessors, device, n_features, training=True)
                with autocast(device, config.training_params.amp_bf16):
                    _check_loss(name, model.loss(batch))
            model.eval()
            split = next((s for s in ("val", *config.evaluation.splits) if trials.get(s)), None)
            if split is not None:
                model.prepare_split(split, trials[split])
                batch = _batch(trials[split], stores[split], preprocessors, device, n_features)
                tp = config.training_params
                validating = split == "val" and tp.num_steps > 0
                if validating:  # as validation runs it during training
                    rows = _evaluate(name, model, batch, tp.amp_bf16, device, with_loss=batch.phoneme_ids is not None,
                                     decode_words=tp.val_decode_words)
                # as the final decoding runs it: no loss, words decoded
                final_rows = _evaluate(name, model, batch, tp.amp_bf16, device, with_loss=False, decode_words=True)
                if validating:
                    _check_best_metric(name, model, config, rows, final_rows, batch)
        finally:
            model.train(was_training)
    return time.perf_counter() - started


def _batch(trials, store, preprocessors, device, n_features: int, training: bool = False):
    batch = collate([TrialDataset(trials, store)[i] for i in range(min(BATCH_TRIALS, len(trials)))])
    batch = apply_preprocessors(batch.to(device), preprocessors, training=training)
    width = batch.features.shape[-1]
    if width != n_features:
        raise ContractError(f"the preprocessors give {width} features per bin, but the model was built for "
                            f"{n_features} (a preprocessor that changes the width must say so in output_features)")
    return batch


def _evaluate(name: str, model, batch, amp: bool, device, *, with_loss: bool, decode_words: bool) -> list:
    """model.evaluate as evaluate_split calls it; checks the loss parts and the rows, returns the rows."""
    where = f"{name}.evaluate(batch, with_loss={with_loss}, decode_words={decode_words})"
    with autocast(device, amp):
        out = model.evaluate(batch, with_loss=with_loss, decode_words=decode_words)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ContractError(f"{where} returned {_describe(out)}; it must return (loss parts or None, rows)")
    parts, rows = out
    if with_loss:
        _check_loss(name, parts, where=f"{where}[0]", data="validation")
    elif parts is not None:
        raise ContractError(f"{where}[0] is {_describe(parts)}; it must be None when with_loss is False")
    _check_rows(name, rows, batch, where=f"{where}[1]")
    return rows


def _check_loss(name: str, out, where: str | None = None, data: str = "training") -> None:
    where = where or f"{name}.loss(batch)"
    if not isinstance(out, dict) or "loss" not in out:
        raise ContractError(f"{where} returned {_describe(out)}; it must return a dict with the key 'loss'")
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ContractError(f"{where}['loss'] is {_describe(loss)}; it must be a scalar tensor")
    if not math.isfinite(float(loss)):
        raise ContractError(f"{where}['loss'] is {float(loss)} on a batch of the {data} data; it must be finite")


def _check_rows(name: str, rows, batch, where: str) -> None:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ContractError(f"{where} returned {_describe(rows)}; it must return a list with one dict per trial")
    if len(rows) != len(batch):
        raise ContractError(f"{where} returned {len(rows)} rows for {len(batch)} trials; it must return one per trial")
    lengths = batch.lengths.tolist()
    for i, row in enumerate(rows):
        text, phonemes = row.get("predicted_text"), row.get("predicted_phonemes")
        if text is not None and not isinstance(text, str):
            raise ContractError(f"{where}[{i}]['predicted_text'] is {_describe(text)}; it must be a str (or absent)")
        if phonemes is None:
            continue
        if not isinstance(phonemes, str):
            raise ContractError(f"{where}[{i}]['predicted_phonemes'] is {_describe(phonemes)}; it must be a str of "
                                "space-separated ARPAbet phonemes with SIL")
        unknown = sorted(set(phonemes.split()) - KNOWN_PHONEMES)
        if unknown:
            raise ContractError(f"{where}[{i}]['predicted_phonemes'] holds {', '.join(unknown[:5])}, not in the "
                                "phoneme inventory (ARPAbet without stress, and SIL)")
        if len(phonemes.split()) > lengths[i]:
            raise ContractError(f"{where}[{i}] has {len(phonemes.split())} phonemes for a trial of {lengths[i]} "
                                "time steps after the preprocessors: more outputs than the time dimension allows")


def _check_best_metric(name: str, model, config, rows, final_rows, batch) -> None:
    """best_metric must have a value in what validation produces (words only with val_decode_words)."""
    tp = config.training_params
    metrics = _metrics(model, rows, batch)
    if metrics.get(tp.best_metric) is None:  # absent, or null on labelled trials: validation never produces it
        known = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        message = f"training_params.best_metric '{tp.best_metric}' is not among the metrics validation reports for {name}"
        if not tp.val_decode_words and _metrics(model, final_rows, batch).get(tp.best_metric) is not None:
            raise ContractError(f"{message} without word decoding ({known}): set training_params.val_decode_words: "
                                f"true to decode words at every validation, or pick one of those")
        raise ContractError(f"{message} ({known})")


def _metrics(model, rows, batch) -> dict:
    scored = [trial_row(t, r) for t, r in zip(batch.trials, rows)]
    metrics = split_metrics(scored, n_resamples=0)
    metrics.update(model.split_metrics("val", scored))
    return metrics


@contextlib.contextmanager
def _rng_kept():
    """Every generator a model or preprocessor may draw from, as it was."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
