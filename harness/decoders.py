"""Which runs of a comparison form one decoder, and what a decoder of several runs shows.

A decoder is the runs whose config.yaml files (flattened to dotted keys) differ only in the seeds
(`training_params.seed`, `data_params.seed`) and in `output.*` and `slurm.*` (where results go, how
the cluster ran it), and that share metrics.json's recalibration k: the seeds (and recalibration
draws) of one config. Runs of one config with the same seeds (a run and an `evaluate` of its
checkpoint, runs without a config) are not seeds of one decoder: each stays a decoder of its own;
nor are runs of two run groups (two groups of one config, e.g. to see two seed sets, stay two).
Decoders are labelled by their names plus the config values that tell apart those of one model and
trial name.

With one run per decoder every figure is the run's own, as read from its files. A decoder with
several runs has the mean and standard deviation across its runs of each metric of metrics.json;
its CIs, by_session and by_corpus pool the runs: each trial's errors averaged over the runs
(harness.group_summary.pooled_point).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from config import SEED_KEYS
from harness import analyses
from harness.group_summary import pooled_point
from harness.metrics import COLUMNS, METRICS
from harness.run_reader import Run

RETRIEVAL = {"retrieval_top1": 1, "retrieval_top10": 10}  # metric -> k: the true sentence ranked <= k
ALL_METRICS = (*METRICS, *RETRIEVAL)
# per metric: (value, count) columns of a decoder's seed-averaged per-trial frame (Decoder.averaged)
VALUE_COLUMNS = {**COLUMNS, "retrieval_top1": ("top1_hit", "ranked"), "retrieval_top10": ("top10_hit", "ranked")}
TRIAL_KEY = list(analyses.TRIAL_KEY)
IGNORED_PREFIXES = ("output.", "slurm.")  # where results go and how the cluster ran it: not the decoder
MAX_LABEL_KEYS = 3  # config values named in a label; more are "+N more"
_MISSING = object()


def described_config(run: Run) -> dict:
    """What defines the run's decoder: its flattened config without seeds, output.* and slurm.*, plus the
    recalibration k (key "k") where it has one."""
    out = {k: v for k, v in run.flat_config.items()
           if k not in SEED_KEYS and not k.startswith(IGNORED_PREFIXES)}
    if run.k is not None:
        out["k"] = run.k
    return out


def _show(value, limit: int | None = None) -> str:
    """A config value as YAML would write it ("-": the key is absent), cut to `limit` characters."""
    if value is _MISSING:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def shown_value(config: dict, key: str, limit: int | None = None) -> str:
    """The key's value in a described config as tables and labels show it ("-": absent)."""
    return _show(config.get(key, _MISSING), limit)


def differing_keys(configs: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for config in configs for k in config))
    return [k for k in keys if len({shown_value(config, k) for config in configs}) > 1]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """key -> its name in a label: the last part ("lr_max"), or the whole key where two share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (tail if last.count(tail) == 1 else k) for k, tail in zip(keys, last)}


def assign_labels(names: list[str], idents: list[str], configs: list[dict]) -> list[str]:
    """Labels for tables and legends: each name, plus the config values that tell it apart from the
    others of the same model and trial name ("ctc_baseline_tiny (lr_max=0.003)"); unique."""
    labels = list(names)
    for ident in dict.fromkeys(idents):
        members = [i for i, x in enumerate(idents) if x == ident]
        if len(members) < 2:
            continue
        keys = differing_keys([configs[i] for i in members])
        short = _short_keys(keys)
        for i in members:
            parts = [f"{short[k]}={shown_value(configs[i], k, 24)}" for k in keys[:MAX_LABEL_KEYS]]
            parts += [f"+{len(keys) - MAX_LABEL_KEYS} more"] if len(keys) > MAX_LABEL_KEYS else []
            if parts:
                labels[i] += f" ({', '.join(parts)})"
    counts, seen = Counter(labels), Counter()
    for i, label in enumerate(labels):
        if counts[label] > 1:
            seen[label] += 1
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _mean(values):
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _sd(values):
    values = [float(v) for v in values if v is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _as_top1(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """true_rank recoded so that pooled_point's retrieval_top1 measures top-k (1: within k, 2: not)."""
    if "true_rank" not in frame:
        return frame
    rank = frame["true_rank"]
    return frame.assign(true_rank=rank.where(rank.isna(), np.where(rank <= k, 1.0, 2.0)))


def pooled(frames: list[pd.DataFrame], metric: str, n_resamples: int, seed: int) -> dict | None:
    """harness.group_summary.pooled_point, retrieval_top10 too."""
    if metric in RETRIEVAL:
        frames, metric = [_as_top1(f, RETRIEVAL[metric]) for f in frames], "retrieval_top1"
    return pooled_point(frames, metric, n_resamples, seed)


def _ci(point: dict | None):
    return [point["ci_low"], point["ci_high"]] if point and point.get("ci_low") is not None else None


def _n_distinct(frames: list[pd.DataFrame]) -> int:
    frames = [f for f in frames if len(f)]
    return len(pd.concat(frames)[TRIAL_KEY].drop_duplicates()) if frames else 0


@dataclass
class Decoder:
    """One config's runs (its seeds; a single run most of the time) and what they show together."""

    runs: list[Run]
    label: str = ""
    n_resamples: int = 1000  # for the pooled CIs of a decoder with several runs
    seed: int = 0
    _entries: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.label = self.label or self.name

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    @property
    def name(self) -> str:
        """A one-run decoder's folder name; a group's runs: the group folder's name; else the trial
        name its runs share."""
        if len(self.runs) == 1:
            return self.first.name
        if self.first.group is not None and all(run.group == self.first.group for run in self.runs):
            return self.first.group.name
        info = self.first.metrics.get("run") or {}
        return str(self.first.config.get("trial_name") or info.get("trial_name") or self.first.decoder)

    @property
    def ident(self) -> str:
        return self.first.decoder  # "<model> (<trial name>)"

    @property
    def protocol(self) -> str:
        return self.first.protocol

    @property
    def is_retrieval(self) -> bool:
        return any(run.is_retrieval for run in self.runs)

    def text_from(self, entry: dict) -> str:
        """Where the decoder's predicted_text comes from (README: retrieval models)."""
        if not self.is_retrieval:
            return "decoding"
        n = entry.get("n_candidates")
        return f"retrieval ({n} candidates)" if n is not None else "retrieval (candidate list)"

    @cached_property
    def trials(self) -> pd.DataFrame:
        """Every run's per-trial rows pooled, with the run's name in column "run"."""
        return pd.concat([run.trials.assign(run=run.name) for run in self.runs], ignore_index=True)

    def split_trials(self, split: str) -> pd.DataFrame:
        return self.trials[self.trials["split"] == split]

    @cached_property
    def averaged(self) -> pd.DataFrame:
        """One row per trial: each trial's edits and counts (and retrieval hits) averaged over the runs
        that scored it (NaN where none did). With one run: the run's own numbers."""
        parts = []
        for run in self.runs:
            t = run.trials
            part = t[TRIAL_KEY].copy()
            for edits, count in COLUMNS.values():
                part[edits], part[count] = t[edits], t[count]
            if "true_rank" in t:
                ranked = t["true_rank"].notna()
                for metric, k in RETRIEVAL.items():
                    part[VALUE_COLUMNS[metric][0]] = (t["true_rank"] <= k).astype(float).where(ranked)
                part["ranked"] = ranked.astype(float).where(ranked)
            parts.append(part)
        return pd.concat(parts, ignore_index=True).groupby(TRIAL_KEY, sort=False, as_index=False, dropna=False).mean()

    def averaged_split(self, split: str) -> pd.DataFrame:
        return self.averaged[self.averaged["split"] == split]

    def averaged_trials(self, split: str) -> pd.DataFrame:
        """averaged_split with each trial's properties (reference text, corpus, days since implant,
        n_time_steps: the same in every run), for the error breakdowns: a trial counts once however
        many runs decoded it, so the bootstrap CIs are over trials."""
        trials = self.split_trials(split)
        properties = [c for c in ("reference_text", "corpus", "days_since_implant", "n_time_steps") if c in trials]
        first = trials.drop_duplicates(TRIAL_KEY)[[*TRIAL_KEY, *properties]]
        return self.averaged_split(split).merge(first, on=TRIAL_KEY, how="left")

    def split_metrics(self) -> dict[str, dict]:
        """split -> a metrics.json-like entry: a one-run decoder's own; else the mean over the runs
        (with `<metric>_sd`), CIs and by_session / by_corpus pooled from the per-trial rows."""
        if not self._entries:
            if len(self.runs) == 1:
                self._entries.update(self.first.split_metrics())
            else:
                splits = dict.fromkeys(s for run in self.runs for s in run.split_metrics())
                self._entries.update({s: self._pooled_entry(s) for s in splits})
        return self._entries

    def entry(self, split: str) -> dict:
        return self.split_metrics().get(split) or {}

    def _pooled_entry(self, split: str) -> dict:
        present = [(run, run.split_metrics()[split]) for run in self.runs if split in run.split_metrics()]
        frames = [run.trials[run.trials["split"] == split] for run, _ in present]
        out: dict = {}
        for metric in ALL_METRICS:
            values = [entry.get(metric) for _, entry in present if entry.get(metric) is not None]
            if not values:
                if metric in METRICS:
                    out[metric] = None
                continue
            out[metric], out[f"{metric}_sd"] = _mean(values), _sd(values)
            out[f"{metric}_ci"] = _ci(pooled(frames, metric, self.n_resamples, self.seed))
        out["n_trials"] = _n_distinct(frames)
        candidates = {entry["n_candidates"] for _, entry in present if "n_candidates" in entry}
        if len(candidates) == 1:
            out["n_candidates"] = candidates.pop()
        out["by_session"] = self._pooled_by(frames, "session")
        if all("by_corpus" in entry for _, entry in present):
            out["by_corpus"] = self._pooled_by(frames, "corpus")
        return out

    def _pooled_by(self, frames: list[pd.DataFrame], column: str) -> dict:
        out = {}
        for group in sorted({g for frame in frames for g in frame[column] if g}):
            parts = [frame[frame[column] == group] for frame in frames]
            figures: dict = {}
            for metric in METRICS:
                point = pooled(parts, metric, self.n_resamples, self.seed)
                figures[metric] = point["value"] if point else None
                figures[f"{metric}_ci"] = _ci(point)
                if point and point.get("sd") is not None:
                    figures[f"{metric}_sd"] = point["sd"]
            figures["n_trials"] = _n_distinct(parts)
            out[group] = figures
        return out

    @property
    def steps(self):
        values = [(run.metrics.get("run") or {}).get("steps") for run in self.runs]
        if len(set(map(str, values))) == 1:
            return values[0]
        return _mean(values)

    @property
    def wall_seconds(self):
        return self.first.meta.get("wall_seconds") if len(self.runs) == 1 else \
            _mean(run.meta.get("wall_seconds") for run in self.runs)

    @property
    def device(self):
        devices = list(dict.fromkeys(str(run.meta.get("device")) for run in self.runs if run.meta.get("device")))
        return ", ".join(devices) if devices else None


def make_decoders(runs: list[Run], n_resamples: int = 1000, seed: int = 0) -> list[Decoder]:
    """Runs grouped into decoders (module docstring), in the order of their first run, and labelled."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        described = described_config(run)
        # runs of two groups stay two decoders (two groups of one config are what a user compares)
        group = str(run.group.resolve()) if run.group is not None else None
        key = (run.decoder, group, tuple(sorted((k, _show(v)) for k, v in described.items())))
        by_key.setdefault(key, []).append(run)
    groups = []
    for members in by_key.values():
        seeds = [run.seed_identity for run in members]
        if len(set(map(str, seeds))) == len(seeds):  # distinct seeds (or draws): repeats of one decoder
            groups.append(members)
        else:
            groups += [[run] for run in members]
    order = {id(run): i for i, run in enumerate(runs)}
    groups.sort(key=lambda members: order[id(members[0])])
    decoders = [Decoder(members, n_resamples=min(n_resamples, 1000), seed=seed) for members in groups]
    labels = assign_labels([d.name for d in decoders], [d.ident for d in decoders],
                           [described_config(d.first) for d in decoders])
    for decoder, label in zip(decoders, labels):
        decoder.label = label
    return decoders


def as_decoders(items: list) -> list[Decoder]:
    """Decoders as given, or one decoder per Run."""
    return [item if isinstance(item, Decoder) else Decoder([item]) for item in items]
