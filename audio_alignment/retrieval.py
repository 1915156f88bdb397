"""Sentence retrieval: how the audio-aligned model is scored, since alignment alone writes no text.

Every distinct sentence of a split is a candidate. A trial's brain embeddings are compared with
every candidate's target embeddings; the candidates are ranked by similarity, the best one is the
trial's `predicted_text` and the rank of the true sentence goes in `true_rank` (1 = retrieved).

Similarity (`score`):
- "sequence": the mean frame-wise cosine after resampling both sides to `n_frames` (what the
  interpolated-cosine loss trains);
- "pooled": the cosine of the mean embeddings (what InfoNCE trains);
- "both": their sum.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from audio_alignment.losses import frame_similarity, unit_frames, unit_mean
from harness.metrics import bootstrap_ci


@dataclass
class CandidateSet:
    sentences: list[str]
    index: dict[str, int]  # sentence -> its position
    sequences: torch.Tensor  # (C, n_frames, D) unit-norm frames
    pooled: torch.Tensor  # (C, D) unit-norm


def build_candidates(sentences: list[str], targets: torch.Tensor, lengths: torch.Tensor, n_frames: int) -> CandidateSet:
    """targets (C, T, D) zero padded after lengths, one row per sentence."""
    return CandidateSet(sentences=list(sentences), index={s: i for i, s in enumerate(sentences)},
                        sequences=unit_frames(targets, lengths, n_frames), pooled=unit_mean(targets, lengths))


def similarity(brain: torch.Tensor, lengths: torch.Tensor, candidates: CandidateSet, score: str) -> torch.Tensor:
    """brain (B, P, D) zero padded after lengths -> (B, C) similarities."""
    brain = brain.float()
    out = torch.zeros(brain.shape[0], len(candidates.sentences), device=brain.device)
    if score in ("sequence", "both"):
        out += frame_similarity(unit_frames(brain, lengths, candidates.sequences.shape[1]), candidates.sequences)
    if score in ("pooled", "both"):
        out += unit_mean(brain, lengths) @ candidates.pooled.T
    return out


def true_ranks(scores: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """1-based rank of each trial's true candidate: 1 + the number of candidates scored higher."""
    true_scores = scores.gather(1, true_index.unsqueeze(1))
    return (scores > true_scores).sum(1) + 1


def retrieval_metrics(rows: list[dict], n_candidates: int, n_resamples: int, seed: int) -> dict:
    """top-1 and top-10 accuracy (with bootstrap CIs over trials) overall and per session."""
    ranked = [r for r in rows if r.get("true_rank") is not None]

    def summary(subset) -> dict:
        ranks = np.array([r["true_rank"] for r in subset], dtype=float)
        out = {}
        for k in (1, 10):
            hits = (ranks <= k).astype(float)
            out[f"retrieval_top{k}"] = float(hits.mean()) if len(hits) else None
            ci = bootstrap_ci(hits, np.ones_like(hits), n_resamples=n_resamples, seed=seed) if len(hits) else None
            out[f"retrieval_top{k}_ci"] = list(ci) if ci else None
        out["median_true_rank"] = float(np.median(ranks)) if len(ranks) else None
        return out

    by_session = defaultdict(list)
    for r in ranked:
        by_session[r["session"]].append(r)
    return {
        **summary(ranked),
        "n_candidates": n_candidates,
        "retrieval_chance_top1": 1 / n_candidates if n_candidates else None,
        "retrieval_by_session": {s: summary(rs) for s, rs in sorted(by_session.items())},
    }
