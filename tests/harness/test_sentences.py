"""The built-in sentence generator and CMU pronunciation (harness.sentences, harness.pronounce)."""

import numpy as np
import pytest

from harness.errors import UserError
from harness.phonemes import PHONEMES
from harness.pronounce import cmu_dict, oov_words, sentence_ids, sentence_phonemes, words
from harness.sentences import MAX_WORDS, MIN_WORDS, generate_sentence, sentence_key, unique_sentences, vocabulary


def test_every_vocabulary_word_is_in_cmudict():
    vocab = vocabulary()
    assert len(vocab) > 200
    assert sorted(w for w in vocab if w not in cmu_dict()) == []


def test_sentences_look_like_copy_task_prompts():
    rng = np.random.default_rng(0)
    vocab = vocabulary()
    for _ in range(2000):
        s = generate_sentence(rng)
        body = s[:-1].split()
        assert MIN_WORDS <= len(body) <= MAX_WORDS, s
        assert s[0].isupper() and s[-1] in ".?!", s
        assert set(words(s)) <= vocab, s
        assert "i" not in body, s  # the pronoun is capitalised
        for w, nxt in zip(body, body[1:]):
            assert not (w == "a" and nxt[0] in "aeiou"), s
        assert oov_words(s) == []


def test_generator_is_deterministic_per_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [generate_sentence(rng) for _ in range(50)]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_thousands_of_distinct_sentences():
    sentences = unique_sentences(np.random.default_rng(0), 4000)
    assert len({sentence_key(s) for s in sentences}) == 4000


def test_unique_sentences_errors_when_the_grammar_runs_out(monkeypatch):
    import harness.sentences as S
    monkeypatch.setattr(S, "TEMPLATES", ("i feel {feeling}.",))
    with pytest.raises(UserError, match="ran out"):
        unique_sentences(np.random.default_rng(0), len(S.SLOTS["feeling"]) + 1)


def test_hello_world():
    # cmudict: hello -> HH AH0 L OW1 (first of two), world -> W ER1 L D
    assert sentence_phonemes("Hello, world!") == "HH AH L OW SIL W ER L D SIL".split()
    assert sentence_ids("hello world") == [PHONEMES.index(p) for p in
                                           "HH AH L OW SIL W ER L D SIL".split()]
    assert sentence_ids("hello world") == [16, 3, 21, 25, 40, 36, 12, 21, 9, 40]


def test_normalisation_keeps_letters_hyphen_apostrophe():
    assert words("I'm home -- at\tlast, X-ray?") == ["i'm", "home", "at", "last", "x-ray"]
    assert sentence_phonemes("I'm") == ["AY", "M", "SIL"]


def test_no_stress_digits_and_sil_after_every_word():
    phonemes = sentence_phonemes("The old man reads a short letter.")
    assert all(p in PHONEMES for p in phonemes)
    assert phonemes.count("SIL") == 7 and phonemes[-1] == "SIL"


def test_out_of_dictionary_words():
    assert oov_words("The zorblaxian cat ate 5 fish.") == ["zorblaxian", "5"]
    assert oov_words("The cat ate fish.") == []
    with pytest.raises(UserError, match="zorblaxian"):
        sentence_phonemes("the zorblaxian cat")
