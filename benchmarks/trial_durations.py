"""What real trial durations cost: a model's training step and validation pass on the embedded data with
short trials (`synth --durations short`, the default) and with real ones (`--durations real`), side by
side, and `make gru-align`'s time projected from them.

The two datasets are written with the same seed (same sessions, blocks and sentences; only the trial
lengths differ), the model is built by its registered constructor from its config on each, and the
two take turns step by step on batches of the same trial indices and augmentation seeds.

    .venv/bin/python benchmarks/trial_durations.py --short data/synthetic --real data/synthetic_real
    .venv/bin/python benchmarks/trial_durations.py --config configs/ctc_baseline/ctc_baseline.yml ...

A missing dataset folder is written first (`synth`, seed 0, 8 sessions x 100 trials). Prints the
median ms per step of each, their ratio, the seconds of one validation pass, and the projection.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.batching import TrainBatchSampler, TrialDataset  # noqa: E402
from harness.data import FeatureStore, read_trials  # noqa: E402
from harness.evaluation import evaluate_split  # noqa: E402
from harness.plugins import load_plugins  # noqa: E402
from harness.synthetic import REPORT_NAME, write_synthetic_dataset  # noqa: E402


def _step_tools():
    """build() and make_step() of gru_align_step.py: one way to time a training step in benchmarks/."""
    spec = importlib.util.spec_from_file_location("gru_align_step", REPO_ROOT / "benchmarks" / "gru_align_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build, module.make_step


def ensure_dataset(folder: Path, durations: str) -> dict:
    """The dataset's trial-length summary (the dataset written first when missing)."""
    if not (folder / REPORT_NAME).is_file():
        print(f"writing {folder} ({durations} durations)")
        write_synthetic_dataset(folder, durations=durations)
    lengths = [t["n_time_steps"] for t in json.loads((folder / REPORT_NAME).read_text())["trials"]]
    return {"mean": statistics.mean(lengths), "p50": statistics.median(lengths)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/gru_align/gru_align.yml")
    ap.add_argument("--short", default="data/synthetic", help="dataset with short trials (written if missing)")
    ap.add_argument("--real", default="data/synthetic_real", help="dataset with real-length trials (written if missing)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    load_plugins()
    build, make_step = _step_tools()
    device = torch.device("cpu")
    runs = {}
    for name in ("short", "real"):
        lengths = ensure_dataset(Path(args.short if name == "short" else args.real), name)
        config, model, optimizer, scheduler, trials, preprocessors = build(
            args.config, [f"data_params.data_dir={args.short if name == 'short' else args.real}",
                          "model_params.word_decoder={name: greedy}"], device)
        store = FeatureStore(trials, "memory")
        runs[name] = {"lengths": lengths, "config": config, "model": model, "preprocessors": preprocessors,
                      "step": make_step(config, model, optimizer, scheduler, TrialDataset(trials, store), preprocessors,
                                        device), "trials": trials, "times": []}
    dp = runs["short"]["config"].data_params
    sampler = TrainBatchSampler(runs["short"]["trials"], dp.batch_size, dp.days_per_batch, seed=dp.seed,
                                num_steps=args.warmup + args.steps)
    for i in range(args.warmup + args.steps):
        indices = sampler.batch_for_step(i)  # the same trial positions in both datasets (same plan)
        for name in (("short", "real") if i % 2 == 0 else ("real", "short")):
            ms = runs[name]["step"](indices, seed=1000 + i)
            if i >= args.warmup:
                runs[name]["times"].append(ms)

    result = {"config": args.config, "steps": args.steps, "threads": torch.get_num_threads()}
    for name, run in runs.items():  # one validation pass, as training runs it (no bootstrap)
        cfg = run["config"]
        val = read_trials(cfg.data_params.data_dir, cfg.data_params.sessions, "val", cfg.data_params.n_features)
        started = time.perf_counter()
        evaluate_split(run["model"], "val", val, FeatureStore(val, "memory"), run["preprocessors"], device=device,
                       eval_batch_size=cfg.data_params.eval_batch_size, bootstrap_resamples=0, with_loss=True)
        tp = cfg.training_params
        step_ms = statistics.median(run["times"])
        val_s = time.perf_counter() - started
        validations = tp.num_steps // tp.val_every if tp.val_every else 1
        result[name] = {"mean_bins": run["lengths"]["mean"], "median_ms_per_step": step_ms, "validation_s": val_s,
                        "projected_training_min": (tp.num_steps * step_ms / 1000 + validations * val_s) / 60}
    result["step_ratio_real_over_short"] = result["real"]["median_ms_per_step"] / result["short"]["median_ms_per_step"]
    print(f"{args.config}: {args.steps} timed steps each, alternating, {result['threads']} threads")
    for name in runs:
        r = result[name]
        print(f"  {name:5s} trials of {r['mean_bins']:.0f} bins on average: {r['median_ms_per_step']:8.1f} ms/step "
              f"(median), one validation pass {r['validation_s']:.1f} s, training projected at "
              f"{r['projected_training_min']:.1f} min")
    print(f"  real / short: {result['step_ratio_real_over_short']:.2f}x per step")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
