"""harness.plots: what the figures hold (titles, lines, markers, bands, legend placement), built from
small hand-made inputs; no run folders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from harness import plots

# --------------------------------------------------------------------------- helpers


def _panel(fig, name: str):
    """The visible axes whose title, up to its first comma or line break, is `name` (exactly one)."""
    found = [ax for ax in fig.axes
             if ax.get_visible() and ax.get_title().split("\n")[0].split(",")[0] == name]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes if ax.get_visible()]
    return found[0]


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def _curves(ax) -> list:
    """The run lines of a training-curves panel (marker "."), not the reference line nor the rings."""
    return [line for line in ax.get_lines() if line.get_marker() == "."]


def _rings(ax) -> list:
    return [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]


def _extent(artist):
    return artist.get_window_extent(artist.figure._get_renderer())


# --------------------------------------------------------------------------- 1. losses relative to the first value


def test_loss_panels_are_relative_to_each_runs_first_value():
    runs = [
        ("ctc", {"train/loss": [(0, 80.0), (10, 40.0), (20, 20.0)], "val/loss": [(10, 60.0), (20, 45.0)],
                 "val/per": [(10, 0.5), (20, 0.4)]}, []),
        ("cosine", {"train/loss": [(0, 0.3), (10, 0.24)], "val/loss": [(10, 0.25), (20, 0.2)]}, []),
    ]
    fig = plots.training_curves_figure(runs)
    train = _panel(fig, "training loss")
    assert train.get_title() == "training loss, relative to each run's first value"
    (ctc, cosine) = _curves(train)
    assert list(ctc.get_ydata()) == pytest.approx([1.0, 0.5, 0.25])
    assert list(cosine.get_ydata()) == pytest.approx([1.0, 0.24 / 0.3])
    assert list(ctc.get_xdata()) == [0, 10, 20]
    val = _panel(fig, "validation loss")
    assert val.get_title() == "validation loss, relative to each run's first value"
    assert [list(line.get_ydata()) for line in _curves(val)] == [pytest.approx([1.0, 0.75]), pytest.approx([1.0, 0.8])]
    # error rates are comparable across models: drawn as logged, title unchanged
    per = _panel(fig, "validation PER")
    assert per.get_title() == "validation PER"
    assert list(_curves(per)[0].get_ydata()) == pytest.approx([0.5, 0.4])


def test_loss_panel_from_the_validation_history_and_a_first_value_that_cannot_be_a_reference():
    runs = [("history only", {}, [{"step": 50, "loss": 2.0, "per": 0.6}, {"step": 100, "loss": 1.5, "per": 0.5}]),
            ("zero first", {"train/loss": [(0, 0.0), (10, 1.0)]}, []),
            ("nan first", {"train/loss": [(0, math.nan), (10, 4.0), (20, 2.0)]}, [])]
    fig = plots.training_curves_figure(runs)
    val = _panel(fig, "validation loss")
    assert list(_curves(val)[0].get_ydata()) == pytest.approx([1.0, 0.75])
    train = _panel(fig, "training loss")
    (nan_first,) = _curves(train)  # the run starting at 0 cannot be drawn relative to it ...
    assert list(nan_first.get_ydata())[1:] == pytest.approx([1.0, 0.5])  # ... a NaN first value is skipped over
    assert any("zero first" in text.get_text() for text in train.texts)  # ... and the panel says it is left out


# --------------------------------------------------------------------------- 2. the selection metric


HISTORY = [{"step": 50, "loss": 1.2, "per": 0.4, "retrieval_top1": 0.3},
           {"step": 100, "loss": 1.0, "per": 0.35, "retrieval_top1": 0.5},
           {"step": 150, "loss": 0.9, "per": 0.33, "retrieval_top1": 0.45}]


def test_three_tuples_work_as_before_without_a_selection_panel():
    fig = plots.training_curves_figure([("old", {"train/loss": [(0, 2.0), (10, 1.0)], "val/per": [(10, 0.4)]}, [])])
    assert _titles(fig) == ["training loss, relative to each run's first value", "validation PER"]
    assert not any("selection" in title for title in _titles(fig))
    assert plots.training_curves_figure([("nothing", {}, [])]) is None


def test_selection_metric_panel_from_the_history_with_the_best_step_ringed():
    selection = {"metric": "retrieval_top1", "mode": "max", "best_step": 100}
    runs = [("gru_align", {"train/loss": [(0, 3.0), (50, 2.0)], "val/loss": [(50, 1.2)]}, HISTORY, selection),
            ("gru_ctc", {"train/loss": [(0, 80.0), (50, 40.0)], "val/per": [(50, 0.3)]}, [])]
    fig = plots.training_curves_figure(runs)
    panel = _panel(fig, "validation retrieval top-1")
    assert panel.get_title() == "validation retrieval top-1\n(selection metric, higher is better)"
    (line,) = _curves(panel)  # the run's scalars lack val/retrieval_top1: read from its validation history
    assert list(line.get_xdata()) == [50, 100, 150]
    assert list(line.get_ydata()) == pytest.approx([0.3, 0.5, 0.45])
    (ring,) = _rings(panel)
    assert list(ring.get_xdata()) == [100] and list(ring.get_ydata()) == pytest.approx([0.5])
    assert ring.get_color() == line.get_color()
    # no ring anywhere else
    assert sum(len(_rings(ax)) for ax in fig.axes) == 1


def test_selection_metric_from_the_scalars_lower_is_better_and_retrieval_scalars():
    scalars = {"train/loss": [(0, 1.0), (10, 0.5)], "val/per": [(10, 0.5), (20, 0.3), (30, 0.31)],
               "val/retrieval_top10": [(10, 0.7), (20, 0.8)]}
    runs = [("a", scalars, HISTORY, {"metric": "per", "mode": "min", "best_step": 20}),
            ("b", {"val/retrieval_top1": [(10, 0.2)]}, [], None)]
    fig = plots.training_curves_figure(runs)
    per = _panel(fig, "validation PER")
    assert per.get_title() == "validation PER\n(selection metric, lower is better)"
    (line,) = _curves(per)  # the scalars win over the history
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.3, 0.31])
    (ring,) = _rings(per)
    assert list(ring.get_xdata()) == [20] and list(ring.get_ydata()) == pytest.approx([0.3])
    assert _panel(fig, "validation retrieval top-10").get_title() == "validation retrieval top-10"
    assert _panel(fig, "validation retrieval top-1").get_title() == "validation retrieval top-1"
    assert len(_titles(fig)) == 4  # train/loss, val/per, val/retrieval_top1, val/retrieval_top10


def test_selection_without_a_best_step_has_no_ring_and_a_bad_selection_is_refused(tmp_path):
    runs = [("a", {}, HISTORY, {"metric": "retrieval_top1"})]
    fig = plots.training_curves_figure(runs)
    panel = _panel(fig, "validation retrieval top-1")
    assert panel.get_title() == "validation retrieval top-1\n(selection metric)"
    assert not _rings(panel)
    path = plots.training_curves(runs, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="selection"):
        plots.training_curves_figure([("a", {}, HISTORY, {"mode": "max"})])
    with pytest.raises(ValueError, match="mode"):
        plots.training_curves_figure([("a", {}, HISTORY, {"metric": "per", "mode": "up"})])


# --------------------------------------------------------------------------- 3. per-group figure: title and legend


def _runs(n_runs: int, n_sessions: int, label: str) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(0)
    runs = []
    for r in range(n_runs):
        entry = {"per": 0.2 + 0.05 * r, "per_ci": [0.18 + 0.05 * r, 0.22 + 0.05 * r], "wer": 0.3, "by_session": {}}
        for s in range(n_sessions):
            value = float(rng.uniform(0.1, 0.5))
            entry["by_session"][f"t15.2023.08.{s + 1:02d}"] = {"per": value, "per_ci": [value - 0.03, value + 0.03]}
        runs.append((label.format(r), entry))
    return runs


@pytest.mark.parametrize("n_runs,n_sessions,label", [
    (4, 4, "gru_align_contrastive_lr3e-4_seed{}_final"),  # narrow figure, long labels: overlapped before
    (3, 10, "gru_baseline_{}"),
    (1, 10, "step {}"),  # as harness/trackers.py draws it at every validation
])
def test_per_group_title_is_a_suptitle_and_the_legend_overlaps_neither_it_nor_the_axes(n_runs, n_sessions, label):
    fig = plots.per_group_figure(_runs(n_runs, n_sessions, label), "val", "by_session", "session")
    assert fig.get_suptitle() == "Error per session on val, with 95% bootstrap CIs"
    assert all(ax.get_title() == "" for ax in fig.axes)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    (legend,) = legends
    assert [text.get_text() for text in legend.get_texts()] == [label.format(r) for r in range(n_runs)]
    fig.draw_without_rendering()  # constrained layout placed everything
    title = _extent(fig._suptitle)
    box = _extent(legend)
    assert not title.overlaps(box), (title, box)
    assert box.y1 <= title.y0
    for ax in fig.axes:
        assert not _extent(ax).overlaps(box)  # outside the axes
    assert fig.bbox.contains(box.x1 - 1, box.y1 - 1) and fig.bbox.contains(box.x0 + 1, box.y0 + 1)  # not cut off


# --------------------------------------------------------------------------- 4. protocol curves


def _frame(x, value, half=0.02, sd=False) -> pd.DataFrame:
    value = np.asarray(value, dtype=float)
    frame = pd.DataFrame({"x": np.asarray(x, dtype=float), "value": value, "ci_low": value - half,
                          "ci_high": value + half})
    if sd:
        frame["sd"] = 0.01
    return frame


def test_curve_figure_one_line_and_one_band_per_decoder():
    curves = [("gru", _frame([0, 1, 3, 7], [0.20, 0.22, 0.25, 0.30], sd=True)),
              ("transformer", _frame([0, 1, 3, 7], [0.18, 0.21, 0.23, 0.26]))]
    fig = plots.curve_figure(curves, "days since the last training session", "WER", "WER against days")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    assert [line.get_marker() for line in lines] == ["o", "o"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    assert [line.get_color() for line in lines] == ["C0", "C1"]
    # the band spans ci_low..ci_high
    vertices = bands[0].get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(0.18) and vertices[:, 1].max() == pytest.approx(0.32)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["gru", "transformer"]
    assert fig.get_suptitle() == "WER against days"
    assert ax.get_xlabel() == "days since the last training session" and ax.get_ylabel() == "WER"
    assert ax.get_ylim()[0] == 0
    assert ax.yaxis.get_major_formatter()(0.25, 0).startswith("25")  # percent
    assert ax.yaxis.get_major_formatter()(0.25, 0).endswith("%")
    assert ax.get_xscale() == "linear"


def test_curve_figure_skips_nan_points_and_sorts_by_x():
    frame = _frame([4, 1, 2, 3, np.nan], [0.4, 0.1, np.nan, 0.3, 0.5])
    frame.loc[3, "ci_low"] = np.nan  # no band at x=3, the point stays
    fig = plots.curve_figure([("gru", frame)], "k", "PER", "t")
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 3, 4]
    assert list(line.get_ydata()) == pytest.approx([0.1, 0.3, 0.4])
    (band,) = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert not np.isnan(band.get_paths()[0].vertices).any()
    assert set(band.get_paths()[0].vertices[:, 0]) == {1.0, 4.0}


def test_curve_figure_log_x_and_nothing_to_draw(tmp_path):
    fig = plots.curve_figure([("a", _frame([0.1, 0.5, 1.0], [0.3, 0.2, 0.1]))], "fraction", "WER", "t", log_x=True)
    assert fig.axes[0].get_xscale() == "log"
    fig = plots.curve_figure([("a", _frame([0, 1, 10], [0.3, 0.2, 0.1]))], "k", "WER", "t", log_x=True)
    assert fig.axes[0].get_xscale() == "symlog"  # k = 0 cannot go on a log axis
    assert plots.curve_figure([], "x", "y", "t") is None
    assert plots.curve_figure([("a", _frame([1, 2], [np.nan, np.nan]))], "x", "y", "t") is None
    assert plots.curve_plot([], "x", "y", "t", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    path = plots.curve_plot([("a", _frame([1, 2], [0.3, 0.2]))], "x", "y", "t", tmp_path / "curve.png", log_x=True)
    assert path == tmp_path / "curve.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="value"):
        plots.curve_figure([("a", pd.DataFrame({"x": [1.0]}))], "x", "y", "t")
