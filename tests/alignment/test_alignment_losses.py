"""audio_alignment losses and retrieval: valid-length handling and ranks on hand-made cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.losses import (
    info_nce,
    interpolated_cosine_loss,
    masked_mean,
    pooled_similarity,
    resample,
    sentence_info_nce,
    sequence_cosine,
    sequence_similarity,
)
from alignment.retrieval import build_candidates, similarity, true_ranks
from harness.metrics import retrieval_metrics


def padded(seqs, fill=0.0):
    """list of (T_i, D) -> (B, T_max, D) with `fill` after each length, and the lengths."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max()), seqs[0].shape[1]), fill, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


@pytest.mark.parametrize("n_out", [1, 3, 7, 20])
def test_resample_equals_f_interpolate_on_each_trials_valid_frames(n_out):
    torch.manual_seed(0)
    seqs = [torch.randn(n, 5, dtype=torch.float64) for n in (1, 2, 7, 12)]
    x, lengths = padded(seqs, fill=1e6)  # garbage padding must not leak in
    got = resample(x, lengths, n_out)
    for i, s in enumerate(seqs):
        want = F.interpolate(s.T.unsqueeze(0), size=n_out, mode="linear", align_corners=False)[0].T
        torch.testing.assert_close(got[i], want)


def test_zero_length_trial_resamples_to_zeros_and_is_left_out_of_the_loss():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(9, 4)
    x, xl = padded([a, torch.randn(3, 4)], fill=5.0)
    xl[1] = 0  # e.g. a trial the random cut left without a patch
    t, tl = padded([b, torch.randn(4, 4)])
    assert torch.all(resample(x, xl, 8)[1] == 0)
    alone = interpolated_cosine_loss(x[:1], xl[:1], t[:1], tl[:1], 8)
    assert torch.allclose(interpolated_cosine_loss(x, xl, t, tl, 8), alone)


def test_cosine_loss_is_zero_for_the_same_curve_at_different_rates_and_ignores_padding():
    # The same smooth trajectory sampled at 40 and 25 points: after resampling both to 16 frames
    # they nearly coincide, so the loss is near 0; a different trajectory is far.
    def curve(n, phase=0.0):
        s = torch.linspace(0, 1, n).unsqueeze(1)
        return torch.cat([torch.sin(3 * s + phase), torch.cos(3 * s + phase), s + 1], dim=1)

    brain, bl = padded([curve(40), curve(40)], fill=-7.0)
    target, tl = padded([curve(25), curve(25, phase=2.5)], fill=3.0)
    cos = sequence_cosine(brain, bl, target, tl, 16)
    assert cos[0] > 0.999 and cos[1] < 0.9
    loss = interpolated_cosine_loss(brain[:1], bl[:1], target[:1], tl[:1], 16)
    assert loss < 1e-3


def test_masked_mean_reads_valid_frames_only():
    x, lengths = padded([torch.ones(2, 3), 2 * torch.ones(5, 3)], fill=100.0)
    assert torch.equal(masked_mean(x, lengths), torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_info_nce_treats_a_repeated_sentence_as_one_candidate():
    targets, tl = padded([torch.eye(3)[i].repeat(4, 1) for i in range(3)])  # three distinct sentences
    brain, bl = padded([torch.eye(3)[i].repeat(n, 1) for i, n in ((0, 5), (1, 2), (0, 7))], fill=8.0)
    labels = torch.tensor([0, 1, 0])  # trials 0 and 2 say sentence 0
    for sim in (pooled_similarity(brain, bl, targets, tl), sequence_similarity(brain, bl, targets, tl, 6)):
        assert torch.allclose(sim, torch.eye(3)[[0, 1, 0]], atol=1e-6)
        assert info_nce(sim, labels, temperature=0.05) < 1e-6
        assert info_nce(sim, torch.tensor([1, 0, 1]), temperature=0.05) > 10
    # From the batch's own target rows (one per trial): "a" twice is one candidate, not its own negative
    # (as two candidates, trials 0 and 2 would each lose log 2).
    rows, row_lengths = padded([torch.eye(3)[i].repeat(n, 1) for i, n in ((0, 4), (1, 3), (0, 6))])
    for mode in ("pooled", "sequence"):
        assert sentence_info_nce(brain, bl, rows, row_lengths, ["a", "b", "a"], 0.05, mode, n_frames=6) < 1e-6


def test_retrieval_ranks_on_a_hand_made_case():
    d = 4
    sentences = ["a", "b", "c"]
    frames, frame_lengths = padded([torch.eye(d)[i].repeat(5, 1) for i in range(3)])  # constant orthogonal frames
    cands = build_candidates(sentences, frames, frame_lengths, n_frames=4)
    # trial 0 looks like "b", trial 1 like "c" mixed with a bit of "a"
    brain, lengths = padded([torch.eye(d)[1].repeat(3, 1), (torch.eye(d)[2] + 0.3 * torch.eye(d)[0]).repeat(6, 1)],
                            fill=9.0)
    for score in ("sequence", "pooled", "both"):
        s = similarity(brain, lengths, cands, score)
        assert s.argmax(1).tolist() == [1, 2]
        ranks = true_ranks(s, torch.tensor([1, 0])).tolist()  # trial 1's truth is "a": second best
        assert ranks == [1, 2]
    assert math.isclose(float(similarity(brain, lengths, cands, "pooled")[1, 0]), 0.3 / math.sqrt(1.09), rel_tol=1e-6)


def test_true_rank_counts_strictly_better_candidates():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.0]])
    assert true_ranks(scores, torch.tensor([2, 0])).tolist() == [2, 1]


def test_retrieval_metrics_overall_and_per_session():
    rows = [{"session": "s1", "true_rank": 1}, {"session": "s1", "true_rank": 4},
            {"session": "s2", "true_rank": 12}, {"session": "s2", "true_rank": 1},
            {"session": "s2", "true_rank": None}]  # unlabeled: not scored
    m = retrieval_metrics(rows, n_resamples=200, seed=0)  # the harness's, from the model's ranks
    assert m["retrieval_top1"] == 0.5 and m["retrieval_top10"] == 0.75
    lo, hi = m["retrieval_top1_ci"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert m["retrieval_by_session"]["s1"]["retrieval_top1"] == 0.5
    assert m["retrieval_by_session"]["s2"]["retrieval_top10"] == 0.5
