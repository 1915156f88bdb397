"""Figures of the analyses in harness/analyses.py for the `compare` report, several decoders at once.

matplotlib's object API only (`Figure`, no pyplot), as harness/plots.py. Decoder i is colour C{i} in
every figure, in the order given, even where it has nothing to draw; the one legend sits outside the
axes so that it never covers a title or data. Each builder returns None when there is nothing to draw.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

from harness.analyses import GAP, TOO_FEW_TRIALS, few_trials
from harness.plots import LABELS, _color


def _legend(fig: Figure, labels: list[str], extra: list = ()) -> None:
    handles = [Line2D([], [], color=_color(i), marker="o", label=label) for i, label in enumerate(labels)]
    fig.legend(handles=[*handles, *extra], loc="outside right center", fontsize=8)


def _offsets(n: int, spread: float) -> np.ndarray:
    """Side-by-side positions of n decoders around each x, within +-spread."""
    return np.linspace(-spread, spread, n) if n > 1 else np.zeros(1)


def _is_numeric(values: list) -> bool:
    return bool(values) and all(isinstance(v, (int, float, np.integer, np.floating)) for v in values)


def error_by_figure(curves: list[tuple[str, pd.DataFrame]], xlabel: str, title: str) -> Figure | None:
    """Error per group with 95% CIs, one panel per metric, decoders side by side.

    curves: (decoder label, its analyses.error_by frame). Groups that are numbers (days since implant)
    sit on a numeric x axis; others (length bins) are categories in the order of the frames. A hollow
    marker is a group with fewer than TOO_FEW_TRIALS trials.
    """
    frames = [frame for _, frame in curves if not frame.empty]
    if not frames:
        return None
    metrics = list(dict.fromkeys(m for frame in frames for m in frame["metric"]))
    groups = list(dict.fromkeys(g for frame in frames for g in frame["group"]))
    numeric = _is_numeric(groups)
    if numeric:
        span = (max(groups) - min(groups)) or 1.0
        position = {g: float(g) for g in groups}
        offsets = _offsets(len(curves), 0.01 * span * min(len(curves), 4))
    else:
        position = {g: i for i, g in enumerate(groups)}
        offsets = _offsets(len(curves), 0.3)
    width = 8.0 if numeric else min(20.0, max(6.0, 0.5 * len(groups) * (1 + 0.15 * len(curves)) + 2))
    fig = Figure(figsize=(width, 2.8 * len(metrics) + 0.8), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)[:, 0]
    for ax, metric in zip(axes, metrics):
        for i, ((_label, frame), offset) in enumerate(zip(curves, offsets)):
            rows = frame[frame["metric"] == metric]
            for hollow in (False, True):
                part = rows[rows["n_trials"].map(few_trials) == hollow]
                if part.empty:
                    continue
                x = np.array([position[g] for g in part["group"]]) + offset
                y = part["value"].to_numpy(float)
                yerr = np.nan_to_num([y - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - y])
                ax.errorbar(x, y, yerr=yerr, fmt="o", markersize=4, capsize=2, color=_color(i),
                            markerfacecolor="none" if hollow else _color(i))
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # error rates in percent, as every other figure
        ax.grid(axis="y", alpha=0.3)
    if not numeric:
        axes[-1].set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30, ha="right", rotation_mode="anchor")
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(f"{title}, with 95% bootstrap CIs")
    few = Line2D([], [], color="0.4", marker="o", markerfacecolor="none", linestyle="none",
                 label=f"< {TOO_FEW_TRIALS} trials")
    _legend(fig, [label for label, _ in curves], [few])
    return fig


# per_trial column, hatch, shade: the decoder's colour at full, 0.6 and 0.3 opacity, so that the bars
# keep the decoder's colour and the operations still tell apart in print
OPERATIONS = [("substitutions", None, 1.0), ("deletions", "//", 0.6), ("insertions", "..", 0.3)]
LEVEL_METRICS = {"word": "WER", "phoneme": "PER"}
# width of a legend character at font size 8, generous: the figure widens by its longest label, so that
# labels as long as a run folder's full path leave the panels their room
LEGEND_INCH_PER_CHARACTER = 0.07


def edit_operations_figure(frames: list[tuple[str, pd.DataFrame]]) -> Figure | None:
    """Substitution, deletion and insertion rates (per reference token) stacked into each decoder's
    error rate, one panel per level (word, phoneme). frames: (decoder label, analyses.edit_operations).
    The bars are numbered 1, 2, ... and the legend names them ("1: label"): labels under the bars
    would squeeze the panels away when they are long or many."""
    levels = list(dict.fromkeys(level for _, frame in frames for level in frame["level"]))
    if not levels:
        return None
    names = [f"{i + 1}: {label}" for i, (label, _) in enumerate(frames)]
    panels = len(levels) * max(2.5, 1.0 + 0.5 * len(frames))
    legend = 1.0 + LEGEND_INCH_PER_CHARACTER * max(len(name) for name in [*names, *(o for o, _, _ in OPERATIONS)])
    fig = Figure(figsize=(panels + legend, 4.0), layout="constrained")
    axes = fig.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels):
        for i, (_label, frame) in enumerate(frames):
            rows = frame[frame["level"] == level]
            if rows.empty:
                continue
            row = rows.iloc[0]
            bottom = 0.0
            for column, hatch, shade in OPERATIONS:
                rate = row[column] / row["reference_count"] if row["reference_count"] else 0.0
                ax.bar(i, rate, bottom=bottom, color=to_rgba(_color(i), shade), edgecolor=_color(i), hatch=hatch)
                bottom += rate
        ax.set_xticks(range(len(frames)), [str(i + 1) for i in range(len(frames))])
        ax.set_xlabel("decoder (numbered as in the legend)")
        ax.set_ylabel(f"{LEVEL_METRICS.get(level, 'error rate')} by operation")
        ax.set_title(level)
        ax.grid(axis="y", alpha=0.3)
    operations = [Patch(facecolor=to_rgba("0.4", shade), edgecolor="0.4", hatch=hatch, label=column)
                  for column, hatch, shade in OPERATIONS]
    fig.suptitle("Edit operations per reference token")
    _legend(fig, names, operations)
    return fig


def confusion_figure(labels: list[str], matrix: np.ndarray, title: str) -> Figure | None:
    """Heat map of analyses.phoneme_confusion, each true phoneme's row normalised to sum to 1 (the
    share of its occurrences predicted as each column). Phonemes that never occur on either side are
    left out (keeping the matrix square, so the diagonal stays the correct predictions); the gap
    symbol always stays. None when the matrix is empty."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.sum() == 0:
        return None
    keep = [i for i, label in enumerate(labels) if label == GAP or matrix[i].any() or matrix[:, i].any()]
    counts = matrix[np.ix_(keep, keep)]
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    names = [labels[i] for i in keep]
    size = 2.5 + 0.22 * len(names)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")  # auto: the layout sees the real margins
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted phoneme")
    ax.set_ylabel("true phoneme")
    fig.colorbar(image, ax=ax, label="share of the true phoneme's row")
    fig.suptitle(title)
    return fig


def rank_figure(decoders: list[tuple[str, pd.DataFrame, pd.DataFrame]]) -> Figure | None:
    """Retrieval: the true_rank histogram (share of ranked trials per bin) beside the top-k accuracy
    curve (log k). decoders: (label, analyses.rank_histogram, analyses.top_k_curve); decoders
    without ranks are skipped (keeping their colour slot). None when none has ranks."""
    if all(histogram.empty and curve.empty for _, histogram, curve in decoders):
        return None
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    bars, curves = fig.subplots(1, 2)
    bins = list(dict.fromkeys(b for _, histogram, _ in decoders for b in histogram.get("rank", [])))
    width = 0.8 / len(decoders)
    offsets = _offsets(len(decoders), 0.4 - width / 2)
    for i, ((_label, histogram, curve), offset) in enumerate(zip(decoders, offsets)):
        if not histogram.empty:
            x = np.array([bins.index(b) for b in histogram["rank"]]) + offset
            bars.bar(x, histogram["share"], width=width, color=_color(i))
        if not curve.empty:
            curves.plot(curve["k"], curve["accuracy"], marker="o", markersize=4, color=_color(i))
    bars.set_xticks(range(len(bins)), bins)
    bars.set_xlabel("rank of the true sentence")
    bars.set_ylabel("share of ranked trials")
    bars.set_title("rank histogram")
    curves.set_xscale("log")
    curves.set_xlabel("k")
    curves.set_ylabel("top-k accuracy")
    curves.set_ylim(0, 1.02)
    curves.set_title("top-k accuracy")
    for ax in (bars, curves):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Retrieval of the true sentence")
    _legend(fig, [label for label, _, _ in decoders])
    return fig


def forest_figure(forest: pd.DataFrame, label_a: str, label_b: str, metric: str) -> Figure | None:
    """analyses.session_forest as a forest plot: B - A in percentage points with its paired 95% CI, one
    row per session and "all" at the top (black). Left of 0: B makes fewer errors. A hollow marker is a
    session with fewer than TOO_FEW_TRIALS trials. None when the frame is empty."""
    forest = forest.dropna(subset=["difference"])
    if forest.empty:
        return None
    name = LABELS.get(metric, metric)
    fig = Figure(figsize=(7.0, 1.6 + 0.25 * len(forest)), layout="constrained")
    ax = fig.subplots()
    rows = list(forest.itertuples(index=False))
    for position, row in zip(range(len(rows) - 1, -1, -1), rows):  # first row ("all") at the top
        difference = 100 * row.difference
        low = 100 * row.ci_low if not pd.isna(row.ci_low) else difference
        high = 100 * row.ci_high if not pd.isna(row.ci_high) else difference
        color = "black" if row.session == "all" else "C0"
        ax.errorbar(difference, position, xerr=[[difference - low], [high - difference]], fmt="o", markersize=4,
                    capsize=2, color=color, markerfacecolor="none" if few_trials(row.n_trials) else color)
    ax.axvline(0, color="0.5", linewidth=0.8)
    ax.set_yticks(range(len(rows) - 1, -1, -1), [f"{row.session} (n={row.n_trials})" for row in rows], fontsize=8)
    ax.set_xlabel(f"B − A ({name} points)")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{name}: B = {label_b} minus A = {label_a}, paired 95% bootstrap CIs")
    fig.legend(handles=[Line2D([], [], color="black", marker="o", linestyle="none", label="all trials"),
                        Line2D([], [], color="C0", marker="o", linestyle="none", label="one session"),
                        Line2D([], [], color="C0", marker="o", markerfacecolor="none", linestyle="none",
                               label=f"< {TOO_FEW_TRIALS} trials")],
               loc="outside right center", fontsize=8)
    return fig
