"""What the language model reads: [prompt] [brain embeddings] [prompt_after] [sentence + end token].

Training sequences are right padded (each trial's tokens at positions 0..n-1), with labels -100
everywhere but on the sentence tokens and the end token, so the cross-entropy sees nothing else.
Generation inputs stop before the sentence and are left padded, so that every trial's next token
comes right after its own last input. (Rotary position embeddings, as in Qwen2, depend only on
distances between positions, so the left padding shifts nothing the model sees.)

Also here: pooling or striding the brain frames before the LM (fewer positions, shorter sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions the loss skips (torch's and transformers' convention)


def shorten(x: torch.Tensor, lengths: torch.Tensor, mode: str, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, D) frames valid up to `lengths` -> (B, ceil(P / factor), D) and the new lengths.

    mean: each window of `factor` frames averaged over its valid frames (a trial's last window may be
    partial); stride: every factor-th frame; none: unchanged. Padding never enters a kept frame."""
    if mode == "none" or factor <= 1:
        return x, lengths
    new_lengths = torch.div(lengths + factor - 1, factor, rounding_mode="floor")
    if mode == "stride":
        return x[:, ::factor], new_lengths
    B, P, D = x.shape
    n_out = -(-P // factor)
    mask = (torch.arange(n_out * factor, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    padded = F.pad(x, (0, 0, 0, n_out * factor - P)) * mask.unsqueeze(2)
    sums = padded.view(B, n_out, factor, D).sum(2)
    counts = mask.view(B, n_out, factor).sum(2).clamp(min=1).unsqueeze(2)
    return sums / counts, new_lengths


@dataclass
class LMInputs:
    embeds: torch.Tensor  # (B, S, H)
    attention_mask: torch.Tensor  # (B, S) int64, 1 on real positions
    labels: torch.Tensor | None  # (B, S) token ids on sentence + end token, IGNORE elsewhere; None for generation


def training_inputs(prompt: torch.Tensor, brain: torch.Tensor, brain_lengths: torch.Tensor, after: torch.Tensor,
                    sentence_ids: list[list[int]], embed) -> LMInputs:
    """prompt (n_p, H), brain (B, P, H) valid up to brain_lengths, after (n_a, H) embeddings;
    sentence_ids: each trial's token ids, end token included; embed: token ids -> embeddings."""
    rows, labels = [], []
    for b, ids in enumerate(sentence_ids):
        ids_t = torch.tensor(ids, dtype=torch.int64, device=brain.device)
        rows.append(torch.cat([prompt, brain[b, : int(brain_lengths[b])], after, embed(ids_t).to(brain.dtype)]))
        n_context = len(rows[-1]) - len(ids)
        labels.append(torch.cat([torch.full((n_context,), IGNORE, dtype=torch.int64, device=brain.device), ids_t]))
    return LMInputs(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), _mask(rows, left=False, device=brain.device),
                    torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE))


def generation_inputs(prompt: torch.Tensor, brain: torch.Tensor, brain_lengths: torch.Tensor,
                      after: torch.Tensor) -> LMInputs:
    rows = [torch.cat([prompt, brain[b, : int(n)], after]) for b, n in enumerate(brain_lengths.tolist())]
    width = max(len(r) for r in rows)
    embeds = torch.stack([F.pad(r, (0, 0, width - len(r), 0)) for r in rows])
    return LMInputs(embeds, _mask(rows, left=True, device=brain.device), None)


def _mask(rows, left: bool, device) -> torch.Tensor:
    lengths = torch.tensor([len(r) for r in rows], device=device)
    width = int(lengths.max())
    positions = torch.arange(width, device=device)[None, :]
    real = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
    return real.long()


def sentence_loss(lm, inputs: LMInputs) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (sentence + end token) of the batch.

    The LM's layers run on every position, but its output head only on the positions that predict a
    labelled token (vocabularies of real LMs are 150k wide: logits everywhere would dominate memory)."""
    hidden = lm.get_decoder()(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                              use_cache=False).last_hidden_state
    targets = inputs.labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])
