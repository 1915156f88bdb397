"""`main.py compare`: finished decoders side by side, trial by trial, from their run folders only.

This module is the command: it reads the runs, checks them before anything is written, then writes
the files. A run group's folder (harness/groups.py) stands for its member run folders; with no folder
given, every run under --results-dir is compared (group members included). Runs whose configs differ
only in their seeds (and output.*, slurm.*) are pooled as one decoder (harness.decoders); the tables,
figures and report are made by harness.compare_tables, harness.compare_figures and
harness.compare_report.

Checks, each refusing in one line before anything is written: an --out that cannot be written; a
RUN_DIR that is not a folder; a true_rank below 1; runs of different evaluation protocols (a group's
protocol, else metrics.json's protocol name, else "fixed"); runs whose data fingerprints differ
(harness.same_data), unless --force (and the output then says so). A run whose per_trial.csv is cut
short, disagrees with its metrics.json, holds a trial twice or names a split other than train/val/test
is refused when it is read (harness.run_reader). Runs without `DONE` are listed as unfinished and left
out. Two runs of the same folder name are told apart as <group>/<member>, else by their paths. Trials
are joined on (split, session, block_num, trial_num).

Writes into --out: comparison.md (the report), comparison.csv (one row per decoder and scored split),
runs.csv (one row per run and scored split), per_corpus.csv (one row per decoder, scored split and
corpus), paired.csv (one row per pair of decoders, split and metric), what_differs.csv (the config
keys whose values differ between the decoders), edit_operations.csv (substitutions, deletions,
insertions per decoder, split and level), and PNGs: per_session_<split>, per_corpus_<split>,
training_curves, protocol_<metric>, error_by_day_<split>, error_by_length_<split>,
error_by_duration_<split>, edit_operations_<split>, confusion_<split>_<n>_<decoder>,
retrieval_<split>, forest_<split>_<a>_<b>. A figure with nothing to show is not written, and a PNG of
those names left in --out by an earlier comparison is removed, so that every PNG there matches the
report.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness import results
from harness.compare_figures import analyses_section, protocol_curves, write_plots
from harness.compare_report import render_report, summary_markdown
from harness.compare_tables import corpus_frame, differs_frame, edit_operations_frame, paired_frame, runs_frame, summary_frame
from harness.decoders import make_decoders
from harness.errors import UserError
from harness.run_reader import Run, expand, find_runs, load_run
from harness.same_data import data_groups, describe_groups

PNG_PREFIXES = ("per_session_", "per_corpus_", "protocol_", "error_by_", "edit_operations_", "confusion_", "retrieval_",
                "forest_")


def compare(run_dirs: list[str], out: str, results_dir: str = "results", force: bool = False,
            n_resamples: int = 10_000, seed: int = 0) -> Path:
    """Compare the runs in run_dirs (run or group folders; none: every run under results_dir) into
    the folder out (module docstring); returns it."""
    out_dir = Path(out)
    check_out(out_dir)
    given = [Path(d) for d in run_dirs]
    missing = [d for d in given if not d.is_dir()]
    if missing:
        raise UserError(f"run folder not found: {missing[0]}")
    dirs = _unique(expand(given)) if run_dirs else [
        d for d in find_runs(Path(results_dir)) if out_dir.resolve() not in (d.resolve(), *d.resolve().parents)]
    unfinished = [d for d in dirs if not results.is_finished(d)]
    for d in unfinished:
        print(f"unfinished (no DONE), left out: {d}")
    runs = [load_run(d) for d in dirs if results.is_finished(d)]
    if not runs:
        raise UserError(f"no finished run to compare (looked in {', '.join(run_dirs) or results_dir})")
    for run in runs:
        _check_ranks(run)
    _name_runs(runs)
    check_protocols(runs)
    groups = data_groups(runs)
    if len(groups) > 1 and not force:
        raise UserError(f"these runs read different data (data fingerprints in meta.json differ: {describe_groups(groups)}); "
                        "compare runs on identical data, or pass --force")
    if len(groups) > 1:
        print(f"warning: comparing runs on different data because of --force: {describe_groups(groups)}")

    decoders = make_decoders(runs, n_resamples, seed)
    table = summary_frame(decoders)
    splits = list(dict.fromkeys(table["split"]))
    pairs = paired_frame(decoders, splits, n_resamples, seed)
    make_out(out_dir)  # every check has passed: now write
    images = write_plots(decoders, splits, out_dir)
    corpora = corpus_frame(decoders)
    differs = differs_frame(decoders)
    curves_text, curve_images = protocol_curves(decoders, out_dir)
    images.update(curve_images)
    analysis_parts, analysis_images, edits = {}, {}, []
    for split in splits:
        text, found, frame = analyses_section(decoders, split, out_dir, min(n_resamples, 1000), seed)
        analysis_parts[split] = text
        analysis_images.update(found)
        edits.append(frame)
    images.update(analysis_images)
    remove_stale_pngs(out_dir, images)
    edit_table = edit_operations_frame(edits)
    report = render_report(decoders, table, pairs, images, splits, unfinished, groups, corpora, differs=differs,
                           curves=curves_text, analyses_text=analysis_parts)
    files = {"comparison.csv": table, "runs.csv": runs_frame(decoders), "per_corpus.csv": corpora,
             "paired.csv": pairs, "what_differs.csv": differs, "edit_operations.csv": edit_table}
    for name, frame in files.items():
        results.atomic_write_text(out_dir / name, frame.to_csv(index=False))
    results.atomic_write_text(out_dir / "comparison.md", report)
    print(summary_markdown(table))
    written = ["comparison.md", *files, *(p.name for p in images.values())]
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


def remove_stale_pngs(out_dir: Path, images: dict[str, Path]) -> None:
    """Remove the PNGs of an earlier comparison in out_dir that this one did not write again: they
    would not match this report."""
    written = {path.resolve() for path in images.values()}
    stale = [path for prefix in PNG_PREFIXES for path in out_dir.glob(f"{prefix}*.png")] + [out_dir / "training_curves.png"]
    for path in stale:
        if path.resolve() not in written:
            path.unlink(missing_ok=True)


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _name_runs(runs: list[Run]) -> None:
    """Folder names, unless two runs share one: then <group>/<member> for group members, else the path."""
    names = Counter(run.name for run in runs)
    for run in runs:
        if names[run.name] > 1 and run.group is not None:
            run.name = f"{run.group.name}/{run.dir.name}"
    names = Counter(run.name for run in runs)
    for run in runs:
        if names[run.name] > 1:
            run.name = str(run.dir)


def check_protocols(runs: list[Run]) -> None:
    """One protocol per comparison: a cross-session error and a fixed-split error are not one figure."""
    by_protocol: dict[str, list[str]] = {}
    for run in runs:
        by_protocol.setdefault(run.protocol, []).append(str(run.group.name) if run.group is not None else run.name)
    if len(by_protocol) > 1:
        def where(names):
            names = list(dict.fromkeys(names))
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        described = " vs ".join(f"{protocol} ({where(names)})" for protocol, names in by_protocol.items())
        raise UserError(f"these runs follow different evaluation protocols: {described}; compare runs of one "
                        "protocol (evaluation.protocol, or a group's protocol) at a time")


def _check_ranks(run: Run) -> None:
    """A true_rank below 1 is refused: counting from 0 would shift every top-k of the comparison."""
    if "true_rank" not in run.trials:
        return
    low = run.trials[run.trials["true_rank"] < 1]
    if len(low):
        rank, split = low["true_rank"].iloc[0], low["split"].iloc[0]
        raise UserError(f"{run.dir / 'per_trial.csv'}: true_rank {rank:g} in {split}; ranks count "
                        "from 1 (1 = the true sentence ranked first)")
