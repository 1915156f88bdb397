"""Run an `nn.GRU`'s parameters over variable-length sequences, skipping the padded steps.

Same math as `nn.GRU` (gate order r, z, n; n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) * n
+ z * h), the module's own parameters (its state dict is untouched), dropout between layers in
training. Every output inside a sequence's length equals nn.GRU's on the padded batch (the GRU is
unidirectional); outputs past it are zeros.

`packing` lays out the valid steps as packed rows, `gru_over_packed` runs the layers over them, `unpack`
pads the result again; `packed_gru` strings the three together for a padded batch.

Why not `nn.GRU` on a PackedSequence on CPU: ATen's packed GRU takes each time step with `narrow`, and
the backward of every narrow builds a zero-filled gradient the size of the whole packed sequence, so
its backward moves O(steps x frames) memory and loses what skipping padding saved (BENCHMARKS.md).
On CUDA it is the right tool (cuDNN's packed kernels; a per-step Python loop would be slow there), so
`gru_over_packed(..., via_nn_gru=True)` hands the same rows to nn.GRU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence


@dataclass
class Packing:
    """Where the packed rows of a padded batch (B, T, ...) come from. Packed rows are step-major: the
    batch_sizes[0] sequences that have a step 0, longest first, then those that have a step 1 in the
    same order, and so on; `frames` holds each row's flat index b * T + t in the padded batch."""

    order: torch.Tensor  # (B,) sequences, longest first (stable), on the batch's device
    batch_sizes: list[int]  # rows per step, non-increasing; empty sequences never appear
    frames: torch.Tensor  # (N,) flat padded index of each packed row, on the batch's device
    batch: int  # B
    steps: int  # T


def packing(lengths: torch.Tensor, steps: int, device: torch.device | str = "cpu") -> Packing:
    """The packed layout of sequences of these lengths (0 allowed) in a batch padded to `steps`.

    By hand rather than pack_padded_sequence: that refuses empty sequences and copies the whole padded
    batch twice (a sort, then the packing); with `frames`, one index_select of the valid rows does both."""
    lengths = lengths.to("cpu", torch.long).clamp(max=steps)
    order = torch.argsort(lengths, descending=True, stable=True)
    batch_sizes = [int(n) for n in (lengths[None, :] > torch.arange(steps)[:, None]).sum(1) if n > 0]
    frames = torch.cat([order[:n] * steps + t for t, n in enumerate(batch_sizes)]) if batch_sizes else order[:0]
    return Packing(order.to(device), batch_sizes, frames.to(device), len(lengths), steps)


def gru_over_packed(gru: nn.GRU, data: torch.Tensor, pack: Packing, h0: torch.Tensor,
                    via_nn_gru: bool = False) -> torch.Tensor:
    """gru's layers over packed rows data (N, D) from h0 (layers, B, H) -> packed outputs (N, H).

    via_nn_gru: hand the rows to nn.GRU as a PackedSequence instead (for CUDA, where cuDNN's packed
    kernels are fast and a per-step Python loop is not)."""
    if not gru.batch_first or gru.bidirectional or gru.proj_size or not gru.bias:
        raise ValueError("gru_over_packed supports batch-first, unidirectional GRUs with biases only")
    h = h0.index_select(1, pack.order[: pack.batch_sizes[0]])  # first states in packed order
    if via_nn_gru:
        return gru(PackedSequence(data, torch.tensor(pack.batch_sizes)), h)[0].data
    for layer in range(gru.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(gru, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        data = _PackedGRULayer.apply(F.linear(data, w_ih, b_ih), h[layer], w_hh, b_hh, pack.batch_sizes)
        if layer < gru.num_layers - 1 and gru.dropout > 0 and gru.training:
            # nn.GRU's dropout on every layer's output but the last: the same distribution; the random
            # numbers come from a different stream than ATen's, so masks differ from nn.GRU's for a seed.
            data = F.dropout(data, gru.dropout, training=True)
    return data


def unpack(data: torch.Tensor, pack: Packing) -> torch.Tensor:
    """Packed rows (N, H) -> padded (B, T, H), zeros past each sequence's length."""
    out = data.new_zeros(pack.batch * pack.steps, data.shape[1]).index_copy(0, pack.frames, data)
    return out.view(pack.batch, pack.steps, data.shape[1])


def packed_gru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) batch-first, lengths (B,) valid steps (0 allowed), h0 (layers, B, H) -> (B, T, H).

    Only steps t < lengths[b] are computed; the outputs past each length are zeros."""
    B, T = x.shape[:2]
    pack = packing(lengths, T, x.device)
    if not pack.batch_sizes:  # no valid step at all
        return x.new_zeros(B, T, gru.hidden_size)
    data = x.reshape(B * T, -1).index_select(0, pack.frames)
    return unpack(gru_over_packed(gru, data, pack, h0), pack)


class _PackedGRULayer(torch.autograd.Function):
    """One GRU layer over packed rows (the first batch_sizes[0] rows are step 0, and so on; each step's
    rows are the longest sequences first, so step t+1 continues the first batch_sizes[t+1] rows of
    step t), from precomputed input gates (N, 3H) and the first state h0 (B, H).

    Why a hand-written backward: under autograd each step's `prev @ w_hh.T` records its own node, so the
    gradient of w_hh arrives as one small GEMM plus one full (3H, H) accumulation per step (steps x 3H x H
    memory traffic per layer). Here every step's gate gradients go into one (N, 3H) buffer and w_hh's
    gradient is a single GEMM over all steps; the elementwise factors that do not depend on the incoming
    gradient are computed for all steps at once, outside the step loop."""

    @staticmethod
    def forward(ctx, gates_in, h0, w_hh, b_hh, batch_sizes):
        H = h0.shape[1]
        n_rows = gates_in.shape[0]
        out = gates_in.new_empty(n_rows, H)
        gates_h = gates_in.new_empty(n_rows, 3 * H)  # W_hh h + b_hh
        rz = gates_in.new_empty(n_rows, 2 * H)  # sigmoid gates r | z
        new = gates_in.new_empty(n_rows, H)  # candidate state n
        w_hh_t = w_hh.t()
        prev, start = h0, 0
        for n in batch_sizes:
            end = start + n
            prev = prev[:n]  # sequences past their end drop off the bottom
            g_h = torch.addmm(b_hh, prev, w_hh_t, out=gates_h[start:end])
            r_z = torch.add(gates_in[start:end, : 2 * H], g_h[:, : 2 * H], out=rz[start:end]).sigmoid_()
            n_gate = torch.addcmul(gates_in[start:end, 2 * H:], r_z[:, :H], g_h[:, 2 * H:], out=new[start:end]).tanh_()
            prev = torch.addcmul(n_gate, r_z[:, H:], prev - n_gate, out=out[start:end])  # n + z * (h - n)
            start = end
        ctx.batch_sizes = batch_sizes
        # keep only the part of W_hh h + b_hh that r scales; the rest is not needed backward
        ctx.save_for_backward(h0, w_hh, out, rz, new, gates_h[:, 2 * H:].clone())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h0, w_hh, out, rz, new, h_n = ctx.saved_tensors
        sizes, H = ctx.batch_sizes, h0.shape[1]
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        # each row's previous state: h0 for step 0, else the first n rows of the step before
        prev = torch.cat([h0[: sizes[0]]] + [out[starts[t - 1]: starts[t - 1] + sizes[t]] for t in range(1, len(sizes))])
        r, z = rz[:, :H], rz[:, H:]
        # the chain rule's factors that do not depend on the incoming gradient, for all steps at once:
        # d(pre-activation of n)/dh', d(pre-activation of z)/dh', d(pre-activation of r)/d(pre-activation of n)
        f_n = (1 - z) * (1 - new * new)  # h' = (1 - z) n + z h, n = tanh(.)
        f_z = (prev - new) * z * (1 - z)
        f_r = h_n * r * (1 - r)
        d_hh = grad_out.new_empty(out.shape[0], 3 * H)  # d(hidden gates): d_r | d_z | d_n * r
        d_n = grad_out.new_empty(out.shape[0], H)  # d(input gate n) = d(pre-activation of n)
        grad_h = grad_out.clone(memory_format=torch.contiguous_format)  # d(loss)/d(state), completed step by step
        carry = None  # the part of it flowing back from the step after
        for t in range(len(sizes) - 1, -1, -1):
            a, b = starts[t], starts[t + 1]
            g = grad_h[a:b]
            if carry is not None:
                g[: carry.shape[0]] += carry
            torch.mul(g, f_n[a:b], out=d_n[a:b])
            torch.mul(d_n[a:b], f_r[a:b], out=d_hh[a:b, :H])
            torch.mul(g, f_z[a:b], out=d_hh[a:b, H: 2 * H])
            torch.mul(d_n[a:b], r[a:b], out=d_hh[a:b, 2 * H:])
            carry = torch.addmm(g * z[a:b], d_hh[a:b], w_hh)
        d_h0 = torch.zeros_like(h0)
        d_h0[: carry.shape[0]] = carry
        d_in = torch.cat([d_hh[:, : 2 * H], d_n], 1)
        return d_in, d_h0, d_hh.t() @ prev, d_hh.sum(0), None
