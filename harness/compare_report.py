"""comparison.md, the report of `compare`: its sections rendered from the tables and figures already made.

In order: the data compared (or the --force warning) and the protocol, the unfinished runs left out,
the decoders of several runs, what differs between the decoders, the error rates, the paired
differences (flagging a difference within the seed spread), the protocol curves, the per-session and
per-corpus figures, the training curves, the error breakdowns and the example sentences of each split.
Also the markdown helpers (rates as percent with CIs, pipe tables of cells as given) that the figures'
sections share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from config import HELD_OUT_PROTOCOLS, SEED_KEYS
from harness import analyses
from harness.compare_tables import corpus_frame, is_scored
from harness.decoders import RETRIEVAL, Decoder, as_decoders
from harness.metrics import COLUMNS, METRICS, as_number
from harness.run_reader import Run
from harness.same_data import describe_groups, fingerprint

LABELS = {"per": "PER", "wer": "WER", "cer": "CER", "retrieval_top1": "top-1", "retrieval_top10": "top-10"}
N_DISAGREE, N_FIRST = 5, 3  # example sentences: where the decoders disagree most, then the first trials


def format_rate(value, low=None, high=None, percent=True, sd=None) -> str:
    """A rate as "12.3% ± 1.0 [10.1, 14.5]" (sd and CI where given); "-" for none."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{value * scale:.1f}{unit}"
    if sd is not None:
        text += f" ± {sd * scale:.1f}"
    return text + (f" [{low * scale:.1f}, {high * scale:.1f}]" if low is not None and high is not None else "")


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(float(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _cell(text) -> str:
    """Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table of the frame's cells as given (no number parsing: "0.10" stays "0.10")."""
    return frame.map(_cell).to_markdown(index=False, disable_numparse=True) + "\n"


def _value(row, column):
    value = row.get(column)
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def summary_markdown(table: pd.DataFrame) -> str:
    """The error-rate table: one row per decoder and split; "± sd" and a seeds column where a decoder
    has several runs, a "text from" column where a decoder retrieves its text."""
    rows = table.to_dict("records")
    retrieval = [m for m in RETRIEVAL if m in table and any(_value(r, m) is not None for r in rows)]
    seeds = any((_value(r, "n_seeds") or 1) > 1 for r in rows)
    texts = any(str(r.get("text_from", "decoding")) != "decoding" for r in rows)
    shown = []
    for row in rows:
        cells = {"decoder": row["run"], "model (trial)": row["decoder"], "split": row["split"]}
        if seeds:
            cells["seeds"] = row["n_seeds"]
        for metric in (*METRICS, *retrieval):
            name = f"{LABELS[metric]}{' accuracy' if metric in RETRIEVAL else ''}{' ± sd' if seeds else ''} [95% CI]"
            cells[name] = format_rate(_value(row, metric), _value(row, f"{metric}_ci_low"), _value(row, f"{metric}_ci_high"),
                                sd=_value(row, f"{metric}_sd"))
        if texts:
            cells["text from"] = row["text_from"]
        cells.update({"trials": row["n_trials"], "steps": "-" if _value(row, "steps") is None else row["steps"],
                      "wall time": _duration(_value(row, "wall_seconds"))})
        shown.append(cells)
    return markdown_table(pd.DataFrame(shown)) if shown else "No scored split.\n"


def corpus_markdown(decoders: list[Decoder], corpora: pd.DataFrame, split: str) -> str:
    """The split's per-corpus table (by corpus, then the decoders in the order given) and a line per
    decoder that has no per-corpus figures for it; "" when no decoder has any."""
    rows = [row for row in corpora.to_dict("records") if row["split"] == split]
    if not rows:
        return ""
    order = {d.label: i for i, d in enumerate(decoders)}
    rows = sorted(rows, key=lambda row: (row["corpus"], order[row["run"]]))
    shown = pd.DataFrame([{"corpus": row["corpus"], "decoder": row["run"],
                           **{f"{LABELS[m]} [95% CI]": format_rate(_value(row, m), _value(row, f"{m}_ci_low"),
                                                             _value(row, f"{m}_ci_high"), sd=_value(row, f"{m}_sd"))
                              for m in METRICS}, "trials": row["n_trials"]} for row in rows])
    text = markdown_table(shown)
    have = {row["run"] for row in rows}
    absent = []
    for decoder in decoders:
        entry = decoder.split_metrics().get(split)
        if entry is None or decoder.label in have or not is_scored(entry):
            continue
        why = "no by_corpus in its metrics.json (a run from before per-corpus metrics)" if "by_corpus" not in entry \
            else "no corpus labels (no description CSV beside its data, or no row for its blocks)"
        absent.append(f"- {decoder.label}: {why}\n")
    if absent:
        text += "\nNot in this table:\n\n" + "".join(absent)
    return text


def _p_value(p) -> str:
    if p is None or (isinstance(p, float) and np.isnan(p)):
        return "- (equal on every trial)"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def paired_markdown(pairs: pd.DataFrame) -> str:
    rows = pairs.to_dict("records")
    seeds = any(max(r.get("n_seeds_a") or 1, r.get("n_seeds_b") or 1) > 1 for r in rows)
    splits = len({r["split"] for r in rows}) > 1
    shown = []
    for p in rows:
        name = LABELS[p["metric"]] + (" accuracy" if p["metric"] in RETRIEVAL else "")
        diff = format_rate(_value(p, "difference"), _value(p, "difference_ci_low"),
                     _value(p, "difference_ci_high")).replace("%", " pts")
        cells = [("split", p["split"])] if splits else []
        cells += [("A", p["run_a"]), ("B", p["run_b"]), ("metric", name), ("trials", p["n_trials"]),
                 ("A ", format_rate(_value(p, "a"))), ("B ", format_rate(_value(p, "b"))),
                 ("B - A [95% CI]", ("+" if (_value(p, "difference") or 0) > 0 else "") + diff),
                 ("B better / A better / equal", f"{p['b_better']} / {p['a_better']} / {p['equal']}"),
                 ("Wilcoxon p", _p_value(_value(p, "wilcoxon_p")))]
        if seeds:
            spread = p.get("within_seed_spread")
            cells += [("seeds A / B", f"{p['n_seeds_a']} / {p['n_seeds_b']}"),
                      ("seed sd A / B (pts)", " / ".join("-" if _value(p, k) is None else f"{100 * p[k]:.1f}"
                                                         for k in ("sd_a", "sd_b"))),
                      ("within seed spread", "-" if spread is None else "**yes**" if spread else "no")]
        shown.append(dict(cells))
    return markdown_table(pd.DataFrame(shown))


def _few_trials_notes(counts: dict[str, int]) -> str:
    lines = [f"- **{split}: CIs from {int(n)} trials say little** (fewer than {analyses.TOO_FEW_TRIALS}: the bootstrap "
             "resamples too few distinct trials, so the intervals come out too narrow and move with every trial)\n"
             for split, n in counts.items() if n is not None and not pd.isna(n) and analyses.few_trials(int(n))]
    return "\n" + "".join(lines) if lines else ""


def _outputs(run: Run, split: str) -> list[str]:
    """What a run's examples show: "text" and/or "phonemes", whichever it predicted on the split."""
    kinds = [kind for kind in ("text", "phonemes") if any(
        (row.get(f"predicted_{kind}") or "").strip() for row in run.rows if row.get("split") == split)]
    return kinds or ["text"]  # predicted nothing at all: show the (empty) text


def _metric_values(row: dict, metric: str) -> tuple[float, float] | None:
    """(edits, reference length) of one per_trial row; None where the run has no such number."""
    edits, count = (as_number(row.get(c)) for c in COLUMNS[metric])
    return None if edits is None or count is None else (edits, count)


def _trial_rate(row: dict, metric: str) -> float | None:
    values = _metric_values(row, metric)
    return None if values is None or values[1] == 0 else values[0] / values[1]


def examples_markdown(decoders: list[Decoder], split: str) -> str:
    """Reference vs each decoder (its first run) on the trials where the decoders disagree most (the
    largest gap between the best and worst per-trial error rate, on the metric every decoder has),
    then the first trials of the split. Retrieved text is marked as such."""
    decoders = as_decoders(decoders)
    runs = [d.first for d in decoders]
    keyed = [run.rows_by_key(split) for run in runs]
    joined = [k for k in keyed[0] if all(k in rows for rows in keyed[1:])]
    if not joined:
        return "No trial of this split was decoded by every decoder.\n"
    shown = [_outputs(run, split) for run in runs]
    metric = next((m for m in ("wer", "cer", "per") if all(
        _trial_rate(rows[k], m) is not None for rows in keyed for k in joined)), None)
    disagree = []
    if len(runs) == 1:
        note = f"The first {N_FIRST} trials."
    elif metric is None:
        note = f"The decoders share no error metric on every trial, so disagreement is not ranked: the first {N_FIRST} trials."
    else:
        gaps = {}
        for key in joined:
            rates = [_trial_rate(rows[key], metric) for rows in keyed]
            gaps[key] = max(rates) - min(rates)
        disagree = [k for k in sorted(joined, key=gaps.get, reverse=True)[:N_DISAGREE] if gaps[k] > 0]
        which = f"The {len(disagree)} trials" if len(disagree) > 1 else "The trial"
        note = (f"{which} where the decoders' per-trial {LABELS[metric]} differ most, then the "
                f"first {N_FIRST} trials." if disagree else
                f"The decoders' per-trial {LABELS[metric]} are equal on every trial: the first {N_FIRST} trials.")
    if any(len(d.runs) > 1 for d in decoders):
        note += " A decoder of several runs shows its first run's sentences (named in brackets)."
    if any(run.is_retrieval for run in runs):
        note += (" *retrieved*: the text is the candidate sentence the model ranked first (it ranks a list of "
                 "candidates, per_trial.csv's true_rank), not decoded text.")
    picked = disagree + [k for k in joined if k not in disagree][:N_FIRST]
    body = []
    for key in picked:
        reference = keyed[0][key]
        trial = f"{key[1]} block {key[2]} trial {key[3]}"
        body.append([trial, "reference", reference.get("reference_text", ""), ""])
        if any("phonemes" in kinds for kinds in shown):
            body.append(["", "reference phonemes", reference.get("reference_phonemes", ""), ""])
        for decoder, run, rows, kinds in zip(decoders, runs, keyed, shown):
            for kind in kinds:
                own = "wer" if kind == "text" else "per"
                values = _metric_values(rows[key], own)
                errors = f"{values[0]:g}/{values[1]:g} {LABELS[own]}" if values else "-"
                source = decoder.label + (f" [{run.name}]" if len(decoder.runs) > 1 else "")
                marks = [kind] if len(kinds) > 1 else []
                marks += ["retrieved"] if kind == "text" and run.is_retrieval else []
                source += f" ({', '.join(marks)})" if marks else ""
                body.append(["", source, rows[key].get(f"predicted_{kind}") or "*(empty)*", errors])
    return note + "\n\n" + markdown_table(pd.DataFrame(body, columns=["trial", "source", "sentence", "errors"]))


def decoders_markdown(decoders: list[Decoder]) -> str:
    shown = pd.DataFrame([{"decoder": d.label, "runs": d.n_seeds, "run folders": ", ".join(r.name for r in d.runs),
                           "seeds": ", ".join(str(r.flat_config.get(SEED_KEYS[0], "-")) for r in d.runs)
                           + ("; draws " + ", ".join(str(r.protocol_section.get("draw")) for r in d.runs)
                              if any(r.protocol_section.get("draw") is not None for r in d.runs) else "")}
                          for d in decoders])
    return markdown_table(shown)


def render_report(decoders, table, pairs, images, splits, unfinished, groups, corpora=None, *, differs=None,
                  curves: str = "", analyses_text: dict | None = None) -> str:
    decoders = as_decoders(decoders)
    runs = [run for d in decoders for run in d.runs]
    corpora = corpora if corpora is not None else corpus_frame(decoders)
    parts = ["# Comparison\n"]
    count = f"{len(runs)} finished run{'s' if len(runs) > 1 else ''}" + (
        f" ({len(decoders)} decoder{'s' if len(decoders) > 1 else ''})" if len(decoders) < len(runs) else "")
    if len(groups) > 1:
        parts.append(f"**Warning: compared with --force although the runs read different data: {describe_groups(groups)}. "
                     "Differences below mix decoders and data.**\n")
    else:
        sessions, n_trials = set(), {}
        for run in runs:
            sessions.update(fingerprint(run).get("sessions") or [])
            n_trials.update(fingerprint(run).get("n_trials") or {})
        read = ", ".join(f"{n} {split}" for split, n in n_trials.items())
        parts.append(f"{count} on the same data ({len(sessions)} sessions; trials read: {read}).\n")
    if decoders and decoders[0].protocol != "fixed":
        held_out = decoders[0].protocol in HELD_OUT_PROTOCOLS
        parts.append(f"Evaluation protocol: {decoders[0].protocol}." + (
            " Every split below is the held-out sessions' trials of that split's files (sessions the decoders "
            "were not trained on)." if held_out else "") + "\n")
    if unfinished:
        parts.append("Unfinished runs (no `DONE`), left out:\n\n" + "".join(f"- `{d}`\n" for d in unfinished))
    several = any(d.n_seeds > 1 for d in decoders)
    if several:
        parts.append("## Decoders\n\nRuns whose configs differ only in the seeds (training_params.seed, "
                     "data_params.seed; for recalibration also the draw), output.* and slurm.* are one decoder.\n\n"
                     + decoders_markdown(decoders))
    if differs is not None and len(differs.columns) > 2:
        parts.append("## What differs\n\nThe config keys (config.yaml, dotted) whose values differ between the "
                     "decoders; seeds, output.* and slurm.* left out, \"-\": not in that config"
                     + ("; k: recalibration's calibration sentences per held-out session" if "k" in differs else "")
                     + ".\n\n"
                     + markdown_table(differs.rename(columns={"run": "decoder", "n_seeds": "runs"})))
    counts = {split: pd.to_numeric(table.loc[table["split"] == split, "n_trials"], errors="coerce").max()
              for split in splits}
    parts.append("## Error rates\n\nSummed ratios over each split with 95% bootstrap CIs (percent); "
                 "`-`: not applicable (no such output). Splits without labels are left out. "
                 "Wall time: the whole run (training and decoding), from meta.json"
                 + (" (a decoder of several runs: the mean per run). ± sd: the standard deviation of the metric "
                    "across the decoder's runs (seeds); its value is their mean and its CI the bootstrap over the "
                    "trials with each trial's errors averaged over the runs" if several else "") + "."
                 + (" Text from: *retrieval* where the model picks predicted_text from a list of candidate sentences "
                    "(per_trial.csv has true_rank), so its WER and CER measure that choice, not decoding."
                    if any(d.is_retrieval for d in decoders) else "")
                 + "\n\n" + summary_markdown(table) + _few_trials_notes(counts))
    if len(pairs):
        text = ("## Paired differences\n\nEvery pair of decoders on the trials both decoded. B - A in percentage "
                "points with its paired bootstrap 95% CI: below 0, B makes fewer errors (for an accuracy, "
                "above 0 is better for B); a CI that excludes 0 is a difference the trials support. "
                "Wilcoxon p: signed-rank test on the per-trial differences (uncorrected for the number "
                "of comparisons).")
        if several:
            text += (" A decoder of several runs enters with each trial's errors averaged over its runs. A difference "
                     "is marked *within seed spread* when |B - A| is smaller than the larger of the two decoders' "
                     "standard deviations across their runs: retraining with another seed moves a decoder about "
                     "that much, so the trials alone do not show which is better.")
        text += "\n\n" + paired_markdown(pairs)
        flagged = [p for p in pairs.to_dict("records") if p.get("within_seed_spread") is True]
        if flagged:
            text += "\n" + "".join(
                f"- **Warning: {LABELS[p['metric']]} ({p['split']}), {p['run_b']} - {p['run_a']} = "
                f"{100 * p['difference']:+.1f} pts is within the seed spread** (seed sd "
                f"{' / '.join('-' if _value(p, k) is None else f'{100 * p[k]:.1f}' for k in ('sd_a', 'sd_b'))} pts; "
                f"{p['n_seeds_a']} / {p['n_seeds_b']} runs)\n" for p in flagged)
        pair_counts = {split: int(pairs.loc[pairs["split"] == split, "n_trials"].min()) for split in splits
                       if (pairs["split"] == split).any()}
        parts.append(text + _few_trials_notes(pair_counts))
    if curves:
        parts.append(curves)
    for split in splits:
        if f"per_session_{split}" in images:
            parts.append(f"## Error per session ({split})\n\n![error per session]({images[f'per_session_{split}'].name})\n")
    for split in splits:
        table_text = corpus_markdown(decoders, corpora, split)
        if table_text:
            plot = images.get(f"per_corpus_{split}")
            parts.append(f"## Error per corpus ({split})\n\nEach corpus's summed ratios with 95% bootstrap CIs, "
                         "from each run's metrics.json (`by_corpus`; the corpus of a trial's block comes from the "
                         "dataset's description CSV).\n\n" + table_text
                         + (f"\n![error per corpus]({plot.name})\n" if plot else ""))
    if "training_curves" in images:
        parts.append(f"## Training curves\n\n![training curves]({images['training_curves'].name})\n")
    for split in splits:
        if analyses_text and analyses_text.get(split):
            parts.append(analyses_text[split])
    for split in splits:
        parts.append(f"## Example sentences ({split})\n\n" + examples_markdown(decoders, split))
    return "\n".join(parts)
