"""CTC beam search over words: flashlight-text's LexiconDecoder with a KenLM n-gram inside.

The search is the library's; this module only sets it up the way the reference's WFST decoder is
set up (docs/reference.md, section 8), with the same parameter meanings:

- emissions are `acoustic_scale * log_softmax(logits)`, the blank's log-probability first lowered
  by log(blank_penalty);
- the lexicon trie spells each word as its phonemes followed by SIL, the labels' convention (one SIL
  after every word, the last included); more SIL frames are free between words (`sil_score` is added
  per SIL frame);
- the n-gram term is `lm_weight` times the natural-log probability (KenLM returns log10: the
  weight handed to flashlight is multiplied by ln 10), plus `word_score` per word;
- `beam_threshold` prunes hypotheses that many (scaled) log units below the best, as Kaldi's beam.

Class order: the trie and the emissions use this project's 41-class order (blank 0, AA..ZH 1-39,
SIL 40, harness.phonemes) directly. The reference's decoder wanted [BLANK, SIL, AA..ZH] and permuted
the logits; nothing is permuted here because the trie is built in the model's own order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flashlight.lib.text.decoder import CriterionType, LexiconDecoder, LexiconDecoderOptions, SmearingMode, Trie
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import Dictionary

from config import above, at_least, non_negative
from harness.errors import UserError
from harness.phonemes import BLANK_ID, N_CLASSES, PHONEME_TO_ID, SIL_ID
from word_decoding.lexicon import Lexicon

LN10 = math.log(10)
UNK = "<unk>"


@dataclass
class BeamSearchParams:
    """The search's knobs; names and meanings follow the reference's decoder (docs/reference.md,
    section 8). The defaults are the untuned probabilistic combination (log p(phonemes) + log p(words)); the
    reference tuned acoustic_scale 0.325 and blank_penalty 90 for its model (configs/ctc_baseline/b2txt25.yml)."""

    acoustic_scale: float = 1.0  # weight of the phoneme log-probabilities against the LM; above 0
    blank_penalty: float = 1.0  # the blank's probability is divided by this (1: no penalty); above 0
    lm_weight: float = 1.0  # weight of the n-gram's natural-log probability; 0: lexicon-only search
    word_score: float = 0.0  # added per word (a word insertion bonus when positive)
    sil_score: float = 0.0  # added per SIL frame
    beam_size: int = 100  # hypotheses kept per frame
    beam_size_token: int = N_CLASSES  # classes tried per frame (the most probable first)
    beam_threshold: float = 17.0  # drop hypotheses this far below the frame's best (Kaldi's beam); 0 or more
    nbest: int = 1  # distinct word sequences returned (LLM rescoring picks among them)

    def problems(self):
        """What check_params() checks when the search is built, and the rest, at config load."""
        yield from above(self, 0, "acoustic_scale", "blank_penalty")
        yield from non_negative(self, "lm_weight")
        for name in ("word_score", "sil_score"):
            if not math.isfinite(getattr(self, name)):
                yield name, f"is {getattr(self, name)}: it must be a finite number"
        yield from at_least(self, 1, "beam_size", "beam_size_token", "nbest")
        yield from at_least(self, 0, "beam_threshold")


@dataclass
class Hypothesis:
    words: tuple[str, ...]
    acoustic: float  # log-probability of the best path (blank penalty included), before acoustic_scale
    ngram: float  # natural-log n-gram probability of the words, end of sentence included
    score: float  # the search's total: scaled acoustic + weighted LM + word and SIL scores

    @property
    def text(self) -> str:
        return " ".join(self.words)


def check_params(p: BeamSearchParams) -> None:
    if p.acoustic_scale <= 0:
        raise UserError(f"acoustic_scale must be positive, got {p.acoustic_scale}")
    if p.blank_penalty <= 0:
        raise UserError(f"blank_penalty must be positive (1: no penalty), got {p.blank_penalty}")
    for name in ("beam_size", "beam_size_token", "nbest"):
        if getattr(p, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(p, name)}")


class LexiconBeamSearch:
    """Decodes one trial's (T, 41) log-probabilities into its n-best distinct word sequences."""

    def __init__(self, lexicon: Lexicon, lm_path: str, params: BeamSearchParams):
        check_params(params)
        if not lexicon.pronunciations:
            raise UserError("the lexicon is empty: no vocabulary word has a pronunciation")
        self.params = params
        self.lexicon, self.lm_path = lexicon, str(lm_path)  # what a worker process needs to build its own copy
        self.words = set(lexicon.words)
        self.word_dict = Dictionary()
        for word in (*lexicon.words, UNK):
            self.word_dict.add_entry(word)
        try:
            self.lm = KenLM(str(lm_path), self.word_dict)
        except RuntimeError as error:
            raise UserError(f"KenLM cannot read the language model {lm_path}: {error}") from None
        self.trie = Trie(N_CLASSES, SIL_ID)
        start = self.lm.start(False)
        for word, spellings in lexicon.pronunciations.items():
            index = self.word_dict.get_index(word)
            _, unigram = self.lm.score(start, index)  # smearing: the best LM score below each trie node
            for spelling in spellings:
                self.trie.insert([PHONEME_TO_ID[p] for p in spelling] + [SIL_ID], index, unigram)
        self.trie.smear(SmearingMode.MAX)
        options = LexiconDecoderOptions(
            beam_size=params.beam_size, beam_size_token=params.beam_size_token,
            beam_threshold=params.beam_threshold, lm_weight=params.lm_weight * LN10,
            word_score=params.word_score, unk_score=-math.inf,  # only lexicon words
            sil_score=params.sil_score, log_add=False, criterion_type=CriterionType.CTC)
        self.decoder = LexiconDecoder(options, self.trie, self.lm, SIL_ID, BLANK_ID,
                                      self.word_dict.get_index(UNK), [], False)

    def emissions(self, log_probs: np.ndarray) -> np.ndarray:
        """What the search scores: scaled log-probabilities with the blank penalty."""
        scores = np.array(log_probs, dtype=np.float32, copy=True)
        scores[:, BLANK_ID] -= math.log(self.params.blank_penalty)
        return np.ascontiguousarray(scores * self.params.acoustic_scale, dtype=np.float32)

    def search(self, log_probs: np.ndarray) -> list[Hypothesis]:
        """log_probs: (T, 41) log-softmax outputs of one trial (valid frames only). Best first,
        never empty (no frame gives one empty hypothesis)."""
        if log_probs.ndim != 2 or log_probs.shape[1] != N_CLASSES:
            raise ValueError(f"expected (T, {N_CLASSES}) log-probabilities, got shape {log_probs.shape}")
        emissions = self.emissions(log_probs)
        results = self.decoder.decode(emissions.ctypes.data, len(emissions), N_CLASSES)
        found: dict[tuple[str, ...], Hypothesis] = {}
        last = -math.inf  # score of the last hypothesis kept
        for result in results:  # best first; many differ only in their alignment
            if len(found) >= self.params.nbest and result.score < last:
                break  # enough, and no more ties with the last one kept
            words = tuple(self.word_dict.get_entry(i) for i in result.words if i >= 0)
            if words not in found:
                found[words] = Hypothesis(words, result.emittingModelScore / self.params.acoustic_scale,
                                          result.lmScore * LN10, result.score)
                last = result.score
        # Exact ties (homophones under equal LM scores) come out of flashlight in an order that depends
        # on memory addresses; the words break them, so that a rerun decodes the same text.
        ranked = sorted(found.values(), key=lambda h: (-h.score, h.words))[:self.params.nbest]
        return ranked or [Hypothesis((), 0.0, 0.0, 0.0)]  # no frame: no word
