"""From a CTC head's outputs to what decoders read: the greedy phoneme string and CPU log-probs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.phonemes import BLANK_ID, ids_to_text

if TYPE_CHECKING:  # tensor methods only at run time: importing word_decoding (a search worker does) skips torch
    import torch


def greedy_phonemes(logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best class per frame up to each valid length, merge repeats, THEN drop blanks.

    (The reference evaluation script drops blanks first, which turns "A blank A" into "A";
    the correct CTC collapse gives "A A".)"""
    texts = []
    for best, n in zip(logits.argmax(-1).tolist(), lengths.tolist()):
        frames = best[:n]
        merged = [c for i, c in enumerate(frames) if i == 0 or c != frames[i - 1]]
        texts.append(ids_to_text([c for c in merged if c != BLANK_ID]))
    return texts


def log_softmax_cpu(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities on the CPU, what decode() takes (from logits of any dtype/device)."""
    return logits.float().log_softmax(-1).cpu()
