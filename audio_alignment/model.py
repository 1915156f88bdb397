"""gru_align: the shared GRU brain encoder trained so that its embeddings match what a frozen audio
encoder makes of text-to-speech audio of the attempted sentence.

brain features -> GRUEncoder (day layers, patching, GRU) -> projector -> (B, P, target dim)
sentence -> TTS -> audio encoder -> (T, target dim), precomputed once per sentence (TargetCache)

Losses (weights in `loss_weights`): the interpolated frame-wise cosine,
sentence-level InfoNCE across the batch, and an optional auxiliary CTC head over the 41 phoneme
classes. Evaluation ranks every sentence of the split by similarity (alignment.retrieval) and
writes the best as the trial's text (the harness turns the ranks into retrieval accuracy); with the
CTC head on, the run also reports phonemes (PER) and, through a shared word decoder, words
(`text_source: ctc_words` makes those the predicted text). At every validation the experiment trackers
get a heatmap of the cosine similarity of every brain frame to every target frame of one trial
(`validation_figures`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from alignment.losses import LossWeights, alignment_losses, weighted_total
from alignment.retrieval import CandidateSet, build_candidates, rank_candidates
from alignment.store import TargetStore, fill_targets, make_projector, standardized_targets
from alignment.targets import TargetParams
from config import ComponentSpec, EvaluationParams, above, at_least
from gru_decoder import GRUEncoder, GRUEncoderParams
from harness.errors import UserError
from harness.metrics import split_metrics as error_rates
from harness.metrics import trial_error_columns
from harness.model_api import DecoderModel
from harness.phonemes import N_CLASSES
from registry import register_model_constructor
from word_decoding import NoWords, build_word_decoder, greedy_phonemes, log_softmax_cpu, word_decoder_field

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    # With the CTC head (loss_weights.ctc > 0): phonemes -> words through a shared word decoder
    # (greedy writes no words), and which text goes in `predicted_text` (the other goes in its own column).
    word_decoder: ComponentSpec = word_decoder_field()
    text_source: Literal["retrieval", "ctc_words"] = "retrieval"

    def problems(self):
        yield from super().problems()
        yield from at_least(self, 0, "projector_hidden")
        yield from at_least(self, 1, "align_frames")
        yield from above(self, 0, "infonce_temperature")


class GRUAlign(GRUEncoder, DecoderModel):
    """State-dict keys: the encoder's (h0, day_weights.*, day_biases.*, gru.*), projector.*,
    target_mean, and ctc_head.* when the CTC weight is > 0. The targets themselves stay in the
    cache, not in checkpoints."""

    def __init__(self, p: GRUAlignParams, targets: TargetStore, evaluation: EvaluationParams,
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
        return self.loss_from(self.embed(batch), batch)

    def decode(self, batch):
        return self.rows_from(self.embed(batch), batch, decode_words=True)

    def evaluate(self, batch, *, with_loss, decode_words=True):
        outputs = self.embed(batch)  # once, for the losses and the rows
        parts = self.loss_from(outputs, batch) if with_loss and batch.phoneme_ids is not None else None
        return parts, self.rows_from(outputs, batch, decode_words)

    def loss_from(self, outputs, batch):
        hidden, emb, lengths = outputs
        emb = emb.float()
        target, target_lengths = self.batch_targets(batch.sentences, emb.device)
        parts = alignment_losses(
            self.p.loss_weights, emb, lengths, target, target_lengths, batch.sentences,
            temperature=self.p.infonce_temperature, similarity=self.p.infonce_similarity,
            align_frames=self.p.align_frames, ctc_logits=self.ctc_head(hidden) if self.ctc_head is not None else None,
            phoneme_ids=batch.phoneme_ids, phoneme_lengths=batch.phoneme_lengths)
        return {"loss": weighted_total(self.p.loss_weights, parts), **parts}

    def prepare_split(self, split, trials):
        sentences = list(dict.fromkeys(t.sentence for t in trials if t.sentence))
        if not sentences:
            self.candidates = None
            return
        targets, lengths = self.batch_targets(sentences, self.target_mean.device)
        self.candidates = build_candidates(sentences, targets, lengths, self.p.align_frames)

    def rows_from(self, outputs, batch, decode_words: bool) -> list[dict]:
        """Retrieval, and with the CTC head greedy phonemes and (unless decode_words is false: the
        search validation on PER skips) the word decoder's text."""
        hidden, emb, lengths = outputs
        rows = [{} for _ in range(len(batch))]
        if self.candidates is not None:
            ranked = rank_candidates(emb, lengths, self.candidates, self.p.retrieval_score, batch.sentences)
            for row, found in zip(rows, ranked):
                row.update(found)
        if self.ctc_head is not None:
            logits = self.ctc_head(hidden)
            words = (self.word_decoder.decode(log_softmax_cpu(logits), lengths.cpu()) if decode_words
                     else [None] * len(batch))
            for row, phonemes, text in zip(rows, greedy_phonemes(logits, lengths), words):
                row.update(predicted_phonemes=phonemes, ctc_text=text)
        source = "retrieved_text" if self.p.text_source == "retrieval" else "ctc_text"
        for row in rows:
            row["predicted_text"] = row.pop(source, None)
        return rows

    def validation_figures(self, batch):
        """The cosine similarity of each brain embedding frame to each (standardised) target frame of
        the batch's first trial: what the frame-wise loss aligns, before any resampling."""
        if not batch.sentences or not batch.sentences[0]:
            return {}
        _, emb, lengths = self.embed(batch)
        target, target_lengths = self.batch_targets(batch.sentences[:1], emb.device)
        brain = nn.functional.normalize(emb[0, : int(lengths[0])].float(), dim=-1)
        audio = nn.functional.normalize(target[0, : int(target_lengths[0])].float(), dim=-1)
        return {"brain_target_similarity": similarity_figure((brain @ audio.T).cpu().numpy(), batch.sentences[0],
                                                             self.target_name)}

    def split_metrics(self, split, rows):
        metrics = {"targets": self.target_name, "text_source": self.p.text_source}
        if self.ctc_head is not None:
            metrics.update(self.word_decoder.split_metrics(rows))
            if self.p.text_source == "retrieval" and any(r.get("ctc_text") for r in rows):
                metrics["ctc_words"] = self.ctc_word_metrics(rows)
        if self.candidates is not None:  # the accuracy itself is the harness's, from true_rank
            n = len(self.candidates.sentences)
            metrics.update(n_candidates=n, retrieval_chance_top1=1 / n)
        return metrics

    def ctc_word_metrics(self, rows) -> dict:
        """WER and CER of the CTC head's words, when the retrieved text is the predicted text."""
        scored = [{"session": r["session"], **trial_error_columns(r["reference_text"], r["ctc_text"], None, None)}
                  for r in rows]
        m = error_rates(scored, seed=self.evaluation.bootstrap_seed, n_resamples=self.evaluation.bootstrap_resamples)
        return {k: m[k] for k in ("wer", "wer_ci", "cer", "cer_ci")}


def similarity_figure(similarity, sentence: str, target_name: str) -> Figure:
    """(brain frames, target frames) cosine similarities as a heatmap, brain frames up the y axis."""
    from matplotlib.figure import Figure  # here: matplotlib is not imported until a figure is drawn

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(similarity, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1,
                      interpolation="nearest")
    ax.set_xlabel(f"target frame ({target_name})")
    ax.set_ylabel("brain embedding frame (patch)")
    ax.set_title(textwrap.shorten(sentence, 70), fontsize=9)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    return fig


@register_model_constructor()
def gru_align(params: GRUAlignParams, ctx):
    if params.loss_weights.cosine <= 0 and params.loss_weights.infonce <= 0:
        raise UserError("model_params.loss_weights: cosine or infonce must be > 0 (the model aligns nothing otherwise)")
    if params.text_source == "ctc_words" and (params.loss_weights.ctc <= 0 or params.word_decoder.name == "greedy"):
        raise UserError("model_params.text_source: ctc_words needs the CTC head (loss_weights.ctc > 0) and a word "
                        "decoder that writes words (model_params.word_decoder.name, e.g. lexicon_ngram)")
    targets = TargetStore(params.targets, ctx.cache_dir)
    stats = fill_targets(targets, ctx.trials, params.standardize_targets)
    words = None
    if params.loss_weights.ctc > 0 and params.word_decoder.name != "greedy":
        words = build_word_decoder(params.word_decoder, ctx.training_sentences(), ctx.cache_dir)
    return GRUAlign(params, targets, ctx.config.evaluation, stats, words)
