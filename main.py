"""b2t-bench command line: run | evaluate | compare | synth | convert | download | list.

Thin: parses arguments, then calls the harness. A user mistake ends with one line on stderr and
exit status 2; a model folder that fails to import shows its traceback and its name, exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import traceback
import warnings

from harness.errors import UserError
from harness.plugins import PluginImportError
from harness.project import version


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py", description="b2t-bench: train, evaluate and compare brain-to-text decoders.")
    parser.add_argument("--version", action="version", version=f"b2t-bench {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a model from a config, decode val/test, write a run folder",
                              description="Train a model from a YAML config, decode the evaluation splits and write a run folder.")
    run.add_argument("--config", help="YAML config, e.g. configs/ctc_baseline/tiny.yml (optional with --resume)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config value (VALUE parsed as YAML); repeatable")
    run.add_argument("--out", metavar="RUN_DIR", help="run folder (default: a new folder under results/ named after the trial)")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the unfinished run in --out from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    run.add_argument("--no-preflight", dest="preflight", action="store_false",
                     help="skip the pre-flight check (one small batch through loss and decode before the run folder)")
    run.add_argument("--launcher", choices=["local", "slurm"], default="local",
                     help="local: run here (default); slurm: submit a job with the config's slurm: resources and return")
    run.add_argument("--seeds", metavar="S1,S2,...",
                     help="one run per seed (training_params.seed and data_params.seed), grouped in one folder with "
                          "a summary (mean and spread across seeds); with slurm: one job array")
    run.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY.PATH=V1,V2,...",
                     help="one run per value (each parsed as YAML), each in its own folder (under --out if given); "
                          "repeatable: every combination. With slurm: one job array")

    ev = commands.add_parser("evaluate", help="decode a split with a saved checkpoint",
                             description="Decode one split of a dataset with a saved checkpoint and write a run folder.")
    ev.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint .pt file, or a reference baseline folder")
    ev.add_argument("--data-dir", required=True, help="the folder holding the session folders (hdf5_data_final/)")
    ev.add_argument("--split", required=True, choices=["train", "val", "test"])
    ev.add_argument("--out", metavar="RUN_DIR", help="output run folder (default: new folder under results/)")
    ev.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    ev.add_argument("--no-preflight", dest="preflight", action="store_false",
                    help="skip the pre-flight check (one small batch through decode before the run folder)")
    ev.add_argument("--kaggle-csv", metavar="FILE", help="also write id,text predictions in the Kaggle order")

    cmp = commands.add_parser("compare", help="compare finished runs (or run groups) side by side",
                              description="Compare finished run folders trial by trial: error rates with CIs, "
                                          "paired bootstrap CIs and Wilcoxon tests for every pair of decoders, plots, "
                                          "error breakdowns, examples. A RUN_DIR may be a run-group folder (from --seeds, "
                                          "data_scaling or recalibration): it stands for its finished members. Runs "
                                          "whose configs differ only in their seeds (and output.*, slurm.*) are pooled "
                                          "as one decoder: the mean and standard deviation across the seeds, CIs and "
                                          "paired tests on each trial's errors averaged over them.")
    cmp.add_argument("runs", nargs="*", metavar="RUN_DIR",
                     help="run folders or run-group folders (default: every run under --results-dir)")
    cmp.add_argument("--out", default="results/comparison",
                     help="where comparison.md, comparison.csv (per decoder), runs.csv (per run), per_corpus.csv, "
                          "paired.csv, what_differs.csv (the config keys that differ), edit_operations.csv and the PNGs "
                          "go: per session, per corpus, training curves, protocol curves, and the analyses' (error by "
                          "day, sentence length and trial duration; edit operations; phoneme confusions; retrieval "
                          "ranks; per-session forest plots) (default: %(default)s)")
    cmp.add_argument("--results-dir", default="results", help="where to look for runs when none are given")
    cmp.add_argument("--force", action="store_true", help="compare runs even if their data fingerprints differ")

    syn = commands.add_parser("synth", help="write a synthetic dataset in the Brain-to-Text '25 format",
                              description="Write a synthetic dataset in the exact Brain-to-Text '25 HDF5 format.")
    syn.add_argument("--out", required=True, help="folder to hold the session folders")
    syn.add_argument("--sessions", type=int, help="number of sessions")
    syn.add_argument("--trials", type=int, help="trials per session, all splits together")
    syn.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    syn.add_argument("--corpus", help="text file, one sentence per line, replacing the built-in sentences")
    syn.add_argument("--durations", choices=["short", "real"],
                     help="trial lengths: short (about 2.7 s, the default) or real (about 11 s, the real data's)")
    syn.add_argument("--preset", choices=["b2txt25"],
                     help="the real dataset's shape: 45 sessions with the real names, 10,948 trials, real durations "
                          "(about 11 GB; takes the place of --sessions and --trials)")

    add_convert_parser(commands)

    dl = commands.add_parser("download", help="fetch the Brain-to-Text '25 data and baseline checkpoint from Dryad",
                             description="Fetch the Brain-to-Text '25 dataset from Dryad (API v2), resuming and verifying "
                                         "each file, and unpack it into DIR/hdf5_data_final/ and "
                                         "DIR/t15_pretrained_rnn_baseline/checkpoint/. Dryad serves files only to API users: "
                                         "set DRYAD_TOKEN, or DRYAD_CLIENT_ID and DRYAD_CLIENT_SECRET "
                                         "(an API account: https://datadryad.org/api).")
    dl.add_argument("--dest", default="data/b2txt25", metavar="DIR", help="where the data goes (default: %(default)s)")
    dl.add_argument("--base-url", default="https://datadryad.org", metavar="URL", help="the Dryad server (default: %(default)s)")
    dl.add_argument("--doi", default="doi:10.5061/dryad.dncjsxm85", help="the dataset (default: %(default)s)")
    dl.add_argument("--files", nargs="+", metavar="NAME",
                    help="these files of the dataset, by exact name (default: the neural data zip, the baseline zip, "
                         "the README and the description CSV)")
    dl.add_argument("--keep-zips", action="store_true", help="keep the zip archives after unpacking them")

    commands.add_parser("list", help="print every registered name", description="Print every name of every registry.")
    return parser.parse_args(argv)


CONVERT_DESCRIPTION = """\
Convert continuous recordings with sentence annotations into session folders in the Brain-to-Text '25 format,
which every decoder here trains on (data_params.data_dir=DIR).

Inputs: files mne.io.read_raw reads (FIF, EDF, BDF, BrainVision .vhdr, ...), one file = one block; or one BIDS
root (mne-bids; --subject/--session/--task/--run select runs), one run = one block. One session per recording day
(the UTC date of meas_date) or BIDS session, named <prefix>.<YYYY.MM.DD> (without a date: <prefix>.<BIDS session>,
else <prefix>.<NN> per undated file).

Trials: annotations whose description starts with --sentence-prefix (onset, duration, the sentence), or --events
TSVs (onset, duration, sentence; a 'recording' column, or one TSV per recording in order). Labels: CMU phonemes
without stress, SIL after every word.

Features per picked channel, in --bin-ms bins, z-scored per block (float32):
  spikes      threshold crossings at --threshold x RMS of the --spike-band band-passed signal, then its power
              (mean square): all crossing channels first, then all power channels (the real data's layout)
  high_gamma  power (mean square) of the --band band-passed signal
  as_is       the samples as they are, at the bin rate (resampled by MNE when the recording is at another rate)
  auto        as_is at the bin rate; else spikes when Nyquist is above the spike band's top and no MEG channel is
              picked; else high_gamma when Nyquist is above --band's top; else an error

Splits: --test-blocks/--val-blocks or --splits TSV by block; val otherwise a seeded share (--val-fraction) of each
session's distinct non-test sentences. Writes DIR/<session>/data_{train,val,test}.hdf5 and DIR/convert_report.json,
all at once (nothing is written when a check fails).
"""


def add_convert_parser(commands) -> None:
    cv = commands.add_parser("convert", help="convert FIF/EDF/BrainVision/BIDS recordings into the Brain-to-Text '25 format",
                             description=CONVERT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    cv.add_argument("recordings", nargs="+", metavar="RECORDING",
                    help="recording files (one file = one block), or one BIDS root folder")
    cv.add_argument("--out", required=True, metavar="DIR", help="new folder to hold the session folders and convert_report.json")
    cv.add_argument("--overwrite", action="store_true", help="replace DIR when it holds a previous conversion")
    bids = cv.add_argument_group("BIDS filters (a BIDS root only)")
    for name, what in (("subject", "subjects"), ("session", "sessions"), ("task", "tasks"), ("run", "runs")):
        bids.add_argument(f"--{name}", dest=f"{name}s", nargs="+", metavar="LABEL", help=f"only these {what}")
    cv.add_argument("--session-prefix", metavar="PREFIX",
                    help="session folders are PREFIX.YYYY.MM.DD (default: sub-<subject> for BIDS, else rec)")
    cv.add_argument("--sentence-prefix", default="sentence:", metavar="TEXT",
                    help="annotations whose description starts with TEXT are sentences (default: %(default)s)")
    cv.add_argument("--events", nargs="+", metavar="TSV",
                    help="sentences from TSVs (columns onset, duration, sentence; seconds from the first sample) "
                         "instead of the annotations: with a 'recording' column, or one TSV per recording in order")
    cv.add_argument("--picks", nargs="+", metavar="PICK",
                    help="channel types (ecog, seeg, eeg, meg, mag, grad, dbs, misc, ...) or channel names "
                         "(default: every MEG/EEG/sEEG/ECoG/DBS channel, bad ones included)")
    cv.add_argument("--features", choices=["auto", "spikes", "high_gamma", "as_is"], default="auto",
                    help="what to compute per channel (default: %(default)s; see above)")
    cv.add_argument("--bin-ms", type=float, default=20.0, metavar="MS", help="bin width (default: %(default)g, as the real data)")
    cv.add_argument("--band", type=float, nargs=2, default=[70.0, 150.0], metavar=("LOW", "HIGH"),
                    help="high_gamma band in Hz (default: 70 150)")
    cv.add_argument("--spike-band", type=float, nargs=2, default=[250.0, 5000.0], metavar=("LOW", "HIGH"),
                    help="spikes band in Hz (default: 250 5000)")
    cv.add_argument("--threshold", type=float, default=-4.5, metavar="K",
                    help="spikes: a crossing is the first sample beyond K x RMS (below for K < 0; default: %(default)g)")
    cv.add_argument("--test-blocks", nargs="+", metavar="SPEC",
                    help="blocks of the test split: SESSION:BLOCK, a block number (in every session), or a recording")
    cv.add_argument("--val-blocks", nargs="+", metavar="SPEC", help="blocks of the val split, likewise")
    cv.add_argument("--splits", metavar="TSV",
                    help="split per block: columns split and recording, or split, session and block (others: train)")
    cv.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                    help="without val blocks: this share of each session's distinct sentences is val (default: %(default)g)")
    cv.add_argument("--seed", type=int, default=0, help="seed of the val share (default: %(default)s)")
    cv.add_argument("--unlabeled-test", action="store_true", help="write the test split without labels, as the real data")
    cv.add_argument("--skip-unknown-words", action="store_true",
                    help="skip (and count) sentences with words not in the CMU dictionary instead of refusing them")


def convert_options(args: argparse.Namespace):
    from harness.convert import ConvertOptions
    from harness.recording_features import FeatureSettings

    def tup(values):
        return tuple(values) if values else None

    features = FeatureSettings(args.features, args.bin_ms, tuple(args.band), tuple(args.spike_band), args.threshold)
    return ConvertOptions(tuple(args.recordings), args.out, args.overwrite, tup(args.subjects), tup(args.sessions),
                          tup(args.tasks), tup(args.runs), args.session_prefix, args.sentence_prefix, tup(args.events),
                          tup(args.picks), features, tup(args.val_blocks), tup(args.test_blocks), args.splits,
                          args.val_fraction, args.seed, args.unlabeled_test, args.skip_unknown_words)


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from harness.launch import launch

        launch(args.config, args.overrides, args.out, args.resume, args.overwrite, args.launcher, args.sweeps,
               args.preflight, args.seeds)
    elif args.command == "evaluate":
        from harness.runner import evaluate

        evaluate(args.checkpoint, args.data_dir, args.split, args.out, args.kaggle_csv, args.overwrite, args.preflight)
    elif args.command == "compare":
        from harness.compare import compare

        compare(args.runs, args.out, args.results_dir, args.force)
    elif args.command == "synth":
        from harness.synthetic import write_synthetic_dataset

        if args.preset and (args.sessions or args.trials):
            raise UserError(f"--preset {args.preset} fixes the sessions and trials: drop --sessions and --trials")
        given = {"n_sessions": args.sessions, "trials_per_session": args.trials, "seed": args.seed, "corpus_path": args.corpus,
                 "durations": args.durations, "preset": args.preset}
        report = write_synthetic_dataset(args.out, **{k: v for k, v in given.items() if v is not None})
        print(f"wrote {args.out}: {synth_summary(report)}")
    elif args.command == "convert":
        from harness.convert import convert, summary

        report = convert(convert_options(args))
        print(f"wrote {args.out}: {summary(report)}")
    elif args.command == "download":
        from harness.download import download

        download(args.dest, args.base_url, args.files, args.doi, args.keep_zips)
    elif args.command == "list":
        print_registries()
    return 0


def synth_summary(report: dict) -> str:
    trials = report.get("trials", [])
    by_split = {}
    for t in trials:
        by_split[t["split"]] = by_split.get(t["split"], 0) + 1
    sessions = len({t["session"] for t in trials})
    steps = report["durations"]["n_time_steps"]
    return (f"{sessions} sessions, " + ", ".join(f"{n} {s}" for s, n in by_split.items()) + " trials"
            + f"; {report['durations']['name']} durations: mean {steps['mean']:g} bins, median {steps['p50']:g}, "
              f"95th percentile {steps['p95']:g}")


def print_registries() -> None:
    from config import params_type
    from harness.plugins import load_plugins
    from registry import ALL_REGISTRIES

    load_plugins()
    for registry in ALL_REGISTRIES:
        print(f"{registry.kind}s:")
        for name in registry.names() or ["(none)"]:
            params = params_type(registry.get(name)) if name != "(none)" else None
            print(f"  {name}" + (f"  (params: {params.__name__})" if params else ""))


def main(argv=None) -> int:
    from config import RetiredKeyWarning  # here, not at the top: spawned workers re-import this file

    warnings.simplefilter("default", RetiredKeyWarning)  # a retired key in a user's config is news to them
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        return dispatch(args)
    except UserError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return UserError.exit_code
    except PluginImportError as error:
        traceback.print_exception(error.__cause__, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # the run's files are written atomically: what was there is intact, and --resume goes on
        where = f" writing {error.filename}" if error.filename else ""
        print(f"error: no space left on device{where} (free some space, then --resume)", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    """`kill PID` (SIGTERM) ends a command as Ctrl-C does: the `finally` blocks run (worker pools
    stop, locks are released) and run.log says the run stopped, instead of Python's silent exit."""
    raise KeyboardInterrupt(f"signal {signum}")


def one_line(message: str) -> str:
    """A UserError re-raised from a DataLoader worker carries the worker's traceback: keep its last line."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[-1].split("UserError: ", 1)[-1] if len(lines) > 1 else message.strip()


if __name__ == "__main__":
    sys.exit(main())
