#!/usr/bin/env python
"""`make gpu-check`: every GPU path of b2t-bench checked in one run of at most 8 minutes, one table.

Items (each with its own time budget; the 7B and compile items last, so that a slow one costs only
what comes after it):
  a  the published-size CTC step (configs/ctc_baseline/b2txt25.yml: 5 x 768 GRU, patch 14/4, 45 day
     layers, batch 64 of trials 500-600 bins) in fp32 eager, bf16 autocast and bf16 + torch.compile
     (the harness's model.compile()): ms/step, peak memory, and the losses of the three from one seed
     compared (tolerances in PARITY_*)
  b  torch.compile over 8 batches of different lengths, graphs compiled counted (a counting backend
     in front of "eager": dynamo's own guards decide what recompiles) against a bound, for: static
     shapes padded to data_params.pad_to_multiple; the same unpadded (control: must exceed the
     bound, or the counter counts nothing); the harness's compile (automatic dynamic shapes) on the
     padded and on the packed encoder (pack_sequences: true, what the configs use)
  c  packed (pack_sequences: true; cuDNN's packed GRU on CUDA) vs padded: logits on the valid frames,
     loss and gradients, fp32 with TF32 off
  d  evaluation throughput: trials/s, eval batch 64, no grad, bf16, greedy phonemes
  e  a gru_align training step (configs/gru_align/b2txt25.yml) against targets of the mms_tts +
     qwen2_audio shapes (Qwen2AudioEncoderConfig's width, 25 frames per second of speech), random
  f  the llm_decoder training step with a Qwen2-Audio-7B-shaped LM (random bf16 weights built on the
     GPU from a transformers config, nothing downloaded; benchmarks/llm_decoder_step.py builds it),
     gradient checkpointing on and off
  g  a one-rank NCCL process group (127.0.0.1, a free port): all_reduce, the harness's object
     collectives, barrier, destroy
Data are random, in memory (no dataset needed): trials of 500-600 bins, 512 features, random
phonemes, sentences of the synthetic grammar. On CUDA every item runs in its own subprocess (a crash,
hang or CUDA error costs that item only; memory is the item's own); its rows stream back as they are
made, so a killed item keeps the rows it finished. Peak memory is torch.cuda.max_memory_allocated
over the timed steps.

    .venv/bin/python benchmarks/gpu_check.py --out results/gpu_check        # a GPU machine (make gpu-check)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny            # smoke test of the code paths

Without a GPU (and without --device cpu) it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.utils  # noqa: E402,F401  (imported here, never half-way under an item's alarm)

import audio_alignment  # noqa: E402,F401  (registers gru_align)
import ctc_baseline  # noqa: E402,F401  (registers the model)
import harness.preprocessors  # noqa: E402,F401  (registers the preprocessors the configs name)
import llm_decoder  # noqa: E402,F401  (registers the model)
from config import load_config  # noqa: E402
from harness.batching import collate  # noqa: E402
from harness.data import Trial  # noqa: E402
from harness.evaluation import apply_preprocessors  # noqa: E402
from harness.runner import build_preprocessors, fill_data_fields  # noqa: E402
from harness.sentences import generate_sentence  # noqa: E402
from harness.train import build_optimizer  # noqa: E402

# all items together: with the imports before and a hung child's 15 s grace, under the 8 minutes
TOTAL_BUDGET_S = 450
ROW_TAG = "GPU_CHECK_ROW "
# bf16 (8 bits of mantissa) against fp32: the eval-mode loss on one fixed batch, and the training loss
# at the last step (there the dropout masks also differ: inductor draws its own random numbers)
PARITY_EVAL, PARITY_TRAIN = 0.02, 0.05
PACKED_ATOL, PACKED_GRAD_RTOL = 1e-4, 1e-3  # fp32 without TF32, as benchmarks/ctc_train_step.py's same-math check
SEED = 10


# ----------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Sizes:
    n_features: int
    n_days: int
    lengths: tuple[int, int]  # trial lengths in bins
    multiple: int  # pad_to_multiple for the bucketed checks
    warmup: int
    steps: int  # timed steps of the training items
    eval_batches: int
    llm_steps: int
    recompile_batches: int  # batches of different lengths for item b
    model: dict  # encoder overrides (tiny only)
    llm_text: str  # llm_decoder_step's text config: QWEN2_AUDIO_7B_TEXT or TOY_TEXT
    batch_size: int | None = None  # None: the config's
    target_dim: int | None = None  # None: Qwen2AudioEncoderConfig().d_model


PUBLISHED = Sizes(n_features=512, n_days=45, lengths=(500, 600), multiple=64, warmup=2, steps=8, eval_batches=10,
                  llm_steps=3, recompile_batches=8, model={}, llm_text="QWEN2_AUDIO_7B_TEXT")
TINY = Sizes(n_features=16, n_days=4, lengths=(40, 80), multiple=32, warmup=1, steps=2, eval_batches=2, llm_steps=1,
             recompile_batches=4, model={"n_units": 16, "n_layers": 1, "rnn_dropout": 0.0, "projector_hidden": 16},
             llm_text="TOY_TEXT", batch_size=8, target_dim=24)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    tiny: bool
    compile_backend: str
    deadline: float  # time.monotonic() by which this item must be done

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


class ItemTimeout(BaseException):
    """Raised by the alarm when an item's budget is spent (BaseException: no `except Exception` swallows it)."""


# ----------------------------------------------------------------------------------------------
# Random data of the real shapes


class TrialMaker:
    """Trials of random lengths, random features (views into one noise block), random phonemes, and
    sentences of the synthetic grammar; the same seed gives the same trials."""

    def __init__(self, sizes: Sizes, seed: int = 0):
        self.sizes, self.rng = sizes, np.random.default_rng(seed)
        # 37 rows twice the longest trial: each trial a view at a random offset (fast, and batches differ)
        self.noise = self.rng.standard_normal((37, 2 * sizes.lengths[1], sizes.n_features), dtype=np.float32)
        self.count = 0

    def trial(self, n_bins: int, day: int):
        n_frames = (n_bins - 14) // 4 + 1  # the GRU's output frames at patch 14 / stride 4
        phonemes = tuple(int(p) for p in self.rng.integers(1, 41, size=max(2, n_frames // 3)))
        self.count += 1
        trial = Trial("train", f"t15.day{day}", day, "memory", f"trial_{self.count:05d}", 1, self.count, int(n_bins),
                      phonemes, generate_sentence(self.rng))
        start = int(self.rng.integers(0, self.noise.shape[1] - n_bins + 1))
        return trial, self.noise[self.count % len(self.noise), start:start + n_bins]

    def items(self, lengths, days) -> list:
        per_day = -(-len(lengths) // len(days))
        return [self.trial(n, days[i // per_day]) for i, n in enumerate(lengths)]

    def lengths(self, n: int, longest: int | None = None) -> list[int]:
        lo, hi = self.sizes.lengths
        out = self.rng.integers(lo, (longest or hi) + 1, size=n).tolist()
        if longest is not None:
            out[0] = longest
        return out

    def days(self, k: int = 4) -> list[int]:
        return sorted(self.rng.choice(self.sizes.n_days, size=min(k, self.sizes.n_days), replace=False).tolist())


# ----------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def amp(device: torch.device, enabled: bool):
    """bf16 autocast: harness.evaluation.autocast on CUDA; on the CPU (smoke test only) torch's CPU autocast."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def free_memory(device: torch.device) -> None:
    """Between checks: compiled code, garbage, cached CUDA blocks and the peak statistics."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def median_ms(seconds: list[float]) -> float | None:
    return 1000 * statistics.median(seconds) if seconds else None


def pack_for(ctx: Context, configured: bool, autocast: bool) -> bool:
    """The config's pack_sequences, except under CPU autocast: packed_gru's CPU layer writes into buffers
    of its input's dtype and is not autocast-safe (the harness autocasts on CUDA only)."""
    return configured and (ctx.cuda or not autocast)


def load(config_path: str, overrides: list[str], ctx: Context, random_cut: bool = True):
    """A config with the data fields filled (45 days, 512 features) and the tiny sizes applied."""
    config = load_config(ROOT / config_path, overrides)
    p = config.model_params
    fill_data_fields(config, ctx.sizes.n_days, ctx.sizes.n_features)
    for key, value in ctx.sizes.model.items():
        if hasattr(p, key):
            setattr(p, key, value)
    if ctx.sizes.batch_size:
        config.data_params.batch_size = config.data_params.eval_batch_size = ctx.sizes.batch_size
    if not random_cut:
        for spec in config.data_params.preprocessors:
            if hasattr(spec.params, "random_cut"):
                spec.params = replace(spec.params, random_cut=0)
    return config


def batches(maker: TrialMaker, config, n: int, *, same_lengths: bool = False, days: list[int] | None = None,
            pad_to_multiple: int = 1) -> list:
    """n training batches (days_per_batch sessions each); same_lengths: one length profile for all."""
    dp = config.data_params
    profile = sorted(maker.lengths(dp.batch_size), reverse=True)
    return [collate(maker.items(profile if same_lengths else maker.lengths(dp.batch_size),
                                days or maker.days(dp.days_per_batch)), pad_to_multiple=pad_to_multiple)
            for _ in range(n)]


class Trainer:
    """harness/train.py's loop body: preprocess, loss under autocast, backward, clip, AdamW, scheduler."""

    def __init__(self, model, config, device: torch.device, autocast: bool):
        self.model, self.config, self.device, self.autocast = model, config, device, autocast
        self.optimizer, self.scheduler = build_optimizer(model, config.training_params)
        self.preprocessors = build_preprocessors(config)

    def step(self, batch, seed: int) -> tuple[float, float]:
        """-> (seconds, loss)."""
        sync(self.device)
        start = time.perf_counter()
        torch.manual_seed(seed)  # the same augmentation draws and dropout seed for every variant of a step
        batch = apply_preprocessors(batch.to(self.device), self.preprocessors, training=True)
        with amp(self.device, self.autocast):
            loss = self.model.loss(batch)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.training_params.grad_norm_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.scheduler.step()
        value = float(loss.detach())  # a sync, as in the harness
        sync(self.device)
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite training loss {value}")
        return time.perf_counter() - start, value

    def eval_loss(self, batch) -> float:
        self.model.eval()
        try:
            with torch.no_grad(), amp(self.device, self.autocast):
                b = apply_preprocessors(batch.to(self.device), self.preprocessors, training=False)
                return float(self.model.loss(b)["loss"])
        finally:
            self.model.train()


def run_steps(ctx: Context, trainer: Trainer, batch_list: list, warmup: int) -> dict:
    """Warm-up steps, then timed steps while the item's budget allows (each step's time kept)."""
    times, losses, first = [], [], None
    for i, batch in enumerate(batch_list):
        if i == warmup:
            reset_peak(ctx.device)
        if i > warmup and ctx.time_left() < 3 * max(times[-1:] or [1.0]) + 5:
            break  # keep what was measured: the rest of the budget goes to the other variants
        seconds, loss = trainer.step(batch, seed=1000 + i)
        if i == 0:
            first = seconds
        if i >= warmup:
            times.append(seconds)
        losses.append(loss)
    return {"times": times, "losses": losses, "first_step_s": first, "peak_mb": peak_mb(ctx.device),
            "timed": len(times), "planned": len(batch_list) - warmup}


def steps_note(result: dict) -> str:
    cut = f", {result['timed']} of {result['planned']} timed steps (budget)" if result["timed"] < result["planned"] else ""
    return f"first step {result['first_step_s']:.1f} s{cut}"


# ----------------------------------------------------------------------------------------------
# a. The published-size CTC step: fp32, bf16, bf16 + torch.compile


def item_ctc_step(ctx: Context, emit) -> None:
    from ctc_baseline import CTCBaseline

    # random_cut off: it changes the batch shape and the packed layout every step, which under compile
    # means recompiling inside the timed steps (item b counts that); every batch has the same lengths
    config = load("configs/ctc_baseline/b2txt25.yml", [], ctx, random_cut=False)
    maker = TrialMaker(ctx.sizes, seed=1)
    days = maker.days(config.data_params.days_per_batch)
    train = batches(maker, config, ctx.sizes.warmup + ctx.sizes.steps, same_lengths=True, days=days,
                    pad_to_multiple=ctx.sizes.multiple)
    fixed = batches(maker, config, 1, same_lengths=True, days=days, pad_to_multiple=ctx.sizes.multiple)[0]
    # one encoder path for all three, so that only the precision and compilation differ
    p = replace(config.model_params, pack_sequences=pack_for(ctx, config.model_params.pack_sequences, True))
    fp32: dict = {}

    def variant(autocast: bool, compiled: bool):
        def run():
            torch.manual_seed(SEED)
            model = CTCBaseline(p).to(ctx.device).train()
            trainer = Trainer(model, config, ctx.device, autocast)
            if compiled:
                model.compile(backend=ctx.compile_backend)  # in place, as harness/train.py
            # compiled: the eval-mode graph is a second compilation, so it comes after the timed steps, if
            # the budget leaves room for it (the timing is what the budget is for)
            before = None if compiled else trainer.eval_loss(fixed)
            result = run_steps(ctx, trainer, train, ctx.sizes.warmup)
            after = trainer.eval_loss(fixed) if not compiled or ctx.time_left() > 45 else None
            n, last = len(result["losses"]), result["losses"][-1]
            note = (f"B={len(fixed)} T={fixed.features.shape[1]} pack={p.pack_sequences}; eval loss "
                    + (f"{before:.3f} -> " if before is not None else "")
                    + (f"{after:.3f} after {n} steps" if after is not None else "not measured (budget)")
                    + f", train loss at step {n} {last:.3f}; " + steps_note(result))
            status = "ok"
            if not autocast and not compiled:
                fp32.update(after=after, last=last, steps=n)
            elif fp32.get("steps") != n:
                note += "; not compared: " + (f"{n} steps vs fp32's {fp32['steps']}" if fp32 else "no fp32 result")
            else:
                d_train = abs(last / fp32["last"] - 1)
                d_eval = abs(after / fp32["after"] - 1) if after is not None else None
                note += ("; vs fp32: " + (f"eval {d_eval:.2%}, " if d_eval is not None else "eval not compared, ")
                         + f"train {d_train:.2%} (tolerances {PARITY_EVAL:.0%}, {PARITY_TRAIN:.0%})")
                if (d_eval or 0.0) > PARITY_EVAL or d_train > PARITY_TRAIN:
                    status = f"FAILED: loss differs from fp32's by {max(d_eval or 0.0, d_train):.2%}"
            return {"status": status, "ms": median_ms(result["times"]), "peak_mb": result["peak_mb"], "note": note,
                    "data": {"eval_loss_before": before, "eval_loss_after": after, "train_losses": result["losses"],
                             "times_s": result["times"], "first_step_s": result["first_step_s"]}}
        return run

    for name, autocast, compiled in [("fp32 eager", False, False), ("bf16 autocast", True, False),
                                     (f"bf16 + torch.compile ({ctx.compile_backend})", True, True)]:
        emit_attempt(ctx, emit, "a", f"ctc {size_name(config)}: {name}", variant(autocast, compiled))


def size_name(config) -> str:
    p = config.model_params
    return f"{p.n_layers}x{p.n_units}, {p.n_days} days, batch {config.data_params.batch_size}"


# ----------------------------------------------------------------------------------------------
# b. Recompilations over batches of different lengths


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it, then runs them as `inner` would."""

    def __init__(self, inner: str = "eager"):
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


class RecompileLimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: from then on that frame runs eagerly."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record):
        if "recompile_limit" in record.getMessage():
            self.hits += 1


def count_graphs(ctx: Context, model, config, batch_list, dynamic, augment: bool, recompile_limit: int | None):
    """Graphs compiled per batch (training forward + backward) by the model compiled in place, as the
    harness does, with `dynamic`; and the recompile-limit hits."""
    torch._dynamo.reset()
    counter, hits = CountingBackend("eager"), RecompileLimitHits()
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(hits)
    preprocessors = build_preprocessors(config) if augment else [
        p for spec, p in zip(config.data_params.preprocessors, build_preprocessors(config)) if spec.name != "augment"]
    per_batch = []
    limit = torch._dynamo.config.patch(recompile_limit=recompile_limit) if recompile_limit else contextlib.nullcontext()
    try:
        model.compile(backend=counter, dynamic=dynamic)
        with limit:
            for i, batch in enumerate(batch_list):
                if ctx.time_left() < 5:
                    break
                torch.manual_seed(1000 + i)
                b = apply_preprocessors(batch.to(ctx.device), preprocessors, training=True)
                before = counter.graphs
                model.loss(b)["loss"].backward()
                per_batch.append(counter.graphs - before)
    finally:
        logger.removeHandler(hits)
        torch._dynamo.reset()
    return per_batch, hits.hits


def item_recompiles(ctx: Context, emit) -> None:
    from ctc_baseline import CTCBaseline

    config = load("configs/ctc_baseline/b2txt25.yml", [], ctx)
    m = ctx.sizes.multiple
    lo, hi = ctx.sizes.lengths
    # batches whose longest trials all differ (8 at the published size): as many shapes unpadded
    longest = np.linspace(lo + 5, hi, ctx.sizes.recompile_batches).round().astype(int).tolist()
    maker = TrialMaker(ctx.sizes, seed=2)
    dp = config.data_params
    raw = [maker.items(maker.lengths(dp.batch_size, longest=n), maker.days(dp.days_per_batch)) for n in longest]
    padded = [collate(items, pad_to_multiple=m) for items in raw]
    unpadded = [collate(items) for items in raw]
    shapes = len({math.ceil(n / m) * m for n in longest})
    cut = next((spec.params.random_cut for spec in dp.preprocessors if spec.name == "augment"), 0)

    def model(pack: bool):
        torch.manual_seed(SEED)
        return CTCBaseline(replace(config.model_params, pack_sequences=pack)).to(ctx.device).train()

    def row(per_batch, hits, bound, what, control=False):
        total = sum(per_batch)
        note = (f"{what}; graphs per batch {per_batch}; bound {bound}"
                + (f"; hit recompile_limit {hits}x (those frames then run eagerly)" if hits else ""))
        if len(per_batch) < len(longest):
            note += f"; {len(per_batch)} of {len(longest)} batches (budget)"
        complete = len(per_batch) == len(longest)
        if not per_batch:
            status = "skipped: the item's time budget ran out first"
        elif control:
            status = ("ok" if total > bound else f"FAILED: {total} graphs <= bound {bound}: the counter saw no new shape"
                      if complete else "skipped: the time budget ran out before the control exceeded the bound")
        else:  # a count only grows: over the bound is a failure even when the budget cut the batches short
            status = "ok" if total <= bound else f"FAILED: {total} graphs compiled > bound {bound}"
        return {"status": status, "ms": None, "peak_mb": peak_mb(ctx.device), "note": note,
                "data": {"graphs_per_batch": per_batch, "total": total, "bound": bound, "recompile_limit_hits": hits,
                         "longest": longest, "pad_to_multiple": m}}

    static = {}

    def bucketed():
        per_batch, hits = count_graphs(ctx, model(False), config, padded, False, augment=False, recompile_limit=64)
        static["per_shape"] = per_batch[0] if per_batch else 0
        bound = static["per_shape"] * shapes
        return row(per_batch, hits, bound, f"padded encoder, static shapes, pad_to_multiple {m} ({shapes} shapes), "
                                           "no augmentation")

    def control():
        per_batch, hits = count_graphs(ctx, model(False), config, unpadded, False, augment=False, recompile_limit=64)
        bound = static.get("per_shape", per_batch[0] if per_batch else 0) * shapes
        return row(per_batch, hits, bound, f"control: the same without padding ({len(set(longest))} shapes)",
                   control=True)

    def harness(pack: bool):
        def run():
            per_batch, hits = count_graphs(ctx, model(pack), config, padded, None, augment=True, recompile_limit=None)
            bound = 2 * per_batch[0] if per_batch else 0  # automatic dynamic: each graph recompiles once, symbolic
            return row(per_batch, hits, bound, f"{'packed' if pack else 'padded'} encoder, the harness's compile "
                                               f"(dynamic=None), pad_to_multiple {m}, augment with random_cut {cut}")
        return run

    emit_attempt(ctx, emit, "b", f"compile recompilations: static, pad_to_multiple {m}", bucketed)
    emit_attempt(ctx, emit, "b", "compile recompilations: static, no padding (control)", control)
    emit_attempt(ctx, emit, "b", "compile recompilations: harness compile, padded encoder", harness(False))
    if ctx.cuda:
        emit_attempt(ctx, emit, "b", "compile recompilations: harness compile, packed encoder (the configs)",
                     harness(True))
    else:
        emit(skipped("b", "compile recompilations: harness compile, packed encoder (the configs)",
                     "needs CUDA (on the CPU the packed path is packed_gru, not the cuDNN route a GPU compiles)"))


# ----------------------------------------------------------------------------------------------
# c. Packed vs padded


@contextlib.contextmanager
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def item_packed(ctx: Context, emit) -> None:
    from ctc_baseline import CTCBaseline

    def run():
        config = load("configs/ctc_baseline/b2txt25.yml", [], ctx)
        maker = TrialMaker(ctx.sizes, seed=3)
        batch = batches(maker, config, 1, pad_to_multiple=ctx.sizes.multiple)[0]
        batch = apply_preprocessors(batch.to(ctx.device), build_preprocessors(config), training=False)
        torch.manual_seed(SEED)
        # training mode (cuDNN's RNN backward refuses eval mode) with dropout off: deterministic
        p = replace(config.model_params, pack_sequences=True, input_dropout=0.0, rnn_dropout=0.0)
        model = CTCBaseline(p).to(ctx.device).train()
        out, times = {}, {}
        with no_tf32():
            for pack in (True, False):
                model.pack_sequences = pack  # same weights, the other path
                with torch.no_grad():
                    model(batch.features, batch.lengths, batch.day_indices)  # warm-up (cuDNN plans), not timed
                model.zero_grad(set_to_none=True)
                reset_peak(ctx.device)
                sync(ctx.device)
                start = time.perf_counter()
                logits, lengths = model(batch.features, batch.lengths, batch.day_indices)
                sync(ctx.device)
                times[pack] = time.perf_counter() - start
                loss = model.loss(batch)["loss"]
                loss.backward()
                out[pack] = (logits.detach(), lengths, float(loss), peak_mb(ctx.device),
                             {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        (lp, n, loss_p, peak, grads_p), (lq, _, loss_q, _, grads_q) = out[True], out[False]
        diff = max(float((lp[i, :k] - lq[i, :k]).abs().max()) for i, k in enumerate(n.tolist()) if k)
        grad = max(float((grads_p[k] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for k, g in grads_q.items()
                   if k in grads_p)
        ok = diff <= PACKED_ATOL and abs(loss_p - loss_q) <= PACKED_ATOL * max(1.0, abs(loss_q)) and grad <= PACKED_GRAD_RTOL
        route = "cuDNN packed GRU" if ctx.cuda else "packed_gru (CPU)"
        note = (f"{route} vs nn.GRU padded, fp32, TF32 off, dropout off, B={len(batch)} T={batch.features.shape[1]}: "
                f"max abs logit diff {diff:.1e} (tol {PACKED_ATOL:g}), loss {loss_p:.4f} vs {loss_q:.4f}, "
                f"max rel grad diff {grad:.1e} (tol {PACKED_GRAD_RTOL:g}); "
                f"forward ms packed {1000 * times[True]:.1f}, padded {1000 * times[False]:.1f}")
        status = "ok" if ok else "FAILED: packed and padded outputs differ beyond the tolerance"
        return {"status": status, "ms": 1000 * times[True], "peak_mb": peak, "note": note,
                "data": {"max_abs_logit_diff": diff, "loss_packed": loss_p, "loss_padded": loss_q,
                         "max_rel_grad_diff": grad}}

    emit_attempt(ctx, emit, "c", "packed vs padded encoder (valid steps)", run)


# ----------------------------------------------------------------------------------------------
# d. Evaluation throughput


def item_eval(ctx: Context, emit) -> None:
    from ctc_baseline import CTCBaseline

    def run():
        config = load("configs/ctc_baseline/b2txt25.yml", [], ctx)
        dp, autocast = config.data_params, config.training_params.amp_bf16
        maker = TrialMaker(ctx.sizes, seed=4)
        n = 2 + ctx.sizes.eval_batches
        eval_batches = [collate(maker.items(maker.lengths(dp.eval_batch_size), [maker.days(1)[0]]),
                                pad_to_multiple=ctx.sizes.multiple) for _ in range(n)]
        preprocessors = build_preprocessors(config)
        torch.manual_seed(SEED)
        model = CTCBaseline(replace(config.model_params,
                                    pack_sequences=pack_for(ctx, config.model_params.pack_sequences, autocast)))
        model = model.to(ctx.device).eval()
        times = []
        with torch.no_grad():
            for i, batch in enumerate(eval_batches):
                if i == 2:
                    reset_peak(ctx.device)
                if i > 2 and ctx.time_left() < 5:
                    break
                sync(ctx.device)
                start = time.perf_counter()
                b = apply_preprocessors(batch.to(ctx.device), preprocessors, training=False)
                with amp(ctx.device, autocast):
                    rows = model.decode(b)  # greedy phonemes, on the CPU
                sync(ctx.device)
                if i >= 2:
                    times.append(time.perf_counter() - start)
                if len(rows) != len(batch) or not all(r.get("predicted_phonemes") is not None for r in rows):
                    raise RuntimeError("decode returned no phonemes for some trials")
        ms = median_ms(times)
        note = (f"{dp.eval_batch_size / ms * 1000:.0f} trials/s; eval batch {dp.eval_batch_size}, no grad, "
                f"{'bf16' if autocast else 'fp32'}, eager, greedy phonemes, {len(times)} batches")
        return {"ms": ms, "peak_mb": peak_mb(ctx.device), "note": note,
                "data": {"trials_per_s": dp.eval_batch_size / ms * 1000, "times_s": times}}

    emit_attempt(ctx, emit, "d", "evaluation throughput", run)


# ----------------------------------------------------------------------------------------------
# e. gru_align with targets of the mms_tts + qwen2_audio shapes


class SpeechShapedTargets:
    """Stands in for the target cache of mms_tts + qwen2_audio (no weights can be downloaded): random
    frames, fixed per sentence, of Qwen2-Audio's width, 25 per second of speech at about 2.5 words/s."""

    name = "mms_tts+qwen2_audio shapes (random)"

    def __init__(self, dim: int, sentences: list[str], seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.frames = dim, {}
        for s in dict.fromkeys(sentences):
            n = round(25 * (0.4 * len(s.split()) + 0.3))
            self.frames[s] = torch.randn(n, dim, generator=generator).half()  # float16 on the CPU, as TargetStore

    def get(self, sentences):
        return {s: self.frames[s] for s in sentences}


def item_gru_align(ctx: Context, emit) -> None:
    from audio_alignment.model import GRUAlign

    def run():
        config = load("configs/gru_align/b2txt25.yml", [], ctx)
        autocast = config.training_params.amp_bf16
        p = config.model_params
        p.pack_sequences = pack_for(ctx, p.pack_sequences, autocast)
        if ctx.sizes.target_dim:
            dim = ctx.sizes.target_dim
        else:
            from transformers import Qwen2AudioEncoderConfig

            dim = Qwen2AudioEncoderConfig().d_model  # the audio tower's width: 1280
        maker = TrialMaker(ctx.sizes, seed=5)
        train = batches(maker, config, ctx.sizes.warmup + ctx.sizes.steps, pad_to_multiple=ctx.sizes.multiple)
        targets = SpeechShapedTargets(dim, [s for b in train for s in b.sentences])
        torch.manual_seed(SEED)
        model = GRUAlign(p, targets, config.evaluation).to(ctx.device).train()
        result = run_steps(ctx, Trainer(model, config, ctx.device, autocast), train, ctx.sizes.warmup)
        frames = statistics.mean(len(f) for f in targets.frames.values())
        note = (f"{size_name(config)}, targets {dim}-d, {frames:.0f} frames/sentence, align_frames {p.align_frames}, "
                f"loss weights {vars(p.loss_weights)}, {'bf16' if autocast else 'fp32'}, eager, pack={p.pack_sequences}; "
                f"loss {result['losses'][-1]:.3f}; " + steps_note(result))
        return {"ms": median_ms(result["times"]), "peak_mb": result["peak_mb"], "note": note,
                "data": {"losses": result["losses"], "times_s": result["times"]}}

    emit_attempt(ctx, emit, "e", "gru_align step (qwen2_audio target shapes)", run)


# ----------------------------------------------------------------------------------------------
# f. llm_decoder with a Qwen2-Audio-7B-shaped LM


def llm_benchmark():
    """benchmarks/llm_decoder_step.py as a module (its model builder and shapes)."""
    spec = importlib.util.spec_from_file_location("llm_decoder_step", ROOT / "benchmarks" / "llm_decoder_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def item_llm(checkpointing: bool):
    def item(ctx: Context, emit) -> None:
        def run():
            bench = llm_benchmark()
            dtype = "bfloat16"
            overrides = [f"model_params.lm.dtype={dtype}", "training_params.amp_bf16=true",
                         f"model_params.lm.gradient_checkpointing={str(checkpointing).lower()}"]
            config = load("configs/llm_decoder/qwen2_audio.yml", overrides, ctx)
            p = config.model_params
            p.pack_sequences = pack_for(ctx, p.pack_sequences, True)
            maker = TrialMaker(ctx.sizes, seed=6)
            train = batches(maker, config, 1 + ctx.sizes.llm_steps, pad_to_multiple=ctx.sizes.multiple)
            trials = {"train": [t for b in train for t in b.trials]}
            build = time.perf_counter()
            torch.manual_seed(SEED)
            model = bench.build_qwen2_audio_shaped(config, trials, ctx.device, getattr(bench, ctx.sizes.llm_text))
            model.train()
            build = time.perf_counter() - build
            free_memory(ctx.device)  # the fp32 -> bf16 copy of the build is not the step's memory
            result = run_steps(ctx, Trainer(model, config, ctx.device, True), train, 1)
            frozen = sum(t.numel() for t in model.parameters() if not t.requires_grad)
            note = (f"{frozen / 1e6:,.1f} M frozen {dtype} weights, LoRA r={p.lm.lora.r}, batch {config.data_params.batch_size}, "
                    f"brain {p.n_layers}x{p.n_units} pack={p.pack_sequences}; built in {build:.0f} s; "
                    f"loss {result['losses'][-1]:.3f}; " + steps_note(result))
            return {"ms": median_ms(result["times"]), "peak_mb": result["peak_mb"], "note": note,
                    "data": {"losses": result["losses"], "times_s": result["times"], "frozen_parameters": frozen}}

        shapes = "toy" if ctx.tiny else "Qwen2-Audio-7B"
        emit_attempt(ctx, emit, "f", f"llm_decoder step, {shapes} shapes, checkpointing {'on' if checkpointing else 'off'}",
                     run)
    return item


# ----------------------------------------------------------------------------------------------
# g. One-rank NCCL process group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def item_nccl(ctx: Context, emit) -> None:
    import torch.distributed as dist

    from harness import distributed

    def run():
        backend = "nccl" if ctx.cuda else "gloo"
        if dist.is_initialized():
            raise RuntimeError("a process group already exists in this process")
        # the harness's arguments (harness/distributed.py), on a free local port instead of torchrun's env://
        device = torch.device("cuda", ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()) \
            if ctx.cuda else None  # NCCL binds to an indexed device (harness: cuda:LOCAL_RANK)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60), device_id=device)
        try:
            x = torch.arange(1 << 20, dtype=torch.float32, device=ctx.device)
            times = []
            for _ in range(6):
                y = x.clone()
                sync(ctx.device)
                start = time.perf_counter()
                dist.all_reduce(y)
                sync(ctx.device)
                times.append(time.perf_counter() - start)
            if not torch.equal(y, x):
                raise RuntimeError("all_reduce over one rank changed the tensor")
            distributed.barrier()
            objects = (distributed.broadcast_object({"a": 1}), distributed.gather_object("x"),
                       distributed.mean_across_ranks({"loss": torch.tensor(2.0, device=ctx.device)}))
            if objects != ({"a": 1}, ["x"], {"loss": 2.0}):
                raise RuntimeError(f"the harness's object collectives returned {objects}")
            world = f"{dist.get_world_size()} rank, {dist.get_backend()}"
        finally:
            dist.destroy_process_group()
        note = (f"{world}: all_reduce of 4 MB (median of 5 after 1), barrier, broadcast/gather_object, "
                f"mean_across_ranks, destroy" + ("" if ctx.cuda else "; gloo: NCCL needs CUDA"))
        return {"ms": median_ms(times[1:]), "peak_mb": None, "note": note}

    emit_attempt(ctx, emit, "g", "process group (NCCL), one rank", run)


# ----------------------------------------------------------------------------------------------
# Items, rows, budgets


@dataclass(frozen=True)
class Item:
    key: str
    title: str
    budget_s: float  # on a GPU at the published sizes
    run: object  # (ctx, emit) -> None


ITEMS = [  # in the order they run: cheap ones first, so a slow item costs only what comes after it
    Item("g", "one-rank NCCL process group", 25, item_nccl),
    Item("c", "packed vs padded", 30, item_packed),
    Item("d", "evaluation throughput", 30, item_eval),
    Item("e", "gru_align step", 40, item_gru_align),
    Item("f-on", "llm_decoder 7B step, checkpointing on", 65, item_llm(True)),
    Item("f-off", "llm_decoder 7B step, checkpointing off", 55, item_llm(False)),
    Item("a", "published-size CTC step: fp32, bf16, bf16 + compile", 130, item_ctc_step),
    Item("b", "torch.compile recompilations", 75, item_recompiles),
]
ITEM_KEYS = [item.key for item in ITEMS]


def skipped(item: str, name: str, why: str) -> dict:
    return {"item": item, "name": name, "status": f"skipped: {why}", "ms": None, "peak_mb": None, "note": ""}


def emit_attempt(ctx: Context, emit, item: str, name: str, fn) -> None:
    """One row: fn() -> {ms, peak_mb, note, data, status?}; any failure becomes a FAILED row, and
    memory is freed after it either way. A spent budget is recorded and stops the item."""
    start, cpu = time.monotonic(), time.process_time()
    row = {"item": item, "name": name, "ms": None, "peak_mb": None, "note": ""}
    timeout = None
    try:
        row.update(fn())
        row.setdefault("status", "ok")
    except ItemTimeout as error:
        row["status"], timeout = "FAILED: over the item's time budget", error
    except torch.cuda.OutOfMemoryError as error:
        row["status"] = f"FAILED: CUDA out of memory ({first_line(error)[:160]})"
    except Exception as error:  # one failure never loses the table
        row["status"] = f"FAILED: {first_line(error)}"
        row["traceback"] = traceback.format_exc()[-3000:]
    row["seconds"], row["cpu_seconds"] = round(time.monotonic() - start, 1), round(time.process_time() - cpu, 1)
    emit(row)
    free_memory(ctx.device)
    if timeout is not None:
        timeout.recorded = True
        raise timeout


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise ItemTimeout in the main thread after `seconds` (Python code only: a C call returns first)."""
    def expire(signum, frame):
        raise ItemTimeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_item(item: Item, ctx: Context, emit) -> None:
    """Run one item in this process under its alarm; rows go to emit as they are made."""
    rows_before = []

    def counted(row):
        rows_before.append(row)
        emit(row)

    try:
        with alarm(ctx.time_left()):
            item.run(ctx, counted)
    except ItemTimeout as error:
        if not getattr(error, "recorded", False):  # spent between attempts
            counted({"item": item.key[0], "name": item.title, "status": "FAILED: over the item's time budget",
                     "ms": None, "peak_mb": None, "note": f"{len(rows_before)} rows done before"})
    except BaseException as error:  # an error outside the item's attempts (e.g. an import)
        if isinstance(error, KeyboardInterrupt):
            raise
        counted({"item": item.key[0], "name": item.title, "status": f"FAILED: {first_line(error)}", "ms": None,
                 "peak_mb": None, "note": "", "traceback": traceback.format_exc()[-3000:]})
    finally:
        with contextlib.suppress(Exception):
            free_memory(ctx.device)


def run_item_subprocess(item: Item, args, budget: float, log_file) -> list[dict]:
    """The item in its own process: rows come back on its stdout as they are made; a crash, hang or
    kill loses only the rows not yet made."""
    # an absolute deadline (the monotonic clock is the machine's): the child's imports count against its budget
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", item.key, "--deadline",
           f"{time.monotonic() + budget:.3f}", "--device", args.device, "--compile-backend", args.compile_backend]
    cmd += ["--tiny"] * args.tiny
    rows, lines = [], []

    def read(stream):
        for line in stream:
            line = line.rstrip("\n")
            if line.startswith(ROW_TAG):
                rows.append(json.loads(line[len(ROW_TAG):]))
            else:
                lines.append(line)
                if log_file:
                    log_file.write(f"[{item.key}] {line}\n")

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                          start_new_session=True) as child:
        reader = threading.Thread(target=read, args=(child.stdout,), daemon=True)
        reader.start()
        try:
            child.wait(timeout=budget + 15)  # the child's own alarm comes first; this is for a hang in C
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            reader.join(5)
            rows.append({"item": item.key[0], "name": item.title, "status": f"FAILED: killed after {budget + 15:.0f} s "
                         "(a hang outside Python?)", "ms": None, "peak_mb": None, "note": tail(lines)})
            return rows
        reader.join(10)
    if child.returncode != 0 and not any(r["status"].startswith("FAILED") for r in rows):
        rows.append({"item": item.key[0], "name": item.title, "status": f"FAILED: exit code {child.returncode}",
                     "ms": None, "peak_mb": None, "note": tail(lines)})
    return rows


def tail(lines: list[str]) -> str:
    useful = [line.strip() for line in lines if line.strip()]
    return useful[-1][:300] if useful else ""


# ----------------------------------------------------------------------------------------------
# Report


def machine(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "host_python":
            platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device)}
    if device.type == "cuda":
        try:  # a detail missing here must not cost the checks
            info["gpu"] = torch.cuda.get_device_name(device)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
            info["cudnn"] = torch.backends.cudnn.version()
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as error:
            info["gpu_info_error"] = first_line(error)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["transformers"] = importlib.metadata.version("transformers")  # without importing it
    return info


def order(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["item"])  # a..g; a stable sort keeps each item's rows in order


def table(rows: list[dict]) -> str:
    head = ["item", "check", "status", "ms/step (median)", "peak GPU MB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in order(rows):
        ms = f"{r['ms']:.1f}" if r.get("ms") is not None else "-"
        peak = f"{r['peak_mb']:,.0f}" if r.get("peak_mb") is not None else "-"
        cells = [r["item"], r["name"], r["status"], ms, peak, r.get("note", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def header(info: dict, argv: list[str]) -> str:
    return ("# b2t-bench gpu-check\n\n" + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None)
            + f"\n\ncommand: {' '.join(argv)}\n")


def write_out(out: str | None, info: dict, rows: list[dict], argv: list[str], seconds: float, done: bool) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = f"total {seconds:.0f} s" + ("" if done else " (still running: partial)")
    path.with_suffix(".md").write_text(header(info, argv) + "\n" + table(rows) + f"\n\n{state}\n")
    path.with_suffix(".json").write_text(json.dumps({"machine": info, "argv": argv, "seconds": seconds, "done": done,
                                                     "rows": order(rows)}, indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (with --tiny: the smoke test)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths, measures nothing real")
    ap.add_argument("--out", default=None, help="also write the table to OUT.md and OUT.json (after every item)")
    ap.add_argument("--items", nargs="+", default=None, help=f"a subset of {' '.join(ITEM_KEYS)} (f: both f items)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of item a (default: inductor on CUDA, eager on the CPU: no C compiler)")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all items together")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each item in its own process (default: on CUDA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one item, rows on stdout
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.monotonic() value
    args = ap.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device.startswith("cuda") else "eager"
    return args


def selected(keys: list[str] | None) -> list[Item]:
    if not keys:
        return list(ITEMS)
    unknown = [k for k in keys if not any(item.key == k or item.key.startswith(k + "-") for item in ITEMS)]
    if unknown:
        raise SystemExit(f"unknown items {unknown}: choose from {' '.join(ITEM_KEYS)}")
    return [item for item in ITEMS if any(item.key == k or item.key.startswith(k + "-") for k in keys)]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is false): nothing was checked. "
              "Run it on a GPU machine; `--device cpu --tiny` smoke-tests the script's code paths.")
        return 0
    sizes = TINY if args.tiny else PUBLISHED
    start = time.monotonic()

    if args.child:  # one item in this process, rows on stdout
        item = next(i for i in ITEMS if i.key == args.child)
        ctx = Context(device, sizes, args.tiny, args.compile_backend, args.deadline - 2)
        run_item(item, ctx, lambda row: print(ROW_TAG + json.dumps(row, default=str), flush=True))
        return 0

    isolate = args.isolate if args.isolate is not None else device.type == "cuda"
    info = machine(device)
    argv_used = [Path(sys.executable).name, *sys.argv] if argv is None else ["gpu_check.py", *argv]
    print(header(info, argv_used), flush=True)
    rows: list[dict] = []
    deadline = start + args.total_budget
    log_path = Path(args.out).with_suffix(".log") if args.out and isolate else None  # the items' own output
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with (open(log_path, "w") if log_path else contextlib.nullcontext()) as log_file:
        for item in selected(args.items):
            left = deadline - time.monotonic()
            budget = min(item.budget_s, left)
            if budget < 15:
                rows.append(skipped(item.key[0], item.title, f"the {args.total_budget:.0f} s total ran out"))
                continue
            print(f"== {item.key}: {item.title} (budget {budget:.0f} s)", flush=True)
            if isolate:
                new = run_item_subprocess(item, args, budget, log_file)
            else:
                new = []
                ctx = Context(device, sizes, args.tiny, args.compile_backend, time.monotonic() + budget)
                run_item(item, ctx, new.append)
            for row in new:
                print(f"   {row['name']}: {row['status']}" + (f", {row['ms']:.1f} ms/step" if row.get("ms") else ""),
                      flush=True)
            rows += new
            write_out(args.out, info, rows, argv_used, time.monotonic() - start, done=False)
    seconds = time.monotonic() - start
    print("\n" + table(rows) + f"\n\ntotal {seconds:.0f} s")
    write_out(args.out, info, rows, argv_used, seconds, done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
