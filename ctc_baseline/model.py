"""The Brain-to-Text '25 baseline as a b2t-bench model: GRU encoder + linear phoneme head, CTC loss,
greedy decoding (reference sections 3 and 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gru_decoder import GRUEncoder, GRUEncoderParams
from harness.errors import UserError
from harness.model_api import DecoderModel
from harness.phonemes import BLANK_ID, N_CLASSES, ids_to_text
from registry import register_config_setter, register_model_constructor


@dataclass
class CTCBaselineParams(GRUEncoderParams):
    """Every key of model_params: the encoder sizes (GRUEncoderParams) plus the head and the loss."""

    n_classes: int = N_CLASSES  # 41: blank, 39 phonemes, SIL
    # The reference trainer uses CTCLoss(zero_infinity=False): an impossible alignment (too few
    # output frames for the targets) gives an infinite loss instead of being silently zeroed.
    zero_infinity: bool = False


class CTCBaseline(GRUEncoder, DecoderModel):
    """GRUDecoder of the reference. Subclassing the encoder keeps the reference state-dict keys:
    h0, day_weights.*, day_biases.*, gru.*, out.weight, out.bias."""

    def __init__(self, p: CTCBaselineParams):
        super().__init__(p)
        self.min_time_steps = p.patch_size  # shorter trials give no output frame
        self.zero_infinity = p.zero_infinity
        self.out = nn.Linear(p.n_units, p.n_classes)
        nn.init.xavier_uniform_(self.out.weight)  # the reference code does this (section 3 omits it)

    def forward(self, features, lengths, day_indices):
        """-> raw logits (B, P, n_classes) and the valid output frames per trial (B,)."""
        hidden, out_lengths = self.encode(features, lengths, day_indices)
        return self.out(hidden), out_lengths

    def loss(self, batch):
        logits, out_lengths = self(batch.features, batch.lengths, batch.day_indices)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (P, B, classes), float32 under bf16 too
        per_trial = F.ctc_loss(log_probs, batch.phoneme_ids, out_lengths, batch.phoneme_lengths,
                               blank=BLANK_ID, reduction="none", zero_infinity=self.zero_infinity)
        ctc = per_trial.mean()  # mean over trials, no length normalisation (reference section 6)
        return {"loss": ctc, "ctc": ctc}

    def decode(self, batch):
        logits, out_lengths = self(batch.features, batch.lengths, batch.day_indices)
        return [{"predicted_phonemes": text} for text in greedy_phonemes(logits, out_lengths)]

    def param_group(self, name: str) -> str:
        """Reference section 4: biases without decay, day layers with their own LR, the rest."""
        if name.startswith("gru.bias") or name == "out.bias":
            return "bias"
        if name.startswith(("day_weights.", "day_biases.")):
            return "day"
        return "other"


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


@register_model_constructor()
def ctc_baseline(params: CTCBaselineParams, ctx):
    if params.n_days < len(ctx.sessions):
        raise UserError(f"model_params.n_days is {params.n_days} but the run has {len(ctx.sessions)} sessions "
                        "(use config_setter_name: ctc_baseline_setter to fill it)")
    return CTCBaseline(params)


@register_config_setter()
def ctc_baseline_setter(config, data):
    config.model_params.n_days = len(data.sessions)
    config.model_params.n_features = data.n_features
