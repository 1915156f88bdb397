"""Deprecated: word decoding moved to the shared package `word_decoding` (CHANGELOG, 0.2.0).
This module re-exports it until 0.3."""

import warnings

from config import ComponentSpec as WordDecoderSpec  # noqa: F401  the one component spec now
from word_decoding import NoWords, build_word_decoder, greedy_phonemes, log_softmax_cpu  # noqa: F401
from word_decoding.decoders import LexiconNgramDecoder, LexiconNgramParams, lexicon_ngram  # noqa: F401

warnings.warn("ctc_baseline.word_decoding moved to word_decoding (import from word_decoding); "
              "this path goes in 0.3", DeprecationWarning, stacklevel=2)
