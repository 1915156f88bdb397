"""The GRU encoder under torch.compile, bf16 autocast and data_params.pad_to_multiple, on the CPU.

- torch.compile recompiles for every new batch shape unless shapes are bucketed (pad_to_multiple) or
  dynamic; the counts come from a backend that counts the graphs dynamo hands it ("eager" behind it,
  so no C compiler is needed). benchmarks/gpu_check.py counts the same on a GPU.
- bf16 autocast gives the fp32 CTC loss within a stated tolerance.
- pad_to_multiple pads the time axis only: losses, logits on valid frames and decoded phonemes stay.
"""

import math

import numpy as np
import pytest
import torch

from ctc_baseline import CTCBaseline, CTCBaselineParams
from harness.batching import collate
from harness.data import Trial
from harness.preprocessors import GaussianSmoothingParams, gaussian_smoothing

N_FEATURES, N_DAYS = 32, 3
# eight batches whose longest trials all differ: eight shapes unpadded, two (192, 256) padded to 64
BATCH_MAX = [134, 150, 166, 182, 198, 214, 230, 246]
MULTIPLE = 64


def items(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        phonemes = tuple(int(p) for p in rng.integers(1, 41, size=max(2, n // 16)))
        trial = Trial("train", "s", i % N_DAYS, "p", f"trial_{i}", 1, i, int(n), phonemes, "a sentence.")
        out.append((trial, rng.standard_normal((n, N_FEATURES)).astype(np.float32)))
    return out


def batch_of(longest, seed, pad_to_multiple=1):
    return collate(items([longest, longest - 7, longest - 13, longest - 20], seed), pad_to_multiple=pad_to_multiple)


def model(pack: bool, n_layers=1) -> CTCBaseline:
    torch.manual_seed(0)
    return CTCBaseline(CTCBaselineParams(n_days=N_DAYS, n_features=N_FEATURES, n_units=32, n_layers=n_layers,
                                         pack_sequences=pack, input_dropout=0.0, rnn_dropout=0.0)).eval()


def graphs_compiled(net, batches, dynamic) -> list[int]:
    """Graphs dynamo compiles for each batch (the first batch's are the compilation, later ones recompilations)."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(net, backend=counting_backend, dynamic=dynamic)
    per_batch = []
    # a limit above the shapes here, so that every recompilation is counted (at the default of 8 dynamo
    # would stop recompiling a frame and run it eagerly)
    with torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
        for b in batches:
            before = len(graphs)
            compiled(b.features, b.lengths, b.day_indices)
            per_batch.append(len(graphs) - before)
    torch._dynamo.reset()
    return per_batch


def shape_bound(lengths, multiple) -> int:
    return len({math.ceil(n / multiple) * multiple for n in lengths})


def test_bucketed_padding_bounds_recompilation_and_the_counter_sees_every_shape():
    net = model(pack=False)
    bucketed = graphs_compiled(net, [batch_of(n, i, MULTIPLE) for i, n in enumerate(BATCH_MAX)], dynamic=False)
    per_shape = bucketed[0]  # graphs of one shape (the encoder's graph breaks split the forward)
    bound = per_shape * shape_bound(BATCH_MAX, MULTIPLE)
    assert per_shape >= 1 and sum(bucketed) <= bound, (bucketed, bound)
    # without buckets and with static shapes every one of the 8 lengths compiles again: the counter counts
    unbucketed = graphs_compiled(net, [batch_of(n, i) for i, n in enumerate(BATCH_MAX)], dynamic=False)
    assert unbucketed[0] == per_shape and all(k >= 1 for k in unbucketed) and sum(unbucketed) > bound, unbucketed


def test_automatic_dynamic_shapes_recompile_once_without_buckets():
    """The harness's model.compile() (dynamic=None): the second shape recompiles with a symbolic
    time axis, after which new lengths reuse it: at most one recompilation per graph."""
    per_batch = graphs_compiled(model(pack=False), [batch_of(n, i) for i, n in enumerate(BATCH_MAX)], dynamic=None)
    assert sum(per_batch) <= 2 * per_batch[0] and sum(per_batch[2:]) == 0, per_batch


def test_the_packed_encoder_does_not_recompile_per_batch():
    """pack_sequences (every config's choice): the packed encoder runs outside the compiled graphs (its
    sizes follow the true lengths); what is compiled around it recompiles at most once, as above."""
    per_batch = graphs_compiled(model(pack=True), [batch_of(n, i) for i, n in enumerate(BATCH_MAX)], dynamic=None)
    assert sum(per_batch[2:]) == 0 and sum(per_batch) <= 2 * max(1, per_batch[0]), per_batch


def test_bf16_autocast_ctc_loss_matches_fp32():
    # pack_sequences false: packed_gru's hand-written CPU layer writes into preallocated fp32/bf16 buffers and
    # is not autocast-safe; the harness autocasts on CUDA only, where the packed path runs nn.GRU (cuDNN).
    net = model(pack=False, n_layers=2)
    batch = collate(items([120, 101, 96, 77, 64, 130], seed=3))
    with torch.no_grad():
        fp32 = float(net.loss(batch)["loss"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = float(net.loss(batch)["loss"])
    assert math.isfinite(fp32) and abs(bf16 - fp32) <= 1e-2 * abs(fp32), (fp32, bf16)  # bf16: ~3 significant digits


@pytest.mark.parametrize("pack", [False, True])
def test_pad_to_multiple_changes_no_loss_logit_or_decoded_output(pack):
    net = model(pack=pack, n_layers=2)
    smooth = gaussian_smoothing(GaussianSmoothingParams(std=2.0, kernel_size=100))  # its zero padding is the same
    lengths = [97, 120, 64, 101, 77]
    plain = smooth(collate(items(lengths, seed=5)), False)
    padded = smooth(collate(items(lengths, seed=5), pad_to_multiple=MULTIPLE), False)
    assert plain.features.shape[1] == 120 and padded.features.shape[1] == 128
    assert torch.equal(plain.lengths, padded.lengths)
    with torch.no_grad():
        (logits_a, n_a), (logits_b, n_b) = net(plain.features, plain.lengths, plain.day_indices), \
            net(padded.features, padded.lengths, padded.day_indices)
        loss_a, loss_b = float(net.loss(plain)["loss"]), float(net.loss(padded)["loss"])
    assert torch.equal(n_a, n_b)
    diff = max(float((logits_a[i, :k] - logits_b[i, :k]).abs().max()) for i, k in enumerate(n_a.tolist()))
    assert diff <= 1e-5, diff  # float32: only the GEMMs' blocking may differ with the padded length
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a), (loss_a, loss_b)
    assert [r["predicted_phonemes"] for r in net.decode(plain)] == [r["predicted_phonemes"] for r in net.decode(padded)]
