"""n-gram word language models in ARPA format, for KenLM (and so for the lexicon beam search).

`build_arpa(sentences, order, path)` writes an interpolated modified Kneser-Ney model of the
sentences (lists of normalised words). It runs KenLM's own `lmplz` when that program is on the PATH;
otherwise it uses `write_kneser_ney_arpa` below, which follows lmplz's estimate (Chen & Goodman 1998;
Heafield et al. 2013):

- counts: the highest order uses raw counts; every lower order uses continuation counts (how many
  distinct words precede the n-gram), except n-grams starting with <s>, which keep raw counts;
- three discounts per order from the counts of counts t1..t4: Y = t1 / (t1 + 2 t2),
  D1 = 1 - 2Y t2/t1, D2 = 2 - 3Y t3/t2, D3+ = 3 - 4Y t4/t3 (lmplz's fallback 0.5, 1, 1.5 where
  the counts are too few for these to lie in [0, k], as on small corpora);
- p(w | h) = (a(hw) - D(a(hw))) / a(h.) + gamma(h) p(w | h minus its first word), gamma(h) the
  discounted mass; unigrams interpolate with the uniform distribution over the vocabulary
  (every word but <s>, plus <unk>);
- ARPA stores the interpolated p(w | h) for every seen n-gram and gamma(h) as the backoff weight of
  every context, so KenLM's backoff queries reproduce the interpolated model exactly.

Why hand-written: `lmplz` (C++) has no wheel and is not installed here, and no Python library fits
(NLTK's KneserNeyInterpolated has no modified discounts and writes no ARPA).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness.errors import UserError
from harness.results import atomic_write_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz --discount_fallback defaults
BUILDER_VERSION = "b2t-mkn-1"  # part of the cache key: bump when the estimate changes


def builder_name() -> str:
    """Which builder build_arpa will use: 'lmplz' where it is installed, else this module's."""
    return "lmplz" if shutil.which("lmplz") else BUILDER_VERSION


def build_arpa(sentences: Sequence[Sequence[str]], order: int, path: Path | str) -> str:
    """Write an interpolated modified Kneser-Ney ARPA model of `sentences`; returns the builder used."""
    if order < 2:
        raise UserError(f"n-gram order must be at least 2 (KenLM reads no unigram model), got {order}")
    if not any(sentences):
        raise UserError("no text to build the n-gram language model from (every sentence is empty)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    builder = builder_name()
    if builder == "lmplz":
        text = "".join(" ".join(words) + "\n" for words in sentences if words)
        result = subprocess.run(["lmplz", "-o", str(order), "--discount_fallback", "-S", "20%"],
                                input=text.encode(), capture_output=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"lmplz failed: {result.stderr.decode(errors='replace').strip()[-500:]}")
        atomic_write_text(path, result.stdout.decode())
    else:
        atomic_write_text(path, kneser_ney_arpa(sentences, order))
    return builder


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter]:
    """Raw counts: counts[n][ngram] for n = 1..order (index 0 unused), sentences padded <s> ... </s>."""
    counts = [Counter() for _ in range(order + 1)]
    for words in sentences:
        if not words:
            continue
        tokens = (BOS, *words, EOS)
        for n in range(1, order + 1):
            counter = counts[n]
            for i in range(len(tokens) - n + 1):
                counter[tokens[i:i + n]] += 1
    return counts


def adjusted_counts(counts: list[Counter]) -> list[dict]:
    """Kneser-Ney counts: raw at the highest order and for n-grams starting with <s>; elsewhere the
    number of distinct words seen before the n-gram. The unigram <s> gets no probability: dropped."""
    order = len(counts) - 1
    adjusted = [dict() for _ in range(order + 1)]
    adjusted[order] = dict(counts[order])
    for n in range(order - 1, 0, -1):
        continuation = Counter(ngram[1:] for ngram in counts[n + 1])
        adjusted[n] = {g: (c if g[0] == BOS else continuation[g]) for g, c in counts[n].items()}
    adjusted[1].pop((BOS,), None)
    return adjusted


def discounts(adjusted: dict) -> tuple[float, float, float]:
    """(D1, D2, D3+) of one order from its counts of counts; lmplz's fallback where they are invalid."""
    t = Counter(min(a, 4) for a in adjusted.values())
    t1, t2, t3, t4 = (t[k] for k in (1, 2, 3, 4))
    if min(t1, t2, t3) == 0:
        return FALLBACK_DISCOUNTS
    y = t1 / (t1 + 2 * t2)
    d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    if any(not 0 <= dk <= k for k, dk in enumerate(d, start=1)):
        return FALLBACK_DISCOUNTS
    return d


def kneser_ney_arpa(sentences: Iterable[Sequence[str]], order: int) -> str:
    """The ARPA text of the interpolated modified Kneser-Ney model (see the module docstring)."""
    adjusted = adjusted_counts(count_ngrams(sentences, order))
    adjusted[1].setdefault((UNK,), 0)  # <unk> gets the uniform share of the unigram's discounted mass
    vocabulary_size = len(adjusted[1])  # every word but <s> (never predicted), <unk> included
    probs: list[dict] = [dict() for _ in range(order + 1)]  # log10 p(w | h) of each seen n-gram
    backoffs: list[dict] = [dict() for _ in range(order + 1)]  # log10 gamma(h), by context h
    for n in range(1, order + 1):
        d = discounts(adjusted[n])
        by_context: dict[tuple, list] = defaultdict(list)
        for ngram, a in adjusted[n].items():
            by_context[ngram[:-1]].append((ngram, a))
        for context, entries in by_context.items():
            total = sum(a for _, a in entries)
            discounted = sum(d[min(a, 3) - 1] for _, a in entries if a > 0)
            gamma = discounted / total
            if n > 1:
                backoffs[n - 1][context] = math.log10(gamma) if gamma > 0 else -99.0
            for ngram, a in entries:
                lower = 1 / vocabulary_size if n == 1 else 10 ** probs[n - 1][ngram[1:]]
                kept = a - d[min(a, 3) - 1] if a > 0 else 0.0
                probs[n][ngram] = math.log10(kept / total + gamma * lower)
        if n == 1:
            probs[1][(BOS,)] = -99.0  # ARPA convention: <s> is listed (it is a context) but never predicted
    return _arpa_text(probs, backoffs, order)


def _arpa_text(probs: list[dict], backoffs: list[dict], order: int) -> str:
    lines = ["", "\\data\\"]
    lines += [f"ngram {n}={len(probs[n])}" for n in range(1, order + 1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        for ngram, logp in probs[n].items():
            words = " ".join(ngram)
            if n < order and ngram in backoffs[n]:
                lines.append(f"{logp:.7g}\t{words}\t{backoffs[n][ngram]:.7g}")
            else:
                lines.append(f"{logp:.7g}\t{words}")
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def arpa_vocabulary(path: Path | str) -> list[str]:
    """The words of an ARPA file's unigram section (without <s>, </s>, <unk>)."""
    words, in_unigrams = [], False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif in_unigrams and line.startswith("\\"):
                break
            elif in_unigrams and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in (BOS, EOS, UNK):
                    words.append(fields[1])
    return words


def is_arpa(path: Path | str) -> bool:
    """ARPA text starts with a \\data\\ header (after blank lines); a KenLM binary does not."""
    with open(path, "rb") as f:
        return f.read(256).lstrip().startswith(b"\\data\\")
