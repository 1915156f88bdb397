"""The recalibration protocol's fine-tunes: how much of a new day does a decoder need?

The group's training run (a cross_session run, harness/protocols.py) left a model trained on the
sessions before the cut. For each k in `evaluation.recalibration.k` (k > 0) and each draw, every
held-out session gets its own fine-tune, from those trained weights, on k of its labelled sentences
(drawn with sklearn's seeded ShuffleSplit), and the session's other labelled trials are decoded. A
(k, draw) is one run folder of the group, `k-<k>_draw-<d>`, holding the decoded rows of every held-out
session; k = 0 is the training run itself. The loop below is a plain AdamW loop at a constant
learning rate: no schedule, validation or checkpoint, since a fine-tune is a few dozen steps.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import ShuffleSplit
from torch.utils.data import DataLoader

from config import ExperimentConfig, dump_config, load_config
from harness import protocols, results
from harness.batching import TrainBatchSampler, TrialDataset, collate
from harness.errors import UserError
from harness.evaluation import apply_preprocessors, evaluate_split
from harness.metrics import split_metrics
from harness.train import load_checkpoint

log = logging.getLogger("b2t")


def draws_of(config: ExperimentConfig, k: int) -> int:
    return 1 if k == 0 else config.evaluation.recalibration.draws


def child_name(prefix: str, k: int, draw: int) -> str:
    return f"{prefix}k-{k}_draw-{draw}"


def session_pools(trials: dict) -> dict[str, list]:
    """held-out session -> its labelled trials (every split), in a fixed order."""
    pools: dict[str, list] = {}
    for key in protocols.held_out_splits(trials):
        for t in trials[key]:
            pools.setdefault(t.session, []).append(t)
    return pools


def check_k(config: ExperimentConfig, trials: dict) -> None:
    """Every k leaves at least one trial of each held-out session to decode, else a user error."""
    largest = max(config.evaluation.recalibration.k)
    for session, pool in session_pools(trials).items():
        if largest >= len(pool):
            raise UserError(f"evaluation.recalibration.k has {largest}, but held-out session {session} has only "
                            f"{len(pool)} labelled trials: k must leave at least one to decode")


def calibration_draw(n: int, k: int, draw: int, seed: int) -> tuple[list[int], list[int]]:
    """(calibration, rest) indices of a session's n trials for draw number `draw` (1-based) of k."""
    if k == 0:
        return [], list(range(n))
    splitter = ShuffleSplit(n_splits=draw, train_size=k, test_size=None, random_state=seed)
    calibration, rest = list(splitter.split(np.zeros(n)))[draw - 1]
    return sorted(calibration.tolist()), sorted(rest.tolist())


def fine_tune(model, trials, store, preprocessors, config: ExperimentConfig, day: int, device, seed: int) -> float:
    """`steps` AdamW updates of the day layer of `day` (or of every weight) on `trials`; the last loss."""
    params = config.evaluation.recalibration
    chosen = list(model.day_layer_parameters(day)) if params.fine_tune == "day_layer" else list(model.parameters())
    trainable = {id(p) for p in chosen}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.AdamW(chosen, lr=params.lr, weight_decay=0.0)
    sampler = TrainBatchSampler(trials, params.batch_size, 1, seed, params.steps)
    loader = DataLoader(TrialDataset(trials, store), batch_sampler=sampler,
                        collate_fn=functools.partial(collate, pad_to_multiple=config.data_params.pad_to_multiple),
                        generator=torch.Generator())
    model.train()
    loss = float("nan")
    try:
        for batch in loader:
            batch = apply_preprocessors(batch.to(device), preprocessors, training=True)
            value = model.loss(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            loss = value.item()
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.eval()
    return loss


def pending(config: ExperimentConfig, group_dir: Path, prefix: str) -> list[tuple[int, int]]:
    """The (k > 0, draw) pairs whose run folder is not finished."""
    return [(k, d) for k in config.evaluation.recalibration.k if k > 0 for d in range(1, draws_of(config, k) + 1)
            if not results.is_finished(group_dir / child_name(prefix, k, d))]


def recalibrate(base_dir: Path, group_dir: Path, prefix: str) -> list[Path]:
    """Every unfinished (k > 0, draw) run folder of one training run (base_dir); returns those written.
    Runs on this process's device, one fine-tune after another."""
    from harness import runner

    config = load_config(base_dir / "config.yaml", source=str(base_dir / "config.yaml"))
    todo = pending(config, group_dir, prefix)
    if not todo:
        return []
    params = config.evaluation.recalibration
    trials, preprocessors = runner.prepare_data(config, runner.needed_splits(config))
    check_k(config, trials)
    device = runner.pick_device(config.training_params.device)
    sessions = list(config.data_params.sessions)
    runner.seed_everything(config.training_params.seed)
    model = runner.build_model(config, sessions, trials, device)
    checkpoint = base_dir / "checkpoints" / "best.pt"
    if not (config.evaluation.use_best_checkpoint and checkpoint.is_file()):
        checkpoint = base_dir / "checkpoints" / "last.pt"
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    section = protocols.prepare_held_out(model, config)
    if params.fine_tune == "day_layer" and model.day_layer_parameters(0) is None:
        raise UserError(f"evaluation.recalibration.fine_tune is day_layer, but model {config.model_constructor_name} "
                        "has no day layers: use fine_tune: all")
    trained = copy.deepcopy(model.state_dict())
    pools = session_pools(trials)
    stores = runner.feature_stores(pools, config)
    whole_splits = {key.removeprefix(protocols.HELD_OUT): trials[key] for key in protocols.held_out_splits(trials)}
    written = []
    for k, draw in todo:
        folder = group_dir / child_name(prefix, k, draw)
        with (results.prepare_out_dir(folder, False, folder.exists(), {"the training run": base_dir}) as path,
              runner.run_logging(path)):
            log.info("recalibration k=%d, draw %d: %s of %d held-out sessions from %s", k, draw, params.fine_tune,
                     len(pools), checkpoint)
            rows, calibration = fine_tune_and_decode(model, trained, config, pools, stores, whole_splits,
                                                     preprocessors, device, k, draw)
            write_child(path, model, config, rows, section, calibration, k, draw, checkpoint, device)
            log.info("finished: %s", path)
        written.append(folder)
    model.load_state_dict(trained)
    return written


def fine_tune_and_decode(model, trained: dict, config: ExperimentConfig, pools: dict, stores: dict, whole_splits: dict,
                         preprocessors, device, k: int, draw: int) -> tuple[list[dict], dict]:
    """One (k, draw): each held-out session fine-tuned from the trained weights on its k drawn
    trials, then its other trials decoded. Returns the rows and the calibration trials' keys."""
    from harness import runner

    params = config.evaluation.recalibration
    sessions = list(config.data_params.sessions)
    rows, calibration = [], {}
    for session, pool in pools.items():
        cal, rest = calibration_draw(len(pool), k, draw, params.seed)
        model.load_state_dict(trained)
        runner.seed_everything(params.seed + draw)
        loss = fine_tune(model, [pool[i] for i in cal], stores[session].subset(cal), preprocessors, config,
                         sessions.index(session), device, params.seed + draw)
        log.info("recalibration k=%d draw %d, %s: %d steps on %d trials, last loss %.4f", k, draw, session,
                 params.steps, len(cal), loss)
        calibration[session] = [list(pool[i].key) for i in cal]
        for split in whole_splits:
            indices = [i for i in rest if pool[i].split == split]
            if indices:
                split_rows, _, _ = evaluate_split(
                    model, split, [pool[i] for i in indices], stores[session].subset(indices), preprocessors,
                    device=device, eval_batch_size=config.data_params.eval_batch_size, bootstrap_resamples=0,
                    pad_to_multiple=config.data_params.pad_to_multiple, show_progress=False,
                    split_trials=whole_splits[split])
                rows += split_rows
    return rows, calibration


def write_child(folder: Path, model, config: ExperimentConfig, rows: list[dict], section: dict, calibration: dict,
                k: int, draw: int, checkpoint: Path, device) -> None:
    """One (k, draw) run folder: the results contract's files, with metrics.json's protocol section
    saying what was fine-tuned on what."""
    from harness import runner

    ev, params = config.evaluation, config.evaluation.recalibration
    metrics = {}
    for split in dict.fromkeys(row["split"] for row in rows):
        split_rows = [row for row in rows if row["split"] == split]
        metrics[split] = split_metrics(split_rows, n_resamples=ev.bootstrap_resamples, seed=ev.bootstrap_seed)
        metrics[split].update(model.split_metrics(split, split_rows))
    protocols.add_days_since_training(rows, section)
    metrics["protocol"] = {**protocols.held_out_section(section, rows, config), "name": "recalibration", "k": k,
                           "draw": draw, "fine_tune": params.fine_tune, "steps": params.steps, "lr": params.lr,
                           "calibration_trials": calibration}
    trained_on = checkpoint.parent.parent / "metrics.json"  # the training run's
    n_train = (json.loads(trained_on.read_text()).get("run") or {}).get("n_train_trials") if trained_on.is_file() else None
    metrics["run"] = {"trial_name": config.trial_name, "model": config.model_constructor_name,
                      "checkpoint": str(checkpoint), "recalibration": {"k": k, "draw": draw}, "n_train_trials": n_train}
    meta = results.base_meta(str(device))
    meta["checkpoint"] = str(checkpoint)
    # the data the protocol read is the training run's (a fine-tune reads a share of the same files),
    # so compare matches the (k, draw) folders with it and with each other
    base_meta = checkpoint.parent.parent / "meta.json"
    if base_meta.is_file():
        meta["data_fingerprint"] = json.loads(base_meta.read_text()).get("data_fingerprint")
    results.atomic_write_text(folder / "config.yaml", dump_config(config))
    runner.write_run_outputs(folder, rows, metrics, meta)
