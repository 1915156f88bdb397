"""Word decoders: phoneme log-probabilities -> text, for any model that emits the 41 classes.

The entry point for a model (the CTC baseline, or any other with a 41-class CTC head):

    from config import ComponentSpec
    from word_decoding import build_word_decoder, greedy_phonemes, log_softmax_cpu, word_decoder_field

    @dataclass
    class MyParams:
        word_decoder: ComponentSpec = word_decoder_field()   # greedy by default

    decoder = build_word_decoder(params.word_decoder, ctx.training_sentences(), ctx.cache_dir)  # once
    texts = decoder.decode(log_softmax_cpu(logits), lengths)   # (B, T, 41), (B,) valid frames -> B texts
    extra = decoder.split_metrics(rows)   # for the model's split_metrics: {"word_decoder_oov_rate": ...}

`texts[i]` is None for decoders that write no text (`greedy`: the model's phonemes are all there
is). Registered decoders (`python main.py list`):

- `greedy`: no words.
- `lexicon_ngram`: CTC beam search constrained by a pronunciation lexicon and scored by an n-gram
  word LM (flashlight-text + KenLM, word_decoding.beam_search), optionally followed by n-best LLM
  rescoring (word_decoding.rescoring). The lexicon and LM are built once from the training
  transcriptions (plus any corpus or word-list files) and cached under `<cache_dir>/word_decoding/`
  by content hash; a user ARPA/KenLM binary and a user lexicon are taken by path instead. The
  search runs in `num_workers` processes (word_decoding.parallel; default: this rank's share of
  the cores); `close()` stops them (they also stop when the decoder is collected or the program ends).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from config import ComponentSpec, at_least, component
from harness.errors import UserError
from harness.progress import phase
from harness.pronounce import words
from registry import WORD_DECODERS, register_word_decoder
from word_decoding import ngram, parallel
from word_decoding.beam_search import BeamSearchParams, Hypothesis, LexiconBeamSearch
from word_decoding.lexicon import Lexicon, cmu_lexicon, read_lexicon, read_word_list
from word_decoding.rescoring import LLMRescorer, LLMRescoringParams

if TYPE_CHECKING:  # tensor methods only: the search's worker processes import this module without torch
    import torch

log = logging.getLogger(__name__)


def word_decoder_field(default: str = "greedy"):
    """A params field naming a word decoder: `word_decoder: ComponentSpec = word_decoder_field()`."""
    return component(WORD_DECODERS, default)


def build_word_decoder(spec: ComponentSpec, train_sentences: list[str], cache_dir: str | Path,
                       path: str = "model_params.word_decoder"):
    """The decoder `spec` names, built once. train_sentences: the training transcriptions (the
    default vocabulary and LM text); cache_dir: where built lexicons and LMs are kept."""
    return WORD_DECODERS.build(spec, train_sentences, cache_dir, path=path)


# ----------------------------------------------------------------------------------------------
# greedy


class NoWords:
    """The `greedy` choice: the model's greedy phonemes are its only output."""

    def decode(self, log_probs: torch.Tensor, lengths) -> list[None]:
        return [None] * len(log_probs)

    def split_metrics(self, rows: list[dict]) -> dict:
        return {}

    def close(self) -> None:
        pass


@register_word_decoder()
def greedy(params: None, train_sentences, cache_dir) -> NoWords:
    return NoWords()


# ----------------------------------------------------------------------------------------------
# lexicon_ngram


@dataclass
class LexiconNgramParams(BeamSearchParams):
    """The search (BeamSearchParams), where its words and LM come from, and optional LLM rescoring."""

    use_train_text: bool = True  # the training transcriptions go into the vocabulary and the built LM
    corpus_files: list[str] = field(default_factory=list)  # more LM text and vocabulary, one sentence per line
    words_file: str | None = None  # more vocabulary words (whitespace separated)
    lexicon_file: str | None = None  # `word PH PH ...` lines: this lexicon instead of the CMU dictionary
    lm_path: str | None = None  # an ARPA file or KenLM binary instead of building one
    lm_order: int = 3  # of the LM built from the text: 2 or more
    llm_rescoring: LLMRescoringParams | None = None  # n-best rescoring (set nbest > 1)
    # search processes: 1 = in this process, one trial after another; N > 1 = N worker processes;
    # 0 = the cores this process may use divided by the ranks on this machine (LOCAL_WORLD_SIZE)
    num_workers: int = 0

    def problems(self):
        yield from super().problems()
        if not self.lm_path:  # the LM is built from the text (KenLM reads no unigram model)
            yield from at_least(self, 2, "lm_order")
        yield from at_least(self, 0, "num_workers")


class LexiconNgramDecoder:
    def __init__(self, search: LexiconBeamSearch, rescorer: LLMRescorer | None = None,
                 report: list[tuple[int, str]] = (), workers: int = 1):
        self.search = search  # this process's own: single-trial calls, and workers == 1
        self.rescorer = rescorer
        self.vocabulary = search.words  # what it can write
        # (level, message) about what was built, logged at the first decode: models are built before
        # the run log exists, and decoding always happens inside it
        self.report = list(report)
        self.workers = workers
        self.pool: parallel.SearchPool | None = None  # started at the first call with several trials

    def nbest(self, log_probs: torch.Tensor, lengths) -> list[list[Hypothesis]]:
        array = log_probs.detach().float().cpu().numpy()
        trials = [array[i, :int(n)] for i, n in enumerate(lengths)]
        if self.workers < 2 or len(trials) < 2:
            return [self.search.search(trial) for trial in trials]
        if self.pool is None:
            self.pool = parallel.SearchPool(self.search.lexicon, self.search.lm_path, self.search.params, self.workers)
        return self.pool.search(trials)

    def close(self) -> None:
        """Stop the worker processes (a later multi-trial decode starts new ones)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def decode(self, log_probs: torch.Tensor, lengths) -> list[str]:
        """(B, T, 41) log-softmax outputs and the valid frames of each row -> one text per row."""
        for level, message in self.report:
            log.log(level, message)
        self.report = []
        nbests = self.nbest(log_probs, lengths)
        if self.rescorer is None:
            return [nbest[0].text for nbest in nbests]
        return [h.text for h in self.rescorer.choose(nbests, self.search.params.acoustic_scale)]

    def split_metrics(self, rows: list[dict]) -> dict:
        """Share of the reference words the decoder cannot write (outside its vocabulary): a floor
        under the WER that no search can remove."""
        from harness.metrics import normalize_text  # here: it imports scipy, which the search workers skip

        references = [normalize_text(r["reference_text"]).split() for r in rows if r.get("reference_text")]
        total = sum(map(len, references))
        if not total:
            return {}
        outside = sum(w not in self.vocabulary for ref in references for w in ref)
        return {"word_decoder_oov_rate": outside / total}


@register_word_decoder()
def lexicon_ngram(params: LexiconNgramParams, train_sentences: list[str], cache_dir) -> LexiconNgramDecoder:
    if params.num_workers < 0:
        raise UserError(f"num_workers must be 0 (this rank's share of the cores), 1 (no worker process) or more, "
                        f"got {params.num_workers}")
    given_lm = user_lm(params.lm_path) if params.lm_path else None
    text = lm_text(params, train_sentences)
    lexicon = read_lexicon(params.lexicon_file) if params.lexicon_file else cmu_lexicon(vocabulary(params, text))
    folder = Path(cache_dir) / "word_decoding"
    lexicon_path = folder / f"lexicon-{digest(lexicon.text())}.txt"  # for the user to inspect
    if not lexicon_path.is_file():
        lexicon.write(lexicon_path)
    lm_path = given_lm or cached_lm(text, params.lm_order, folder)
    report = [(logging.INFO, f"word decoding: {len(lexicon.words)} words (lexicon {lexicon_path}), "
                             f"{'user' if given_lm else f'{params.lm_order}-gram'} LM {lm_path}")]
    missing = missing_words(lexicon, train_sentences if params.use_train_text else [])
    if missing:
        shown = ", ".join(missing[:20]) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        report.append((logging.WARNING, f"word decoding: {len(missing)} vocabulary words are not in the "
                                        f"dictionary and cannot be decoded: {shown}"))
    search = LexiconBeamSearch(lexicon, str(lm_path), params)
    workers = parallel.resolve_workers(params.num_workers)
    report.append((logging.INFO, worker_report(params.num_workers, workers)))
    rescoring = params.llm_rescoring
    rescorer = LLMRescorer(rescoring) if rescoring is not None and rescoring.enabled else None
    if rescorer is not None and params.nbest < 2:
        report.append((logging.WARNING, f"LLM rescoring with nbest {params.nbest} has nothing to choose from: "
                                        "set nbest (the reference: 100)"))
    return LexiconNgramDecoder(search, rescorer, report, workers)


def worker_report(num_workers: int, workers: int) -> str:
    cores, ranks = parallel.available_cores(), parallel.local_ranks()
    how = (f"num_workers 0: {cores} core{'s' * (cores != 1)} / {ranks} rank{'s' * (ranks != 1)} on this machine"
           if num_workers == 0 else f"num_workers {num_workers}")
    where = f"{workers} worker processes" if workers > 1 else "this process"
    return f"word decoding: beam search in {where} ({how})"


def lm_text(params: LexiconNgramParams, train_sentences: list[str]) -> list[list[str]]:
    """The LM's text: normalised words of the training transcriptions and of the corpus files."""
    sentences = list(train_sentences) if params.use_train_text else []
    for name in params.corpus_files:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"corpus file not found: {path}")
        sentences += path.read_text(encoding="utf-8").splitlines()
    return [w for w in map(words, sentences) if w]


def vocabulary(params: LexiconNgramParams, text: list[list[str]]) -> list[str]:
    """Words of the LM text, the word list and a user ARPA's unigrams, in first-seen order."""
    found = [w for sentence in text for w in sentence]
    if params.words_file:
        found += read_word_list(params.words_file)
    if params.lm_path and ngram.is_arpa(params.lm_path):
        found += ngram.arpa_vocabulary(params.lm_path)
    if not found:
        raise UserError("lexicon_ngram has no vocabulary: no training transcription, corpus_files, words_file, "
                        "or ARPA lm_path (or give a lexicon_file)")
    return list(dict.fromkeys(found))


def missing_words(lexicon: Lexicon, sentences: list[str]) -> list[str]:
    """Vocabulary words without a pronunciation, and numbers (which the normalisation deletes)."""
    numbers = sorted({t for s in sentences for t in s.split() if any(c.isdigit() for c in t)})
    return lexicon.missing + numbers


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_lm(text: list[list[str]], order: int, folder: Path) -> Path:
    """The ARPA model of `text`, built once: the file name is a hash of the builder, order and text."""
    if not text:
        raise UserError("no text for the n-gram LM: no training transcription and no corpus_files (or give lm_path)")
    builder = ngram.builder_name()
    key = "\n".join([builder, str(order), *(" ".join(sentence) for sentence in text)])
    path = folder / f"lm-{order}gram-{digest(key)}.arpa"
    if not path.is_file():
        log.info("building a %d-gram LM from %d sentences with %s", order, len(text), builder)
        with phase(f"{order}-gram LM ({builder})", total=len(text), unit="sentence") as bar:
            ngram.build_arpa(text, order, path)
            bar.update(len(text))
    return path


def user_lm(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise UserError(f"language model file not found: {path} (lm_path takes an ARPA file or a KenLM binary)")
    return path
