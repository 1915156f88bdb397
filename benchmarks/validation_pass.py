#!/usr/bin/env python
"""Validation time per trial: the two-forward path against the model's one-forward `evaluate`.

Validation needs the loss and the decoded rows of every batch. The base class's
`DecoderModel.evaluate` gets them from `loss(batch)` then `decode(batch)`: two encoder passes. Every
shipped model overrides it with one pass shared by both. This script times the two side by side on
the same model and the same batches, in one process, interleaved (the order alternates every
repeat), in eval mode under no_grad as evaluate_split runs them:

  two-forward  DecoderModel.evaluate(model, batch, with_loss=True, decode_words=False)
  one-forward  model.evaluate(batch, with_loss=True, decode_words=False)

decode_words=False is validation as the published recipe runs it (training_params.val_decode_words
false: greedy phonemes, no word search), so the numbers are the forward passes and the loss, not
a beam search. Before timing, both paths must give identical rows and losses within 1e-6.

Models (random weights; only the compute matters):

  ctc_baseline  the published size (configs/ctc_baseline/b2txt25.yml: 5x768 GRU, 45 day layers,
                pack_sequences true), batches of 64 trials
  gru_align     configs/gru_align/tiny.yml (1x64) or gru_align.yml (2x256) sizes with the CTC head,
                retrieval over a candidate set of the batches' sentences; the TTS targets replaced
                by fixed random frames (80 channels, as the log-mel targets), so no TTS runs

The batches are synthetic: 512 features, trial lengths drawn around --mean-bins (the real data's
median trial is about 140 bins after nothing is cut), days spread over the day layers, phoneme
labels short enough for CTC. The preprocessors (identical on both paths) are left out.

    .venv/bin/python benchmarks/validation_pass.py                       # CPU, ~2 min on 2 cores
    .venv/bin/python benchmarks/validation_pass.py --models gru_align --gru-size default --repeats 5
    .venv/bin/python benchmarks/validation_pass.py --device cuda --batches 8 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from alignment.losses import LossWeights  # noqa: E402
from audio_alignment.model import GRUAlign, GRUAlignParams  # noqa: E402
from config import EvaluationParams  # noqa: E402
from ctc_baseline import CTCBaseline, CTCBaselineParams  # noqa: E402
from harness.batching import Batch  # noqa: E402
from harness.data import Trial  # noqa: E402
from harness.model_api import DecoderModel  # noqa: E402

N_FEATURES = 512
TARGET_DIM = 80  # the log-mel targets' channels


class FixedTargets:
    """A stand-in TargetStore: random frames per sentence, made once (no TTS, no audio encoder)."""

    name, dim = "fixed_random", TARGET_DIM

    def __init__(self, seed: int = 0):
        self.frames, self.generator = {}, torch.Generator().manual_seed(seed)

    def get(self, sentences):
        for s in sentences:
            if s not in self.frames:
                n = int(torch.randint(20, 60, (1,), generator=self.generator))
                self.frames[s] = torch.randn(n, TARGET_DIM, generator=self.generator).half()
        return {s: self.frames[s] for s in sentences}


def make_batches(n_batches: int, batch_size: int, n_days: int, mean_bins: int, patch: tuple[int, int], seed: int):
    """Padded synthetic batches with labels (each within what CTC can align) and sentences."""
    g = torch.Generator().manual_seed(seed)
    size, stride = patch
    batches = []
    for b in range(n_batches):
        lengths = torch.randint(int(mean_bins * 0.6), int(mean_bins * 1.4) + 1, (batch_size,), generator=g)
        features = torch.randn(batch_size, int(lengths.max()), N_FEATURES, generator=g)
        features *= (torch.arange(features.shape[1])[None, :] < lengths[:, None]).unsqueeze(2)
        frames = (lengths - size) // stride + 1
        n_phonemes = torch.clamp(frames // 2, min=1)  # room for repeats and blanks
        labels = [torch.randint(1, 41, (int(n),), generator=g) for n in n_phonemes]
        sentences = [f"sentence {b} {i}" for i in range(batch_size)]
        trials = [Trial(split="val", session="s", day=0, path="", group=f"trial_{i:04d}", block_num=1, trial_num=i,
                        n_time_steps=int(n), phoneme_ids=labels[i].tolist(), sentence=sentences[i])
                  for i, n in enumerate(lengths.tolist())]
        batches.append(Batch(features=features, lengths=lengths,
                             day_indices=torch.randint(0, n_days, (batch_size,), generator=g),
                             phoneme_ids=torch.nn.utils.rnn.pad_sequence(labels, batch_first=True),
                             phoneme_lengths=n_phonemes.to(torch.int64), sentences=sentences, trials=trials))
    return batches


def ctc_model(args):
    torch.manual_seed(0)
    p = CTCBaselineParams(n_days=45, n_features=N_FEATURES, n_units=768, n_layers=5, patch_size=14, patch_stride=4,
                          pack_sequences=True)
    return CTCBaseline(p), make_batches(args.batches, 64, 45, args.mean_bins, (14, 4), seed=1)


def gru_align_model(args):
    units, layers, rnn_dropout = {"tiny": (64, 1, 0.0), "default": (256, 2, 0.4)}[args.gru_size]  # as the configs
    torch.manual_seed(0)
    p = GRUAlignParams(n_days=8, n_features=N_FEATURES, n_units=units, n_layers=layers, patch_size=14, patch_stride=4,
                       rnn_dropout=rnn_dropout, pack_sequences=False,
                       loss_weights=LossWeights(cosine=1.0, infonce=1.0, ctc=1.0))
    model = GRUAlign(p, FixedTargets(), EvaluationParams())
    return model, make_batches(args.batches, 64, 8, args.mean_bins, (14, 4), seed=2)


MODELS = {"ctc_baseline": ("published size, 5x768, 45 days", ctc_model),
          "gru_align": ("{gru_size} size", gru_align_model)}


def paths(model):
    return {"two-forward": lambda b: DecoderModel.evaluate(model, b, with_loss=True, decode_words=False),
            "one-forward": lambda b: model.evaluate(b, with_loss=True, decode_words=False)}


def check_same(model, batches, device):
    run = paths(model)
    for batch in batches:
        (parts_two, rows_two), (parts_one, rows_one) = run["two-forward"](batch), run["one-forward"](batch)
        if rows_two != rows_one or set(parts_two) != set(parts_one):
            raise SystemExit("the two paths give different rows or loss parts")
        for key in parts_two:
            a, b = float(parts_two[key]), float(parts_one[key])
            if abs(a - b) > 1e-6 * max(1.0, abs(a)):
                raise SystemExit(f"the two paths give different loss '{key}': {a} vs {b}")


def time_paths(model, batches, repeats: int, device) -> dict[str, float]:
    """Median over repeats of the seconds per trial of one pass over the batches, per path."""
    run, trials = paths(model), sum(len(b) for b in batches)
    seconds = {name: [] for name in run}
    for repeat in range(repeats):
        order = list(run) if repeat % 2 == 0 else list(reversed(run))  # neither always goes first
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                run[name](batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append((time.perf_counter() - start) / trials)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--gru-size", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--batches", type=int, default=2, help="batches of 64 trials per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path (median reported)")
    parser.add_argument("--mean-bins", type=int, default=140, help="mean trial length in 20 ms bins")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"validation pass per trial, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.batches} batches of 64 trials (~{args.mean_bins} bins), median of {args.repeats} passes, "
          "decode_words false (no word search)")
    results = {}
    for name in args.models:
        label, make = MODELS[name]
        model, batches = make(args)
        model = model.to(device).eval()
        model.prepare_split("val", [t for b in batches for t in b.trials])  # gru_align: every batch's sentences
        batches = [b.to(device) for b in batches]
        with torch.no_grad():
            check_same(model, batches[:1], device)  # also the warm-up
            timed = time_paths(model, batches, args.repeats, device)
        results[name] = timed
        two, one = timed["two-forward"], timed["one-forward"]
        print(f"{name} ({label.format(gru_size=args.gru_size)}): two-forward {two * 1e3:.2f} ms/trial, "
              f"one-forward {one * 1e3:.2f} ms/trial, ratio {two / one:.2f}x")
    return results


if __name__ == "__main__":
    main()
