"""The 41-class phoneme inventory of the Brain-to-Text '25 baseline (docs/reference.md, section 2).

Class 0 is the CTC blank, 1-39 the CMU-dictionary ARPAbet phonemes without stress, 40 is SIL,
the word boundary that follows every word (the last one included).
"""

BLANK = "BLANK"
SIL = "SIL"
ARPABET = [
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH",
    "EH", "ER", "EY", "F", "G", "HH", "IH", "IY", "JH", "K",
    "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH",
    "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
]
PHONEMES = [BLANK, *ARPABET, SIL]  # index = class id
N_CLASSES = len(PHONEMES)  # 41
BLANK_ID = 0
SIL_ID = PHONEMES.index(SIL)  # 40
PHONEME_TO_ID = {p: i for i, p in enumerate(PHONEMES)}


def ids_to_phonemes(ids) -> list[str]:
    """Class ids to phoneme symbols (blank ids are kept as BLANK: callers decide what to drop)."""
    return [PHONEMES[int(i)] for i in ids]


def phonemes_to_ids(symbols) -> list[int]:
    return [PHONEME_TO_ID[s] for s in symbols]


def ids_to_text(ids) -> str:
    """Space-separated ARPAbet with SIL, the per_trial.csv form."""
    return " ".join(ids_to_phonemes(ids))

