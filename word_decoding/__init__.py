"""Shared word decoding: phoneme log-probabilities of any 41-class CTC head -> words.

Registers the word decoders `greedy` and `lexicon_ngram` (decoders.py): lexicon (lexicon.py),
n-gram LM (ngram.py), CTC beam search (beam_search.py), n-best LLM rescoring (rescoring.py).
Model folders import from here; none imports another model folder.
"""

from word_decoding.ctc import greedy_phonemes, log_softmax_cpu
from word_decoding.decoders import LexiconNgramParams, NoWords, build_word_decoder, word_decoder_field

__all__ = ["LexiconNgramParams", "NoWords", "build_word_decoder", "greedy_phonemes", "log_softmax_cpu",
           "word_decoder_field"]
