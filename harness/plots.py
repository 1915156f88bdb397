"""PNG plots for `compare`: error per session and per corpus with CIs, training curves, and protocol
curves (error against days, calibration sentences, fraction of training data; several decoders).

Built on matplotlib's object API (`Figure`, no pyplot): no global figure state, no display
needed; savefig renders with the Agg backend. Each plot is written atomically like every other
output file.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from harness import results
from harness.metrics import METRICS

LABELS = {"per": "PER", "wer": "WER", "cer": "CER", "retrieval_top1": "retrieval top-1",
          "retrieval_top10": "retrieval top-10"}
LOSS_TAGS = ("train/loss", "val/loss")  # drawn relative to each run's first value (losses differ in scale)
RETRIEVAL_TAGS = ("val/retrieval_top1", "val/retrieval_top10")  # drawn whenever a run has them


def _color(i: int) -> str:
    """The i-th run's colour in every panel (the default cycle restarts per panel, so a run missing
    from one panel would shift the colours of the others)."""
    return f"C{i % 10}"


def _handles(labels: list[str]) -> list[Line2D]:
    return [Line2D([], [], color=_color(i), marker="o", label=label) for i, label in enumerate(labels)]


def _legend(fig: Figure, labels: list[str]) -> None:
    """One legend for the whole figure with every run, whichever panels it appears in."""
    fig.legend(handles=_handles(labels), loc="outside right upper", fontsize=8)


def _legend_beside(ax, labels: list[str]) -> None:
    """One legend with every run, outside `ax` to its right, its top level with the axes' top: below a
    suptitle whatever the labels' length (a figure legend at "outside right upper" starts at the
    figure's top edge, where the suptitle is). Constrained layout makes room for it."""
    ax.legend(handles=_handles(labels), loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize=8)


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
    fig.suptitle(f"Error per {noun} on {split}, with 95% bootstrap CIs")
    _legend_beside(axes[0], [label for label, _ in runs])
    return fig


def _validation_history_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Curves from metrics.json's run.validation_history, for runs without TensorBoard scalars."""
    curves: dict[str, list] = {}
    for record in history:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault("val/loss" if key == "loss" else f"val/{key}", []).append((record["step"], value))
    return curves


def _selection(run: tuple) -> dict | None:
    """A training_curves run's selection dict (its optional 4th element), checked; None without one."""
    selection = run[3] if len(run) > 3 else None
    if selection is None:
        return None
    if not isinstance(selection, dict) or not selection.get("metric"):
        raise ValueError(f"training_curves: run {run[0]!r}: selection must be None or a dict with 'metric' "
                         f"(and optionally 'mode', 'best_step'), got {selection!r}")
    if selection.get("mode") not in (None, "min", "max"):
        raise ValueError(f"training_curves: run {run[0]!r}: selection mode must be 'min' or 'max', "
                         f"got {selection['mode']!r}")
    return selection


def _relative(points: list[tuple[int, float]]) -> list[tuple[int, float]] | None:
    """The curve divided by its first finite value (so it starts at 1); None when that value is not
    positive (a ratio to it would flip or blow up the curve) or there is none."""
    first = next((v for _, v in points if math.isfinite(v)), None)
    if first is None or first <= 0:
        return None
    return [(step, value / first) for step, value in points]


def _panel_title(tag: str, modes: set) -> str:
    kind, name = tag.split("/", 1)
    title = f"{'training' if kind == 'train' else 'validation'} {LABELS.get(name, name)}"
    if tag in LOSS_TAGS:
        title += ", relative to each run's first value"
    if modes:
        direction = {"max": ", higher is better", "min": ", lower is better"}.get(modes.pop(), "") if len(modes) == 1 else ""
        title += f"\n(selection metric{direction})"
    return title


def training_curves_figure(runs: list[tuple]) -> Figure | None:
    """Training loss, validation loss, validation error rates and the runs' checkpoint-selection
    metrics against the step, one line per run. None if no run has any of them.

    runs: (label, TensorBoard scalars tag -> [(step, value)], validation history of metrics.json[,
    selection]). A run without scalars falls back to its validation history (records like
    {"step": 50, "loss": 1.2, "per": 0.4, "retrieval_top1": 0.3}). `selection`, optional (None or left
    out: none), names the metric that picks the run's best checkpoint: {"metric": "retrieval_top1",
    "mode": "max", "best_step": 120} (training_params.best_metric / best_mode, metrics.json's
    run.best_step).

    Panels: the losses (train/loss, val/loss) relative to each run's first logged value, as losses
    of different models are not on one scale (a run whose first value is not positive is left out of
    that panel, and the panel says so); val/per, val/wer, val/cer as logged; a panel val/<metric> for
    every run's selection metric (from the scalars val/<metric>, else the validation history), its
    title saying which way is better, each selecting run's best step ringed; and val/retrieval_top1 /
    val/retrieval_top10 wherever a run has them.
    """
    curves = []
    for run in runs:
        label, scalars, history = run[0], run[1], run[2]
        from_history = _validation_history_curves(history or [])
        curve = dict(scalars or from_history)
        selection = _selection(run)
        if selection is not None:
            tag = f"val/{selection['metric']}"
            if tag not in curve and tag in from_history:
                curve[tag] = from_history[tag]
        curves.append((label, curve, selection))
    modes: dict[str, set] = {}  # tag -> the modes the runs selecting on it gave
    for _label, _curve, selection in curves:
        if selection is not None:
            modes.setdefault(f"val/{selection['metric']}", set()).add(selection.get("mode"))
    candidates = ["train/loss", "val/loss", *(f"val/{m}" for m in METRICS), *modes, *RETRIEVAL_TAGS]
    panels = [tag for tag in dict.fromkeys(candidates) if any(c.get(tag) for _, c, _ in curves)]
    if not panels:
        return None
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.4 * n_rows), layout="constrained")
    grid = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    for ax, tag in zip(grid[: len(panels)], panels):
        left_out = []
        for i, (label, c, selection) in enumerate(curves):
            points = c.get(tag)
            if not points:
                continue
            if tag in LOSS_TAGS:
                points = _relative(points)
                if points is None:
                    left_out.append(label)
                    continue
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=_color(i))
            best_step = selection.get("best_step") if selection and f"val/{selection['metric']}" == tag else None
            if best_step is not None and best_step in steps:
                ax.plot([best_step], [values[steps.index(best_step)]], linestyle="none", marker="o", markersize=11,
                        markerfacecolor="none", markeredgewidth=1.5, color=_color(i), label=f"best step {best_step}")
        if tag in LOSS_TAGS:
            ax.axhline(1.0, color="0.7", linewidth=0.8)
            ax.set_ylabel("relative to the first value")
        if left_out:
            ax.text(0.02, 0.02, "first value not positive, not shown: " + ", ".join(left_out), fontsize=7,
                    transform=ax.transAxes, color="0.3")
        ax.set_title(_panel_title(tag, set(modes.get(tag, ()))), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend(fig, [label for label, _, _ in curves])
    return fig


def training_curves(runs: list[tuple], path: Path) -> Path | None:
    """training_curves_figure written to `path` as a PNG; None if nothing to plot."""
    fig = training_curves_figure(runs)
    return _save(fig, path) if fig is not None else None


def _finite(frame, column: str) -> np.ndarray:
    return np.asarray(frame[column], dtype=float) if column in frame else np.full(len(frame), np.nan)


def curve_figure(curves: list[tuple], xlabel: str, ylabel: str, title: str, log_x: bool = False) -> Figure | None:
    """A protocol curve for several decoders on one plot: an error rate (in percent on the y axis,
    from 0) against x (days since the last training session, k calibration sentences, fraction of
    training data), a line with markers per decoder and its CI shaded.

    curves: (label, DataFrame with columns x, value, ci_low, ci_high, and optionally sd), values as
    fractions. Points whose x or value is NaN are skipped, the band only spans points with both CI
    bounds; sd is accepted and not drawn (the band is the CI). log_x: a log x axis (symlog, linear
    up to the smallest positive x, when some x is 0 or below). None when no decoder has a point.
    """
    fig, ax, drawn, xs_all, tops = None, None, [], [], []
    for i, (label, frame) in enumerate(curves):
        missing = [c for c in ("x", "value") if c not in frame]
        if missing:
            raise ValueError(f"curve_figure: {label!r} has no column {', '.join(missing)}")
        x, value = _finite(frame, "x"), _finite(frame, "value")
        low, high = _finite(frame, "ci_low"), _finite(frame, "ci_high")
        keep = np.isfinite(x) & np.isfinite(value)
        order = np.argsort(x[keep], kind="stable")
        x, value, low, high = (a[keep][order] for a in (x, value, low, high))
        if not len(x):
            continue
        if fig is None:
            fig = Figure(figsize=(7.5, 4.2), layout="constrained")
            ax = fig.subplots()
        ax.plot(x, value, marker="o", markersize=4, color=_color(i), label=label)
        band = np.isfinite(low) & np.isfinite(high)
        if band.any():
            ax.fill_between(x[band], low[band], high[band], color=_color(i), alpha=0.2, linewidth=0)
        drawn.append(label)
        xs_all.append(x)
        tops.append(np.nanmax(np.concatenate([value, high[band]])))
    if fig is None:
        return None
    if all(float(v).is_integer() for v in np.concatenate(xs_all)):  # k sentences, days: no 2.5 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_x:
        xs = np.concatenate(xs_all)
        if (xs > 0).all():
            ax.set_xscale("log")
        else:
            positive = xs[xs > 0]
            ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    top = max(tops)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)  # headroom: a line at 100% stays off the frame
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    return fig


def curve_plot(curves: list[tuple], xlabel: str, ylabel: str, title: str, path: Path, *,
               log_x: bool = False) -> Path | None:
    """curve_figure written to `path` as a PNG; None if nothing to draw."""
    fig = curve_figure(curves, xlabel, ylabel, title, log_x=log_x)
    return _save(fig, path) if fig is not None else None
