#!/usr/bin/env python
"""What a recalibration protocol costs: one fine-tune step of the CTC baseline, the day layer alone
against every weight, and the protocol's total from it.

A recalibration fine-tune (harness/recalibration.py) updates either one session's day layer
(`fine_tune: day_layer`, 512 x 512 + 512 weights) or the whole model (`all`). Both need the full
forward and backward pass (the day layer's gradient flows back through the GRU), so the question is
what freezing the rest saves: the weight gradients of the GRU and the AdamW update of every weight.
The step below is recalibration.fine_tune's inner step (augmentations left out: they cost the same
on both sides). The two variants alternate step by step in one process after a warm-up; medians.

The protocol runs len(k > 0) x draws x held-out sessions fine-tunes of `steps` steps each, plus one
decoding of each held-out session's rest per fine-tune, so its fine-tuning time is that count x steps
x the median step printed here; it grows linearly with each factor and not with the training data.

    .venv/bin/python benchmarks/recalibration_step.py                    # b2txt25 sizes (5 x 768 GRU), CPU
    .venv/bin/python benchmarks/recalibration_step.py --size tiny --steps 20
    .venv/bin/python benchmarks/recalibration_step.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import ctc_baseline  # noqa: E402,F401  (registers the model)
import harness.preprocessors  # noqa: E402,F401  (registers the preprocessors its configs name)
from config import load_config  # noqa: E402
from ctc_baseline import CTCBaseline  # noqa: E402
from harness.batching import Batch  # noqa: E402

CONFIGS = {"published": "configs/ctc_baseline/b2txt25.yml", "default": "configs/ctc_baseline/ctc_baseline.yml",
           "tiny": "configs/ctc_baseline/tiny.yml"}


def model_of(size: str, n_days: int) -> CTCBaseline:
    config = load_config(ROOT / CONFIGS[size])
    params = config.model_params
    params.n_days, params.n_features = n_days, 512
    return CTCBaseline(params)


def random_batch(batch_size: int, bins: int, n_days: int, day: int, seed: int = 0) -> Batch:
    """A batch of one session's trials at the real data's length (about 11 s = 550 bins), as a
    fine-tune draws them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(bins * 0.8), bins + 1, (batch_size,), generator=g)
    features = torch.randn(batch_size, int(lengths.max()), 512, generator=g)
    phonemes = torch.randint(1, 41, (batch_size, 60), generator=g)
    return Batch(features=features, lengths=lengths, day_indices=torch.full((batch_size,), day),
                 phoneme_ids=phonemes, phoneme_lengths=torch.full((batch_size,), 60), sentences=[None] * batch_size,
                 trials=[None] * batch_size)


def step_timer(model: CTCBaseline, fine_tune: str, day: int, lr: float):
    chosen = list(model.day_layer_parameters(day)) if fine_tune == "day_layer" else list(model.parameters())
    trainable = {id(p) for p in chosen}
    optimizer = torch.optim.AdamW(chosen, lr=lr, weight_decay=0.0)

    def step(batch: Batch, device) -> float:
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        start = time.perf_counter()
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step, sum(p.numel() for p in chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(CONFIGS), default="published")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation.recalibration.batch_size's default")
    ap.add_argument("--bins", type=int, default=550, help="longest trial, 20 ms bins (real data: about 550)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_days, day = 45, 44
    torch.manual_seed(0)
    model = model_of(args.size, n_days).to(device).train()
    batch = random_batch(args.batch_size, args.bins, n_days, day).to(device)
    variants = {name: step_timer(model, name, day, 0.005) for name in ("day_layer", "all")}
    times = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name in (list(variants) if i % 2 == 0 else list(reversed(variants))):  # alternate the order
            seconds = variants[name][0](batch, device)
            if i >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"recalibration fine-tune step, {args.size} model ({CONFIGS[args.size]}), batch {args.batch_size} x up to "
          f"{args.bins} bins, {device}, {torch.get_num_threads()} threads, {platform.node()}, "
          f"{datetime.date.today()}")
    print(f"{'fine_tune':<10} {'weights trained':>16} {'median step s':>14} {'min':>8} {'max':>8}")
    for name, t in times.items():
        print(f"{name:<10} {variants[name][1]:>16,} {median[name]:>14.3f} {min(t):>8.3f} {max(t):>8.3f}")
    print(f"day_layer / all: {median['day_layer'] / median['all']:.2f}")
    fine_tunes = 3 * 3 * 3  # k in (10, 20, 50), 3 draws, 3 held-out sessions
    print(f"e.g. k=[0,10,20,50], 3 draws, 3 held-out sessions, 100 steps: {fine_tunes} fine-tunes x 100 steps = "
          f"{fine_tunes * 100 * median['day_layer'] / 60:.1f} min (day_layer), "
          f"{fine_tunes * 100 * median['all'] / 60:.1f} min (all), plus {fine_tunes} decodings of the rest")


if __name__ == "__main__":
    main()
