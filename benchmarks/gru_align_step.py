"""Training-step cost of gru_align (cached targets) against the CTC baseline at the same encoder size.

Both models are built by their registered constructors from their configs
(configs/gru_align/gru_align.yml and configs/ctc_baseline/ctc_baseline.yml by default), with the
encoder sizes of the gru_align config forced on the baseline, on the same data. They take turns
step by step (the order alternates) on the same batches and the same augmentation seeds; a timed
step is the whole loop body: collate, preprocess, loss, backward, clip, AdamW, scheduler. The targets
come from the cache (filled before timing), as in training.

    .venv/bin/python benchmarks/gru_align_step.py                 # default size, CPU
    .venv/bin/python benchmarks/gru_align_step.py --published     # 5 x 768 encoder (b2txt25 sizes), log_mel targets
    .venv/bin/python benchmarks/gru_align_step.py --device cuda   # on a GPU

Prints the median ms per step of each model, the ratio of medians and the median of per-step ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from config import load_config  # noqa: E402
from harness import runner  # noqa: E402
from harness.batching import TrainBatchSampler, TrialDataset, collate  # noqa: E402
from harness.data import FeatureStore  # noqa: E402
from harness.evaluation import apply_preprocessors  # noqa: E402
from harness.plugins import load_plugins  # noqa: E402
from harness.train import build_optimizer  # noqa: E402

ENCODER_KEYS = ("n_units", "n_layers", "patch_size", "patch_stride", "input_dropout", "rnn_dropout", "pack_sequences")
PUBLISHED = ["model_params.n_units=768", "model_params.n_layers=5", "model_params.pack_sequences=true",
             "data_params.batch_size=64", "model_params.projector_hidden=1024"]


def build(config_path: str, overrides: list[str], device: torch.device):
    config = load_config(REPO_ROOT / config_path, overrides)
    trials, preprocessors = runner.prepare_data(config, ["train", "val", "test"])
    torch.manual_seed(config.training_params.seed)
    model = runner.build_model(config, list(config.data_params.sessions), trials, device).train()
    optimizer, scheduler = build_optimizer(model, config.training_params)
    return config, model, optimizer, scheduler, trials["train"], preprocessors


def make_step(config, model, optimizer, scheduler, dataset, preprocessors, device):
    clip = config.training_params.grad_norm_clip

    def step(indices: list[int], seed: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.manual_seed(seed)  # same augmentation noise and random cut for both models
        batch = apply_preprocessors(collate([dataset[i] for i in indices]).to(device), preprocessors, training=True)
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        float(loss.detach())  # waits for the step
        return (time.perf_counter() - start) * 1000

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--align-config", default="configs/gru_align/gru_align.yml")
    ap.add_argument("--ctc-config", default="configs/ctc_baseline/ctc_baseline.yml")
    ap.add_argument("--published", action="store_true", help="5 x 768 encoder, batch 64 (b2txt25 sizes)")
    ap.add_argument("--data-dir", default="data/synthetic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_plugins()
    device = torch.device(args.device)
    common = [f"data_params.data_dir={args.data_dir}", f"training_params.device={args.device}"]
    common += PUBLISHED if args.published else []
    align = build(args.align_config, common, device)
    encoder = {k: getattr(align[0].model_params, k) for k in ENCODER_KEYS}
    ctc_overrides = [o for o in common if "projector" not in o] + [f"model_params.{k}={json.dumps(v)}" for k, v in encoder.items()]
    ctc_overrides.append("model_params.word_decoder={name: greedy}")  # decoding is not timed: skip building an LM
    ctc = build(args.ctc_config, ctc_overrides, device)
    assert align[0].data_params.batch_size == ctc[0].data_params.batch_size

    dp = align[0].data_params
    trials = align[4]
    store = FeatureStore(trials, "memory")
    dataset = TrialDataset(trials, store)
    sampler = TrainBatchSampler(trials, dp.batch_size, dp.days_per_batch, seed=dp.seed, num_steps=args.warmup + args.steps)
    steps = {"gru_align": make_step(*align[:4], dataset, align[5], device),
             "ctc_baseline": make_step(*ctc[:4], dataset, ctc[5], device)}
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        indices = sampler.batch_for_step(i)
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            ms = steps[name](indices, seed=1000 + i)
            if i >= args.warmup:
                times[name].append(ms)

    med = {name: statistics.median(t) for name, t in times.items()}
    paired = statistics.median(a / c for a, c in zip(times["gru_align"], times["ctc_baseline"]))
    params = {name: sum(p.numel() for p in m[1].parameters()) for name, m in (("gru_align", align), ("ctc_baseline", ctc))}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": str(device), "torch": torch.__version__},
        "encoder": encoder, "batch_size": dp.batch_size, "targets": align[1].target_name,
        "target_dim": int(align[1].target_mean.numel()), "parameters": params, "steps": args.steps,
        "median_ms": med, "ratio_of_medians": med["gru_align"] / med["ctc_baseline"], "median_paired_ratio": paired,
    }
    print(f"encoder {encoder['n_units']}x{encoder['n_layers']}, batch {dp.batch_size}, targets {result['targets']} "
          f"(dim {result['target_dim']}), {args.steps} timed steps each, {device}, {result['machine']['threads']} threads")
    for name in steps:
        print(f"  {name:13s} {med[name]:8.1f} ms/step (median)  {params[name]:,} parameters")
    print(f"  gru_align / ctc_baseline: {result['ratio_of_medians']:.3f} (ratio of medians), "
          f"{paired:.3f} (median of per-step ratios); target <= 1.15")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
