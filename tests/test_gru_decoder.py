"""The shared GRU encoder (reference section 3): day layers, patching, lengths, init, packing."""

import pytest
import torch

from gru_decoder import GRUEncoder, GRUEncoderParams, output_lengths, patchify

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
