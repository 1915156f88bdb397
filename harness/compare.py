"""`main.py compare`: finished runs side by side, trial by trial, from their run folders only.

Writes into --out: comparison.md (the report: error rates, paired tests, plots, per-corpus table,
example sentences), comparison.csv (one row per run and scored split), per_corpus.csv (one row per
run, scored split and corpus), paired.csv (one row per pair of runs, split and metric),
per_session_<split>.png, per_corpus_<split>.png and training_curves.png. Every per-session and
per-corpus figure is read from metrics.json (`by_session`, `by_corpus`); a run from before
`by_corpus` has no per-corpus figures and is named as such.

Runs without `DONE` are listed as unfinished and left out. Runs whose data fingerprints differ are
refused unless --force (and the output then says so). Trials are joined on
(split, session, block_num, trial_num). A run whose per_trial.csv is cut short, disagrees with its
metrics.json or names a split other than train/val/test is refused (harness.run_reader), and so is
an --out that cannot be written: in one line, before anything is written.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from harness import plots, results
from harness.errors import UserError
from harness.metrics import COLUMNS, METRICS, as_number
from harness.paired_stats import paired_comparison
from harness.run_reader import Run, find_runs, load_run

LABELS = {"per": "PER", "wer": "WER", "cer": "CER", "retrieval_top1": "top-1", "retrieval_top10": "top-10"}
RETRIEVAL = {"retrieval_top1": 1, "retrieval_top10": 10}  # metric -> k: the true sentence ranked <= k
N_DISAGREE, N_FIRST = 5, 3  # example sentences: where the decoders disagree most, then the first trials
CORPUS_COLUMNS = ["run", "decoder", "split", "corpus", *(f"{m}{end}" for m in METRICS for end in ("", "_ci_low", "_ci_high")),
                  "n_trials"]
PAIRED_COLUMNS = ["split", "run_a", "run_b", "metric", "n_trials", "a", "b", "difference", "difference_ci_low",
                  "difference_ci_high", "b_better", "a_better", "equal", "wilcoxon_statistic", "wilcoxon_p"]


def compare(run_dirs: list[str], out: str, results_dir: str = "results", force: bool = False,
            n_resamples: int = 10_000, seed: int = 0) -> Path:
    out_dir = Path(out)
    check_out(out_dir)
    dirs = _unique([Path(d) for d in run_dirs]) if run_dirs else [
        d for d in find_runs(Path(results_dir)) if out_dir.resolve() not in (d.resolve(), *d.resolve().parents)]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"run folder not found: {missing[0]}")
    unfinished = [d for d in dirs if not results.is_finished(d)]
    for d in unfinished:
        print(f"unfinished (no DONE), left out: {d}")
    runs = [load_run(d) for d in dirs if results.is_finished(d)]
    if not runs:
        raise UserError(f"no finished run to compare (looked in {', '.join(run_dirs) or results_dir})")
    for run in runs:
        _check_ranks(run)
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:  # same folder name under different parents: show the path
            run.name = str(run.dir)
    groups = data_groups(runs)
    if len(groups) > 1 and not force:
        raise UserError(f"these runs read different data (data fingerprints in meta.json differ: {_describe(groups)}); "
                        "compare runs on identical data, or pass --force")
    if len(groups) > 1:
        print(f"warning: comparing runs on different data because of --force: {_describe(groups)}")

    table = summary_rows(runs)
    splits = list(dict.fromkeys(row["split"] for row in table))
    pairs = [row for split in splits for row in paired_rows(runs, split, n_resamples, seed)]
    make_out(out_dir)  # every check has passed (paired_rows refuses duplicated trials): now write
    images = write_plots(runs, splits, out_dir)
    corpora = corpus_rows(runs)
    for stale in [*out_dir.glob("per_session_*.png"), *out_dir.glob("per_corpus_*.png"), out_dir / "training_curves.png"]:
        if stale not in images.values():  # from an earlier comparison: it would not match this report
            stale.unlink(missing_ok=True)
    report = render_report(runs, table, pairs, images, splits, unfinished, groups, corpora)
    results.atomic_write_text(out_dir / "comparison.csv", results.rows_to_csv(table, ["run", "decoder", "split"]))
    results.atomic_write_text(out_dir / "per_corpus.csv", results.rows_to_csv(corpora, CORPUS_COLUMNS))
    results.atomic_write_text(out_dir / "paired.csv", results.rows_to_csv(pairs, PAIRED_COLUMNS))
    results.atomic_write_text(out_dir / "comparison.md", report)
    print(summary_markdown(table))
    written = ["comparison.md", "comparison.csv", "per_corpus.csv", "paired.csv", *(p.name for p in images.values())]
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    return out_dir


def check_out(out_dir: Path) -> None:
    """Refuse an --out that cannot hold the comparison before any work, writing nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    results.check_writable(out_dir)


def make_out(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # changed since check_out
        raise UserError(f"--out {out_dir}: cannot make it ({error.strerror or error})") from None


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


# --------------------------------------------------------------------------- same data?


def _fingerprint(run: Run) -> dict:
    return run.meta.get("data_fingerprint") or {}


def _same_hashes(keys_a, keys_b, features_a, features_b) -> bool:
    """Same trial keys and labels; same features too where both runs hashed them (features read
    from HDF5 on demand are not hashed, so a hash missing on one side is not a difference)."""
    if keys_a is None or keys_a != keys_b:
        return False
    return features_a is None or features_b is None or features_a == features_b


def _features_comparable(fp_a: dict, fp_b: dict) -> bool:
    """Features hashes of the same definition (harness.data.FEATURES_HASH_VERSION; 1 when absent)."""
    return fp_a.get("features_hash_version", 1) == fp_b.get("features_hash_version", 1)


def _same_data(a: Run, b: Run) -> bool:
    """Runs read the same data when every split both read is the same (a run that also decoded
    test, or an `evaluate` run that read one split, still matches). Fingerprints from before
    meta.json had per-split hashes are compared whole."""
    fp_a, fp_b = _fingerprint(a), _fingerprint(b)
    by_a, by_b = fp_a.get("by_split"), fp_b.get("by_split")
    features = _features_comparable(fp_a, fp_b)  # else only the keys and labels are compared
    if by_a and by_b:
        shared = set(by_a) & set(by_b)
        return bool(shared) and all(
            _same_hashes(by_a[s].get("keys_hash"), by_b[s].get("keys_hash"),
                         by_a[s].get("features_hash") if features else None, by_b[s].get("features_hash")) for s in shared)
    if not features:
        return _same_hashes(fp_a.get("keys_hash"), fp_b.get("keys_hash"), None, None)
    return _same_hashes(fp_a.get("keys_hash"), fp_b.get("keys_hash"), fp_a.get("content_hash"), fp_b.get("content_hash"))


def data_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped by the data they read; a run without a fingerprint is a group of its own."""
    groups: list[list[Run]] = []
    for run in runs:
        group = next((g for g in groups if _same_data(g[0], run)), None)
        if group is None:
            groups.append([run])
        else:
            group.append(run)
    return groups


def _describe(groups: list[list[Run]]) -> str:
    def names(group):
        shown = ", ".join(r.name for r in group[:3])
        return shown + (f" and {len(group) - 3} more" if len(group) > 3 else "")

    def data(group):
        keys = _fingerprint(group[0]).get("keys_hash")
        return f"data {keys[:8]}" if keys else "no fingerprint"

    return " vs ".join(f"{names(g)} ({data(g)})" for g in groups)


# --------------------------------------------------------------------------- one row per run and split


def _check_ranks(run: Run) -> None:
    """A true_rank below 1 is refused: counting from 0 would shift every top-k of the comparison."""
    for row in run.rows:
        rank = as_number(row.get("true_rank"))
        if rank is not None and rank < 1:
            raise UserError(f"{run.dir / 'per_trial.csv'}: true_rank {rank:g} in {row.get('split')}; ranks count "
                            "from 1 (1 = the true sentence ranked first)")


def _is_scored(entry: dict) -> bool:
    return any(entry.get(m) is not None for m in (*METRICS, *RETRIEVAL))


def _retrieval_columns(entry: dict) -> dict:
    """retrieval_top1/top10 with their CIs, as metrics.json has them (harness.metrics computes them
    from the per-trial true_rank when the run is written; compare never recomputes them)."""
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


def summary_rows(runs: list[Run]) -> list[dict]:
    """comparison.csv: one row per run and split that has any score (an unlabeled test split has
    none and is left out). Every figure and CI comes from metrics.json."""
    rows = []
    for run in runs:
        info = run.metrics.get("run") or {}
        for split, entry in run.split_metrics().items():
            if not _is_scored(entry):
                continue
            row = {"run": run.name, "decoder": run.decoder, "split": split, **_rates(entry)}
            row.update(_retrieval_columns(entry))
            if "n_candidates" in entry:
                row["n_candidates"] = entry["n_candidates"]
            row.update({"n_trials": entry.get("n_trials"), "steps": info.get("steps"),
                        "wall_seconds": run.meta.get("wall_seconds"), "device": run.meta.get("device")})
            rows.append(row)
    return rows


def corpus_rows(runs: list[Run]) -> list[dict]:
    """per_corpus.csv: one row per run, split and corpus with any score, from the split's
    `by_corpus` in metrics.json (never recomputed). Runs without it (from before by_corpus, or on
    data without a description CSV) have no rows."""
    rows = []
    for run in runs:
        for split, entry in run.split_metrics().items():
            for corpus, figures in (entry.get("by_corpus") or {}).items():
                if isinstance(figures, dict) and _is_scored(figures):
                    rows.append({"run": run.name, "decoder": run.decoder, "split": split, "corpus": corpus,
                                 **_rates(figures), "n_trials": figures.get("n_trials")})
    return rows


# --------------------------------------------------------------------------- every pair of runs


def _metric_values(run: Run, row: dict, metric: str) -> tuple[float, float] | None:
    """(value, count) of one trial: (edits, reference length) of an error rate, (hit, 1) of a
    retrieval accuracy; None where the run has no such number for this trial."""
    if metric in RETRIEVAL:
        rank = as_number(row.get("true_rank"))
        return None if rank is None else (float(rank <= RETRIEVAL[metric]), 1.0)
    edits, count = (as_number(row.get(c)) for c in COLUMNS[metric])
    return None if edits is None or count is None else (edits, count)


def paired_rows(runs: list[Run], split: str, n_resamples: int, seed: int) -> list[dict]:
    """paired.csv: for every pair of runs (in the order given) and every metric both have on the
    split's joined trials, the paired bootstrap CI of B - A and the Wilcoxon test."""
    keyed = [run.rows_by_key(split) for run in runs]
    out = []
    for (a, rows_a), (b, rows_b) in itertools.combinations(zip(runs, keyed), 2):
        joined = [k for k in rows_a if k in rows_b]
        for metric in (*METRICS, *RETRIEVAL):
            pairs = [(_metric_values(a, rows_a[k], metric), _metric_values(b, rows_b[k], metric)) for k in joined]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if not pairs:
                continue
            (a_v, a_c), (b_v, b_c) = zip(*(x for x, _ in pairs)), zip(*(y for _, y in pairs))
            stats = paired_comparison(a_v, a_c, b_v, b_c, higher_is_better=metric in RETRIEVAL,
                                      n_resamples=n_resamples, seed=seed)
            ci = stats.pop("difference_ci") or [None, None]
            row = {"split": split, "run_a": a.name, "run_b": b.name, "metric": metric}
            row.update(stats)
            row["difference_ci_low"], row["difference_ci_high"] = ci
            out.append(row)
    return out


# --------------------------------------------------------------------------- plots


def _file_name(name: str) -> str:
    """A plain file name for a name built from run content: [A-Za-z0-9._-] only, no leading dot, so
    it cannot leave --out nor hide (run_reader admits only train/val/test as splits; this holds
    whatever a reader lets through)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def write_plots(runs: list[Run], splits: list[str], out_dir: Path) -> dict[str, Path]:
    """name -> PNG written; a plot with nothing to show is not written."""
    images = {}
    for split in splits:
        entries = [(run.name, run.split_metrics()[split]) for run in runs if split in run.split_metrics()]
        path = plots.per_session_plot(entries, split, out_dir / _file_name(f"per_session_{split}.png"))
        if path:
            images[f"per_session_{split}"] = path
        path = plots.per_corpus_plot(entries, split, out_dir / _file_name(f"per_corpus_{split}.png"))
        if path:
            images[f"per_corpus_{split}"] = path
    history = [(run.name, run.scalars, (run.metrics.get("run") or {}).get("validation_history") or [])
               for run in runs]
    path = plots.training_curves(history, out_dir / "training_curves.png")
    if path:
        images["training_curves"] = path
    return images


# --------------------------------------------------------------------------- comparison.md


def _rate(value, low=None, high=None, percent=True) -> str:
    if value is None:
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{value * scale:.1f}{unit}"
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


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(table: list[dict]) -> str:
    retrieval = [m for m in RETRIEVAL if any(m in row for row in table)]
    candidates = any("n_candidates" in row for row in table)
    header = ["run", "decoder", "split", "PER [95% CI]", "WER [95% CI]", "CER [95% CI]",
              *(f"{LABELS[m]} accuracy [95% CI]" for m in retrieval), *(["candidates"] if candidates else []),
              "trials", "steps", "wall time"]
    body = []
    for row in table:
        cells = [row["run"], row["decoder"], row["split"]]
        cells += [_rate(row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in METRICS]
        cells += [_rate(row.get(m), row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")) for m in retrieval]
        cells += [row.get("n_candidates", "-")] if candidates else []
        cells += [row["n_trials"], row["steps"] if row["steps"] is not None else "-", _duration(row["wall_seconds"])]
        body.append(cells)
    return _table(header, body)


def corpus_markdown(runs: list[Run], corpora: list[dict], split: str) -> str:
    """The split's per-corpus table (by corpus, then the runs in the order given) and a line per run
    that has no per-corpus figures for it; "" when no run has any."""
    rows = [row for row in corpora if row["split"] == split]
    if not rows:
        return ""
    order = {run.name: i for i, run in enumerate(runs)}
    rows = sorted(rows, key=lambda row: (row["corpus"], order[row["run"]]))
    body = [[row["corpus"], row["run"], *(_rate(row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in METRICS),
             row["n_trials"]] for row in rows]
    text = _table(["corpus", "run", "PER [95% CI]", "WER [95% CI]", "CER [95% CI]", "trials"], body)
    have = {row["run"] for row in rows}
    absent = []
    for run in runs:
        entry = run.split_metrics().get(split)
        if entry is None or run.name in have or not _is_scored(entry):
            continue
        why = "no by_corpus in its metrics.json (a run from before per-corpus metrics)" if "by_corpus" not in entry \
            else "no corpus labels (no description CSV beside its data, or no row for its blocks)"
        absent.append(f"- {run.name}: {why}\n")
    if absent:
        text += "\nNot in this table:\n\n" + "".join(absent)
    return text


def _p_value(p) -> str:
    if p is None:
        return "- (equal on every trial)"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def paired_markdown(pairs: list[dict]) -> str:
    header = ["A", "B", "metric", "trials", "A", "B", "B - A [95% CI]", "B better / A better / equal", "Wilcoxon p"]
    body = []
    for p in pairs:
        name = LABELS[p["metric"]] + (" accuracy" if p["metric"] in RETRIEVAL else "")
        diff = _rate(p["difference"], p["difference_ci_low"], p["difference_ci_high"]).replace("%", " pts")
        body.append([p["run_a"], p["run_b"], name, p["n_trials"], _rate(p["a"]), _rate(p["b"]),
                     ("+" if (p["difference"] or 0) > 0 else "") + diff,
                     f"{p['b_better']} / {p['a_better']} / {p['equal']}", _p_value(p["wilcoxon_p"])])
    return _table(header, body)


def _outputs(run: Run, split: str) -> list[str]:
    """What a run's examples show: "text" and/or "phonemes", whichever it predicted on the split."""
    kinds = [kind for kind in ("text", "phonemes") if any(
        (row.get(f"predicted_{kind}") or "").strip() for row in run.rows if row.get("split") == split)]
    return kinds or ["text"]  # predicted nothing at all: show the (empty) text


def _trial_rate(run: Run, row: dict, metric: str) -> float | None:
    values = _metric_values(run, row, metric)
    return None if values is None or values[1] == 0 else values[0] / values[1]


def examples_markdown(runs: list[Run], split: str) -> str:
    """Reference vs each decoder on the trials where the decoders disagree most (the largest gap
    between the best and worst per-trial error rate, on the metric every run has), then the first
    trials of the split."""
    keyed = [run.rows_by_key(split) for run in runs]
    joined = [k for k in keyed[0] if all(k in rows for rows in keyed[1:])]
    if not joined:
        return "No trial of this split was decoded by every run.\n"
    shown = [_outputs(run, split) for run in runs]
    metric = next((m for m in ("wer", "cer", "per") if all(
        _trial_rate(run, rows[k], m) is not None for run, rows in zip(runs, keyed) for k in joined)), None)
    disagree = []
    if len(runs) == 1:
        note = f"The first {N_FIRST} trials."
    elif metric is None:
        note = f"The runs share no error metric on every trial, so disagreement is not ranked: the first {N_FIRST} trials."
    else:
        gaps = {}
        for key in joined:
            rates = [_trial_rate(run, rows[key], metric) for run, rows in zip(runs, keyed)]
            gaps[key] = max(rates) - min(rates)
        disagree = [k for k in sorted(joined, key=gaps.get, reverse=True)[:N_DISAGREE] if gaps[k] > 0]
        which = f"The {len(disagree)} trials" if len(disagree) > 1 else "The trial"
        note = (f"{which} where the decoders' per-trial {LABELS[metric]} differ most, then the "
                f"first {N_FIRST} trials." if disagree else
                f"The decoders' per-trial {LABELS[metric]} are equal on every trial: the first {N_FIRST} trials.")
    picked = disagree + [k for k in joined if k not in disagree][:N_FIRST]
    body = []
    for key in picked:
        reference = keyed[0][key]
        trial = f"{key[1]} block {key[2]} trial {key[3]}"
        body.append([trial, "reference", reference.get("reference_text", ""), ""])
        if any("phonemes" in kinds for kinds in shown):
            body.append(["", "reference phonemes", reference.get("reference_phonemes", ""), ""])
        for run, rows, kinds in zip(runs, keyed, shown):
            for kind in kinds:
                own = "wer" if kind == "text" else "per"
                values = _metric_values(run, rows[key], own)
                errors = f"{values[0]:g}/{values[1]:g} {LABELS[own]}" if values else "-"
                source = run.name + (f" ({kind})" if len(kinds) > 1 else "")
                body.append(["", source, rows[key].get(f"predicted_{kind}") or "*(empty)*", errors])
    return note + "\n\n" + _table(["trial", "source", "sentence", "errors"], body)


def render_report(runs, table, pairs, images, splits, unfinished, groups, corpora=()) -> str:
    parts = ["# Comparison\n"]
    if len(groups) > 1:
        parts.append(f"**Warning: compared with --force although the runs read different data: {_describe(groups)}. "
                     "Differences below mix decoders and data.**\n")
    else:
        sessions, n_trials = set(), {}
        for run in runs:
            sessions.update(_fingerprint(run).get("sessions") or [])
            n_trials.update(_fingerprint(run).get("n_trials") or {})
        read = ", ".join(f"{n} {split}" for split, n in n_trials.items())
        parts.append(f"{len(runs)} finished run{'s' if len(runs) > 1 else ''} on the same data "
                     f"({len(sessions)} sessions; trials read: {read}).\n")
    if unfinished:
        parts.append("Unfinished runs (no `DONE`), left out:\n\n" + "".join(f"- `{d}`\n" for d in unfinished))
    parts.append("## Error rates\n\nSummed ratios over each split with 95% bootstrap CIs (percent); "
                 "`-`: not applicable (no such output). Splits without labels are left out. "
                 "Wall time: the whole run (training and decoding), from meta.json.\n\n" + summary_markdown(table))
    if pairs:
        parts.append("## Paired differences\n\nEvery pair of runs on the trials both decoded. B - A in percentage "
                     "points with its paired bootstrap 95% CI: below 0, B makes fewer errors (for an accuracy, "
                     "above 0 is better for B); a CI that excludes 0 is a difference the trials support. "
                     "Wilcoxon p: signed-rank test on the per-trial differences (uncorrected for the number "
                     "of comparisons).\n\n" + paired_markdown(pairs))
    for split in splits:
        if f"per_session_{split}" in images:
            parts.append(f"## Error per session ({split})\n\n![error per session]({images[f'per_session_{split}'].name})\n")
    for split in splits:
        table_text = corpus_markdown(runs, list(corpora), split)
        if table_text:
            plot = images.get(f"per_corpus_{split}")
            parts.append(f"## Error per corpus ({split})\n\nEach corpus's summed ratios with 95% bootstrap CIs, "
                         "from each run's metrics.json (`by_corpus`; the corpus of a trial's block comes from the "
                         "dataset's description CSV).\n\n" + table_text
                         + (f"\n![error per corpus]({plot.name})\n" if plot else ""))
    if "training_curves" in images:
        parts.append(f"## Training curves\n\n![training curves]({images['training_curves'].name})\n")
    for split in splits:
        parts.append(f"## Example sentences ({split})\n\n" + examples_markdown(runs, split))
    return "\n".join(parts)
