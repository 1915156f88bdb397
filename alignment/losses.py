"""Alignment losses between brain embeddings and frozen audio-encoder targets.

Both sides are padded batches with their own valid lengths: brain frames shrink with patching and
the random cut, target frames depend on the speech. Every function here reads only frames inside
each trial's valid length, so padding never enters a loss or a score (tested by filling the
padding with garbage).

- `resample`: linear interpolation of every sequence to a common number of frames, the same rule as
  `F.interpolate(mode="linear", align_corners=False)` applied to each trial's valid frames alone,
  done for the whole batch as one batched matmul (F.interpolate takes one output size per call).
- `interpolated_cosine_loss`: both sequences resampled to a common length,
  1 - mean frame-wise cosine.
- `ctc_head_loss`: the auxiliary CTC loss of a phoneme head on the GRU outputs (mean over trials).
- `alignment_losses` and `weighted_total`: the parts a model's `LossWeights` turn on, and their sum
  (the audio-aligned GRU and the LLM decoder both assemble their alignment loss with these).
- `info_nce`: sentence-level contrastive loss across the batch, on a similarity of whole sequences
  (`sequence_similarity`, the resampled frame-wise cosine, or `pooled_similarity`, the cosine of the
  means, which ignores timing altogether). Only the ranking of the true sentence among the batch's
  sentences matters, not matching every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from config import non_negative
from harness.phonemes import BLANK_ID


def resample_matrix(lengths: torch.Tensor, max_length: int, n_out: int) -> torch.Tensor:
    """(B, n_out, max_length) weights whose rows interpolate each trial's first `lengths[b]` frames
    to n_out frames. Rows of a trial with length 0 are all zero."""
    device = lengths.device
    src_len = lengths.clamp(min=1).to(torch.float64).unsqueeze(1)  # (B, 1)
    k = torch.arange(n_out, device=device, dtype=torch.float64).unsqueeze(0)  # (1, n_out)
    x = ((k + 0.5) * src_len / n_out - 0.5).clamp(min=0)  # source position (align_corners=False)
    i0 = x.floor().long()
    last = (src_len.long() - 1).expand_as(i0)
    i0 = torch.minimum(i0, last)
    i1 = torch.minimum(i0 + 1, last)
    w1 = (x - i0).clamp(0, 1)
    m = torch.zeros(lengths.shape[0], n_out, max_length, dtype=torch.float64, device=device)
    m.scatter_add_(2, i0.unsqueeze(2), (1 - w1).unsqueeze(2))
    m.scatter_add_(2, i1.unsqueeze(2), w1.unsqueeze(2))
    return m * (lengths > 0).view(-1, 1, 1)


def resample(x: torch.Tensor, lengths: torch.Tensor, n_out: int) -> torch.Tensor:
    """x (B, T, D) zero padded after lengths -> (B, n_out, D)."""
    m = resample_matrix(lengths, x.shape[1], n_out).to(x.dtype)
    return m @ x


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over each trial's valid frames: (B, T, D) -> (B, D); zeros for a trial of length 0."""
    mask = (torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).to(x.dtype)
    return (x * mask.unsqueeze(2)).sum(1) / lengths.clamp(min=1).to(x.dtype).unsqueeze(1)


def unit_frames(x: torch.Tensor, lengths: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(B, T, D) -> (B, n_frames, D): resampled valid frames, each scaled to unit norm."""
    return F.normalize(resample(x, lengths, n_frames), dim=-1)


def unit_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, D): the mean of the valid frames, scaled to unit norm."""
    return F.normalize(masked_mean(x, lengths), dim=-1)


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unit frames (A, N, D) and (B, N, D) -> (A, B): mean frame-wise cosine of every pair."""
    return torch.einsum("akd,bkd->ab", a, b) / a.shape[1]


def sequence_cosine(brain: torch.Tensor, brain_lengths: torch.Tensor, target: torch.Tensor,
                    target_lengths: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Mean frame-wise cosine per trial after resampling both sides to n_frames: (B,)."""
    b, t = unit_frames(brain, brain_lengths, n_frames), unit_frames(target, target_lengths, n_frames)
    return (b * t).sum(-1).mean(-1)


def interpolated_cosine_loss(brain, brain_lengths, target, target_lengths, n_frames: int) -> torch.Tensor:
    """1 - mean cosine over the trials that have at least one valid frame on both sides."""
    valid = (brain_lengths > 0) & (target_lengths > 0)
    cos = sequence_cosine(brain, brain_lengths, target, target_lengths, n_frames)
    return 1 - cos[valid].sum() / valid.sum().clamp(min=1)


def pooled_similarity(brain, brain_lengths, target, target_lengths) -> torch.Tensor:
    """(B, S): cosine between each trial's mean embedding and each target's mean frame."""
    return unit_mean(brain, brain_lengths) @ unit_mean(target, target_lengths).T


def sequence_similarity(brain, brain_lengths, target, target_lengths, n_frames: int) -> torch.Tensor:
    """(B, S): mean frame-wise cosine of each trial with each target, both resampled to n_frames."""
    return frame_similarity(unit_frames(brain, brain_lengths, n_frames), unit_frames(target, target_lengths, n_frames))


def info_nce(similarity: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each trial against the batch's distinct sentences.

    similarity (B, S): each trial against each distinct sentence of the batch (training batches draw
    trials with replacement, so a sentence can occur twice: it must not be its own negative);
    labels (B,): the index of each trial's sentence."""
    return F.cross_entropy(similarity / temperature, labels)


def sentence_info_nce(brain, brain_lengths, target, target_lengths, sentences: list[str], temperature: float,
                      similarity: str = "pooled", n_frames: int = 32) -> torch.Tensor:
    """InfoNCE of a batch whose i-th trial attempted sentences[i] (target row i): each trial against
    the batch's distinct sentences, on the "pooled" or "sequence" similarity."""
    distinct = list(dict.fromkeys(sentences))
    labels = torch.tensor([distinct.index(s) for s in sentences], device=brain.device)
    first = [sentences.index(s) for s in distinct]
    if similarity == "sequence":
        sim = sequence_similarity(brain, brain_lengths, target[first], target_lengths[first], n_frames)
    else:
        sim = pooled_similarity(brain, brain_lengths, target[first], target_lengths[first])
    return info_nce(sim, labels, temperature)


def ctc_head_loss(logits, lengths, phoneme_ids, phoneme_lengths) -> torch.Tensor:
    """CTC over the 41 phoneme classes of (B, P, classes) head outputs, mean over trials."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(log_probs, phoneme_ids, lengths, phoneme_lengths, blank=BLANK_ID, reduction="none",
                      zero_infinity=True).mean()


@dataclass
class LossWeights:
    """Weight of each alignment loss: 0 or more; 0 leaves that loss out."""

    cosine: float = 1.0  # interpolated frame-wise cosine
    infonce: float = 1.0  # sentence-level contrastive loss across the batch
    ctc: float = 0.0  # auxiliary CTC head on the GRU outputs; 0 = no head

    def problems(self):
        yield from non_negative(self, "cosine", "infonce", "ctc")


def alignment_losses(weights: LossWeights, emb, lengths, target, target_lengths, sentences: list[str], *,
                     temperature: float, similarity: str, align_frames: int, ctc_logits=None,
                     phoneme_ids=None, phoneme_lengths=None) -> dict[str, torch.Tensor]:
    """The parts `weights` turn on: "cosine" and "infonce" against the targets (skipped when
    `target` is None), "ctc" of the head's logits (when given)."""
    parts = {}
    if target is not None and weights.cosine:
        parts["cosine"] = interpolated_cosine_loss(emb, lengths, target, target_lengths, align_frames)
    if target is not None and weights.infonce:
        parts["infonce"] = sentence_info_nce(emb, lengths, target, target_lengths, sentences, temperature,
                                             similarity, align_frames)
    if ctc_logits is not None:
        parts["ctc"] = ctc_head_loss(ctc_logits, lengths, phoneme_ids, phoneme_lengths)
    return parts


def weighted_total(weights: LossWeights, parts: dict[str, torch.Tensor]):
    """The sum of the parts, each times its weight (parts are named as LossWeights' fields)."""
    return sum(getattr(weights, name) * value for name, value in parts.items())
