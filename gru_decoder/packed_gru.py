"""Run an `nn.GRU`'s parameters over variable-length sequences, skipping the padded steps (CPU).

Same math as `nn.GRU` (gate order r, z, n; n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) * n
+ z * h), the same parameters (the module's own, so its state dict is untouched), dropout between
layers in training. Every output inside a sequence's length equals nn.GRU's on the padded batch (the
GRU is unidirectional); outputs past it are zeros.

Why not `nn.GRU` on a PackedSequence: ATen's packed GRU on CPU takes each time step with `narrow`,
and the backward of every narrow builds a zero-filled gradient the size of the whole packed sequence,
so its backward moves O(steps x frames) memory and loses what skipping padding saved (BENCHMARKS.md).
On CUDA use nn.GRU + PackedSequence: cuDNN's packed kernels do not have this problem, and the
per-step Python loop here would be slow there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packed_gru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) batch-first, lengths (B,) valid steps (0 allowed), h0 (layers, B, H) -> (B, T, H).

    Only steps t < lengths[b] are computed; the outputs past each length are zeros."""
    if not gru.batch_first or gru.bidirectional or gru.proj_size or not gru.bias:
        raise ValueError("packed_gru supports batch-first, unidirectional GRUs with biases only")
    B, T = x.shape[:2]
    # Packing by hand rather than pack_padded_sequence: that refuses empty sequences and copies the
    # whole padded batch twice (a sort, then the packing); one index_select of the valid frames does both.
    lengths = lengths.to("cpu", torch.long).clamp(max=T)
    order = torch.argsort(lengths, descending=True, stable=True)  # longest first
    batch_sizes = [int(n) for n in (lengths[None, :] > torch.arange(T)[:, None]).sum(1) if n > 0]
    if not batch_sizes:  # no valid step at all
        return x.new_zeros(B, T, gru.hidden_size)
    # packed row for (step t, k-th longest trial): frame order[k] * T + t of the flattened batch
    frames = torch.cat([order[:n] * T + t for t, n in enumerate(batch_sizes)]).to(x.device)
    data = x.reshape(B * T, -1).index_select(0, frames)
    h = h0.index_select(1, order.to(x.device))
    for layer in range(gru.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(gru, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        data = _PackedGRULayer.apply(F.linear(data, w_ih, b_ih), h[layer], w_hh, b_hh, batch_sizes)
        if layer < gru.num_layers - 1 and gru.dropout > 0 and gru.training:
            # nn.GRU's dropout on every layer's output but the last: the same distribution; the random
            # numbers come from a different stream than ATen's, so masks differ from nn.GRU's for a seed.
            data = F.dropout(data, gru.dropout, training=True)
    out = data.new_zeros(B * T, gru.hidden_size).index_copy(0, frames, data)
    return out.view(B, T, gru.hidden_size)


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
        rz = gates_in.new_empty(n_rows, 2 * H)  # sigmoid gates r | z
        new = gates_in.new_empty(n_rows, H)  # candidate state n
        h_n = gates_in.new_empty(n_rows, H)  # W_hn h + b_hn (the part of n that r scales)
        w_hh_t = w_hh.t()
        prev, start = h0, 0
        for n in batch_sizes:
            end = start + n
            prev = prev[:n]  # sequences past their end drop off the bottom
            gates_h = torch.addmm(b_hh, prev, w_hh_t)
            r_z = torch.add(gates_in[start:end, : 2 * H], gates_h[:, : 2 * H], out=rz[start:end]).sigmoid_()
            h_n[start:end] = gates_h[:, 2 * H:]
            n_gate = torch.addcmul(gates_in[start:end, 2 * H:], r_z[:, :H], gates_h[:, 2 * H:],
                                   out=new[start:end]).tanh_()
            prev = torch.addcmul(n_gate, r_z[:, H:], prev - n_gate, out=out[start:end])  # n + z * (h - n)
            start = end
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(h0, w_hh, out, rz, new, h_n)
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
        # d(pre-activation)/d(h') of each gate, for all steps at once
        f_n = (1 - z) * (1 - new * new)  # n = tanh(.), h' = (1 - z) n + z h
        f_z = (prev - new) * z * (1 - z)
        f_r = h_n * r * (1 - r)
        d_hh = grad_out.new_empty(out.shape[0], 3 * H)  # d(hidden gates): d_r | d_z | d_n * r
        d_n = grad_out.new_empty(out.shape[0], H)  # d(input gate n) = d(pre-activation of n)
        grad_out = grad_out.contiguous()
        carry = None  # d(loss)/d(state) flowing back from the step after
        for t in range(len(sizes) - 1, -1, -1):
            a, b = starts[t], starts[t + 1]
            g = grad_out[a:b]
            if carry is not None:
                g = g.clone()
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
