"""The PNGs of `compare`, written into --out, each with the name under which comparison.md shows it.

write_plots: per_session_<split>, per_corpus_<split> (a one-run decoder's from metrics.json's
`by_session` / `by_corpus`, pooled over the runs otherwise) and training_curves (every run).
protocol_curves: protocol_<metric>, the groups' summary curves (summary.json) of a protocol with an
axis (cross_session, data_scaling, recalibration) overlaid, with its section of the report.
analyses_section: the split's error breakdowns (harness.analyses) with their section of the report:
error_by_day_<split>, error_by_length_<split>, error_by_duration_<split>, edit_operations_<split>,
confusion_<split>_<n>_<decoder>, retrieval_<split>, forest_<split>_<a>_<b>. A figure with nothing to
show is not written. File names built from run content keep to [A-Za-z0-9._-], so none leaves --out.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pandas as pd
import yaml

from config import SEED_KEYS
from harness import analyses, analysis_plots, plots
from harness.compare_report import LABELS, format_rate, markdown_table
from harness.compare_tables import edit_operations_rows
from harness.decoders import IGNORED_PREFIXES, Decoder, as_decoders, assign_labels, pooled
from harness.group_summary import AXES, AXIS_LABELS
from harness.metrics import COLUMNS
from harness.run_reader import Run, flatten

MAX_CONFUSION_SYMBOLS = 60  # a confusion matrix of more symbols than this is not of phonemes: not drawn
MAX_ALL_PAIRS = 5  # up to this many decoders, a forest plot per pair; beyond, each against the first


def _file_name(name: str) -> str:
    """A plain file name for a name built from run content: [A-Za-z0-9._-] only, no leading dot, so
    it cannot leave --out nor hide (run_reader admits only train/val/test as splits; this holds
    whatever a reader lets through)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def _selection(run: Run) -> dict | None:
    """The run's checkpoint-selection metric for plots.training_curves (config.yaml's
    training_params.best_metric / best_mode, metrics.json's run.best_step)."""
    metric = run.flat_config.get("training_params.best_metric")
    if not metric:
        return None
    mode = run.flat_config.get("training_params.best_mode")
    return {"metric": str(metric), "mode": mode if mode in ("min", "max") else None,
            "best_step": (run.metrics.get("run") or {}).get("best_step")}


def write_plots(decoders: list, splits: list[str], out_dir: Path) -> dict[str, Path]:
    """Per session, per corpus and training curves (Runs are taken as one-run decoders): name -> PNG
    written; a plot with nothing to show is not written."""
    decoders = as_decoders(decoders)
    images = {}
    for split in splits:
        entries = [(d.label, d.split_metrics()[split]) for d in decoders if split in d.split_metrics()]
        path = plots.per_session_plot(entries, split, out_dir / _file_name(f"per_session_{split}.png"))
        if path:
            images[f"per_session_{split}"] = path
        path = plots.per_corpus_plot(entries, split, out_dir / _file_name(f"per_corpus_{split}.png"))
        if path:
            images[f"per_corpus_{split}"] = path
    history = []
    for decoder in decoders:
        for run in decoder.runs:
            label = decoder.label if len(decoder.runs) == 1 else f"{decoder.label} [{run.name}]"
            history.append((label, run.scalars, (run.metrics.get("run") or {}).get("validation_history") or [],
                            _selection(run)))
    path = plots.training_curves(history, out_dir / "training_curves.png")
    if path:
        images["training_curves"] = path
    return images


# --------------------------------------------------------------------------- protocol curves


def _read_summary(group: Path) -> dict | None:
    try:
        summary = json.loads((group / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _group_config(group: Path) -> dict:
    try:
        config = yaml.safe_load((group / "group.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _loose_points(decoder: Decoder, n_resamples: int, seed: int) -> pd.DataFrame:
    """A cross_session decoder outside any group: its error per held-out session at the days since
    training (metrics.json's protocol by_days_since_training), pooled over its runs."""
    where = {}
    for run in decoder.runs:
        for item in run.protocol_section.get("by_days_since_training") or []:
            x = item.get("days_since_training")
            where[item.get("session")] = x if x is not None else item.get("sessions_since_training")
    records = []
    for session, x in where.items():
        frames = [run.trials[run.trials["session"] == session] for run in decoder.runs]
        for metric in ("per", "wer", "cer", "retrieval_top1"):
            point = pooled(frames, metric, n_resamples, seed)
            if point is not None:
                records.append({"split": "held_out", "x": x, "metric": metric, **point})
    return pd.DataFrame.from_records(records, columns=["split", "x", "metric", "value", "ci_low", "ci_high", "sd",
                                                      "n_runs", "n_trials"])


def protocol_curves(decoders: list[Decoder], out_dir: Path, n_resamples: int = 1000, seed: int = 0
                    ) -> tuple[str, dict[str, Path]]:
    """The groups' summary curves (summary.json) overlaid, one plot per metric, with the curves of
    cross_session decoders outside a group; ("", {}) for a protocol without an axis."""
    protocol = decoders[0].protocol
    axis = AXES.get(protocol)
    if not axis:
        return "", {}
    groups = list(dict.fromkeys(run.group for d in decoders for run in d.runs if run.group is not None))
    sources, notes = [], []
    for group in groups:
        summary = _read_summary(group)
        if summary is None or not summary.get("points"):
            notes.append(f"- {group.name}: no summary.json yet (the group is unfinished), not drawn\n")
            continue
        config = _group_config(group)
        plan = json.loads((group / "group.json").read_text()) if (group / "group.json").is_file() else {}
        ident = f"{config.get('model_constructor_name')} ({plan.get('trial_name') or config.get('trial_name')})"
        described = {k: v for k, v in flatten(config).items() if k not in SEED_KEYS and not k.startswith(IGNORED_PREFIXES)}
        sources.append((group.name, ident, described, pd.DataFrame.from_records(summary["points"])))
    n_groups = len(sources)
    for decoder in decoders:
        if protocol == "cross_session" and all(run.group is None for run in decoder.runs):
            sources.append((decoder.label, f"run {decoder.ident}", {}, _loose_points(decoder, n_resamples, seed)))
    usable = [len(s[3]) > 0 and {"x", "value", "metric", "split"} <= set(s[3].columns) for s in sources]
    n_loose = sum(usable[n_groups:])
    sources = [s for s, ok in zip(sources, usable) if ok]
    if not sources:
        return ("" if not notes else f"## {protocol} curves\n\n" + "".join(notes)), {}
    labels = assign_labels([s[0] for s in sources], [s[1] for s in sources], [s[2] for s in sources])
    several_splits = len({split for s in sources for split in s[3]["split"]}) > 1
    images = {}
    for metric in ("per", "wer", "cer", "retrieval_top1"):
        curves = []
        for label, (_, _, _, points) in zip(labels, sources):
            for split, part in points[points["metric"] == metric].groupby("split", sort=False):
                part = part.assign(x=pd.to_numeric(part["x"], errors="coerce"))
                curves.append((f"{label} ({split})" if several_splits else label, part.reset_index(drop=True)))
        if not curves:
            continue
        name = plots.LABELS.get(metric, metric)
        path = plots.curve_plot(curves, AXIS_LABELS[axis], name, f"{name} against {AXIS_LABELS[axis]} ({protocol})",
                                out_dir / f"protocol_{metric}.png", log_x=axis == "fraction")
        if path:
            images[f"protocol_{metric}"] = path
    kinds = (["each group's summary (summary.json)"] if len(sources) > n_loose else []) + (
        ["each decoder outside a group (the held-out sessions of its runs' metrics.json)"] if n_loose else [])
    text = (f"## {protocol} curves\n\n{' and '.join(kinds).capitalize()}, against {AXIS_LABELS[axis]}: at each point "
            "every trial's errors averaged over the runs there, summed over trials; the band is the 95% bootstrap CI "
            "over trials.\n\n")
    text += "".join(f"![{metric}]({path.name})\n\n" for metric, path in images.items())
    return text + ("".join(notes) + "\n" if notes else ""), images


# --------------------------------------------------------------------------- analyses


def _save(fig, path: Path) -> Path | None:
    return plots._save(fig, path) if fig is not None else None


def _aligned(values: pd.Series, frame: pd.DataFrame) -> pd.Series:
    return pd.Series(values.to_numpy(), index=frame.index)


def analyses_section(decoders: list[Decoder], split: str, out_dir: Path, n_resamples: int, seed: int
                     ) -> tuple[str, dict[str, Path], pd.DataFrame]:
    """The split's analyses of the per-trial rows (harness.analyses): error against days since implant,
    sentence length and trial duration on each decoder's seed-averaged trials; edit operations, phoneme
    confusions and retrieval ranks on all its runs' rows; per-session paired differences (forest plots)
    per pair of decoders. Returns (markdown, name -> PNG written, edit operations table)."""
    frames = [(d.label, d.split_trials(split)) for d in decoders]  # every run's rows
    averaged = [(d.label, d.averaged_trials(split)) for d in decoders]  # one row per trial
    images: dict[str, Path] = {}
    several = any(d.n_seeds > 1 for d in decoders)
    averaging = " (each trial with its errors averaged over the runs of a decoder)" if several else ""
    parts = [f"## Error breakdowns ({split})\n\nFrom per_trial.csv. Error against a trial property: summed ratios "
             f"with 95% bootstrap CIs over trials{averaging}; a hollow marker is a group of fewer than "
             f"{analyses.TOO_FEW_TRIALS} trials."
             + (" Edit operations, confusions and ranks: every run's rows together." if several else "") + "\n"]

    def figure(name: str, fig, title: str, note: str = "") -> None:
        path = _save(fig, out_dir / _file_name(f"{name}_{split}.png"))
        if path:
            images[f"{name}_{split}"] = path
            parts.append(f"### {title}\n\n{note}![{title}]({path.name})\n")

    combined = pd.concat([frame for _, frame in averaged], ignore_index=True)
    days = analyses.days_since_implant(combined)
    if days.notna().any():
        from_dates = not combined["days_since_implant"].notna().any()
        xlabel = "days since the first session (dates from the session names)" if from_dates else "days since implant"
        curves, start = [], 0
        for label, frame in averaged:
            curves.append((label, analyses.error_by(frame, _aligned(days.iloc[start:start + len(frame)], frame),
                                                    n_resamples=n_resamples, seed=seed)))
            start += len(frame)
        note = ("No trial has days_since_implant (no description CSV), so days count from the first session's date "
                "in the session names.\n\n" if from_dates else "")
        figure("error_by_day", analysis_plots.error_by_figure(curves, xlabel, f"Error against {xlabel} ({split})"),
               f"Error against {xlabel.split(' (')[0]}", note)
    curves = [(label, analyses.error_by(frame, analyses.length_bins(analyses.sentence_length(frame)),
                                        n_resamples=n_resamples, seed=seed)) for label, frame in averaged]
    figure("error_by_length", analysis_plots.error_by_figure(curves, "words in the reference sentence",
                                                             f"Error against sentence length ({split})"),
           "Error against sentence length")
    timed = {label for label, frame in averaged if "n_time_steps" in frame and frame["n_time_steps"].notna().any()}
    untimed = [label for label, frame in averaged if label not in timed and len(frame)]
    if timed:
        curves = [(label, analyses.error_by(frame, analyses.length_bins(analyses.trial_seconds(frame), analyses.SECOND_EDGES,
                                                                        whole_numbers=False, unit="s"),
                                            n_resamples=n_resamples, seed=seed)) if label in timed
                  else (label, pd.DataFrame(columns=analyses.ERROR_BY_COLUMNS)) for label, frame in averaged]
        note = (f"Not shown (per_trial.csv without n_time_steps): {', '.join(untimed)}.\n\n" if untimed else "")
        figure("error_by_duration", analysis_plots.error_by_figure(curves, "trial duration",
                                                                   f"Error against trial duration ({split})"),
               "Error against trial duration", note)
    else:
        parts.append("### Error against trial duration\n\nNot shown: per_trial.csv has no n_time_steps (runs written "
                     "before the column), so the trials' durations are unknown.\n")

    operations = [(label, analyses.edit_operations(frame)) for label, frame in frames]
    table = edit_operations_rows(operations, split)
    if len(table):
        def operation(column: str) -> list[str]:
            return [f"{int(n)} ({format_rate(n / total if total else None)})"
                    for n, total in zip(table[column], table["reference_count"])]

        shown = pd.DataFrame({
            "decoder": table["run"], "level": table["level"], "substitutions": operation("substitutions"),
            "deletions": operation("deletions"), "insertions": operation("insertions"),
            "reference tokens": table["reference_count"], "error rate": [format_rate(v) for v in table["error_rate"]],
            "trials" if all(d.n_seeds == 1 for d in decoders) else "trials (every run's)": table["n_trials"]})
        parts.append("### Substitutions, deletions, insertions\n\nEdit operations of one minimal alignment per trial, "
                     "summed over the trials (and over a decoder's runs); in brackets per reference token, so the three "
                     "add up to the error rate (WER for words, PER for phonemes).\n\n" + markdown_table(shown))
        figure("edit_operations", analysis_plots.edit_operations_figure(operations), "Edit operations")
    for i, (label, frame) in enumerate(frames):
        labels, matrix = analyses.phoneme_confusion(frame)
        symbols = int(((matrix.sum(axis=0) + matrix.sum(axis=1)) > 0).sum())
        if symbols > MAX_CONFUSION_SYMBOLS:  # not phonemes: a heat map of them would say nothing, slowly
            parts.append(f"### Phoneme confusions: {label}\n\nNot drawn: its phonemes hold {symbols} distinct symbols "
                         f"(more than {MAX_CONFUSION_SYMBOLS}; ARPAbet has {len(analyses.INVENTORY)} with SIL).\n")
            continue
        name = f"confusion_{i + 1}_{_file_name(label)[:60]}"
        fig = analysis_plots.confusion_figure(labels, matrix, f"Phoneme confusions of {label} ({split})")
        path = _save(fig, out_dir / _file_name(f"confusion_{split}_{name.removeprefix('confusion_')}.png"))
        if path:
            images[f"{name}_{split}"] = path
            parts.append(f"### Phoneme confusions: {label}\n\nEach true phoneme's row (share of its occurrences "
                         f"predicted as each column; ∅: deleted or inserted).\n\n![confusions of {label}]({path.name})\n")
    if any(d.is_retrieval for d in decoders):
        ranks = [(label, analyses.rank_histogram(frame), analyses.top_k_curve(frame)) for label, frame in frames]
        figure("retrieval", analysis_plots.rank_figure(ranks), "Retrieval ranks",
               "Where the true sentence ranked among the candidates (true_rank), and the top-k accuracy.\n\n")
    pairs = list(itertools.combinations(range(len(decoders)), 2))
    if len(decoders) > MAX_ALL_PAIRS:
        pairs = [(0, j) for j in range(1, len(decoders))]
        parts.append(f"Per-session paired differences: {len(decoders)} decoders, so each against the first only.\n")
    for i, j in pairs:
        a, b = decoders[i], decoders[j]
        trials_a, trials_b = a.averaged_split(split), b.averaged_split(split)
        # PER first: per phoneme, finer than WER, which saturates near 100% for weak decoders
        metric = next((m for m in ("per", "wer", "cer") if trials_a[COLUMNS[m][0]].notna().any()
                       and trials_b[COLUMNS[m][0]].notna().any()), None)
        if metric is None:
            continue
        forest = analyses.session_forest(trials_a, trials_b, metric, n_resamples=n_resamples, seed=seed)
        fig = analysis_plots.forest_figure(forest, a.label, b.label, metric)
        path = _save(fig, out_dir / _file_name(f"forest_{split}_{i + 1}_{j + 1}.png"))
        if path:
            images[f"forest_{split}_{i + 1}_{j + 1}"] = path
            parts.append(f"### Per session: {b.label} minus {a.label}\n\nPaired difference of {LABELS[metric]} "
                         "per session on the trials both decoded (each trial's errors averaged over a decoder's runs), "
                         f"with paired 95% bootstrap CIs.\n\n![forest]({path.name})\n")
    return "\n".join(parts), images, table
