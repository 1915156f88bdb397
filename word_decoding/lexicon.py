"""Pronunciation lexicon for word decoding: word -> phoneme spellings in the 41-class inventory.

From the CMU dictionary (every pronunciation of a word, stress digits removed: the reference's 39
phonemes) restricted to a vocabulary, or from a user lexicon file. A vocabulary word the dictionary
does not know is listed in `Lexicon.missing` (and logged by the caller), never silently dropped:
it cannot be decoded, and the run log says how many such words there are.

Lexicon files (read and written here) have one pronunciation per line, `word PH PH ...`, the CMU /
Kaldi layout; stress digits are ignored and a word may have several lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError
from harness.phonemes import ARPABET
from harness.pronounce import cmu_dict, words
from harness.results import atomic_write_text


@dataclass
class Lexicon:
    pronunciations: dict[str, list[tuple[str, ...]]]  # word -> distinct spellings (ARPAbet, no SIL)
    missing: list[str] = field(default_factory=list)  # vocabulary words without any pronunciation

    @property
    def words(self) -> list[str]:
        return list(self.pronunciations)

    def text(self) -> str:
        """The lexicon file's content: one `word PH PH ...` line per pronunciation."""
        return "".join(f"{word} {' '.join(spelling)}\n"
                       for word, spellings in self.pronunciations.items() for spelling in spellings)

    def write(self, path: Path | str) -> None:
        atomic_write_text(path, self.text())


def strip_stress(phoneme: str) -> str:
    return phoneme.rstrip("012")


def cmu_lexicon(vocabulary: Iterable[str]) -> Lexicon:
    """Every CMU pronunciation (stress removed, duplicates merged) of each vocabulary word, in the
    vocabulary's order; words the dictionary lacks go to `missing`."""
    dictionary = cmu_dict()
    pronunciations, missing = {}, []
    for word in dict.fromkeys(vocabulary):  # ordered, deduplicated
        if word in dictionary:
            spellings = (tuple(strip_stress(p) for p in pron) for pron in dictionary[word])
            pronunciations[word] = list(dict.fromkeys(spellings))
        else:
            missing.append(word)
    return Lexicon(pronunciations, missing)


def read_lexicon(path: Path | str) -> Lexicon:
    """A user lexicon file (`word PH PH ...` per line). Unknown phonemes are an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"lexicon file not found: {path}")
    known = set(ARPABET)
    pronunciations: dict[str, list[tuple[str, ...]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        word, spelling = fields[0].lower(), tuple(strip_stress(p.upper()) for p in fields[1:])
        bad = [p for p in spelling if p not in known]
        if not spelling or bad:
            problem = f"unknown phonemes {', '.join(bad)}" if bad else "no phonemes"
            raise UserError(f"{path}:{number}: {problem} (expected 'word PH PH ...' with the 39 ARPAbet "
                            "phonemes; SIL, the word separator, is added by the decoder)")
        spellings = pronunciations.setdefault(word, [])
        if spelling not in spellings:
            spellings.append(spelling)
    if not pronunciations:
        raise UserError(f"lexicon file {path} holds no pronunciation")
    return Lexicon(pronunciations)


def read_word_list(path: Path | str) -> list[str]:
    """Words of a word-list file (one or more per line), normalised as the metrics normalise them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"word list file not found: {path}")
    return words(path.read_text(encoding="utf-8"))
