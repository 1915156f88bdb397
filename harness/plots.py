"""PNG plots for `compare`: error per session and per corpus with CIs, and training curves.

Built on matplotlib's object API (`Figure`, no pyplot): no global figure state, no display
needed; savefig renders with the Agg backend. Each plot is written atomically like every other
output file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harness import results
from harness.metrics import METRICS

LABELS = {"per": "PER", "wer": "WER", "cer": "CER"}


def _color(i: int) -> str:
    """The i-th run's colour in every panel (the default cycle restarts per panel, so a run missing
    from one panel would shift the colours of the others)."""
    return f"C{i % 10}"


def _legend(fig: Figure, labels: list[str]) -> None:
    """One legend for the whole figure with every run, whichever panels it appears in."""
    handles = [Line2D([], [], color=_color(i), marker="o", label=label) for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    results.atomic_write_bytes(path, buffer.getvalue())
    return path


def per_session_plot(runs: list[tuple[str, dict]], split: str, path: Path) -> Path | None:
    """Error per session with 95% CIs (the split entries' `by_session`); see per_group_plot."""
    return per_group_plot(runs, split, path, "by_session", "session")


def per_corpus_plot(runs: list[tuple[str, dict]], split: str, path: Path) -> Path | None:
    """Error per corpus with 95% CIs (the split entries' `by_corpus`); see per_group_plot. None
    when no run has a corpus on this split (no description CSV, or runs from before by_corpus)."""
    if not any(entry.get("by_corpus") for _, entry in runs):
        return None
    return per_group_plot(runs, split, path, "by_corpus", "corpus")


def per_group_plot(runs: list[tuple[str, dict]], split: str, path: Path, key: str, noun: str) -> Path | None:
    """per_group_figure written to `path` as a PNG; None if nothing to plot."""
    fig = per_group_figure(runs, split, key, noun)
    return _save(fig, path) if fig is not None else None


def per_group_figure(runs: list[tuple[str, dict]], split: str, key: str, noun: str) -> Figure | None:
    """Error per group (session, corpus) with 95% CIs, one marker per run side by side, for every
    metric any run has on this split; the first group ("all") is the whole split. (Also drawn at
    every validation for the experiment trackers, harness/trackers.py.)

    runs: (label, that run's metrics.json entry for the split); key: the entry's per-group dict
    (by_session, by_corpus), noun: what a group is, for the title. A run without `key` shows only
    "all"; a value without its CI is a marker without bars. Returns None if nothing to plot.
    """
    metrics = [m for m in METRICS if any(entry.get(m) is not None for _, entry in runs)]
    if not metrics:
        return None
    groups = ["all"] + sorted({g for _, entry in runs for g in (entry.get(key) or {})})
    width = min(24.0, max(6.0, 0.3 * len(groups) * (1 + 0.15 * len(runs)) + 2))  # 45 real sessions fit
    fig = Figure(figsize=(width, 2.8 * len(metrics) + 0.8), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)[:, 0]
    offsets = np.linspace(-0.3, 0.3, len(runs)) if len(runs) > 1 else np.zeros(1)
    for ax, metric in zip(axes, metrics):
        for i, ((_label, entry), offset) in enumerate(zip(runs, offsets)):
            xs, ys, lo, hi = [], [], [], []
            for position, group in enumerate(groups):
                values = entry if group == "all" else (entry.get(key) or {}).get(group) or {}
                value = values.get(metric)
                if value is None:
                    continue
                ci = values.get(f"{metric}_ci") or [value, value]
                xs.append(position + offset)
                ys.append(value)
                lo.append(value - ci[0])
                hi.append(ci[1] - value)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", markersize=4, capsize=2, color=_color(i))
        ax.axvline(0.5, color="0.7", linewidth=0.8)  # "all" apart from the groups
        ax.set_ylabel(f"{LABELS[metric]} ({split})")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(groups)), groups, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    axes[0].set_title(f"Error per {noun} on {split}, with 95% bootstrap CIs")
    _legend(fig, [label for label, _ in runs])
    return fig


def _validation_history_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Curves from metrics.json's run.validation_history, for runs without TensorBoard scalars."""
    curves: dict[str, list] = {}
    for record in history:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                curves.setdefault("val/loss" if key == "loss" else f"val/{key}", []).append((record["step"], value))
    return curves


def training_curves(runs: list[tuple[str, dict, list[dict]]], path: Path) -> Path | None:
    """Training loss, validation loss and validation error rates against the step, one line per run.

    runs: (label, TensorBoard scalars tag -> [(step, value)], validation history of metrics.json).
    A run without scalars falls back to its validation history. Returns None if no run has any.
    """
    curves = [(label, scalars or _validation_history_curves(history)) for label, scalars, history in runs]
    panels = [tag for tag in ("train/loss", "val/loss", *(f"val/{m}" for m in METRICS))
              if any(tag in c for _, c in curves)]
    if not panels:
        return None
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.2 * n_rows), layout="constrained")
    grid = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    axes = grid[: len(panels)]
    for ax, tag in zip(axes, panels):
        for i, (_label, c) in enumerate(curves):
            if tag in c:
                steps, values = zip(*c[tag])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=_color(i))
        kind, name = tag.split("/")
        ax.set_title(f"{'training' if kind == 'train' else 'validation'} {LABELS.get(name, name)}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend(fig, [label for label, _ in curves])
    return _save(fig, path)
