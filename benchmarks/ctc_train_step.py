#!/usr/bin/env python
"""Training-step throughput of the CTC baseline: this implementation against the reference approach.

Both sides train the same model (same state dict), on the same batches (the trial indices of
TrainBatchSampler), with the same preprocessors (the harness's augment + gaussian_smoothing), the same
loss (CTC, mean over trials), the same optimizer (the harness's AdamW groups, fused as the reference
trainer's) and the same clipping.
What differs is only this:

  reference   the reference GRUDecoder re-implemented below, op for op: per-trial stacked day weights
              + einsum, unfold patching, GRU over every padded step from h0; and its data path: for
              every batch, open each session's HDF5 file, read the batch's trials, pad them.
  ref+preload the same reference model on this project's data path (ablation: isolates the data path)
  ours        ctc_baseline.CTCBaseline (grouped day layers), pack_sequences false, with the harness
              data path (FeatureStore preloaded once, TrialDataset + collate)
  ours+pack   the same with pack_sequences true: nothing is computed for padding (day layer on the
              bins valid patches read, valid patches only, GRU over valid steps: on CPU through
              gru_decoder.packed_gru, on CUDA through nn.GRU on a PackedSequence)
  ours+atenpack
              ablation, CPU only: a packed path without packed_gru: day layer and
              patching over the padded batch, then nn.GRU on a PackedSequence (ATen's packed CPU GRU;
              on CUDA that is what ours+pack does for the GRU, so leave it out there)

Both data paths run inside the training process (the harness default num_workers 0). The reference
trainer reads in DataLoader workers, which hide its HDF5 time only where there are spare cores; on a
2-core machine they compete with torch's two threads.

Timing comes from one process, the variants interleaved step by step (their order rotates every step)
after warm-up steps; every variant of a step starts from the same RNG seed, so augmentation noise and
random cut are the same. Peak memory comes from one subprocess per variant (this script re-invoked with
--variant): the peak RSS of the whole process (VmHWM: setup, preloaded data, model, optimizer, steps),
the peak RSS increase over the training steps alone (VmHWM reset just before the timed steps, minus the
RSS then), and on CUDA torch.cuda.max_memory_allocated. The subprocesses run with a fixed glibc mmap
threshold (MALLOC_MMAP_THRESHOLD_=131072) so that RSS follows the live tensors reproducibly.

Before timing, a "same math" check: one batch, eval mode, no augmentation: both data paths give the
same tensors; the reference model and ours (pack off and on) give the same logits on every valid
frame (atol 1e-4), the same loss and the same gradients (every "ours" variant is checked).

    .venv/bin/python benchmarks/ctc_train_step.py                      # both sizes, CPU (~7 min on 2 cores)
    .venv/bin/python benchmarks/ctc_train_step.py --size default tiny --steps 30   # tiny: configs/ctc_baseline/tiny.yml
    .venv/bin/python benchmarks/ctc_train_step.py --device cuda --amp --compile \
        --variants reference ref+preload ours ours+pack                          # GPU: bf16 + compile, both sides
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import ctc_baseline  # noqa: E402,F401  (registers the model)
import harness.preprocessors  # noqa: E402,F401  (registers the preprocessors its configs name)
from config import load_config  # noqa: E402
from ctc_baseline import CTCBaseline, CTCBaselineParams  # noqa: E402
from gru_decoder.encoder import output_lengths, patchify  # noqa: E402
from harness.batching import Batch, TrainBatchSampler, TrialDataset, collate  # noqa: E402
from harness.data import FeatureStore, data_width, find_sessions, read_trials  # noqa: E402
from harness.evaluation import apply_preprocessors, autocast  # noqa: E402
from harness.phonemes import BLANK_ID  # noqa: E402
from harness.runner import build_preprocessors  # noqa: E402
from harness.train import build_optimizer  # noqa: E402

MEMORY_TAG = "BENCH_MEMORY "


# ----------------------------------------------------------------------------------------------
# Sizes


@dataclass
class Size:
    name: str
    config: str  # the project config the model, batch and preprocessors come from
    n_days: int | None = None  # day layers to build; None: one per data session (the config setter's rule)
    steps: int = 20  # timed steps per variant (interleaved)
    warmup: int = 2
    memory_steps: int = 3  # steps each memory subprocess runs (after one warm-up step)
    model_overrides: dict = field(default_factory=dict)
    data_overrides: dict = field(default_factory=dict)


SIZES = {
    # configs/ctc_baseline/ctc_baseline.yml: 256 units, 2 layers, batch 32, 4 days per batch
    "default": Size("default", "configs/ctc_baseline/ctc_baseline.yml", steps=30, warmup=2),
    # configs/ctc_baseline/b2txt25.yml: 768 units, 5 layers, batch 64, 45 day layers (the data's days map into them)
    "published": Size("published", "configs/ctc_baseline/b2txt25.yml", n_days=45, steps=6, warmup=1, memory_steps=2),
    # configs/ctc_baseline/tiny.yml (the tests' config): 64 units, 1 layer, batch 16; not in the default run
    "tiny": Size("tiny", "configs/ctc_baseline/tiny.yml", steps=40, warmup=2),
    # for the smoke test only
    "toy": Size("toy", "configs/ctc_baseline/tiny.yml", steps=2, warmup=1, memory_steps=1,
                model_overrides={"n_units": 16}, data_overrides={"batch_size": 8}),
}

VARIANTS = {
    "reference": "reference approach (stacked day weights, padded GRU, HDF5 reopened per batch)",
    "ref+preload": "reference model on the harness data path (ablation)",
    "ours": "this implementation, pack_sequences false",
    "ours+pack": "this implementation, pack_sequences true (nothing computed for padding; packed_gru on CPU)",
    "ours+atenpack": "ablation (CPU): the packed path before packed_gru (padded day layer, ATen's packed GRU)",
}
DEFAULT_VARIANTS = list(VARIANTS)


# ----------------------------------------------------------------------------------------------
# The reference approach: model


class ReferenceGRUDecoder(nn.Module):
    """The reference GRUDecoder (docs/reference.md, section 3), forward op for op. Parameters are
    registered in the reference's order, so the state dict has its key names (those of CTCBaseline too)."""

    def __init__(self, neural_dim, n_units, n_days, n_classes, rnn_dropout, input_dropout, n_layers,
                 patch_size, patch_stride):
        super().__init__()
        self.neural_dim, self.n_units, self.n_layers = neural_dim, n_units, n_layers
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.day_layer_activation = nn.Softsign()
        self.day_weights = nn.ParameterList([nn.Parameter(torch.eye(neural_dim)) for _ in range(n_days)])
        self.day_biases = nn.ParameterList([nn.Parameter(torch.zeros(1, neural_dim)) for _ in range(n_days)])
        self.day_layer_dropout = nn.Dropout(input_dropout)
        self.input_dropout = input_dropout
        self.input_size = neural_dim * patch_size if patch_size > 0 else neural_dim
        self.gru = nn.GRU(self.input_size, n_units, n_layers, dropout=rnn_dropout, batch_first=True,
                          bidirectional=False)
        for name, param in self.gru.named_parameters():
            if "weight_hh" in name:
                nn.init.orthogonal_(param)
            if "weight_ih" in name:
                nn.init.xavier_uniform_(param)
        self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, n_units)))
        self.out = nn.Linear(n_units, n_classes)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x, day_idx, states=None):
        day_weights = torch.stack([self.day_weights[i] for i in day_idx], dim=0)
        day_biases = torch.cat([self.day_biases[i] for i in day_idx], dim=0).unsqueeze(1)
        x = torch.einsum("btd,bdk->btk", x, day_weights) + day_biases
        x = self.day_layer_activation(x)
        if self.input_dropout > 0:
            x = self.day_layer_dropout(x)
        if self.patch_size > 0:
            x = x.unsqueeze(1)  # (B, 1, T, C)
            x = x.permute(0, 3, 1, 2)  # (B, C, 1, T)
            x_unfold = x.unfold(3, self.patch_size, self.patch_stride)  # (B, C, 1, P, size)
            x_unfold = x_unfold.squeeze(2)  # (B, C, P, size)
            x_unfold = x_unfold.permute(0, 2, 3, 1)  # (B, P, size, C)
            x = x_unfold.reshape(x.size(0), x_unfold.size(1), -1)
        if states is None:
            states = self.h0.expand(self.n_layers, x.shape[0], self.n_units).contiguous()
        output, _ = self.gru(x, states)
        return self.out(output)

    @staticmethod
    def param_group(name: str) -> str:
        """The reference trainer's create_optimizer groups (same rule as CTCBaseline.param_group)."""
        if "gru.bias" in name or "out.bias" in name:
            return "bias"
        if "day_" in name:
            return "day"
        return "other"


def reference_loss(model: ReferenceGRUDecoder, batch: Batch) -> torch.Tensor:
    """The reference trainer's loss: CTC on log_softmax, input lengths int((T - size)/stride + 1),
    targets the stored zero-padded seq_class_ids, per-trial losses averaged."""
    adjusted_lens = ((batch.lengths - model.patch_size) / model.patch_stride + 1).to(torch.int32)
    logits = model(batch.features, batch.day_indices)
    per_trial = F.ctc_loss(logits.float().log_softmax(2).permute(1, 0, 2), batch.phoneme_ids, adjusted_lens,
                           batch.phoneme_lengths, blank=BLANK_ID, reduction="none", zero_infinity=False)
    return per_trial.mean()


# ----------------------------------------------------------------------------------------------
# The reference approach: data path


class ReferenceBatchReader:
    """The reference dataset's __getitem__: for every batch, open each session's file, read the
    batch's trials (features, labels, transcription, attributes), pad, stack."""

    def __init__(self, trials):
        self.trials = trials

    def __call__(self, indices: list[int]) -> Batch:
        by_day: dict[int, list[int]] = {}  # the reference's batch index: day -> trials, in draw order
        for i in indices:
            by_day.setdefault(self.trials[i].day, []).append(i)
        features, labels, transcriptions, n_steps, seq_lens, days, blocks, trial_nums = ([] for _ in range(8))
        for day, rows in by_day.items():
            with h5py.File(self.trials[rows[0]].path, "r") as f:
                for i in rows:
                    g = f[self.trials[i].group]
                    features.append(torch.from_numpy(g["input_features"][:]))
                    labels.append(torch.from_numpy(g["seq_class_ids"][:]))
                    transcriptions.append(torch.from_numpy(g["transcription"][:]))
                    n_steps.append(g.attrs["n_time_steps"])
                    seq_lens.append(g.attrs["seq_len"])
                    days.append(int(day))
                    blocks.append(g.attrs["block_num"])
                    trial_nums.append(g.attrs["trial_num"])
        n = len(features)
        torch.stack(transcriptions), torch.tensor(blocks), torch.tensor(trial_nums)  # read and built, as the reference
        return Batch(features=nn.utils.rnn.pad_sequence(features, batch_first=True, padding_value=0),
                     lengths=torch.tensor(np.asarray(n_steps, dtype=np.int64)),
                     day_indices=torch.tensor(days),
                     phoneme_ids=nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=0),
                     phoneme_lengths=torch.tensor(np.asarray(seq_lens, dtype=np.int64)),
                     sentences=[None] * n, trials=[None] * n)


class HarnessBatchReader:
    """This project's data path: features preloaded once (FeatureStore), then TrialDataset + collate,
    what the training loop's DataLoader does per batch with num_workers 0."""

    def __init__(self, trials, store: FeatureStore):
        self.dataset = TrialDataset(trials, store)

    def __call__(self, indices: list[int]) -> Batch:
        return collate([self.dataset[i] for i in indices])


# ----------------------------------------------------------------------------------------------
# Ablation ours+atenpack: the encoder's packed path before packed_gru (what the new path buys on CPU)


class ATenPackedBaseline(CTCBaseline):
    """CTCBaseline whose pack_sequences path hands a PackedSequence to nn.GRU on CPU too: ATen's packed
    GRU, whose backward builds a zero-filled gradient of the whole packed sequence for every time step
    (what the encoder did on CPU before packed_gru). Same parameters and math; encode as GRUEncoder's."""

    def encode(self, features, lengths, day_indices):
        x = self.day_layer_dropout(self.day_layer_activation(self.day_layer(features, day_indices)))
        x = patchify(x, self.patch_size, self.patch_stride)
        out_lengths = self.output_lengths(lengths)
        h0 = self.h0.expand(self.n_layers, x.shape[0], self.n_units).contiguous()
        packed = pack_padded_sequence(x, out_lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed, h0)[0], batch_first=True, total_length=x.shape[1])
        return h, out_lengths


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Setup:
    size: Size
    config: object
    params: CTCBaselineParams  # pack_sequences left to the variant
    trials: list
    sampler: TrainBatchSampler
    preprocessors: list
    state: dict  # the one state dict every variant starts from
    device: torch.device
    amp: bool
    compile: bool
    store: FeatureStore | None = None

    @property
    def batch_size(self) -> int:
        return self.config.data_params.batch_size


def day_index(data_sessions: list[str], config_sessions: list[str] | None, n_days: int) -> dict[str, int]:
    """Day layer of each data session: the config's session with the same date when there is one
    (synth.2023.08.13 -> t15.2023.08.13), else its position."""
    by_date = {s.split(".", 1)[-1]: i for i, s in enumerate(config_sessions or [])}
    index = {s: by_date.get(s.split(".", 1)[-1], i) for i, s in enumerate(data_sessions)}
    if max(index.values()) >= n_days:
        raise ValueError(f"{len(data_sessions)} data sessions do not fit into {n_days} day layers")
    return index


def make_setup(size: Size, data_dir: str | Path, device: str = "cpu", amp: bool = False, compile: bool = False,
               preload: bool = True, seed: int = 10) -> Setup:
    config = load_config(ROOT / size.config)
    dp = config.data_params
    for key, value in size.data_overrides.items():
        setattr(dp, key, value)
    data_sessions = find_sessions(data_dir)
    n_days = size.n_days or len(data_sessions)
    index = day_index(data_sessions, dp.sessions, n_days)
    trials = [t for t in read_trials(data_dir, data_sessions, "train", dp.n_features, index)
              if t.n_time_steps >= config.model_params.patch_size]
    width = data_width({"train": trials}, dp.n_features)  # the config's, else the data's (as a run does)
    params = replace(config.model_params, n_days=n_days, n_features=width, **size.model_overrides)
    torch.manual_seed(seed)
    model = CTCBaseline(params)
    with torch.no_grad():  # move the day layers off identity/zero so the same-math check exercises them
        for w, b in zip(model.day_weights, model.day_biases):
            w.add_(0.01 * torch.randn_like(w))
            b.add_(0.01 * torch.randn_like(b))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    sampler = TrainBatchSampler(trials, dp.batch_size, dp.days_per_batch, dp.seed, num_steps=1 << 30)
    return Setup(size=size, config=config, params=params, trials=trials, sampler=sampler,
                 preprocessors=build_preprocessors(config), state=state, device=torch.device(device), amp=amp,
                 compile=compile, store=FeatureStore(trials, "memory") if preload else None)


@dataclass
class Variant:
    name: str
    model: nn.Module
    read: object  # indices -> Batch (on the CPU)
    loss: object  # (model, batch) -> scalar loss
    optimizer: torch.optim.Optimizer
    scheduler: object


def build_model(setup: Setup, name: str) -> nn.Module:
    p = setup.params
    if name in ("reference", "ref+preload"):
        model = ReferenceGRUDecoder(p.n_features, p.n_units, p.n_days, p.n_classes, p.rnn_dropout, p.input_dropout,
                                    p.n_layers, p.patch_size, p.patch_stride)
    elif name == "ours+atenpack":
        model = ATenPackedBaseline(replace(p, pack_sequences=True))
    else:
        model = CTCBaseline(replace(p, pack_sequences=name == "ours+pack"))
    model.load_state_dict(setup.state)  # strict: the key names are the reference's on both sides
    return model.to(setup.device)


def build_variant(setup: Setup, name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")
    model = build_model(setup, name)
    if name == "reference":
        read = ReferenceBatchReader(setup.trials)
    else:
        if setup.store is None:
            setup.store = FeatureStore(setup.trials, "memory")
        read = HarnessBatchReader(setup.trials, setup.store)
    loss = reference_loss if name.startswith("ref") else (lambda m, batch: m.loss(batch)["loss"])
    tp = setup.config.training_params
    optimizer, scheduler = build_optimizer(model, tp)
    if setup.compile:
        model.compile()  # in place, as the harness (the reference compiles the module too)
    model.train()
    return Variant(name, model, read, loss, optimizer, scheduler)


# ----------------------------------------------------------------------------------------------
# One training step, timed by phase


PHASES = ("data", "preprocess", "forward", "backward", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(setup: Setup, v: Variant, indices: list[int], seed: int) -> dict[str, float]:
    """One step, as the training loops do it; returns seconds per phase and in total."""
    device, clock = setup.device, time.perf_counter
    torch.manual_seed(seed)  # same augmentation draws and dropout seed for every variant of a step
    _sync(device)
    t0 = clock()
    batch = v.read(indices).to(device)
    _sync(device)
    t1 = clock()
    batch = apply_preprocessors(batch, setup.preprocessors, training=True)
    _sync(device)
    t2 = clock()
    with autocast(device, setup.amp):
        loss = v.loss(v.model, batch)
    _sync(device)
    t3 = clock()
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _sync(device)
    t4 = clock()
    clip = setup.config.training_params.grad_norm_clip
    params = [p for p in v.model.parameters() if p.grad is not None]
    if clip:
        float(torch.nn.utils.clip_grad_norm_(params, clip))
    v.optimizer.step()
    v.scheduler.step()
    value = float(loss.detach())  # both trainers read the loss every step (a sync on CUDA)
    _sync(device)
    t5 = clock()
    if not np.isfinite(value):
        raise RuntimeError(f"{v.name}: non-finite loss {value}")
    return {"data": t1 - t0, "preprocess": t2 - t1, "forward": t3 - t2, "backward": t4 - t3, "optimizer": t5 - t4,
            "total": t5 - t0, "loss": value}


# ----------------------------------------------------------------------------------------------
# Same math


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def same_math_check(setup: Setup, names=("ours", "ours+pack"), atol: float = 1e-4, grad_rtol: float = 1e-3,
                    step: int = 0) -> dict:
    """One batch, eval mode (no dropout), fp32, no augmentation (smoothing only): the two data paths
    give the same tensors; on them the reference model and each variant give the same logits on every
    valid frame (atol), the same loss, and the same gradient for every parameter (max difference
    relative to the parameter's largest reference gradient <= grad_rtol)."""
    indices = setup.sampler.batch_for_step(step)
    ref_batch = ReferenceBatchReader(setup.trials)(indices)
    store = setup.store or FeatureStore(setup.trials, "memory")
    our_batch = HarnessBatchReader(setup.trials, store)(indices)
    n = our_batch.phoneme_lengths
    same_data = (torch.equal(ref_batch.features, our_batch.features)
                 and torch.equal(ref_batch.lengths, our_batch.lengths)
                 and torch.equal(ref_batch.day_indices, our_batch.day_indices)
                 and torch.equal(ref_batch.phoneme_lengths, n)
                 and torch.equal(ref_batch.phoneme_ids[:, : n.max()].long(), our_batch.phoneme_ids))
    batch = apply_preprocessors(our_batch.to(setup.device), setup.preprocessors, training=False)
    ref_in = apply_preprocessors(ref_batch.to(setup.device), setup.preprocessors, training=False)
    reference = build_model(setup, "reference").eval()
    with torch.no_grad():
        ref_logits = reference(batch.features, batch.day_indices)
    ref_loss, ref_grads = _loss_and_grads(reference, reference_loss, ref_in)
    del reference
    result = {"batch_size": len(indices), "max_len": int(batch.features.shape[1]), "same_data": same_data}
    ok = same_data
    for name in [n for n in names if not n.startswith("ref")]:
        model = build_model(setup, name).eval()
        with torch.no_grad():
            logits, lengths = model(batch.features, batch.lengths, batch.day_indices)
        diff = max(float((logits[i, :k] - ref_logits[i, :k]).abs().max()) for i, k in enumerate(lengths.tolist()) if k)
        loss, grads = _loss_and_grads(model, lambda m, b: m.loss(b)["loss"], batch)
        same_keys = set(grads) == set(ref_grads)
        grad_err = max(float((grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-12))
                       for k, g in ref_grads.items() if k in grads)
        result[name] = {"max_abs_logit_diff": diff, "loss": loss, "ref_loss": ref_loss, "max_rel_grad_diff": grad_err,
                        "same_grad_keys": same_keys}
        ok = (ok and diff <= atol and abs(loss - ref_loss) <= atol * max(1.0, abs(ref_loss)) and same_keys
              and grad_err <= grad_rtol)
        del model
    result["ok"] = bool(ok)
    return result


# ----------------------------------------------------------------------------------------------
# Interleaved timing (one process)


def valid_shares(setup: Setup, steps: int, warmup: int) -> dict:
    """Share of the padded batch that valid outputs read, over the timed steps' batches (before the random
    cut): GRU frames (valid patches / batch x longest) and input bins (bins inside valid patches / batch x
    longest). Skipping padding can at best shrink the encoder's work to these shares."""
    frames, bins = [], []
    for r in range(warmup, warmup + steps):
        lengths = torch.tensor([setup.trials[i].n_time_steps for i in setup.sampler.batch_for_step(r)])
        n_out = output_lengths(lengths, setup.params.patch_size, setup.params.patch_stride)
        n_bins = torch.where(n_out > 0, (n_out - 1) * setup.params.patch_stride + setup.params.patch_size, 0)
        frames.append(float(n_out.sum() / (len(lengths) * n_out.max())))
        bins.append(float(n_bins.sum() / (len(lengths) * lengths.max())))
    return {"gru_frames": statistics.mean(frames), "input_bins": statistics.mean(bins)}


def time_interleaved(setup: Setup, names: list[str], steps: int, warmup: int, seed: int = 1000,
                     log=print) -> dict:
    variants = [build_variant(setup, name) for name in names]
    records: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(warmup + steps):
        indices = setup.sampler.batch_for_step(r)
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate the order: no variant always runs first
            record = train_step(setup, v, indices, seed + r)
            if r >= warmup:
                records[v.name].append(record)
        if log is not None:
            tag = "warm-up" if r < warmup else "timed"
            log(f"  [{setup.size.name}] step {r + 1}/{warmup + steps} ({tag}): "
                + ", ".join(f"{v.name} {1000 * records[v.name][-1]['total']:.0f} ms" if r >= warmup else v.name
                            for v in variants))
    return summarize(setup, records)


def summarize(setup: Setup, records: dict[str, list[dict]]) -> dict:
    out = {}
    ref = records.get("reference")
    for name, recs in records.items():
        totals = [r["total"] for r in recs]
        median = statistics.median(totals)
        row = {"median_s": median, "trials_per_s": setup.batch_size / median,
               "phases_ms": {p: 1000 * statistics.median(r[p] for r in recs) for p in PHASES},
               "min_s": min(totals), "max_s": max(totals), "n": len(totals)}
        if ref:
            row["ratio"] = statistics.median(r["total"] for r in ref) / median
            row["ratio_paired"] = statistics.median(a["total"] / b["total"] for a, b in zip(ref, recs))
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------------
# Peak memory (one subprocess per variant)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_memory_here(setup: Setup, name: str, steps: int, warmup: int = 1, seed: int = 1000) -> dict:
    """Run one variant alone in this process and report its memory (called in the subprocess)."""
    v = build_variant(setup, name)
    setup.state = None  # the master copy of the weights is setup, not training
    for r in range(warmup):
        train_step(setup, v, setup.sampler.batch_for_step(r), seed + r)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork + exec into
    # ru_maxrss, so a subprocess of a big parent would report the parent's peak.
    setup_peak, before = _status_kb("VmHWM"), _status_kb("VmRSS")
    reset = _reset_peak_rss()
    for r in range(warmup, warmup + steps):
        train_step(setup, v, setup.sampler.batch_for_step(r), seed + r)
    steps_peak = _status_kb("VmHWM")
    result = {"variant": name, "peak_rss_mb": max(setup_peak, steps_peak) / 1024, "rss_before_steps_mb": before / 1024}
    if reset:
        result["step_peak_rss_mb"] = (steps_peak - before) / 1024
    if setup.device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_memory_subprocess(args, size: str, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--size", size,
           "--data-dir", str(args.data_dir), "--device", args.device, "--threads", str(torch.get_num_threads())]
    cmd += ["--amp"] * args.amp + ["--compile"] * args.compile
    if args.memory_steps is not None:
        cmd += ["--memory-steps", str(args.memory_steps)]
    # A fixed glibc mmap threshold: every large tensor is mmapped and returned on free, so RSS follows
    # the live bytes. glibc's default threshold adapts to the allocation history, which made the
    # step peak of one variant vary by +-40% between identical runs.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    raise RuntimeError(f"memory subprocess for {size}/{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# ----------------------------------------------------------------------------------------------
# Report


def machine_info(device: torch.device) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "h5py": h5py.__version__,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(results: dict, device: torch.device) -> str:
    mem = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    head = ["size", "variant", "ms/step (median)", "trials/s", "vs reference", "vs ref (paired)", mem, "step peak MB"]
    rows = []
    for size, res in results.items():
        for name, row in res["timing"].items():
            m = res.get("memory", {}).get(name, {})
            peak = m.get("cuda_peak_mb" if device.type == "cuda" else "peak_rss_mb")
            step_peak = m.get("cuda_peak_mb") if device.type == "cuda" else m.get("step_peak_rss_mb")
            rows.append([size, name, f"{1000 * row['median_s']:.0f}", f"{row['trials_per_s']:.1f}",
                         f"{row['ratio']:.2f}x" if "ratio" in row else "-",
                         f"{row['ratio_paired']:.2f}x" if "ratio_paired" in row else "-",
                         f"{peak:.0f}" if peak is not None else "-",
                         f"{step_peak:.0f}" if step_peak is not None else "-"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def phase_table(results: dict) -> str:
    head = ["size", "variant"] + [f"{p} ms" for p in PHASES]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for size, res in results.items():
        for name, row in res["timing"].items():
            lines.append("| " + " | ".join([size, name] + [f"{row['phases_ms'][p]:.0f}" for p in PHASES]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", choices=list(SIZES), default=["default", "published"])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: per size, 30 / 6)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: per size, 2 / 1)")
    ap.add_argument("--memory-steps", type=int, default=None, help="steps of each memory subprocess")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only), both sides")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data-dir", default=str(ROOT / "data" / "synthetic"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one memory subprocess
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not Path(args.data_dir).is_dir():
        print(f"no data in {args.data_dir}: make it with `.venv/bin/python main.py synth --out data/synthetic`")
        return 2

    if args.variant is not None:  # the memory subprocess: one size, one variant
        size = SIZES[args.size[0]]
        setup = make_setup(size, args.data_dir, args.device, args.amp, args.compile,
                           preload=args.variant != "reference")
        steps = args.memory_steps if args.memory_steps is not None else size.memory_steps
        print(MEMORY_TAG + json.dumps(measure_memory_here(setup, args.variant, steps)), flush=True)
        return 0

    info = machine_info(device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results = {}
    for name in args.size:
        size = SIZES[name]
        steps = args.steps if args.steps is not None else size.steps
        warmup = args.warmup if args.warmup is not None else size.warmup
        started = time.monotonic()
        setup = make_setup(size, args.data_dir, args.device, args.amp, args.compile)
        n_params = sum(v.numel() for v in setup.state.values())
        print(f"\n== size {name}: {size.config}, n_units {setup.params.n_units}, n_layers {setup.params.n_layers}, "
              f"n_days {setup.params.n_days}, batch {setup.batch_size}, {n_params:,} parameters, "
              f"{len(setup.trials)} train trials", flush=True)
        shares = valid_shares(setup, steps, warmup)
        print(f"valid share of the padded batches: {shares['gru_frames']:.1%} of GRU frames, "
              f"{shares['input_bins']:.1%} of input bins", flush=True)
        check = same_math_check(setup, ["ours", "ours+pack"] + [v for v in args.variants if v == "ours+atenpack"])
        print(f"same math: {'PASS' if check['ok'] else 'FAIL'} (same batch tensors: {check['same_data']}; "
              + "; ".join(f"{k}: max |logit diff| {c['max_abs_logit_diff']:.1e}, loss {c['loss']:.5f} vs "
                          f"{c['ref_loss']:.5f}, max rel. grad diff {c['max_rel_grad_diff']:.1e}"
                          for k, c in check.items() if isinstance(c, dict))
              + ")", flush=True)
        if not check["ok"]:
            print("the implementations disagree: timings would compare different math; stopping")
            return 1
        timing = time_interleaved(setup, args.variants, steps, warmup)
        del setup
        memory = {}
        if not args.no_memory:
            for variant in args.variants:
                memory[variant] = measure_memory_subprocess(args, name, variant)
                print(f"  [{name}] memory {variant}: " + ", ".join(f"{k} {v:.0f}" for k, v in memory[variant].items()
                                                                   if isinstance(v, float)), flush=True)
        results[name] = {"same_math": check, "valid_shares": shares, "timing": timing, "memory": memory,
                         "steps": steps, "warmup": warmup,
                         "seconds": time.monotonic() - started}

    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("\n" + table(results, device))
    print("\nmedian ms per phase:\n" + phase_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "argv": sys.argv, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
