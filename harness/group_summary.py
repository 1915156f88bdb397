"""A run group's summary: its members' results pooled per point of the protocol's axis.

Every point (a seed group of the fixed protocol has one; cross_session has one per held-out
session, at its days since the last training session; data_scaling one per fraction; recalibration
one per k) pools the runs that sit on it (seeds; for recalibration also the draws):

- value: each trial's errors averaged over the runs that decoded it, then the summed ratio over
  trials (so seeds are averaged trial by trial, as `compare` does between decoders);
- ci_low, ci_high: the 95% bootstrap CI of that value over trials;
- sd: the standard deviation across the runs of each run's own summed ratio (the seed, or draw,
  spread; empty with one run);
- n_runs, n_trials, and n_train_trials (the runs' training trials: data_scaling's x in trials).

Written as summary.json, summary.csv (one row per split, point and metric), summary.md and
summary.png (the curve, for protocols with an axis).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from config import HELD_OUT_PROTOCOLS
from harness import results, run_reader
from harness.metrics import COLUMNS, bootstrap_ci, summed_ratio

TRIAL_KEY = list(run_reader.TRIAL_KEY)
AXES = {"fixed": None, "cross_session": "days_since_training", "data_scaling": "fraction", "recalibration": "k"}
AXIS_LABELS = {"days_since_training": "days since the last training session", "fraction": "fraction of the training trials",
               "k": "calibration sentences per held-out session (k)"}
POOLED = "held_out"  # cross_session and recalibration: every held-out split pooled
SUMMARY_COLUMNS = ["protocol", "split", "axis", "x", "metric", "value", "ci_low", "ci_high", "sd", "n_runs", "n_trials",
                   "n_train_trials"]


def read_trials(run_dir: Path) -> pd.DataFrame:
    """per_trial.csv as a frame: the key columns as text, empty numbers as NaN."""
    return pd.read_csv(run_dir / "per_trial.csv", dtype={"split": str, "session": str}, keep_default_na=False,
                       na_values={c: [""] for c in ("phoneme_edits", "phoneme_count", "word_edits", "word_count",
                                                    "char_edits", "char_count", "true_rank", "days_since_training")})


def metric_columns(frame: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series] | None:
    """(errors, counts) per trial of an error rate, or (hits, 1) of retrieval_top1; None if absent."""
    if metric == "retrieval_top1":
        if "true_rank" not in frame or frame["true_rank"].isna().all():
            return None
        ranked = frame["true_rank"].notna()
        return (frame["true_rank"] <= 1).astype(float).where(ranked), ranked.astype(float).where(ranked)
    edits, counts = COLUMNS[metric]
    if edits not in frame or frame[edits].isna().all():
        return None
    return frame[edits].astype(float), frame[counts].astype(float)


def pooled_point(frames: list[pd.DataFrame], metric: str, n_resamples: int = 1000, seed: int = 0) -> dict | None:
    """The point's figures (module docstring) from the rows each run decoded there."""
    per_run, parts = [], []
    for i, frame in enumerate(frames):
        columns = metric_columns(frame, metric)
        if columns is None:
            continue
        values = pd.DataFrame({"v": columns[0], "c": columns[1]}).dropna()
        if values.empty:
            continue
        per_run.append(summed_ratio(values["v"], values["c"]))
        keys = frame.loc[values.index, TRIAL_KEY].astype(str)
        parts.append(pd.concat([keys, values], axis=1).assign(run=i))
    if not parts:
        return None
    trials = pd.concat(parts).groupby(TRIAL_KEY, sort=False)[["v", "c"]].mean()  # each trial over its runs
    ci = bootstrap_ci(trials["v"].to_numpy(), trials["c"].to_numpy(), n_resamples=n_resamples, seed=seed)
    per_run = [r for r in per_run if r is not None]
    return {"value": summed_ratio(trials["v"], trials["c"]), "ci_low": ci[0] if ci else None,
            "ci_high": ci[1] if ci else None, "sd": float(np.std(per_run, ddof=1)) if len(per_run) > 1 else None,
            "n_runs": len(per_run), "n_trials": len(trials)}


def _runs(group_dir: Path) -> list[dict]:
    """Every finished member folder with its coordinates, metrics and rows."""
    from harness.groups import read_plan

    plan, members = read_plan(group_dir)
    seeds = {m.name: m.coords.get("seed") for m in members}
    out = []
    for folder in sorted(p for p in group_dir.iterdir() if p.is_dir() and results.is_finished(p)):
        metrics = json.loads((folder / "metrics.json").read_text())
        member = next((m for m in members if folder.name == m.name or folder.name.startswith(m.prefix + "k-")), None)
        if member is None:
            continue
        protocol = metrics.get("protocol") or {}
        coords = {**member.coords, "seed": seeds.get(member.name)}
        if "k" in protocol:
            coords.update(k=protocol["k"], draw=protocol["draw"])
        out.append({"name": folder.name, "coords": coords, "metrics": metrics, "rows": read_trials(folder)})
    return out


def _points(protocol: str, run: dict) -> list[tuple[str, object, pd.DataFrame]]:
    """(split, x, rows) of one run: where its rows sit on the protocol's axis."""
    rows = run["rows"]
    if protocol in HELD_OUT_PROTOCOLS:
        if protocol == "recalibration":
            return [(POOLED, run["coords"].get("k", 0), rows)]
        out = []
        for entry in (run["metrics"].get("protocol") or {}).get("by_days_since_training", []):
            x = entry["days_since_training"] if entry["days_since_training"] is not None else entry["sessions_since_training"]
            out.append((POOLED, x, rows[rows["session"] == entry["session"]]))
        return out
    x = run["coords"].get("fraction") if protocol == "data_scaling" else None
    return [(split, x, part) for split, part in rows.groupby("split", sort=False)]


def summary_frame(group_dir: Path, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    from harness.groups import read_plan

    plan, _ = read_plan(group_dir)
    protocol = plan["protocol"]
    axis = AXES[protocol]
    collected: dict[tuple, list[pd.DataFrame]] = {}
    trained: dict[tuple, list[int]] = {}  # the training trials of the runs at a point (data_scaling's real x)
    for run in _runs(group_dir):
        for split, x, rows in _points(protocol, run):
            collected.setdefault((split, x), []).append(rows)
            trained.setdefault((split, x), []).append((run["metrics"].get("run") or {}).get("n_train_trials"))
    records = []
    for (split, x), frames in sorted(collected.items(), key=lambda item: (item[0][0], -1 if item[0][1] is None else item[0][1])):
        counts = [n for n in trained[(split, x)] if n is not None]
        for metric in (*COLUMNS, "retrieval_top1"):
            point = pooled_point(frames, metric, n_resamples, seed)
            if point is not None:
                records.append({"protocol": protocol, "split": split, "axis": axis, "x": x, "metric": metric, **point,
                                "n_train_trials": round(float(np.mean(counts))) if counts else None})
    return pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS)


def _percent(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{100 * value:.1f}"


def summary_markdown(frame: pd.DataFrame, plan: dict) -> str:
    """The table a reader of summary.md wants: value [CI], the spread across runs, runs and trials."""
    shown = pd.DataFrame({
        "split": frame["split"],
        **({AXIS_LABELS[frame["axis"].iloc[0]]: frame["x"]} if len(frame) and frame["axis"].iloc[0] else {}),
        "metric": frame["metric"],
        "value % [95% CI]": [f"{_percent(v)} [{_percent(lo)}, {_percent(hi)}]"
                             for v, lo, hi in zip(frame["value"], frame["ci_low"], frame["ci_high"])],
        "sd across runs (points)": [_percent(v) for v in frame["sd"]],
        "runs": frame["n_runs"], "trials": frame["n_trials"], "training trials": frame["n_train_trials"]})
    seeds = plan.get("seeds") or []
    head = (f"# {plan.get('trial_name', '')}: {plan['protocol']} protocol"
            + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + "\n\n"
            "Each trial's errors averaged over the runs that decoded it (seeds; for recalibration also the draws), "
            "then summed over trials; 95% bootstrap CI over trials; sd: spread of the runs' own figures; trials: the "
            "distinct trials decoded at the point (a trial decoded by several runs counts once; recalibration draws "
            "each decode the trials they did not calibrate on, so together they may cover every trial).\n\n")
    return head + shown.to_markdown(index=False) + "\n"


def summarize(group_dir: Path) -> pd.DataFrame:
    from harness import plots
    from harness.groups import read_plan

    plan, _ = read_plan(group_dir)
    frame = summary_frame(group_dir)
    results.atomic_write_text(group_dir / "summary.csv", frame.to_csv(index=False))
    results.write_json(group_dir / "summary.json", {"protocol": plan["protocol"], "axis": AXES[plan["protocol"]],
                                                    "points": json.loads(frame.to_json(orient="records"))})
    results.atomic_write_text(group_dir / "summary.md", summary_markdown(frame, plan))
    axis = AXES[plan["protocol"]]
    if axis and hasattr(plots, "curve_plot"):
        curves = [(f"{metric.upper()} ({split})", part.rename(columns={}).reset_index(drop=True))
                  for (split, metric), part in frame.groupby(["split", "metric"], sort=False)
                  if metric in ("per", "wer")]
        plots.curve_plot(curves, AXIS_LABELS[axis], "error", f"{plan.get('trial_name', '')}: {plan['protocol']}",
                         group_dir / "summary.png")
    return frame
