"""Sentence retrieval of the audio-aligned model (alignment.retrieval, audio_alignment.model.GRUAlign.decode)
on hand-made embeddings whose answers are known: the most similar candidate is retrieved, the true
sentence's rank counts the candidates scored above it, and a sentence that is no candidate has no rank."""

import pytest
import torch

from alignment.retrieval import build_candidates, rank_candidates
from audio_alignment.model import GRUAlign, GRUAlignParams
from config import EvaluationParams
from harness.evaluation import trial_row
from harness.metrics import split_metrics
from tests.audio_alignment.test_gru_align import HeldTargets, make_batch

D = 4
E = torch.eye(D)
CANDIDATES = ["alpha", "bravo", "charlie", "delta"]  # candidate i: every frame along axis i
TARGET_LENGTHS = (3, 5, 2, 4)


def held_frames() -> dict:
    return {s: E[i].repeat(n, 1) for i, (s, n) in enumerate(zip(CANDIDATES, TARGET_LENGTHS))}


def padded(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), torch.tensor([len(f) for f in frames])


# Trial 0 says alpha and looks like it; trial 1 says charlie but looks most like bravo, then alpha,
# then charlie (rank 3), never delta; trial 2 says a sentence that is no candidate and looks like delta.
BRAIN = [E[0].repeat(6, 1), (3 * E[1] + 2 * E[0] + E[2]).repeat(4, 1), E[3].repeat(5, 1)]
SENTENCES = ["alpha", "charlie", "zulu"]
EXPECTED = [("alpha", 1), ("bravo", 3), ("delta", None)]


@pytest.mark.parametrize("score", ["sequence", "pooled", "both"])
def test_the_most_similar_candidate_is_retrieved_and_the_true_rank_counts_the_better_ones(score):
    targets, lengths = padded(list(held_frames().values()))
    candidates = build_candidates(CANDIDATES, targets, lengths, n_frames=8)
    brain, brain_lengths = padded(BRAIN)
    rows = rank_candidates(brain, brain_lengths, candidates, score, SENTENCES)
    assert [(r["retrieved_text"], r["true_rank"]) for r in rows] == EXPECTED
    cosine = 3 / (3 * 3 + 2 * 2 + 1) ** 0.5  # trial 1 (3, 2, 1, 0) against bravo (0, 1, 0, 0), its best score
    per_score = {"sequence": 1, "pooled": 1, "both": 2}[score]  # frames are constant: the two scores agree
    assert [r["retrieval_similarity"] for r in rows] == pytest.approx([per_score, per_score * cosine, per_score],
                                                                      abs=1e-4)


def test_the_sequence_score_reads_frame_order():
    """Candidates with the same frames in the opposite order: the same mean (a tie for "pooled", which
    ranks both first), but only one matches frame by frame."""
    forward, backward = torch.cat([E[0].repeat(3, 1), E[1].repeat(3, 1)]), torch.cat([E[1].repeat(2, 1), E[0].repeat(2, 1)])
    targets, lengths = padded([forward, backward])
    candidates = build_candidates(["forward", "backward"], targets, lengths, n_frames=8)
    brain, brain_lengths = padded([torch.cat([E[1].repeat(4, 1), E[0].repeat(4, 1)])])
    (row,) = rank_candidates(brain, brain_lengths, candidates, "sequence", ["forward"])
    assert (row["retrieved_text"], row["true_rank"]) == ("backward", 2)
    (row,) = rank_candidates(brain, brain_lengths, candidates, "pooled", ["forward"])
    assert row["true_rank"] == 1  # tied with backward: nothing scored strictly higher


def test_gru_align_decode_writes_the_retrieved_sentence_and_the_true_rank():
    """GRUAlign.decode with its embeddings fixed by hand: candidates come from the split's trials
    (prepare_split), the best one is the predicted text, and the harness scores the ranks."""
    p = GRUAlignParams(n_days=1, n_features=8, n_units=12, n_layers=1, patch_size=4, patch_stride=2,
                       input_dropout=0.0, rnn_dropout=0.0, retrieval_score="both", align_frames=8)
    model = GRUAlign(p, HeldTargets(held_frames(), D), EvaluationParams(bootstrap_resamples=0)).eval()
    brain, brain_lengths = padded(BRAIN)
    batch = make_batch(torch.zeros(3, 20, 8), torch.tensor([20, 12, 16]), SENTENCES)
    split = make_batch(torch.zeros(4, 4, 8), torch.full((4,), 4), CANDIDATES).trials  # zulu is no candidate
    model.prepare_split("val", split)
    assert model.candidates.sentences == CANDIDATES
    model.embed = lambda batch: (None, brain, brain_lengths)  # (GRU outputs, embeddings, lengths)
    rows = model.decode(batch)
    assert [(r["predicted_text"], r["true_rank"]) for r in rows] == EXPECTED
    metrics = split_metrics([trial_row(t, r) for t, r in zip(batch.trials, rows)], n_resamples=0)
    assert (metrics["retrieval_top1"], metrics["median_true_rank"]) == (0.5, 2.0)  # zulu has no rank
    assert metrics["wer"] == pytest.approx(2 / 3)  # charlie -> bravo and zulu -> delta: 2 of 3 words
