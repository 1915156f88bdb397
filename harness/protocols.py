"""What one run of a protocol trains on and decodes (config `evaluation.protocol`, README "Protocols").

- fixed: the dataset's own splits (train; val picks the checkpoint; `evaluation.splits` decoded).
- cross_session: train on the sessions before a cut, pick the checkpoint on their val trials, then
  decode every labelled trial of the sessions after it, each through a day layer set by a policy
  (`evaluation.held_out.day_layer`); metrics.json's `protocol` section holds the error per held-out
  session against the days since the last training session.
- data_scaling and recalibration run several of these (harness/groups.py); `data_params.train_fraction`
  is the one knob a data_scaling run adds, and the k-sentence fine-tunes of recalibration live in
  harness/recalibration.py.

Session order is date order (the dates at the end of the names, `t15.2023.08.11`); the harness's
session list (sorted names) gives the same order for the real and synthetic data.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import torch
from sklearn.utils import shuffle

from config import HELD_OUT_PROTOCOLS, ExperimentConfig, parse_date
from harness.data import Trial
from harness.errors import UserError
from harness.metrics import split_metrics

log = logging.getLogger("b2t")
HELD_OUT = "held_out/"  # prefix of the held-out trials' entries in the trials dict (one per split)


def date_order(sessions: list[str]) -> list[str]:
    """The sessions in date order when every name ends with a date, else as listed."""
    if all(parse_date(s) for s in sessions):
        return sorted(sessions, key=lambda s: (parse_date(s), s))
    return list(sessions)


def held_out_sessions(sessions: list[str], config: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(training sessions, held-out sessions), each in date order, by the cut of `evaluation.held_out`.
    A cut that leaves no training session or holds out none is the user's mistake."""
    cut = config.evaluation.held_out
    sessions = date_order(sessions)
    if cut.last_sessions is not None:
        if cut.last_sessions >= len(sessions):
            raise UserError(f"evaluation.held_out.last_sessions is {cut.last_sessions} but the data has {len(sessions)} "
                            "sessions: the cut leaves no training session")
        return sessions[: -cut.last_sessions], sessions[-cut.last_sessions:]
    start = parse_date(cut.from_date)
    undated = [s for s in sessions if parse_date(s) is None]
    if undated:
        raise UserError(f"evaluation.held_out.from_date needs dated session names (…YYYY.MM.DD); {undated[0]} has no "
                        "date: use evaluation.held_out.last_sessions")
    train = [s for s in sessions if parse_date(s) < start]
    held = [s for s in sessions if parse_date(s) >= start]
    if not train:
        raise UserError(f"evaluation.held_out.from_date {cut.from_date} is on or before the first session "
                        f"({sessions[0]}): the cut leaves no training session")
    if not held:
        raise UserError(f"evaluation.held_out.from_date {cut.from_date} is after the last session ({sessions[-1]}): "
                        "no session is held out")
    return train, held


def days_between(earlier: str, later: str) -> int | None:
    a, b = parse_date(earlier), parse_date(later)
    return (b - a).days if a and b else None


def select_trials(trials: dict[str, list[Trial]], config: ExperimentConfig) -> dict[str, list[Trial]]:
    """The trials dict a run of the config's protocol uses: cross_session (and recalibration's
    training run) keeps the training sessions' train and val trials and adds the held-out sessions'
    labelled trials under `held_out/<split>`; `data_params.train_fraction` < 1 keeps a seeded share
    of each session's training trials."""
    protocol = config.evaluation.protocol
    if protocol in HELD_OUT_PROTOCOLS:
        train_sessions, held = held_out_sessions(list(config.data_params.sessions), config)
        held_set = set(held)
        selected = {split: [t for t in ts if t.session not in held_set] for split, ts in trials.items()
                    if split in ("train", "val")}
        for split, ts in trials.items():
            labelled = [t for t in ts if t.session in held_set and t.sentence is not None]
            if labelled:
                selected[HELD_OUT + split] = labelled
        if not any(k.startswith(HELD_OUT) for k in selected):
            raise UserError(f"the held-out sessions ({', '.join(held)}) have no labelled trial to decode")
        if not selected.get("train"):
            raise UserError(f"the training sessions ({train_sessions[0]} ... {train_sessions[-1]}) have no training trial")
        trials = selected
    if config.data_params.train_fraction < 1:
        trials = {**trials, "train": training_subset(trials["train"], config.data_params.train_fraction,
                                                       config.data_params.seed)}
    return trials


def training_subset(trials: list[Trial], fraction: float, seed: int) -> list[Trial]:
    """round(fraction x n) of each session's n training trials (at least 1), in file order. The
    sessions are shuffled once each with sklearn's seeded shuffle and the first trials kept, so the
    subsets are nested: the 25% of a seed is part of its 50%, and a scaling curve measures the data
    added, not a new draw. (A splitter such as train_test_split would draw each fraction anew.)"""
    by_session: dict[str, list[int]] = {}
    for i, t in enumerate(trials):
        by_session.setdefault(t.session, []).append(i)
    kept = []
    for session, indices in by_session.items():
        n = max(1, round(fraction * len(indices)))
        order = shuffle(np.asarray(indices), random_state=np.random.RandomState([seed, zlib.crc32(session.encode())]))
        kept += order[:n].tolist()
    return [trials[i] for i in sorted(kept)]


def held_out_splits(trials: dict[str, list[Trial]]) -> list[str]:
    return [k for k in trials if k.startswith(HELD_OUT)]


# ---------------------------------------------------------------------------------------------- day layers


def day_layer_sources(sessions: list[str], train_sessions: list[str], held: list[str], policy: str) -> dict[str, str]:
    """held-out session -> what its day layer is made from, as recorded in metrics.json."""
    if policy == "mean":
        return {s: f"mean of {len(train_sessions)} training sessions" for s in held}
    if policy == "identity":
        return {s: "identity" for s in held}
    out = {}
    order = date_order(sessions)
    for s in held:
        before = [t for t in train_sessions if order.index(t) < order.index(s)]
        out[s] = before[-1] if before else train_sessions[0]  # a cut leaves the training sessions first
    return out


@torch.no_grad()
def set_day_layers(model, sessions: list[str], sources: dict[str, str], policy: str, train_sessions: list[str]) -> bool:
    """Set each held-out session's day layer (model.day_layer_parameters) as `sources` says.
    False when the model has no day layers (nothing to set: every session shares the input)."""
    if model.day_layer_parameters(0) is None:
        return False
    train_days = [sessions.index(s) for s in train_sessions]
    for session, source in sources.items():
        weight, bias = model.day_layer_parameters(sessions.index(session))
        if policy == "identity":
            weight.copy_(torch.eye(weight.shape[0], dtype=weight.dtype))
            bias.zero_()
        elif policy == "mean":
            layers = [model.day_layer_parameters(d) for d in train_days]
            weight.copy_(torch.stack([w for w, _ in layers]).mean(0))
            bias.copy_(torch.stack([b for _, b in layers]).mean(0))
        else:
            source_weight, source_bias = model.day_layer_parameters(sessions.index(source))
            weight.copy_(source_weight)
            bias.copy_(source_bias)
    return True


def prepare_held_out(model, config: ExperimentConfig) -> dict:
    """Set the held-out sessions' day layers by `evaluation.held_out.day_layer`; returns the protocol
    section's start for metrics.json (the cut, the sessions, the policy and each layer's source)."""
    sessions = list(config.data_params.sessions)
    train_sessions, held = held_out_sessions(sessions, config)
    policy = config.evaluation.held_out.day_layer
    sources = day_layer_sources(sessions, train_sessions, held, policy)
    if not set_day_layers(model, sessions, sources, policy, train_sessions):
        sources = {s: "none (the model has no day layers)" for s in held}
    return {"name": config.evaluation.protocol, "train_sessions": train_sessions, "held_out_sessions": held,
            "day_layer": policy, "day_layer_sources": sources}


def held_out_section(section: dict, rows: list[dict], config: ExperimentConfig) -> dict:
    """The protocol section of metrics.json: the held-out trials pooled (every split), and per
    held-out session its error against the days (and sessions) since the last training session."""
    last = section["train_sessions"][-1]
    sessions = date_order(list(config.data_params.sessions))
    pooled = split_metrics(rows, n_resamples=config.evaluation.bootstrap_resamples,
                           seed=config.evaluation.bootstrap_seed)
    by_days = []
    for session, figures in pooled["by_session"].items():
        by_days.append({"session": session, "days_since_training": days_between(last, session),
                        "sessions_since_training": sessions.index(session) - sessions.index(last), **figures})
    return {**section, "held_out": {k: v for k, v in pooled.items() if k != "by_session"},
            "by_days_since_training": sorted(by_days, key=lambda r: r["sessions_since_training"])}


def add_days_since_training(rows: list[dict], section: dict) -> None:
    """Each held-out row's `days_since_training` column (empty when the names carry no dates)."""
    last = section["train_sessions"][-1]
    for row in rows:
        row["days_since_training"] = days_between(last, row["session"])
