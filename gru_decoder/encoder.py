"""The shared brain encoder of the Brain-to-Text '25 baseline (docs/reference.md, section 3, steps 1-4).

Per-session day layer -> Softsign -> dropout -> time patching -> GRU from a learned h0. Decoder
families subclass `GRUEncoder` and add their head, so that the state dict keeps the reference's
key names (`h0`, `day_weights.i`, `day_biases.i`, `gru.*`, then the head's keys) and a reference
checkpoint loads as it is.

Two departures from the reference code, both exact in the math:
- the day layer groups the batch by session and does one matmul per session present, instead of
  stacking a (C, C) weight copy per trial and calling einsum;
- with `pack_sequences` nothing is computed for padding: the day layer runs on the input bins that
  valid patches read, only valid patches are built, and the GRU runs over the valid steps only (on
  CPU through `packed_gru`'s layer loop, on CUDA through nn.GRU on a PackedSequence, cuDNN). The GRU
  is unidirectional, so every output inside a trial's valid length is unchanged; outputs past it are
  zeros instead of the values the reference computes over padding (nothing reads them). In training
  the dropout masks are drawn for fewer elements, so for one seed they differ from the padded path's
  (same distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from config import at_least, fraction
from gru_decoder.packed_gru import gru_over_packed, packing, unpack


@dataclass
class GRUEncoderParams:
    """Encoder sizes; the defaults are the published baseline (docs/reference.md, section 3)."""

    n_days: int = 0  # number of sessions (one day layer each); filled from the data by the harness
    n_features: int = 512  # input width C
    n_units: int = 768  # GRU hidden size
    n_layers: int = 5
    patch_size: int = 14  # time bins per patch (the minimum trial length)
    patch_stride: int = 4
    input_dropout: float = 0.2  # after the day layer's Softsign (0: none)
    rnn_dropout: float = 0.4  # between GRU layers (0: none; no effect with one layer)
    pack_sequences: bool = True  # skip padded steps in the GRU (same valid outputs, less compute)

    def problems(self):
        """Value checks of the encoder keys; a subclass adding keys yields from this too."""
        yield from at_least(self, 0, "n_days")
        yield from at_least(self, 1, "n_features", "n_units", "n_layers", "patch_size", "patch_stride")
        yield from fraction(self, "input_dropout", "rnn_dropout")


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

    def day_layer(self, x: torch.Tensor, day_indices: torch.Tensor, days: list[int] | None = None) -> torch.Tensor:
        """x @ W[day] + b[day] per row of x (a trial, or one bin), one matmul per session.

        days: the sessions to run (default: those in day_indices). One without rows still enters the
        graph, so its weights get a zero gradient (as in the padded path) rather than none, which
        AdamW would treat differently (it skips parameters without a gradient)."""
        rows, parts = [], []
        for day in torch.unique(day_indices).tolist() if days is None else days:
            index = torch.nonzero(day_indices == day).squeeze(1)
            rows.append(index)
            parts.append(x[index] @ self.day_weights[day] + self.day_biases[day])
        order = torch.cat(rows)
        return torch.cat(parts)[torch.argsort(order)]  # back to the batch's row order

    def day_layer_parameters(self, day: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Session `day`'s input layer (W (C, C), b (1, C)) for the cross-session protocols
        (harness.model_api.DecoderModel.day_layer_parameters)."""
        return self.day_weights[day], self.day_biases[day]

    def param_group(self, name: str) -> str:
        """The reference recipe's groups (docs/reference.md, section 4), for every model on this
        encoder: day layers (own LR, no decay), biases (the GRU's and the heads', no decay), the rest."""
        if name.startswith(("day_weights.", "day_biases.")):
            return "day"
        if name.endswith(".bias") or name.startswith("gru.bias"):
            return "bias"
        return "other"

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return output_lengths(lengths, self.patch_size, self.patch_stride)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor, day_indices: torch.Tensor):
        """features (B, T, C) zero padded -> (GRU outputs (B, P, n_units), valid lengths (B,))."""
        if self.pack_sequences:
            return self.encode_packed(features, lengths, day_indices)
        x = self.day_layer_dropout(self.day_layer_activation(self.day_layer(features, day_indices)))
        x = patchify(x, self.patch_size, self.patch_stride)
        h0 = self.h0.expand(self.n_layers, x.shape[0], self.n_units).contiguous()
        return self.gru(x, h0)[0], self.output_lengths(lengths)

    # Not compiled: every tensor size here follows the batch's true lengths (nonzero, the packed layout's
    # batch_sizes), so torch.compile recompiled at every batch until its recompile limit (measured:
    # tests/gru_decoder/test_compile_and_precision.py). The work is cuDNN's packed GRU on CUDA and
    # packed_gru's own layer on CPU, neither of which compile would fuse; the heads after it still compile.
    @torch.compiler.disable
    def encode_packed(self, features: torch.Tensor, lengths: torch.Tensor, day_indices: torch.Tensor):
        """As encode, computing only what valid outputs read (outputs past each valid length are zeros)."""
        B, T, C = features.shape
        size, stride, device = self.patch_size, self.patch_stride, features.device
        n_patches = max(0, (T - size) // stride + 1)
        out_lengths = self.output_lengths(lengths)
        pack = packing(out_lengths, n_patches, device)
        if not pack.batch_sizes:  # no trial reaches one patch
            return features.new_zeros(B, n_patches, self.n_units), out_lengths
        # The input bins that valid patches read: each trial's first (n - 1) * stride + size bins.
        n_bins = torch.where(out_lengths > 0, (out_lengths - 1) * stride + size, 0)
        needed = (torch.arange(T, device=device)[None, :] < n_bins.to(device)[:, None]).flatten()
        bins = torch.nonzero(needed).squeeze(1)  # flat b * T + t
        x = self.day_layer(features.reshape(B * T, C).index_select(0, bins), day_indices.to(device)[bins // T],
                           days=torch.unique(day_indices).tolist())
        x = self.day_layer_dropout(self.day_layer_activation(x))  # (bins, C)
        # Each packed row's patch straight from those bins, in patchify's order (time in patch, then channel).
        row_of_bin = needed.cumsum(0) - 1
        first_bin = (pack.frames // n_patches) * T + (pack.frames % n_patches) * stride
        patch_rows = row_of_bin[first_bin[:, None] + torch.arange(size, device=device)]  # (N, size)
        data = x.index_select(0, patch_rows.flatten()).view(-1, size * C)
        h0 = self.h0.expand(self.n_layers, B, self.n_units)
        h = gru_over_packed(self.gru, data, pack, h0, via_nn_gru=device.type != "cpu")
        return unpack(h, pack), out_lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, day_indices: torch.Tensor):
        return self.encode(features, lengths, day_indices)
