"""Sentence retrieval: how the audio-aligned model is scored, since alignment alone writes no text.

Every distinct sentence of a split is a candidate. A trial's brain embeddings are compared with
every candidate's target embeddings; the candidates are ranked by similarity, the best one is the
trial's `predicted_text` and the rank of the true sentence goes in `true_rank` (1 = retrieved).
Models only rank: top-1/top-10 accuracy with CIs is a harness metric computed from `true_rank`
(harness.metrics.retrieval_metrics).

Similarity (`score`):
- "sequence": the mean frame-wise cosine after resampling both sides to `n_frames` (what the
  interpolated-cosine loss trains);
- "pooled": the cosine of the mean embeddings (what InfoNCE trains);
- "both": their sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.losses import frame_similarity, unit_frames, unit_mean


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


def rank_candidates(brain: torch.Tensor, lengths: torch.Tensor, candidates: CandidateSet, score: str,
                    sentences: list[str]) -> list[dict]:
    """One row per trial: the best-scoring candidate (`retrieved_text`), the 1-based rank of the
    trial's own sentence (`true_rank`, None where it is not a candidate) and the best score."""
    scores = similarity(brain, lengths, candidates, score)
    true_index = torch.tensor([candidates.index.get(s, 0) for s in sentences], device=scores.device)
    ranks = true_ranks(scores, true_index).tolist()
    best, best_scores = scores.argmax(1), scores.max(1).values
    return [{"retrieved_text": candidates.sentences[b], "true_rank": rank if s in candidates.index else None,
             "retrieval_similarity": round(value, 5)}
            for b, rank, s, value in zip(best.tolist(), ranks, sentences, best_scores.tolist())]
