"""The Brain-to-Text '25 baseline as a b2t-bench model: GRU encoder + linear phoneme head, CTC loss,
greedy phoneme decoding (docs/reference.md, sections 3 and 6) and a configurable word decoder
(`model_params.word_decoder`, the shared word_decoding package) for the text."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from config import ComponentSpec
from gru_decoder import GRUEncoder, GRUEncoderParams
from harness.model_api import DecoderModel
from harness.phonemes import BLANK_ID, N_CLASSES
from registry import register_model_constructor
from word_decoding import NoWords, build_word_decoder, greedy_phonemes, log_softmax_cpu, word_decoder_field


@dataclass
class CTCBaselineParams(GRUEncoderParams):
    """Every key of model_params: the encoder sizes (GRUEncoderParams) plus the head and the loss."""

    n_classes: int = N_CLASSES  # 41: blank, 39 phonemes, SIL
    # The reference trainer uses CTCLoss(zero_infinity=False): an impossible alignment (too few
    # output frames for the targets) gives an infinite loss instead of being silently zeroed.
    zero_infinity: bool = False
    # Phonemes -> text: greedy (no text), lexicon_ngram (lexicon + n-gram beam search, optional LLM
    # rescoring). Not part of the network: a checkpoint decodes with any word decoder.
    word_decoder: ComponentSpec = word_decoder_field()

    def problems(self):
        yield from super().problems()
        if self.n_classes != N_CLASSES:
            yield "n_classes", (f"is {self.n_classes}: it must be {N_CLASSES} (blank, 39 phonemes, SIL: the classes "
                                "of the labels and of the word decoders)")


class CTCBaseline(GRUEncoder, DecoderModel):
    """GRUDecoder of the reference. Subclassing the encoder keeps the reference state-dict keys:
    h0, day_weights.*, day_biases.*, gru.*, out.weight, out.bias."""

    def __init__(self, p: CTCBaselineParams, word_decoder=None):
        super().__init__(p)
        self.word_decoder = word_decoder or NoWords()  # built from p.word_decoder by ctc_baseline() below
        self.min_time_steps = p.patch_size  # shorter trials give no output frame
        self.zero_infinity = p.zero_infinity
        self.out = nn.Linear(p.n_units, p.n_classes)
        nn.init.xavier_uniform_(self.out.weight)  # as the reference code (docs/reference.md, section 3)

    def forward(self, features, lengths, day_indices):
        """-> raw logits (B, P, n_classes) and the valid output frames per trial (B,)."""
        hidden, out_lengths = self.encode(features, lengths, day_indices)
        return self.out(hidden), out_lengths

    def loss(self, batch):
        return self.loss_from(self(batch.features, batch.lengths, batch.day_indices), batch)

    def decode(self, batch):
        return self.rows_from(self(batch.features, batch.lengths, batch.day_indices), decode_words=True)

    def evaluate(self, batch, *, with_loss, decode_words=True):
        outputs = self(batch.features, batch.lengths, batch.day_indices)  # once, for the loss and the rows
        parts = self.loss_from(outputs, batch) if with_loss and batch.phoneme_ids is not None else None
        return parts, self.rows_from(outputs, decode_words)

    def loss_from(self, outputs, batch):
        logits, out_lengths = outputs
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (P, B, classes), float32 under bf16 too
        per_trial = F.ctc_loss(log_probs, batch.phoneme_ids, out_lengths, batch.phoneme_lengths,
                               blank=BLANK_ID, reduction="none", zero_infinity=self.zero_infinity)
        ctc = per_trial.mean()  # mean over trials, no length normalisation (docs/reference.md, section 6)
        return {"loss": ctc, "ctc": ctc}

    def rows_from(self, outputs, decode_words: bool) -> list[dict]:
        """Greedy phonemes, and the word decoder's text unless decode_words is false (its search is
        what validation on PER skips)."""
        logits, out_lengths = outputs
        phonemes = greedy_phonemes(logits, out_lengths)
        texts = (self.word_decoder.decode(log_softmax_cpu(logits), out_lengths.cpu()) if decode_words
                 else [None] * len(phonemes))  # None: no text
        return [{"predicted_phonemes": p} | ({"predicted_text": t} if t is not None else {})
                for p, t in zip(phonemes, texts)]

    def split_metrics(self, split: str, rows: list[dict]) -> dict:
        return self.word_decoder.split_metrics(rows)


@register_model_constructor()
def ctc_baseline(params: CTCBaselineParams, ctx):
    # greedy needs no text; the others build their vocabulary and LM from the training transcriptions
    sentences = ctx.training_sentences() if params.word_decoder.name != "greedy" else []
    return CTCBaseline(params, build_word_decoder(params.word_decoder, sentences, ctx.cache_dir))
