"""Targets in memory for training and scoring: every sentence's frames (from the on-disk cache),
standardised with the training statistics, padded into batches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from alignment.cache import TargetCache
from alignment.targets import TargetParams, build_target_maker

log = logging.getLogger(__name__)


class TargetStore:
    """Every sentence's target frames, held in memory (float16, CPU) after the first request; the
    ones not held yet come from the on-disk cache, which computes what it lacks."""

    def __init__(self, params: TargetParams, cache_dir: str | Path):
        self.maker = build_target_maker(params)
        self.cache = TargetCache(Path(cache_dir) / "targets", self.maker)
        self.name, self.dim = self.maker.name, self.maker.dim
        self.frames: dict[str, torch.Tensor] = {}

    def get(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        missing = [s for s in dict.fromkeys(sentences) if s not in self.frames]
        if missing:
            hits, misses = self.cache.hits, self.cache.misses
            for s, frames in self.cache.get(missing).items():
                self.frames[s] = torch.from_numpy(frames).to(torch.float16)
            log.info("targets %s (dim %d, %.1f frames/s): %d sentences, %d from the cache, %d computed", self.name,
                     self.dim, self.maker.frame_rate, len(missing), self.cache.hits - hits, self.cache.misses - misses)
        return {s: self.frames[s] for s in sentences}


def standardized_targets(store, sentences: list[str], device, mean: torch.Tensor,
                         std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) float32 target frames of each sentence (from `store.get`), standardised with the
    training statistics, zero-padded (padding stays zero); their lengths (B,)."""
    found = store.get(sentences)
    seqs = [found[s] for s in sentences]
    lengths = torch.tensor([len(t) for t in seqs], dtype=torch.int64, device=device)
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(device, torch.float32)
    mask = torch.arange(padded.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return (padded - mean.to(device)) / std.to(device) * mask.unsqueeze(2), lengths


def fill_targets(store, trials: dict, standardize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fetch the targets of every labelled sentence of every split at once (one progress bar, and
    training never waits for speech); returns the per-channel (mean, std) of the training sentences'
    frames when `standardize`, None without training trials (evaluate: the checkpoint's buffers
    bring them)."""
    splits = {split: [t.sentence for t in ts if t.sentence] for split, ts in trials.items()}
    found = store.get(list(dict.fromkeys(s for sentences in splits.values() for s in sentences)))
    if not (standardize and splits.get("train")):
        return None
    frames = torch.cat([found[s].float() for s in dict.fromkeys(splits["train"])])
    return frames.mean(0), frames.std(0).clamp(min=1e-3)


def make_projector(n_units: int, hidden: int, dim: int) -> nn.Module:
    """GRU outputs -> embeddings of width `dim`: one linear layer, or an MLP when `hidden` > 0."""
    if hidden > 0:
        return nn.Sequential(nn.Linear(n_units, hidden), nn.GELU(), nn.Linear(hidden, dim))
    return nn.Linear(n_units, dim)
