"""The shared brain encoder of the Brain-to-Text '25 baseline (reference section 3, steps 1-4).

Per-session day layer -> Softsign -> dropout -> time patching -> GRU from a learned h0. Decoder
families subclass `GRUEncoder` and add their head, so that the state dict keeps the reference's
key names (`h0`, `day_weights.i`, `day_biases.i`, `gru.*`, then the head's keys) and a reference
checkpoint loads as it is.

Two departures from the reference code, both exact in the math:
- the day layer groups the batch by session and does one matmul per session present, instead of
  stacking a (C, C) weight copy per trial and calling einsum;
- with `pack_sequences` the GRU skips the padded steps: on CPU through `packed_gru` (the same
  nn.GRU parameters; ATen's packed CPU backward is slow), on CUDA as a PackedSequence through nn.GRU
  (cuDNN). The GRU is unidirectional, so every output inside a trial's valid length is unchanged;
  outputs past it are zeros instead of the values the reference computes over padding (nothing
  reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gru_decoder.packed_gru import packed_gru


@dataclass
class GRUEncoderParams:
    """Encoder sizes; the defaults are the published baseline (reference section 3)."""

    n_days: int = 0  # number of sessions (one day layer each); filled from the data by a config setter
    n_features: int = 512  # input width C
    n_units: int = 768  # GRU hidden size
    n_layers: int = 5
    patch_size: int = 14  # time bins per patch (the minimum trial length)
    patch_stride: int = 4
    input_dropout: float = 0.2  # after the day layer's Softsign
    rnn_dropout: float = 0.4  # between GRU layers
    pack_sequences: bool = True  # skip padded steps in the GRU (same valid outputs, less compute)


def patchify(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """(B, T, C) -> (B, P, size*C), P = (T - size) // stride + 1, feature index k*C + c.

    The reference unfolds a (B, C, 1, T) view and permutes back to (B, P, size, C) before
    flattening; unfolding time directly gives (B, P, C, size), so swap the last two axes."""
    patches = x.unfold(1, size, stride)  # (B, P, C, size)
    return patches.transpose(2, 3).reshape(x.shape[0], patches.shape[1], -1)


def output_lengths(lengths: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Valid patches per trial: the reference's int((T - size) / stride + 1), never below 0.

    (floor division plus one equals the reference's truncation wherever either is >= 0.)"""
    return (torch.div(lengths - size, stride, rounding_mode="floor") + 1).clamp(min=0)


class GRUEncoder(nn.Module):
    def __init__(self, p: GRUEncoderParams):
        super().__init__()
        self.n_layers, self.n_units = p.n_layers, p.n_units
        self.patch_size, self.patch_stride = p.patch_size, p.patch_stride
        self.pack_sequences = p.pack_sequences

        self.day_weights = nn.ParameterList(nn.Parameter(torch.eye(p.n_features)) for _ in range(p.n_days))
        self.day_biases = nn.ParameterList(nn.Parameter(torch.zeros(1, p.n_features)) for _ in range(p.n_days))
        self.day_layer_activation = nn.Softsign()
        self.day_layer_dropout = nn.Dropout(p.input_dropout)

        self.gru = nn.GRU(p.n_features * p.patch_size, p.n_units, p.n_layers, dropout=p.rnn_dropout,
                          batch_first=True, bidirectional=False)
        for name, param in self.gru.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.orthogonal_(param)  # the whole (3H, H) matrix, as the reference
            elif name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)

        self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, p.n_units)))

    def day_layer(self, x: torch.Tensor, day_indices: torch.Tensor) -> torch.Tensor:
        """x @ W[day] + b[day] per trial, one matmul per session present in the batch."""
        rows, parts = [], []
        for day in torch.unique(day_indices).tolist():
            index = torch.nonzero(day_indices == day).squeeze(1)
            rows.append(index)
            parts.append(x[index] @ self.day_weights[day] + self.day_biases[day])
        order = torch.cat(rows)
        return torch.cat(parts)[torch.argsort(order)]  # back to the batch's row order

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return output_lengths(lengths, self.patch_size, self.patch_stride)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor, day_indices: torch.Tensor):
        """features (B, T, C) zero padded -> (GRU outputs (B, P, n_units), valid lengths (B,))."""
        x = self.day_layer_dropout(self.day_layer_activation(self.day_layer(features, day_indices)))
        x = patchify(x, self.patch_size, self.patch_stride)
        out_lengths = self.output_lengths(lengths)
        h0 = self.h0.expand(self.n_layers, x.shape[0], self.n_units).contiguous()
        if not self.pack_sequences:
            return self.gru(x, h0)[0], out_lengths
        if x.device.type == "cpu":
            return packed_gru(self.gru, x, out_lengths, h0), out_lengths
        # CUDA: nn.GRU on a PackedSequence (cuDNN's packed kernels). pack_padded_sequence refuses empty
        # sequences; a trial cut below one patch runs one step that nothing reads (its valid length stays 0).
        packed = pack_padded_sequence(x, out_lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed, h0)[0], batch_first=True, total_length=x.shape[1])
        return h, out_lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, day_indices: torch.Tensor):
        return self.encode(features, lengths, day_indices)
