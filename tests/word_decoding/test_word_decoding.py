"""Word decoding (the word_decoding package): the Kneser-Ney ARPA builder read back
through KenLM, the lexicon, the flashlight beam search against a brute-force oracle, LLM rescoring
with a tiny causal LM built from a config, and a CTC baseline run that reports WER and writes text."""

import csv
import itertools
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from config import ComponentSpec
from harness.errors import UserError
from harness.phonemes import BLANK_ID, N_CLASSES, PHONEME_TO_ID
from tests.conftest import REPO_ROOT
from word_decoding import greedy_phonemes, ngram
from word_decoding.beam_search import BeamSearchParams, Hypothesis, LexiconBeamSearch
from word_decoding.decoders import LexiconNgramParams, build_word_decoder
from word_decoding.lexicon import Lexicon, cmu_lexicon, read_lexicon

kenlm = pytest.importorskip("kenlm")


# ----------------------------------------------------------------------------------------------
# n-gram LM


def kenlm_model(arpa_text, tmp_path, name="lm.arpa"):
    path = tmp_path / name
    path.write_text(arpa_text)
    return kenlm.Model(str(path))


def context_state(model, context):
    state = kenlm.State()
    if context and context[0] == "<s>":
        model.BeginSentenceWrite(state)
        context = context[1:]
    else:
        model.NullContextWrite(state)
    for word in context:
        out = kenlm.State()
        model.BaseScore(state, word, out)
        state = out
    return state


@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_context_sums_to_one_through_kenlm(order, tmp_path):
    rng = np.random.default_rng(order)
    words = "a b c d e f g h".split()
    # Zipf-like word frequencies, so that counts of counts t1..t4 are all populated (real discounts)
    p = 1 / np.arange(1, len(words) + 1)
    sentences = [[str(w) for w in rng.choice(words, size=rng.integers(1, 8), p=p / p.sum())] for _ in range(400)]
    model = kenlm_model(ngram.kneser_ney_arpa(sentences, order), tmp_path)
    predicted = [*words, "</s>", "<unk>"]
    counts = ngram.count_ngrams(sentences, order)
    contexts = [()] + [g for n in range(1, order) for g in counts[n] if g[-1] != "</s>"]
    assert len(contexts) > 9 * (order - 1)  # many contexts, every one of them checked
    for context in contexts:
        state = context_state(model, context)
        total = sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in predicted)
        assert total == pytest.approx(1, abs=1e-5), context


def test_discounts_come_from_the_counts_of_counts_with_lmplz_fallback():
    # t1..t4 = 4, 2, 1, 1: Y = 4/8 = 0.5, D1 = 1 - 2*.5*2/4 = 0.5, D2 = 2 - 3*.5*1/2 = 1.25, D3+ = 3 - 4*.5*1 = 1
    counts = {("a",): 1, ("b",): 1, ("c",): 1, ("d",): 1, ("e",): 2, ("f",): 2, ("g",): 3, ("h",): 7}
    assert ngram.discounts(counts) == pytest.approx((0.5, 1.25, 1.0))
    assert ngram.discounts({("a",): 1, ("b",): 1}) == ngram.FALLBACK_DISCOUNTS  # no t2, t3: as lmplz


def test_kneser_ney_backs_off_to_continuation_counts(tmp_path):
    # "francisco" is frequent but only ever follows "san"; "table" is rarer but follows many words.
    sentences = [["san", "francisco"]] * 10 + [[w, "table"] for w in "a b c d e".split()]
    model = kenlm_model(ngram.kneser_ney_arpa(sentences, 2), tmp_path)
    after_unseen = context_state(model, ("table",))  # a context neither word has followed
    assert model.BaseScore(after_unseen, "table", kenlm.State()) > model.BaseScore(after_unseen, "francisco", kenlm.State())
    after_san = context_state(model, ("san",))
    assert model.BaseScore(after_san, "francisco", kenlm.State()) > math.log10(0.8)  # 10 of 10, minus D3+


def test_build_arpa_refuses_a_unigram_model_and_empty_text(tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        ngram.build_arpa([["a"]], 1, tmp_path / "x.arpa")
    with pytest.raises(UserError, match="no text"):
        ngram.build_arpa([[]], 3, tmp_path / "x.arpa")


@pytest.mark.skipif(shutil.which("lmplz") is None, reason="KenLM's lmplz is not on the PATH (no wheel ships it)")
def test_lmplz_output_sums_to_one_too(tmp_path):
    sentences = [["a", "b", "c"], ["a", "c"], ["b", "c", "a"]] * 20
    assert ngram.build_arpa(sentences, 3, tmp_path / "lm.arpa") == "lmplz"
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    total = sum(10 ** model.BaseScore(context_state(model, ("a",)), w, kenlm.State()) for w in "a b c </s> <unk>".split())
    assert total == pytest.approx(1, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# lexicon


def test_cmu_lexicon_strips_stress_keeps_variants_and_lists_missing_words():
    lexicon = cmu_lexicon(["read", "the", "zzyzxq", "the"])
    assert ("R", "IY", "D") in lexicon.pronunciations["read"] and ("R", "EH", "D") in lexicon.pronunciations["read"]
    assert all(p in PHONEME_TO_ID for spellings in lexicon.pronunciations.values() for s in spellings for p in s)
    assert lexicon.words == ["read", "the"] and lexicon.missing == ["zzyzxq"]


def test_user_lexicon_file(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text("Cat K AE1 T\ncat K AE T\ncat K AA T\n\nzork Z AO R K\n")
    assert read_lexicon(path).pronunciations == {"cat": [("K", "AE", "T"), ("K", "AA", "T")],
                                                 "zork": [("Z", "AO", "R", "K")]}
    path.write_text("cat K AE T\ndog D OG G\n")
    with pytest.raises(UserError, match=r"lexicon.txt:2: unknown phonemes OG"):
        read_lexicon(path)


def test_a_missing_dictionary_word_is_reported_in_the_log(tmp_path, caplog):
    spec = ComponentSpec("lexicon_ngram", {"lm_order": 2})
    decoder = build_word_decoder(spec, ["The cat sat.", "A zzyzxq sat on 3 mats."], tmp_path)
    with caplog.at_level(logging.WARNING):  # reported when decoding starts: inside the run log
        decoder.decode(torch.zeros(1, 4, N_CLASSES).log_softmax(-1), [4])
        decoder.decode(torch.zeros(1, 4, N_CLASSES).log_softmax(-1), [4])
    assert caplog.text.count("not in the dictionary") == 1
    assert "2 vocabulary words are not in the dictionary and cannot be decoded: zzyzxq, 3" in caplog.text
    assert "zzyzxq" not in decoder.vocabulary and "mats" in decoder.vocabulary


# ----------------------------------------------------------------------------------------------
# beam search


HAND_ARPA = """
\\data\\
ngram 1=6
ngram 2=4

\\1-grams:
-1.5\t<unk>
-99\t<s>\t-0.5
-0.8\t</s>
-0.6\tthe\t-0.4
-1.0\tcat\t-0.3
-2.5\tcap\t-0.3

\\2-grams:
-0.05\t<s> the
-0.1\tthe cat
-0.1\tcat </s>
-0.2\tcap </s>

\\end\\
"""
HAND_LEXICON = "the DH AH\ncat K AE T\ncap K AE P\n"


def peaked_log_probs(frames, rng=None, noise=0.0):
    """(T, 41) log-probs: each frame a dict {class: weight} (logits), everything else at 0."""
    logits = np.zeros((len(frames), N_CLASSES), dtype=np.float32)
    for t, frame in enumerate(frames):
        for symbol, value in frame.items():
            logits[t, PHONEME_TO_ID.get(symbol, BLANK_ID) if symbol != "-" else BLANK_ID] = value
    if noise:
        logits += rng.normal(0, noise, logits.shape).astype(np.float32)
    return torch.tensor(logits).log_softmax(-1).numpy()


def hand_decoder(tmp_path, **params):
    (tmp_path / "hand.arpa").write_text(HAND_ARPA)
    (tmp_path / "hand.lex").write_text(HAND_LEXICON)
    spec = ComponentSpec("lexicon_ngram", {"lexicon_file": str(tmp_path / "hand.lex"),
                                             "lm_path": str(tmp_path / "hand.arpa"), "use_train_text": False,
                                             "acoustic_scale": 1.0, "blank_penalty": 1.0, **params})
    return build_word_decoder(spec, [], tmp_path)


# "the cap": P beats T by a little at the one frame that tells them apart.
THE_CAP_OR_CAT = [{"DH": 8}, {"AH": 8}, {"SIL": 8}, {"-": 8}, {"K": 8}, {"AE": 8}, {"P": 6, "T": 5.5}, {"SIL": 8}]


def test_the_lm_fixes_a_word_that_greedy_decoding_gets_wrong(tmp_path):
    log_probs = torch.tensor(peaked_log_probs(THE_CAP_OR_CAT))[None]
    lengths = torch.tensor([len(THE_CAP_OR_CAT)])
    assert greedy_phonemes(log_probs, lengths) == ["DH AH SIL K AE P SIL"]
    assert hand_decoder(tmp_path, lm_weight=0.0).decode(log_probs, lengths) == ["the cap"]
    assert hand_decoder(tmp_path, lm_weight=1.0).decode(log_probs, lengths) == ["the cat"]


def best_path_log_prob(log_probs, target):
    """Oracle: the best single CTC alignment of `target` (Viterbi over the blank-extended target)."""
    ext = [BLANK_ID]
    for symbol in target:
        ext += [symbol, BLANK_ID]
    alpha = np.full(len(ext), -np.inf)
    alpha[:2] = log_probs[0, ext[:2]]
    for frame in log_probs[1:]:
        stay, step = alpha, np.concatenate([[-np.inf], alpha[:-1]])
        skip = np.concatenate([[-np.inf, -np.inf], alpha[:-2]])
        skip[[s for s in range(len(ext)) if ext[s] == BLANK_ID or (s >= 2 and ext[s] == ext[s - 2])]] = -np.inf
        alpha = np.maximum(np.maximum(stay, step), skip) + frame[ext]
    return max(alpha[-1], alpha[-2])


def test_lm_weight_0_is_the_best_lexicon_constrained_alignment(tmp_path):
    """Against brute force: every sequence of up to 3 lexicon words, scored by its best alignment."""
    spellings = {"cat": "K AE T", "cap": "K AE P", "at": "AE T", "tap": "T AE P", "pat": "P AE T"}
    lexicon = Lexicon({w: [tuple(s.split())] for w, s in spellings.items()})
    (tmp_path / "lm.arpa").write_text(ngram.kneser_ney_arpa([["cat", "at", "tap"], ["pat", "cap"]] * 3, 2))
    search = LexiconBeamSearch(lexicon, str(tmp_path / "lm.arpa"), BeamSearchParams(
        lm_weight=0.0, acoustic_scale=1.0, blank_penalty=1.0, beam_size=2000, beam_threshold=1000))
    candidates = [c for n in (1, 2, 3) for c in itertools.product(spellings, repeat=n)]
    rng = np.random.default_rng(0)
    for _ in range(6):
        truth = rng.choice(list(spellings), size=rng.integers(1, 4))
        frames = []
        for word in truth:  # each phoneme 1-2 frames, blanks inside words, SIL never competitive elsewhere
            for phoneme in spellings[word].split():
                frames += [{phoneme: 3.0, "SIL": -6}] * int(rng.integers(1, 3)) + [{"-": 2.0, "SIL": -6}] * int(rng.integers(0, 2))
            frames.append({"SIL": 4.0})
        log_probs = peaked_log_probs(frames, rng, noise=1.5)
        oracle = {c: best_path_log_prob(log_probs, [PHONEME_TO_ID[p] for w in c for p in (*spellings[w].split(), "SIL")])
                  for c in candidates}
        best = max(oracle, key=oracle.get)
        found = search.search(log_probs)[0]
        assert found.words == best
        assert found.acoustic == pytest.approx(oracle[best], abs=1e-3)


def test_every_decoded_word_is_in_the_lexicon_and_the_nbest_is_distinct(tmp_path):
    decoder = hand_decoder(tmp_path, nbest=20, beam_size=200)
    rng = np.random.default_rng(1)
    log_probs = torch.randn(8, 30, N_CLASSES, generator=torch.Generator().manual_seed(1)).mul(3).log_softmax(-1)
    lengths = torch.tensor(rng.integers(1, 31, size=8))
    for text in decoder.decode(log_probs, lengths):
        assert set(text.split()) <= {"the", "cat", "cap"}
    nbest = decoder.search.search(log_probs[0].numpy())
    assert len(nbest) > 1
    assert len({h.words for h in nbest}) == len(nbest)  # distinct word sequences, not alignments
    assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)


def test_the_sil_class_is_the_word_separator_of_the_project_order(tmp_path):
    """Words are delimited by class 40 (SIL in harness.phonemes); the reference's decoder had it at 1."""
    decoder = hand_decoder(tmp_path, lm_weight=0.0)
    the_cat = [{"DH": 8}, {"AH": 8}, {"SIL": 8}, {"K": 8}, {"AE": 8}, {"T": 8}, {"SIL": 8}]
    assert decoder.decode(torch.tensor(peaked_log_probs(the_cat))[None], [7]) == ["the cat"]
    no_separator = [f for f in the_cat if "SIL" not in f]  # no SIL: no complete word after "the"
    assert decoder.decode(torch.tensor(peaked_log_probs(no_separator))[None], [5]) != ["the cat"]


def test_exact_ties_are_broken_by_the_words_so_reruns_agree(tmp_path):
    """Homophones with equal LM probabilities tie exactly; flashlight orders ties by memory address."""
    (tmp_path / "tie.arpa").write_text("\\data\\\nngram 1=5\nngram 2=1\n\n\\1-grams:\n-2\t<unk>\n-99\t<s>\t0\n"
                                        "-0.5\t</s>\t0\n-0.5\tthere\t0\n-0.5\ttheir\t0\n\n\\2-grams:\n"
                                        "-0.3\t<s> there\n\n\\end\\\n")
    lexicon = Lexicon({"there": [("DH", "EH", "R")], "their": [("DH", "EH", "R")]})
    log_probs = peaked_log_probs([{"DH": 8}, {"EH": 8}, {"R": 8}, {"SIL": 8}])
    search = LexiconBeamSearch(lexicon, str(tmp_path / "tie.arpa"), BeamSearchParams(lm_weight=0.0, nbest=2))
    assert {search.search(log_probs)[0].words for _ in range(30)} == {("their",)}  # a tie: alphabetical
    search = LexiconBeamSearch(lexicon, str(tmp_path / "tie.arpa"), BeamSearchParams(lm_weight=1.0, nbest=2))
    assert {search.search(log_probs)[0].words for _ in range(30)} == {("there",)}  # the LM breaks it


# ----------------------------------------------------------------------------------------------
# specs, params and the cache


def test_word_decoder_params_are_checked_strictly(tmp_path):
    with pytest.raises(UserError, match=r"model_params.word_decoder.params.lm_ordr: unknown key; did you mean 'lm_order'"):
        build_word_decoder(ComponentSpec("lexicon_ngram", {"lm_ordr": 3}), ["a b"], tmp_path)
    with pytest.raises(UserError, match="unknown word decoder 'lexicon_ngramm'; did you mean 'lexicon_ngram'"):
        build_word_decoder(ComponentSpec("lexicon_ngramm"), ["a b"], tmp_path)
    with pytest.raises(UserError, match="acoustic_scale: is 0.*: it must be a finite number above 0"):
        build_word_decoder(ComponentSpec("lexicon_ngram", {"acoustic_scale": 0}), ["the cat"], tmp_path)
    greedy = build_word_decoder(ComponentSpec("greedy"), ["a b"], tmp_path)
    assert greedy.decode(torch.zeros(3, 5, N_CLASSES), [5, 5, 5]) == [None] * 3


def test_every_ctc_baseline_config_has_valid_word_decoder_params():
    from config import load_config
    from harness.plugins import load_plugins

    load_plugins()  # the model and the preprocessors the configs name

    for path in sorted((REPO_ROOT / "configs" / "ctc_baseline").glob("*.yml")):
        spec = load_config(path).model_params.word_decoder
        assert spec.name == "lexicon_ngram", path
        assert isinstance(spec.params, LexiconNgramParams), path  # typed when the config is loaded


def test_the_lm_is_built_once_per_text_and_cached(tmp_path):
    spec = ComponentSpec("lexicon_ngram", {"lm_order": 2})
    build_word_decoder(spec, ["the cat sat", "the dog sat"], tmp_path)
    built = sorted((tmp_path / "word_decoding").glob("lm-*.arpa"))
    stamp = built[0].stat().st_mtime_ns
    build_word_decoder(spec, ["the cat sat", "the dog sat"], tmp_path)
    assert sorted((tmp_path / "word_decoding").glob("lm-*.arpa")) == built and built[0].stat().st_mtime_ns == stamp
    build_word_decoder(spec, ["the cat sat", "the dog ran"], tmp_path)
    assert len(list((tmp_path / "word_decoding").glob("lm-*.arpa"))) == 2


# ----------------------------------------------------------------------------------------------
# LLM rescoring


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A 1-layer GPT-2 with a word-level tokenizer, trained for a moment on 'the cat', saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "<unk>", "the", "cat", "cap", "sat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<s>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=1))
    batch = torch.tensor([[1, 3, 4]] * 4)  # "<s> the cat"
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("tiny_llm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_rescoring_picks_the_entry_the_llm_strongly_prefers(tiny_llm, tmp_path):
    from word_decoding.rescoring import LLMRescorer, LLMRescoringParams

    nbest = [Hypothesis(("the", "cap"), acoustic=-1.0, ngram=-3.0, score=0), Hypothesis(("the", "cat"), -1.5, -3.0, 0)]
    scorer = LLMRescorer(LLMRescoringParams(model=str(tiny_llm), alpha=0.0, batch_size=1))
    assert scorer.choose([nbest], acoustic_scale=1.0)[0].words == ("the", "cap")
    cat, cap = scorer.log_probs(["the cat", "the cap"])
    assert cat > cap + 3  # the LLM strongly prefers "the cat"
    scorer.params.alpha = 0.5
    assert scorer.choose([nbest], acoustic_scale=1.0)[0].words == ("the", "cat")
    # batching and padding do not change a score
    texts = ["the cat", "cap", "the cat sat the cap", "sat"]
    one_by_one = scorer.log_probs(texts)
    scorer.params.batch_size = 3
    assert scorer.log_probs(texts) == pytest.approx(one_by_one, abs=1e-4)


def test_decoding_with_llm_rescoring_through_the_word_decoder(tiny_llm, tmp_path):
    log_probs = torch.tensor(peaked_log_probs(THE_CAP_OR_CAT))[None]
    plain = hand_decoder(tmp_path, lm_weight=0.0, nbest=10)
    assert plain.decode(log_probs, [8]) == ["the cap"]
    rescored = hand_decoder(tmp_path, lm_weight=0.0, nbest=10,
                            llm_rescoring={"model": str(tiny_llm), "alpha": 0.5, "device": "cpu"})
    assert rescored.decode(log_probs, [8]) == ["the cat"]


def test_an_llm_that_cannot_be_loaded_is_a_user_error(tmp_path):
    from word_decoding.rescoring import LLMRescorer, LLMRescoringParams

    with pytest.raises(UserError, match="cannot load the rescoring LLM"):
        LLMRescorer(LLMRescoringParams(model=str(tmp_path / "no_such_model")))


# ----------------------------------------------------------------------------------------------
# through the main loop, and the benchmark script


def test_ctc_baseline_run_reports_wer_and_the_kaggle_csv_has_the_text(ctc_tiny_run, synthetic_dataset, tmp_path):
    from harness import runner

    run_dir, cache = ctc_tiny_run
    val = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert val["wer"] is not None and val["cer"] is not None and val["wer_ci"][0] <= val["wer"] <= val["wer_ci"][1]
    assert val["wer"] < 0.9 and 0 <= val["word_decoder_oov_rate"] < 0.1
    rows = list(csv.DictReader(open(run_dir / "per_trial.csv")))
    lexicon = set(next((cache / "word_decoding").glob("lexicon-*.txt")).read_text().split())
    assert sum(bool(r["predicted_text"]) for r in rows) > 0.9 * len(rows)
    assert all(set(r["predicted_text"].split()) <= lexicon for r in rows)
    assert "lm-3gram-" in (run_dir / "run.log").read_text()

    # `evaluate` rebuilds the decoder from the data's training transcriptions (the cached LM)
    kaggle = tmp_path / "submission.csv"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("B2T_CACHE_DIR", str(cache))
        runner.evaluate(str(run_dir), str(synthetic_dataset), "test", str(tmp_path / "eval"), str(kaggle))
    lines = list(csv.reader(open(kaggle)))
    assert lines[0] == ["id", "text"] and len(lines) > 1
    assert sum(bool(text) for _, text in lines[1:]) > 0.9 * (len(lines) - 1)
    assert len(list((cache / "word_decoding").glob("lm-*.arpa"))) == 1


@pytest.mark.slow
def test_the_benchmark_script_runs_at_a_toy_size(ctc_tiny_run, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("word_decoding_bench", REPO_ROOT / "benchmarks" / "word_decoding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--run", str(ctc_tiny_run[0]), "--beams", "2", "8", "--default-beam", "8", "--passes", "1",
                       "--lms", "large", "--sentences", "300", "--workers", "2", "--repeats", "1",
                       "--cores-params", '{"lm_order": 3, "beam_size": 8, "nbest": 4}', "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [lm["lm"] for lm in results["lms"]] == ["large"] and results["lms"][0]["vocabulary"] > 100
    for lm in results["lms"]:
        assert [(r["beam_size"], r["lm_weight"]) for r in lm["rows"]] == [(8, 1.0), (2, 1.0), (8, 0.0)]
        assert all(r["sentences_per_s"] > 0 and 0 <= r["wer"] for r in lm["rows"])
        assert lm["peak_rss_one_decoder_mb"] >= lm["rss_before_decoder_mb"] > 0 and lm["chosen_beam"] in (2, 8)
    cores = results["cores"]
    assert cores["params"]["beam_size"] == 8 and cores["params"]["blank_penalty"] == 90  # the published, but the beam
    assert [r["workers"] for r in cores["rows"]] == [1, 2] and cores["rows"][0]["ratio"] == 1
    assert all(r["text_identical"] and r["sentences_per_s"] > 0 for r in cores["rows"]) and cores["repeats_identical"]
    printed = capsys.readouterr().out
    assert "| beam | LM weight |" in printed and "text identical across worker counts and repeats: yes" in printed
