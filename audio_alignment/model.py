"""gru_align: the shared GRU brain encoder trained so that its embeddings match what a frozen audio
encoder makes of text-to-speech audio of the attempted sentence.

brain features -> GRUEncoder (day layers, patching, GRU) -> projector -> (B, P, target dim)
sentence -> TTS -> audio encoder -> (T, target dim), precomputed once per sentence (TargetCache)

Losses (weights in `loss_weights`): the interpolated frame-wise cosine of the original design,
sentence-level InfoNCE across the batch, and an optional auxiliary CTC head over the 41 phoneme
classes. Evaluation ranks every sentence of the split by similarity (retrieval.py) and writes the
best as the trial's text; with the CTC head on, the run also reports phonemes (PER) and, through a
word decoder of the CTC baseline, words (`text_source: ctc_words` makes those the predicted text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from audio_alignment.cache import TargetCache
from audio_alignment.losses import ctc_head_loss, interpolated_cosine_loss, sentence_info_nce
from audio_alignment.retrieval import CandidateSet, build_candidates, retrieval_metrics, similarity, true_ranks
from audio_alignment.targets import TargetParams, build_target_maker, resolve_target_params
from ctc_baseline.model import greedy_phonemes, training_sentences
from ctc_baseline.word_decoding import NoWords, WordDecoderSpec, build_word_decoder, log_softmax_cpu
from gru_decoder import GRUEncoder, GRUEncoderParams
from config import EvaluationParams
from harness.errors import UserError
from harness.metrics import split_metrics as error_rates
from harness.metrics import trial_error_columns
from harness.model_api import DecoderModel
from harness.phonemes import N_CLASSES
from registry import register_config_setter, register_model_constructor

log = logging.getLogger(__name__)


@dataclass
class LossWeights:
    cosine: float = 1.0  # interpolated frame-wise cosine (the original design)
    infonce: float = 1.0  # sentence-level contrastive loss across the batch
    ctc: float = 0.0  # auxiliary CTC head on the GRU outputs; 0 = no head


@dataclass
class GRUAlignParams(GRUEncoderParams):
    """Every key of model_params: the encoder sizes (GRUEncoderParams) plus these."""

    targets: TargetParams = field(default_factory=TargetParams)
    projector_hidden: int = 0  # 0: one linear layer to the target width; > 0: MLP with this hidden width
    align_frames: int = 32  # common length both sequences are resampled to (cosine loss, "sequence" score)
    # Standardise every target channel with its mean and std over the training targets: raw log-mels
    # share a large common offset that would dominate every cosine. Global, not per utterance: a
    # per-utterance mean would make every sentence's pooled target the same.
    standardize_targets: bool = True
    loss_weights: LossWeights = field(default_factory=LossWeights)
    infonce_temperature: float = 0.1
    infonce_similarity: Literal["pooled", "sequence"] = "pooled"  # what InfoNCE compares (losses.py)
    retrieval_score: Literal["sequence", "pooled", "both"] = "both"
    # With the CTC head (loss_weights.ctc > 0): phonemes -> words through the CTC baseline's decoders
    # (greedy writes no words), and which text goes in `predicted_text` (the other goes in its own column).
    word_decoder: WordDecoderSpec = field(default_factory=WordDecoderSpec)
    text_source: Literal["retrieval", "ctc_words"] = "retrieval"


class GRUAlign(GRUEncoder, DecoderModel):
    """State-dict keys: the encoder's (h0, day_weights.*, day_biases.*, gru.*), projector.*,
    target_mean, and ctc_head.* when the CTC weight is > 0. The targets themselves stay in the
    cache, not in checkpoints."""

    def __init__(self, p: GRUAlignParams, targets: "TargetStore", evaluation: EvaluationParams,
                 target_stats: tuple[torch.Tensor, torch.Tensor] | None = None, word_decoder=None):
        super().__init__(p)
        self.p, self.evaluation = p, evaluation
        self.target_name, target_dim = targets.name, targets.dim
        self.min_time_steps = p.patch_size  # shorter trials give no output frame
        self.projector = make_projector(p.n_units, p.projector_hidden, target_dim)
        self.ctc_head = nn.Linear(p.n_units, N_CLASSES) if p.loss_weights.ctc > 0 else None
        self.word_decoder = word_decoder or NoWords()
        mean, std = target_stats if target_stats is not None else (torch.zeros(target_dim), torch.ones(target_dim))
        self.register_buffer("target_mean", mean)  # standardisation of the targets, saved with the weights
        self.register_buffer("target_std", std)
        self.targets = targets  # not a module: the targets stay out of the state dict
        self.candidates: CandidateSet | None = None

    # -- pieces

    def embed(self, batch):
        """-> GRU outputs (B, P, H), embeddings (B, P, D), valid lengths (B,)."""
        hidden, lengths = self.encode(batch.features, batch.lengths, batch.day_indices)
        return hidden, self.projector(hidden), lengths

    def batch_targets(self, sentences: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        return standardized_targets(self.targets, sentences, device, self.target_mean, self.target_std)

    # -- DecoderModel

    def loss(self, batch):
        hidden, emb, lengths = self.embed(batch)
        emb = emb.float()
        target, target_lengths = self.batch_targets(batch.sentences, emb.device)
        w, parts = self.p.loss_weights, {}
        if w.cosine:
            parts["cosine"] = interpolated_cosine_loss(emb, lengths, target, target_lengths, self.p.align_frames)
        if w.infonce:
            parts["infonce"] = sentence_info_nce(emb, lengths, target, target_lengths, batch.sentences,
                                                 self.p.infonce_temperature, self.p.infonce_similarity,
                                                 self.p.align_frames)
        if self.ctc_head is not None:
            parts["ctc"] = ctc_head_loss(self.ctc_head(hidden), lengths, batch.phoneme_ids, batch.phoneme_lengths)
        total = sum(getattr(w, name) * value for name, value in parts.items())
        return {"loss": total, **parts}

    def prepare_split(self, split, trials):
        sentences = list(dict.fromkeys(t.sentence for t in trials if t.sentence))
        if not sentences:
            self.candidates = None
            return
        targets, lengths = self.batch_targets(sentences, self.target_mean.device)
        self.candidates = build_candidates(sentences, targets, lengths, self.p.align_frames)

    def decode(self, batch):
        hidden, emb, lengths = self.embed(batch)
        rows = [{} for _ in range(len(batch))]
        if self.candidates is not None:
            scores = similarity(emb, lengths, self.candidates, self.p.retrieval_score)
            best = scores.argmax(1).tolist()
            index = self.candidates.index
            known = [s in index for s in batch.sentences]
            true_index = torch.tensor([index.get(s, 0) for s in batch.sentences], device=scores.device)
            ranks = true_ranks(scores, true_index).tolist()
            for row, b, rank, ok, score in zip(rows, best, ranks, known, scores.max(1).values.tolist()):
                row.update(retrieved_text=self.candidates.sentences[b], true_rank=rank if ok else None,
                           retrieval_similarity=round(score, 5))
        if self.ctc_head is not None:
            logits = self.ctc_head(hidden)
            words = self.word_decoder.decode(log_softmax_cpu(logits), lengths.cpu())
            for row, phonemes, text in zip(rows, greedy_phonemes(logits, lengths), words):
                row.update(predicted_phonemes=phonemes, ctc_text=text)
        source = "retrieved_text" if self.p.text_source == "retrieval" else "ctc_text"
        for row in rows:
            row["predicted_text"] = row.pop(source, None)
        return rows

    def split_metrics(self, split, rows):
        metrics = {"targets": self.target_name, "text_source": self.p.text_source}
        if self.ctc_head is not None:
            metrics.update(self.word_decoder.split_metrics(rows))
            if self.p.text_source == "retrieval" and any(r.get("ctc_text") for r in rows):
                metrics["ctc_words"] = self.ctc_word_metrics(rows)
        if self.candidates is not None:
            metrics.update(retrieval_metrics(rows, len(self.candidates.sentences), seed=self.evaluation.bootstrap_seed,
                                             n_resamples=self.evaluation.bootstrap_resamples))
        return metrics

    def ctc_word_metrics(self, rows) -> dict:
        """WER and CER of the CTC head's words, when the retrieved text is the predicted text."""
        scored = [{"session": r["session"], **trial_error_columns(r["reference_text"], r["ctc_text"], None, None)}
                  for r in rows]
        m = error_rates(scored, seed=self.evaluation.bootstrap_seed, n_resamples=self.evaluation.bootstrap_resamples)
        return {k: m[k] for k in ("wer", "wer_ci", "cer", "cer_ci")}


class TargetStore:
    """Every sentence's target frames, held in memory (float16, CPU) after the first request; the
    ones not held yet come from the on-disk cache, which computes what it lacks."""

    def __init__(self, params: TargetParams, cache_dir: str | Path):
        self.maker = build_target_maker(params)
        self.cache = TargetCache(Path(cache_dir) / "targets", self.maker)
        self.name, self.dim = self.maker.name, self.maker.dim
        self.frames: dict[str, torch.Tensor] = {}

    def get(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        missing = [s for s in dict.fromkeys(sentences) if s not in self.frames]
        if missing:
            hits, misses = self.cache.hits, self.cache.misses
            for s, frames in self.cache.get(missing).items():
                self.frames[s] = torch.from_numpy(frames).to(torch.float16)
            log.info("targets %s (dim %d, %.1f frames/s): %d sentences, %d from the cache, %d computed", self.name,
                     self.dim, self.maker.frame_rate, len(missing), self.cache.hits - hits, self.cache.misses - misses)
        return {s: self.frames[s] for s in sentences}


def make_projector(n_units: int, hidden: int, dim: int) -> nn.Module:
    """GRU outputs -> embeddings of width `dim`: one linear layer, or an MLP when `hidden` > 0."""
    if hidden > 0:
        return nn.Sequential(nn.Linear(n_units, hidden), nn.GELU(), nn.Linear(hidden, dim))
    return nn.Linear(n_units, dim)


def standardized_targets(store, sentences: list[str], device, mean: torch.Tensor,
                         std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) float32 target frames of each sentence (from `store.get`), standardised with the
    training statistics, zero-padded (padding stays zero); their lengths (B,)."""
    found = store.get(sentences)
    seqs = [found[s] for s in sentences]
    lengths = torch.tensor([len(t) for t in seqs], dtype=torch.int64, device=device)
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(device, torch.float32)
    mask = torch.arange(padded.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return (padded - mean.to(device)) / std.to(device) * mask.unsqueeze(2), lengths


def fill_targets(store, trials: dict, standardize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fetch the targets of every labelled sentence of every split at once (one progress bar, and
    training never waits for speech); returns the per-channel (mean, std) of the training sentences'
    frames when `standardize`, None without training trials (evaluate: the checkpoint's buffers
    bring them)."""
    splits = {split: [t.sentence for t in ts if t.sentence] for split, ts in trials.items()}
    found = store.get(list(dict.fromkeys(s for sentences in splits.values() for s in sentences)))
    if not (standardize and splits.get("train")):
        return None
    frames = torch.cat([found[s].float() for s in dict.fromkeys(splits["train"])])
    return frames.mean(0), frames.std(0).clamp(min=1e-3)


@register_model_constructor()
def gru_align(params: GRUAlignParams, ctx):
    if params.n_days < len(ctx.sessions):
        raise UserError(f"model_params.n_days is {params.n_days} but the run has {len(ctx.sessions)} sessions "
                        "(use config_setter_name: gru_align_setter to fill it)")
    if params.loss_weights.cosine <= 0 and params.loss_weights.infonce <= 0:
        raise UserError("model_params.loss_weights: cosine or infonce must be > 0 (the model aligns nothing otherwise)")
    if params.text_source == "ctc_words" and (params.loss_weights.ctc <= 0 or params.word_decoder.name == "greedy"):
        raise UserError("model_params.text_source: ctc_words needs the CTC head (loss_weights.ctc > 0) and a word "
                        "decoder that writes words (model_params.word_decoder.name, e.g. lexicon_ngram)")
    targets = TargetStore(params.targets, ctx.cache_dir)
    stats = fill_targets(targets, ctx.trials, params.standardize_targets)
    words = None
    if params.loss_weights.ctc > 0 and params.word_decoder.name != "greedy":
        words = build_word_decoder(params.word_decoder, training_sentences(ctx), ctx.cache_dir)
    return GRUAlign(params, targets, ctx.config.evaluation, stats, words)


@register_config_setter()
def gru_align_setter(config, data):
    config.model_params.n_days = len(data.sessions)
    config.model_params.n_features = data.n_features
    # every target param typed and defaulted now: a bad one fails before any work, and config.yaml
    # records exactly what made the targets
    config.model_params.targets = resolve_target_params(config.model_params.targets)
