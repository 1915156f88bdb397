"""The tables `compare` writes as CSV, one row per decoder (or run, or pair) and split.

comparison.csv (summary_frame), runs.csv (runs_frame), per_corpus.csv (corpus_frame), what_differs.csv
(differs_frame), paired.csv (paired_frame) and edit_operations.csv (edit_operations_frame). A one-run
decoder's figures are its metrics.json's, never recomputed; a decoder of several runs has the mean over
them, `<metric>_sd` their standard deviation, and CIs of the seed-averaged trials (harness.decoders).
The paired tests between two decoders run on those seed-averaged per-trial errors, and a difference
smaller than the larger of the two decoders' seed standard deviations is flagged as within the seed
spread. Values are kept as given (object columns), so 3725 stays 3725 in the CSV.
"""

from __future__ import annotations

import itertools

import pandas as pd

from config import SEED_KEYS
from harness import analyses
from harness.decoders import (
    ALL_METRICS,
    RETRIEVAL,
    TRIAL_KEY,
    VALUE_COLUMNS,
    Decoder,
    as_decoders,
    described_config,
    differing_keys,
    shown_value,
)
from harness.metrics import METRICS
from harness.paired_stats import paired_comparison

SUMMARY_LEADING = ["run", "decoder", "split"]
CORPUS_COLUMNS = ["run", "decoder", "split", "corpus", *(f"{m}{end}" for m in METRICS for end in ("", "_ci_low", "_ci_high")),
                  "n_trials"]
PAIRED_COLUMNS = ["split", "run_a", "run_b", "metric", "n_trials", "a", "b", "difference", "difference_ci_low",
                  "difference_ci_high", "b_better", "a_better", "equal", "wilcoxon_statistic", "wilcoxon_p"]
PAIRED_EXTRA = ["n_seeds_a", "n_seeds_b", "sd_a", "sd_b", "within_seed_spread"]
EDIT_COLUMNS = ["run", "split", *analyses.EDIT_OPERATION_COLUMNS]


def is_scored(entry: dict) -> bool:
    """Whether a metrics.json entry has any score (an unlabeled test split has none)."""
    return any(entry.get(m) is not None for m in ALL_METRICS)


def _retrieval_columns(entry: dict) -> dict:
    """retrieval_top1/top10 with their CIs, as metrics.json has them (harness.metrics computes them
    from the per-trial true_rank when the run is written; compare never recomputes a run's own)."""
    out = {}
    for metric in RETRIEVAL:
        if entry.get(metric) is None:
            continue
        ci = entry.get(f"{metric}_ci") or [None, None]
        out.update({metric: entry[metric], f"{metric}_ci_low": ci[0], f"{metric}_ci_high": ci[1]})
    return out


def _rates(entry: dict) -> dict:
    """per/wer/cer with their CI bounds as columns, from a metrics.json entry."""
    row = {}
    for metric in METRICS:
        ci = entry.get(f"{metric}_ci") or [None, None]
        row.update({metric: entry.get(metric), f"{metric}_ci_low": ci[0], f"{metric}_ci_high": ci[1]})
    return row


def _frame(rows: list[dict], leading: list[str]) -> pd.DataFrame:
    """Rows as a frame of the values as given (object columns: 3725 stays 3725 in the CSV, not
    3725.0): the `leading` columns first, then every other key in first-seen order."""
    columns = list(leading)
    for row in rows:
        columns += [k for k in row if k not in columns]
    return pd.DataFrame(rows, columns=columns, dtype=object)


def summary_frame(decoders: list[Decoder]) -> pd.DataFrame:
    """comparison.csv: one row per decoder and split that has any score (an unlabeled test split has
    none and is left out). `run` is the decoder's label (a one-run decoder's folder name). A one-run
    decoder's figures and CIs come from metrics.json; a decoder of several runs has the mean over
    them, `<metric>_sd` their standard deviation, and CIs of the seed-averaged trials."""
    rows = []
    for decoder in decoders:
        for split, entry in decoder.split_metrics().items():
            if not is_scored(entry):
                continue
            row = {"run": decoder.label, "decoder": decoder.ident, "split": split, **_rates(entry)}
            row.update(_retrieval_columns(entry))
            if "n_candidates" in entry:
                row["n_candidates"] = entry["n_candidates"]
            row.update({"n_trials": entry.get("n_trials"), "steps": decoder.steps,
                        "wall_seconds": decoder.wall_seconds, "device": decoder.device})
            row["n_seeds"] = decoder.n_seeds
            row.update({f"{m}_sd": entry.get(f"{m}_sd") for m in ALL_METRICS if m in METRICS or entry.get(m) is not None})
            row.update({"text_from": decoder.text_from(entry), "protocol": decoder.protocol,
                        "runs": ";".join(run.name for run in decoder.runs)})
            rows.append(row)
    return _frame(rows, SUMMARY_LEADING)


def runs_frame(decoders: list[Decoder]) -> pd.DataFrame:
    """runs.csv: one row per run and scored split, each run's own metrics.json figures, with its decoder."""
    rows = []
    for decoder in decoders:
        for run in decoder.runs:
            info = run.metrics.get("run") or {}
            for split, entry in run.split_metrics().items():
                if not is_scored(entry):
                    continue
                row = {"run": run.name, "decoder_label": decoder.label, "decoder": run.decoder, "split": split,
                       **_rates(entry), **_retrieval_columns(entry), "n_trials": entry.get("n_trials"),
                       "steps": info.get("steps"), "wall_seconds": run.meta.get("wall_seconds"),
                       "device": run.meta.get("device"), "training_seed": run.flat_config.get(SEED_KEYS[0]),
                       "data_seed": run.flat_config.get(SEED_KEYS[1]), "draw": run.protocol_section.get("draw"),
                       "k": run.k, "protocol": run.protocol, "folder": str(run.dir)}
                rows.append(row)
    return _frame(rows, ["run", "decoder_label", "decoder", "split"])


def corpus_frame(decoders: list[Decoder]) -> pd.DataFrame:
    """per_corpus.csv: one row per decoder, split and corpus with any score, from the split's
    `by_corpus` (a one-run decoder's metrics.json, never recomputed; pooled over the runs otherwise).
    Runs without it (from before by_corpus, or on data without a description CSV) have no rows."""
    rows = []
    for decoder in decoders:
        for split, entry in decoder.split_metrics().items():
            for corpus, figures in (entry.get("by_corpus") or {}).items():
                if isinstance(figures, dict) and is_scored(figures):
                    rows.append({"run": decoder.label, "decoder": decoder.ident, "split": split, "corpus": corpus,
                                 **_rates(figures), "n_trials": figures.get("n_trials"), "n_seeds": decoder.n_seeds,
                                 **{f"{m}_sd": figures.get(f"{m}_sd") for m in METRICS}})
    return _frame(rows, [*CORPUS_COLUMNS, "n_seeds", *(f"{m}_sd" for m in METRICS)])


def differs_frame(decoders: list[Decoder]) -> pd.DataFrame:
    """what_differs.csv: one row per decoder, one column per config key whose value differs between
    the decoders (seeds, output.* and slurm.* left out; "k": recalibration's sentences), "-" where a
    decoder's config lacks the key."""
    configs = [described_config(d.first) for d in decoders]
    keys = differing_keys(configs) if len(decoders) > 1 else []
    rows = [{"run": d.label, "n_seeds": d.n_seeds, **{k: shown_value(c, k) for k in keys}}
            for d, c in zip(decoders, configs)]
    return _frame(rows, ["run", "n_seeds", *keys])


def paired_rows(decoders: list[Decoder], split: str, n_resamples: int, seed: int) -> list[dict]:
    """paired.csv's rows of a split: for every pair of decoders (in the order given) and every metric
    both have on the split's joined trials, the paired bootstrap CI of B - A and the Wilcoxon test,
    on each trial's errors averaged over each decoder's runs; with each side's runs and seed spread."""
    out = []
    for a, b in itertools.combinations(as_decoders(decoders), 2):
        trials_a, trials_b = a.averaged_split(split), b.averaged_split(split)
        if trials_a.empty or trials_b.empty:
            continue
        for metric in ALL_METRICS:
            value, count = VALUE_COLUMNS[metric]
            if value not in trials_a or value not in trials_b:
                continue
            joined = trials_a[[*TRIAL_KEY, value, count]].merge(trials_b[[*TRIAL_KEY, value, count]], on=TRIAL_KEY,
                                                                suffixes=("_a", "_b"))
            joined = joined.dropna(subset=[f"{value}_a", f"{count}_a", f"{value}_b", f"{count}_b"])
            if joined.empty:
                continue
            stats = paired_comparison(joined[f"{value}_a"], joined[f"{count}_a"], joined[f"{value}_b"],
                                      joined[f"{count}_b"], higher_is_better=metric in RETRIEVAL,
                                      n_resamples=n_resamples, seed=seed)
            ci = stats.pop("difference_ci") or [None, None]
            row = {"split": split, "run_a": a.label, "run_b": b.label, "metric": metric}
            row.update(stats)
            row["difference_ci_low"], row["difference_ci_high"] = ci
            sd_a, sd_b = a.entry(split).get(f"{metric}_sd"), b.entry(split).get(f"{metric}_sd")
            spread = max((s for s in (sd_a, sd_b) if s is not None), default=None)
            row.update({"n_seeds_a": a.n_seeds, "n_seeds_b": b.n_seeds, "sd_a": sd_a, "sd_b": sd_b,
                        "within_seed_spread": None if spread is None or row["difference"] is None
                        else bool(abs(row["difference"]) < spread)})
            out.append(row)
    return out


def paired_frame(decoders: list[Decoder], splits: list[str], n_resamples: int, seed: int) -> pd.DataFrame:
    """paired.csv: paired_rows of every split."""
    rows = [row for split in splits for row in paired_rows(decoders, split, n_resamples, seed)]
    return _frame(rows, [*PAIRED_COLUMNS, *PAIRED_EXTRA])


def edit_operations_rows(operations: list[tuple[str, pd.DataFrame]], split: str) -> pd.DataFrame:
    """One split's rows of edit_operations.csv: (decoder label, analyses.edit_operations of its rows)
    as EDIT_COLUMNS; a decoder without any (no phonemes nor words) has no rows."""
    table = pd.concat([frame.assign(run=label, split=split) for label, frame in operations if len(frame)],
                      ignore_index=True) if any(len(f) for _, f in operations) else pd.DataFrame(columns=EDIT_COLUMNS)
    return table[EDIT_COLUMNS] if len(table) else table


def edit_operations_frame(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """edit_operations.csv: the splits' edit_operations_rows together."""
    return pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) else \
        pd.DataFrame(columns=EDIT_COLUMNS)
