"""The shared GRU encoder (docs/reference.md, section 3): day layers, patching, lengths, init, packing."""

import pytest
import torch
from torch import nn

from gru_decoder import GRUEncoder, GRUEncoderParams, output_lengths, patchify
from gru_decoder.packed_gru import _PackedGRULayer, gru_over_packed, packed_gru, packing, unpack

SMALL = dict(n_days=3, n_features=8, n_units=12, n_layers=2, patch_size=5, patch_stride=2)


def small_encoder(**overrides) -> GRUEncoder:
    torch.manual_seed(0)
    encoder = GRUEncoder(GRUEncoderParams(**{**SMALL, **overrides}))
    with torch.no_grad():  # move the day layers off their identity/zero init so they matter
        for w, b in zip(encoder.day_weights, encoder.day_biases):
            w.add_(0.3 * torch.randn_like(w))
            b.add_(0.3 * torch.randn_like(b))
    return encoder.eval()


def reference_patches(x, size, stride):
    """The reference GRUDecoder's patching, op for op."""
    x = x.unsqueeze(1).permute(0, 3, 1, 2)  # (B, C, 1, T)
    x_unfold = x.unfold(3, size, stride).squeeze(2).permute(0, 2, 3, 1)  # (B, P, size, C)
    return x_unfold.reshape(x.size(0), x_unfold.size(1), -1)


def reference_day_layer(encoder, x, day_idx):
    """The reference's per-trial stacked weights and einsum."""
    day_weights = torch.stack([encoder.day_weights[i] for i in day_idx], dim=0)
    day_biases = torch.cat([encoder.day_biases[i] for i in day_idx], dim=0).unsqueeze(1)
    return torch.einsum("btd,bdk->btk", x, day_weights) + day_biases


def test_patchify_is_the_reference_unfold_time_major():
    x = torch.randn(3, 23, 8)
    patches = patchify(x, 5, 2)
    assert patches.shape == (3, (23 - 5) // 2 + 1, 5 * 8)
    assert torch.equal(patches, reference_patches(x, 5, 2))
    b, p, k, c = 1, 4, 3, 6  # flattened index k*C + c holds time bin p*stride + k, channel c
    assert patches[b, p, k * 8 + c] == x[b, p * 2 + k, c]


def test_output_lengths_follow_the_reference_formula():
    lengths = torch.arange(0, 80)
    expected = [max(0, int((t - 14) / 4 + 1)) for t in range(80)]
    assert output_lengths(lengths, 14, 4).tolist() == expected


def test_grouped_day_layer_equals_the_reference_stacked_weights():
    encoder = small_encoder()
    x = torch.randn(6, 11, 8)
    days = torch.tensor([2, 0, 2, 1, 0, 2])  # mixed sessions, out of order
    torch.testing.assert_close(encoder.day_layer(x, days), reference_day_layer(encoder, x, days),
                               rtol=0, atol=1e-6)


def test_init_is_the_reference_init():
    encoder = GRUEncoder(GRUEncoderParams(**SMALL))
    assert all(torch.equal(w, torch.eye(8)) for w in encoder.day_weights)
    assert all(torch.equal(b, torch.zeros(1, 8)) for b in encoder.day_biases)
    for k in range(2):
        w_hh = getattr(encoder.gru, f"weight_hh_l{k}")  # (3H, H), orthogonal as a whole: W^T W = I
        torch.testing.assert_close(w_hh.T @ w_hh, torch.eye(12), rtol=0, atol=1e-5)
    w_ih = encoder.gru.weight_ih_l0  # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w_ih.abs().max() <= (6 / (40 + 36)) ** 0.5
    assert encoder.h0.shape == (1, 1, 12) and encoder.h0.abs().sum() > 0


def test_packing_does_not_change_valid_outputs():
    x = torch.randn(4, 30, 8)
    lengths = torch.tensor([30, 17, 9, 4])  # the last is shorter than a patch: 0 valid outputs
    days = torch.tensor([1, 0, 2, 1])
    x[torch.arange(30)[None, :] >= lengths[:, None]] = 0  # zero padding, as batches come
    packed, n_packed = small_encoder(pack_sequences=True)(x, lengths, days)
    padded, n_padded = small_encoder(pack_sequences=False)(x, lengths, days)
    assert torch.equal(n_packed, n_padded) and n_packed.tolist() == [13, 7, 3, 0]
    assert packed.shape == padded.shape == (4, 13, 12)
    for i, n in enumerate(n_packed.tolist()):
        torch.testing.assert_close(packed[i, :n], padded[i, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pack", [True, False])
def test_encoder_output_is_differentiable(pack):
    encoder = small_encoder(pack_sequences=pack).train()
    out, _ = encoder(torch.randn(2, 20, 8), torch.tensor([20, 12]), torch.tensor([0, 2]))
    out.sum().backward()
    assert encoder.h0.grad is not None and encoder.day_weights[2].grad is not None
    assert encoder.day_weights[1].grad is None  # a session absent from the batch is untouched


# ----------------------------------------------------------------------------------------------
# packed_gru: nn.GRU's math over the valid steps only (the CPU path of pack_sequences)

LENGTHS = [5, 9, 0, 1, 7, 9]  # unsorted, with an empty and a one-step sequence


def small_gru(dtype=torch.float32, **overrides) -> nn.GRU:
    torch.manual_seed(1)
    kwargs = dict(input_size=6, hidden_size=5, num_layers=3, dropout=0.4, batch_first=True)
    return nn.GRU(**{**kwargs, **overrides}).to(dtype)


def padded_inputs(dtype=torch.float32, lengths=LENGTHS, steps=9, layers=3):
    torch.manual_seed(2)
    lengths = torch.tensor(lengths)
    valid = (torch.arange(steps)[None, :] < lengths[:, None])[..., None]
    x = (torch.randn(len(lengths), steps, 6, dtype=dtype) * valid).requires_grad_()
    h0 = torch.randn(layers, len(lengths), 5, dtype=dtype, requires_grad=True)
    return x, lengths, h0, valid


def test_packed_gru_equals_nn_gru_on_the_valid_steps_and_is_zero_past_them():
    gru = small_gru().eval()
    x, lengths, h0, valid = padded_inputs()
    with torch.no_grad():
        expected, _ = gru(x, h0)
        out = packed_gru(gru, x, lengths, h0)
    assert out.shape == expected.shape == (6, 9, 5)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i, :n], expected[i, :n], rtol=0, atol=1e-6)
        assert not out[i, n:].any()


def test_packed_gru_gradients_equal_nn_gru_gradients():
    gru = small_gru().eval()
    x, lengths, h0, valid = padded_inputs()
    weights = torch.randn(6, 9, 5) * valid  # a loss that reads only the valid outputs
    inputs = [x, h0, *gru.parameters()]
    expected = torch.autograd.grad((gru(x, h0)[0] * weights).sum(), inputs)
    got = torch.autograd.grad((packed_gru(gru, x, lengths, h0) * weights).sum(), inputs)
    for name, a, b in zip(["x", "h0"] + [n for n, _ in gru.named_parameters()], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert got[0][2].abs().sum() == 0 and got[1][:, 2].abs().sum() == 0  # the empty sequence is untouched


def test_nn_gru_route_for_cuda_gives_the_same_rows_and_gradients():
    # The CUDA path hands the same packed rows to nn.GRU as a PackedSequence; here it runs on CPU.
    gru = small_gru().eval()
    x, lengths, h0, _ = padded_inputs()
    pack = packing(lengths, x.shape[1])
    assert pack.batch_sizes == [5, 4, 4, 4, 4, 3, 3, 2, 2] and pack.order.tolist()[:2] == [1, 5]
    data = x.reshape(-1, 6).index_select(0, pack.frames)
    rows = [gru_over_packed(gru, data, pack, h0, via_nn_gru=via) for via in (False, True)]
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(r.pow(2).sum(), [x, h0, gru.weight_hh_l1], retain_graph=True) for r in rows]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(unpack(rows[0], pack), packed_gru(gru, x, lengths, h0))


def test_packed_gru_with_no_valid_step_gives_zeros():
    gru = small_gru().eval()
    x, lengths, h0, _ = padded_inputs(lengths=[0, 0])
    assert torch.equal(packed_gru(gru, x, lengths, h0), torch.zeros(2, 9, 5))


def test_packed_gru_layer_backward_passes_gradcheck_in_float64():
    """The hand-written backward against finite differences: every input, ragged steps, and h0 rows
    (the 4th) whose sequence has no step."""
    torch.manual_seed(3)
    H, batch_sizes = 3, [3, 3, 2, 1]
    inputs = (torch.randn(sum(batch_sizes), 3 * H, dtype=torch.float64, requires_grad=True),  # input gates
              torch.randn(4, H, dtype=torch.float64, requires_grad=True),  # h0
              torch.randn(3 * H, H, dtype=torch.float64, requires_grad=True),  # w_hh
              torch.randn(3 * H, dtype=torch.float64, requires_grad=True))  # b_hh
    assert torch.autograd.gradcheck(lambda *a: _PackedGRULayer.apply(*a, batch_sizes), inputs)


def test_packed_gru_passes_gradcheck_in_float64():
    gru = small_gru(torch.float64, num_layers=2).eval()
    x, lengths, h0, _ = padded_inputs(torch.float64, lengths=[3, 1, 4, 0], steps=4, layers=2)
    assert torch.autograd.gradcheck(lambda x, h0: packed_gru(gru, x, lengths, h0), (x, h0))


def test_packed_gru_drops_out_between_layers_like_nn_gru():
    # With p = 1 every mask is all zeros, so the masks' random streams do not matter: equal outputs
    # prove dropout sits where nn.GRU puts it (after every layer but the last), in training only.
    gru = small_gru(dropout=1.0).train()
    x, lengths, h0, _ = padded_inputs()
    with torch.no_grad():
        expected, out = gru(x, h0)[0], packed_gru(gru, x, lengths, h0)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i, :n], expected[i, :n], rtol=0, atol=1e-6)
    assert out.abs().sum() > 0  # the last layer's output is not dropped
    gru.dropout = 0.4
    with torch.no_grad():
        dropped = packed_gru(gru, x, lengths, h0)
        kept = packed_gru(gru.eval(), x, lengths, h0)
    assert not torch.allclose(dropped, kept) and torch.equal(dropped == 0, kept == 0)


def test_encoder_packed_path_keeps_the_state_dict_and_the_gradients():
    x = torch.randn(4, 30, 8)
    lengths = torch.tensor([17, 30, 4, 9])  # unsorted; the third gives 0 valid outputs
    days = torch.tensor([1, 0, 2, 1])  # session 2 only in that trial: a zero gradient, not none, on both paths
    x[torch.arange(30)[None, :] >= lengths[:, None]] = 0
    packed, padded = small_encoder(pack_sequences=True), small_encoder(pack_sequences=False)
    assert list(packed.state_dict()) == list(padded.state_dict())  # gru.weight_ih_l0 ... as nn.GRU's
    grads = []
    for encoder in (packed, padded):
        out, n_valid = encoder(x, lengths, days)
        valid = torch.arange(out.shape[1])[None, :] < n_valid[:, None]
        (out * valid[..., None]).pow(2).sum().backward()
        grads.append({k: p.grad for k, p in encoder.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)
