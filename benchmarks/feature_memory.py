"""Memory and start time of the feature sources at real scale: cache (one memory-mapped copy per
machine) against memory (each process preloads its own), side by side in one invocation.

Two measurements on a dataset of the real shape (`python main.py synth --preset b2txt25 [--durations short]`):

1. `torchrun --nproc_per_node=N main.py run` with W DataLoader workers per rank (the CTC baseline's
   b2txt25 config on CPU, greedy words, a smaller GRU so that steps come quickly): the summed PSS of
   every process of the job (ranks and workers, /proc through psutil), its peak while training, the
   time from launch to the first training step, and steps/s. The same job on a 45-session dataset of
   3 trials per session gives the footprint of a rank without data (rank + its workers).
2. The data path alone in one process: batches/s of the training DataLoader (W workers, the
   reference's batch sampler, collate), cache against memory, alternating, median of the repeats.

The feature cache and the trial index are built before anything is timed (the goal is about a start
"with the cache built"); building them is timed and printed too.

    .venv/bin/python benchmarks/feature_memory.py --data /path/to/b2txt25_synth
    .venv/bin/python benchmarks/feature_memory.py --data DIR --nproc 4 --workers 2 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.data import SPLITS, find_sessions, open_feature_stores, read_trials  # noqa: E402

CONFIG = REPO / "configs" / "ctc_baseline" / "b2txt25.yml"
STEP_LINE = re.compile(r"^(\S+ \S+) INFO \S+: step (\d+) loss")


def build_caches(data: Path, cache_dir: Path) -> tuple[float, int]:
    """Trial index and feature cache of every split; returns (seconds, feature bytes)."""
    started = time.monotonic()
    sessions = find_sessions(data)
    trials = {s: read_trials(data, sessions, s, 512, cache_dir=cache_dir) for s in SPLITS}
    open_feature_stores(trials, "cache", cache_dir)
    feature_bytes = sum(t.n_time_steps for ts in trials.values() for t in ts) * 512 * 4
    return time.monotonic() - started, feature_bytes


def job_pss(root: psutil.Process) -> int:
    """Summed PSS of a process and all its descendants (a process that just ended counts 0)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_job(data: Path, cache_dir: Path, source: str, nproc: int, workers: int, steps: int, units: int,
            out: Path) -> dict:
    """Start the training job, sample its PSS every 0.5 s, stop it after `steps` steps."""
    run_dir = out / f"run-{source}-{data.name}"
    command = [str(REPO / ".venv" / "bin" / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "main.py"), "run", "--config", str(CONFIG), "--out", str(run_dir),
               "--set", f"data_params.data_dir={data}", "--set", f"data_params.features={source}",
               "--set", f"data_params.num_workers={workers}", "--set", "training_params.device=cpu",
               "--set", "training_params.amp_bf16=false", "--set", "training_params.compile=false",
               "--set", "training_params.num_steps=100000",
               "--set", "training_params.log_every=1", "--set", "training_params.val_every=0",
               "--set", "model_params.word_decoder={name: greedy}", "--set", f"model_params.n_units={units}",
               "--set", "model_params.n_layers=2", "--set", "training_params.progress_bar=false",
               "--set", "data_params.sessions=null"]  # every session found (the tiny set's names are synthetic)
    env = dict(os.environ, B2T_CACHE_DIR=str(cache_dir))
    launched = time.time()
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    root, peak, times = psutil.Process(job.pid), 0, {}
    log = run_dir / "run.log"
    try:
        while len(times) < steps:
            if job.poll() is not None:
                errors = [line for line in job.stderr.read().decode().splitlines() if line.startswith("error")]
                raise RuntimeError(f"the job ended early ({job.returncode}): {errors[:1]}")
            peak = max(peak, job_pss(root))
            if log.is_file():
                for line in log.read_text().splitlines():
                    m = STEP_LINE.match(line)
                    if m:
                        times[int(m.group(2))] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            time.sleep(0.5)
        last = job_pss(root)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole job: torchrun, its ranks and their workers
            os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    first, last_step = min(times), max(times)
    rate = (last_step - first) / (times[last_step] - times[first]) if last_step > first else float("nan")
    return {"peak_pss": peak, "last_pss": last, "first_step_s": times[first] - launched, "steps_per_s": rate}


def loader_rate(data: Path, cache_dir: Path, source: str, workers: int, batches: int) -> float:
    """Training batches/s of the DataLoader alone (sampler + workers + collate), one process."""
    import torch
    from torch.utils.data import DataLoader

    from harness.batching import TrainBatchSampler, TrialDataset, collate

    sessions = find_sessions(data)
    trials = {"train": read_trials(data, sessions, "train", 512, cache_dir=cache_dir)}
    store = open_feature_stores(trials, source, cache_dir)["train"]
    sampler = TrainBatchSampler(trials["train"], 64, 4, seed=1, num_steps=batches + 5)
    loader = DataLoader(TrialDataset(trials["train"], store), batch_sampler=sampler, collate_fn=collate,
                        num_workers=workers, generator=torch.Generator())
    for i, _ in enumerate(loader):
        if i == 4:  # workers started and warm
            started = time.monotonic()
    return batches / (time.monotonic() - started)


def warm_page_cache(cache_dir: Path) -> None:
    """Read every cache file once, in order: the throughput compared is that of a warm page cache (on a
    cold one the first pass over the features reads them from disk, whatever the source)."""
    for path in (cache_dir / "features").glob("*/features.npy"):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _touch_all(data: str, cache_dir: str, barrier, queue) -> None:
    sessions = find_sessions(data)
    trials = {s: read_trials(data, sessions, s, 512, cache_dir=cache_dir) for s in SPLITS}
    stores = open_feature_stores(trials, "cache", cache_dir)
    for store in stores.values():
        for i in range(len(store)):
            float(store[i].sum())  # read every page (the cache gives views: taking one reads nothing)
    barrier.wait()
    prefix = str((Path(cache_dir) / "features").resolve())
    queue.put(sum(m.pss for m in psutil.Process().memory_maps(grouped=True) if m.path.startswith(prefix)))
    barrier.wait()


def every_page_mapped(data: Path, cache_dir: Path, n: int) -> int:
    """Summed PSS of the cache's mappings when n processes have each read every trial (the worst case
    of a long run, where every trial has been sampled): the features' bytes, once."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_touch_all, args=(str(data), str(cache_dir), barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return total


def tiny_dataset(out: Path) -> Path:
    """45 sessions of 3 trials: the footprint of a rank without data."""
    from harness.synthetic import write_synthetic_dataset

    root = out / "tiny45"
    write_synthetic_dataset(root, n_sessions=45, trials_per_session=3, seed=0)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset of the real shape (synth --preset b2txt25)")
    parser.add_argument("--nproc", type=int, default=4, help="torchrun ranks")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--steps", type=int, default=8, help="training steps to watch per job")
    parser.add_argument("--units", type=int, default=256, help="GRU width (2 layers): memory is about data")
    parser.add_argument("--sources", nargs="+", default=["cache", "memory"])
    parser.add_argument("--loader-batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, help="where the caches go (default: a temporary folder)")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="b2t-feature-memory-"))
    cache_dir = args.cache_dir or out / "cache"
    try:
        print(f"# feature_memory: {args.data}, {args.nproc} ranks x {args.workers} workers, "
              f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {datetime.now():%Y-%m-%d}")
        seconds, feature_bytes = build_caches(args.data, cache_dir)
        print(f"features: {feature_bytes / 1e9:.2f} GB float32; trial index + feature cache ready in {seconds:.0f} s")
        tiny = tiny_dataset(out)
        build_caches(tiny, cache_dir)
        base = run_job(tiny, cache_dir, "cache", args.nproc, args.workers, args.steps, args.units, out)
        per_rank = base["peak_pss"] / args.nproc
        print(f"without data: {base['peak_pss'] / 1e9:.2f} GB summed PSS, {per_rank / 1e9:.2f} GB per rank "
              f"(with its workers); first step after {base['first_step_s']:.0f} s")
        print("| source | peak summed PSS (GB) | (peak - ranks without data) / feature bytes | goal <= 1.25 "
              "| first step after (s) | steps/s |")
        print("|---|---|---|---|---|---|")
        for source in args.sources:
            r = run_job(args.data, cache_dir, source, args.nproc, args.workers, args.steps, args.units, out)
            ratio = (r["peak_pss"] - args.nproc * per_rank) / feature_bytes
            print(f"| {source} | {r['peak_pss'] / 1e9:.2f} | {ratio:.2f} | {'yes' if ratio <= 1.25 else 'no'} "
                  f"| {r['first_step_s']:.0f} | {r['steps_per_s']:.2f} |", flush=True)
        if "cache" in args.sources:
            n = args.nproc * (1 + args.workers)
            mapped = every_page_mapped(args.data, cache_dir, n)
            print(f"cache, every trial read by each of {n} processes (ranks and workers): the mappings' summed PSS "
                  f"is {mapped / 1e9:.2f} GB = {mapped / feature_bytes:.2f}x the features; with the ranks without data, "
                  f"{(base['peak_pss'] + mapped) / 1e9:.2f} GB, {mapped / feature_bytes:.2f} <= 1.25", flush=True)
        warm_page_cache(cache_dir)
        rates = {s: [] for s in args.sources}
        for _ in range(args.repeats):  # alternating, so that drifts in machine load hit both
            for source in args.sources:
                rates[source].append(loader_rate(args.data, cache_dir, source, args.workers, args.loader_batches))
        medians = {s: statistics.median(v) for s, v in rates.items()}
        print(f"data path alone ({args.workers} workers, batch 64, {args.loader_batches} batches, median of "
              f"{args.repeats}): " + ", ".join(f"{s} {m:.1f} batches/s" for s, m in medians.items())
              + (f"; cache / memory = {medians['cache'] / medians['memory']:.2f}x" if {"cache", "memory"} <= set(medians) else ""))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
