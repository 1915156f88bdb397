"""A tiny CTC phoneme model registered from tests/, to drive the main loop end to end.

Loaded by setting B2T_PLUGINS=tests.tiny_plugin (the harness only auto-discovers top-level folders).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.model_api import DecoderModel
from harness.phonemes import BLANK_ID, N_CLASSES, ids_to_text
from registry import register_config_setter, register_data_preprocessor, register_model_constructor


@dataclass
class TinyParams:
    hidden: int = 32
    stride: int = 2  # output frames are every `stride` input bins
    n_days: int = 0  # filled by the harness (sessions)
    n_features: int = 0  # filled by the harness (the width after the preprocessors)
    n_train_trials: int = 0  # filled by the config setter: what only this model derives (recorded, unused)


class TinyCTC(DecoderModel):
    def __init__(self, p: TinyParams):
        super().__init__()
        self.stride = p.stride
        self.min_time_steps = p.stride
        self.day_bias = nn.Parameter(torch.zeros(p.n_days, p.n_features))
        self.inp = nn.Linear(p.n_features * p.stride, p.hidden)
        self.gru = nn.GRU(p.hidden, p.hidden, batch_first=True)
        self.out = nn.Linear(p.hidden, N_CLASSES)

    def forward(self, x, days):
        x = x + self.day_bias[days][:, None, :]
        b, t, c = x.shape
        t = t - t % self.stride
        x = x[:, :t].reshape(b, t // self.stride, c * self.stride)
        h, _ = self.gru(torch.tanh(self.inp(x)))
        return self.out(h)

    def out_lengths(self, lengths):
        return lengths // self.stride

    def loss(self, batch):
        logits = self(batch.features, batch.day_indices)
        log_probs = logits.log_softmax(-1).transpose(0, 1)
        ctc = F.ctc_loss(log_probs, batch.phoneme_ids, self.out_lengths(batch.lengths), batch.phoneme_lengths,
                         blank=BLANK_ID, zero_infinity=True)
        return {"loss": ctc, "ctc": ctc}

    def decode(self, batch):
        best = self(batch.features, batch.day_indices).argmax(-1)
        rows = []
        for seq, n in zip(best.tolist(), self.out_lengths(batch.lengths).tolist()):
            merged = [c for i, c in enumerate(seq[:n]) if i == 0 or c != seq[i - 1]]
            rows.append({"predicted_phonemes": ids_to_text([c for c in merged if c != BLANK_ID]),
                         "n_frames": n})
        return rows

    def param_group(self, name):
        return "day" if name == "day_bias" else "other"


@register_model_constructor()
def tiny_ctc(params: TinyParams, ctx):
    return TinyCTC(params)


@register_config_setter()
def tiny_ctc_setter(config, data):
    config.model_params.n_train_trials = len(data.trials.get("train", []))


@dataclass
class ScaleParams:
    factor: float = 1.0


@register_data_preprocessor()
def scale_features(params: ScaleParams):
    def preprocess(batch, training):
        batch.features = batch.features * params.factor
        return batch

    return preprocess
