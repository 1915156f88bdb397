"""Synthetic neural data in the exact Brain-to-Text '25 file format (docs/reference.md, section 1).

The embedded dataset lets everything run without the real data. It is synthetic and named so
(sessions `synth.YYYY.MM.DD`), but built to be learnable the way the real data is:

sentence -> phonemes (CMU, no stress, SIL after every word)
  -> frame-level phoneme sequence: rest, then each phoneme for a gamma-distributed number of
     20 ms bins (vowels longer than consonants), then a little rest
  -> latent: one-hot phoneme per bin, smoothed in time (coarticulation)
  -> 512 features through per-phoneme tuning vectors shared by every session: channels 0-255
     threshold-crossing counts (Poisson, log-rate linear in the latent), 256-511 spike-band
     power (log-normal, tuned like the same electrode), four 64-electrode arrays with
     different tuning strength (ventral 6v strongest), plus slow low-rank shared noise
  -> per-session drift of the tuning: near-identity channel mixing, per-channel gains and
     baseline offsets (so a per-session input layer pays off)
  -> z-scoring per block and channel.

Splits follow the real data: every block belongs to one split, val/test sentences never occur
in train, and the first session has train data only (when there are 3 sessions or more).
Same seed -> byte-identical files.
"""

import csv
import datetime
import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

from harness.b2txt25_writer import PAD_LEN, write_split
from harness.description import DESCRIPTION_NAME
from harness.errors import UserError
from harness.phonemes import N_CLASSES, PHONEMES
from harness.pronounce import oov_words, sentence_ids
from harness.sentences import sentence_key, unique_sentences

log = logging.getLogger(__name__)

N_FEATURES = 512
N_ELECTRODES = 256  # 4 arrays x 64; features = [threshold crossings, spike-band power]
SPLITS = ("train", "val", "test")
HELDOUT_FRACTION = 0.125  # of each session's trials, for val and for test
TRAIN_BLOCK_TRIALS = 20
REPORT_NAME = "synth_report.json"
REAL_SESSION_DATES = (  # docs/reference.md, section 1, in day-index order
    "2023.08.11 2023.08.13 2023.08.18 2023.08.20 2023.08.25 2023.08.27 2023.09.01 2023.09.03 "
    "2023.09.24 2023.09.29 2023.10.01 2023.10.06 2023.10.08 2023.10.13 2023.10.15 2023.10.20 "
    "2023.10.22 2023.11.03 2023.11.04 2023.11.17 2023.11.19 2023.11.26 2023.12.03 2023.12.08 "
    "2023.12.10 2023.12.17 2023.12.29 2024.02.25 2024.03.03 2024.03.08 2024.03.15 2024.03.17 "
    "2024.04.25 2024.04.28 2024.05.10 2024.06.14 2024.07.19 2024.07.21 2024.07.28 2025.01.10 "
    "2025.01.12 2025.03.14 2025.03.16 2025.03.30 2025.04.13"
).split()
REAL_SESSIONS = tuple(f"t15.{d}" for d in REAL_SESSION_DATES)
# Synthetic post-implant days count from this date (an assumption: the real implant date is not in
# our sources; the real data's days come from its description CSV)
SYNTH_IMPLANT_DATE = datetime.date(2023, 7, 11)
DESCRIPTION_COLUMNS = ("Date", "Post-implant day", "Block number", "Number of sentences", "Corpus", "Split")
# The real dataset's corpora by name. Their shares of the blocks are assumed (the real ones are in
# the description CSV, which our sources do not quote); the synthetic sentences of every corpus come
# from the same built-in generator, so a per-corpus breakdown of synthetic data tests the plumbing only.
CORPORA = {"Switchboard": 0.55, "Openwebtext": 0.15, "Harvard": 0.10, "50-Word": 0.08, "Freq words": 0.07,
           "Random": 0.05}


@dataclass(frozen=True)
class Preset:
    """A dataset shape `synth --preset` writes in one go."""
    sessions: tuple[str, ...]
    n_trials: int  # all sessions and splits together
    train_only: tuple[str, ...]  # sessions without val/test
    heldout_fraction: float  # of each other session's trials, for val and for test each
    durations: str


# The real dataset's shape (docs/reference.md section 1): 45 sessions with their real names and day
# order, 10,948 trials (about 8,071 train, 1,426 val, 1,450 test), 4 sessions without val/test, real
# durations. What the scale benchmarks run on: about 11 GB, like the real data.
PRESETS = {
    "b2txt25": Preset(REAL_SESSIONS, 10_948,
                      ("t15.2023.08.11", "t15.2024.03.03", "t15.2024.04.25", "t15.2024.04.28"), 0.144, "real"),
}
_VOWELS = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH",
           "UW"}


@dataclass(frozen=True)
class SynthParams:
    """Knobs of the generative model, all written to the report.

    The defaults make the data learnable but not trivial: a linear read-out of one z-scored bin
    labels about 3/4 of a session's held-out frames right (chance, always "rest", about 1/5),
    but only about half of another session's (tests/harness/test_synthetic.py measures both).
    """
    vowel_bins: float = 6.5  # mean phoneme durations, 20 ms bins
    consonant_bins: float = 4.0
    sil_bins: float = 3.5
    duration_shape: float = 4.0  # gamma shape; coefficient of variation 1/sqrt(shape)
    rate_jitter: float = 0.15  # per-trial speaking-rate spread (log scale)
    rest_before: tuple[int, int] = (10, 30)  # bins of rest before speech (inclusive range)
    rest_after: tuple[int, int] = (3, 8)
    coarticulation_bins: float = 1.5  # Gaussian smoothing of the phoneme latent (std, bins)
    array_strength: tuple[float, ...] = (1.0, 0.5, 0.7, 0.25)  # ventral 6v, 4, 55b, dorsal 6v
    speaking_weight: float = 0.5  # condition-independent "speaking" part of every tuning vector
    tx_tuning: float = 0.25  # log-rate modulation per unit of tuning at array strength 1
    sbp_tuning: float = 0.18  # log-power modulation, likewise
    tx_base_rate: float = 1.0  # typical threshold crossings per bin at rest
    sbp_noise: float = 0.5  # log-normal noise of spike-band power
    slow_noise: float = 0.4  # std of the shared low-rank slow fluctuation (log scale)
    slow_noise_factors: int = 4
    slow_noise_bins: float = 5.0
    drift_mix: float = 0.5  # session mixing I + drift_mix * N(0, 1/512): a channel keeps ~80%
    #                         of its own tuning variance
    drift_gain: float = 0.5  # session per-channel tuning gain: exp(N(0, drift_gain^2))
    drift_offset: float = 0.3  # session per-channel baseline offset (log scale)
    block_offset: float = 0.2  # per-block baseline offset (log scale), removed by z-scoring
    # None: speech as fast as the phoneme durations above make it ("short" trials, about 2.7 s);
    # a number: every sentence's speech stretched to this many words per minute (times the
    # per-trial rate jitter), keeping the relative phoneme durations ("real" trials)
    words_per_minute: float | None = None


BIN_SECONDS = 0.02
# Trial durations (`synth --durations`). "short": the embedded default, trials of 64-249 bins
# (mean about 137, 2.7 s), fast to train on a laptop. "real": the real data's durations: 11 GB of
# float32 features (2 KiB per 512-wide bin) over 10,948 trials is about 490 bins (9.8 s) per trial;
# the participant speaks at about 32 words per minute (the dataset's description); before speech,
# a rest of 0.5-1.5 s (the time from the go cue to the first phoneme, assumed: the dataset does not
# say), after it 0.2-0.5 s. With the built-in sentences (3-8 words, mean 5.5) that gives trials of
# about 560 bins on average (synth_report.json lists the mean and percentiles of every dataset).
DURATIONS = {
    "short": SynthParams(),
    "real": SynthParams(words_per_minute=32.0, rest_before=(25, 75), rest_after=(10, 25)),
}


@dataclass(frozen=True)
class TrialPlan:
    split: str
    block_num: int
    trial_num: int
    sentence_label: str


@dataclass
class DatasetPlan:
    """Everything decided before any features are drawn: sessions, blocks, sentences."""
    seed: int
    params: SynthParams
    sessions: list[str]
    trials: list[list[TrialPlan]]  # per session, in file order (block, then trial)
    corpus: dict | None  # corpus statistics for the report; None for the built-in sentences
    block_corpora: list[dict[int, str]]  # per session: block number -> corpus name (CORPORA)


@dataclass
class SynthTrial:
    """One simulated trial. `frame_ids` (phoneme class per bin, 0 = rest) is ground truth kept
    in memory for tests and diagnostics; the files hold only what the real files hold."""
    session: str
    split: str
    block_num: int
    trial_num: int
    sentence_label: str
    phoneme_ids: list[int]
    features: np.ndarray  # (T, 512) float32, z-scored per block
    frame_ids: np.ndarray  # (T,) int


@dataclass(frozen=True)
class _Tuning:
    """The neural model of one session: features = f(base + latent @ weights + noise)."""
    weights: np.ndarray  # (N_CLASSES, 512) log-rate / log-power per phoneme; row 0 (rest) = 0
    base: np.ndarray  # (512,) rest log-rate (0-255) and log-power (256-511)
    slow_loadings: np.ndarray  # (factors, 512)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per purpose: (0,) tuning, (1,) sentences, (2, i) session i."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ---------------------------------------------------------------- sessions, splits, sentences

def session_names(n: int) -> list[str]:
    """`synth.<date>` with the real sessions' dates in order, then weekly after the last."""
    dates = REAL_SESSION_DATES[:n]
    last = datetime.datetime.strptime(REAL_SESSION_DATES[-1], "%Y.%m.%d")
    extra = [last + datetime.timedelta(weeks=k) for k in range(1, n - len(dates) + 1)]
    return [f"synth.{d}" for d in (*dates, *(e.strftime("%Y.%m.%d") for e in extra))]


def split_counts(n_trials: int, heldout: bool, fraction: float = HELDOUT_FRACTION) -> dict[str, int]:
    """About 75/12.5/12.5 %, at least one val and one test trial when the session has them."""
    n_held = max(1, round(n_trials * fraction)) if heldout else 0
    return {"train": n_trials - 2 * n_held, "val": n_held, "test": n_held}


def _blocks(counts: dict[str, int], rng: np.random.Generator) -> list[tuple[int, str, int]]:
    """(block_num, split, n_trials): train in blocks of <= 20, one val and one test block,
    recorded in a random order as in the real sessions."""
    n_train_blocks = math.ceil(counts["train"] / TRAIN_BLOCK_TRIALS)
    blocks = [("train", len(b)) for b in np.array_split(np.arange(counts["train"]),
                                                         n_train_blocks)]
    blocks += [(s, counts[s]) for s in ("val", "test") if counts[s]]
    order = rng.permutation(len(blocks))
    return [(num + 1, *blocks[i]) for num, i in enumerate(order)]


def read_corpus(path: str | Path) -> tuple[list[str], dict]:
    """Unique pronounceable sentences of a corpus file (one per line) and statistics.

    Sentences with words missing from the CMU dictionary, or too long for the 500-long label
    padding, are skipped, counted and logged.
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read corpus file {path}: {err}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"corpus file {path} has no sentences (one sentence per line)")
    oov, too_long, unique = [], [], {}
    for s in lines:
        if oov_words(s) or not sentence_key(s):  # unknown words, or no words at all
            oov.append(s)
        elif max(len(s), len(sentence_ids(s))) > PAD_LEN:
            too_long.append(s)
        else:
            unique.setdefault(sentence_key(s), s)
    if oov or too_long:
        log.warning("corpus %s: skipped %d sentences with words not in the CMU dictionary "
                    "(first: %r) and %d longer than %d", path, len(oov),
                    oov[0] if oov else None, len(too_long), PAD_LEN)
    if not unique:
        raise UserError(f"no sentence of corpus file {path} can be pronounced with the CMU "
                        f"dictionary ({len(oov)} have unknown words, {len(too_long)} too long)")
    stats = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "n_sentences": len(lines), "n_unique_used": len(unique),
             "n_skipped_oov": len(oov), "n_skipped_too_long": len(too_long)}
    return list(unique.values()), stats


def _split_sentences(pool: list[str], totals: dict[str, int],
                     rng: np.random.Generator) -> dict[str, list[str]]:
    """Val and test get distinct sentences of their own; train cycles through the rest
    (repeats only when the pool is smaller than the train split, as in the real corpus)."""
    n_val, n_test = totals["val"], totals["test"]
    if len(pool) < n_val + n_test + 1:
        raise UserError(f"{len(pool)} distinct sentences are too few: val and test need "
                        f"{n_val + n_test} of their own and train at least one more; "
                        f"use fewer trials or a larger corpus")
    pool = [pool[i] for i in rng.permutation(len(pool))]
    train_pool = pool[n_val + n_test:]
    train = [train_pool[i % len(train_pool)] for i in rng.permutation(totals["train"])]
    return {"val": pool[:n_val], "test": pool[n_val:n_val + n_test], "train": train}


def plan_dataset(n_sessions: int, trials_per_session: int, seed: int,
                 corpus_path: str | Path | None = None,
                 params: SynthParams | None = None, preset: Preset | None = None) -> DatasetPlan:
    """Sessions, blocks and the sentence of every trial; UserError for impossible requests.
    With a preset, its sessions and trial counts replace n_sessions and trials_per_session."""
    if preset is not None:
        n_sessions, trials_per_session = len(preset.sessions), preset.n_trials // len(preset.sessions)
    if n_sessions < 1:
        raise UserError(f"the number of sessions must be at least 1 (got {n_sessions})")
    if trials_per_session < 3:
        raise UserError(f"trials per session must be at least 3, one per split "
                        f"(got {trials_per_session})")
    if seed < 0:
        raise UserError(f"the seed must be a non-negative integer (got {seed})")
    rng = _rng(seed, 1)
    if preset is None:
        sessions = session_names(n_sessions)
        counts = [split_counts(trials_per_session, heldout=not (i == 0 and n_sessions >= 3))
                  for i in range(n_sessions)]
    else:
        sessions = list(preset.sessions)
        extra = preset.n_trials - trials_per_session * n_sessions  # the first sessions get one more
        counts = [split_counts(trials_per_session + (i < extra), s not in preset.train_only, preset.heldout_fraction)
                  for i, s in enumerate(sessions)]
    totals = {s: sum(c[s] for c in counts) for s in SPLITS}
    corpus = None
    if corpus_path is None:
        pool = unique_sentences(rng, sum(totals.values()))
    else:
        pool, corpus = read_corpus(corpus_path)
    sentences = {s: iter(v) for s, v in _split_sentences(pool, totals, rng).items()}
    trials = []
    for c in counts:
        plans = [TrialPlan(split, block_num, t, next(sentences[split]))
                 for block_num, split, n in sorted(_blocks(c, rng)) for t in range(n)]
        trials.append(plans)
    return DatasetPlan(seed, params or SynthParams(), sessions, trials, corpus, _block_corpora(trials, seed))


def _block_corpora(trials: list[list[TrialPlan]], seed: int) -> list[dict[int, str]]:
    """A corpus name per block, drawn with CORPORA's shares from a stream of its own (the data
    of a seed is the same with or without it)."""
    rng = _rng(seed, 3)
    names, shares = list(CORPORA), np.array(list(CORPORA.values()))
    return [{b: names[rng.choice(len(names), p=shares / shares.sum())] for b in sorted({t.block_num for t in plans})}
            for plans in trials]


# ---------------------------------------------------------------- neural model

def _shared_tuning(seed: int, p: SynthParams) -> _Tuning:
    """Per-phoneme tuning shared by all sessions; spike-band power of an electrode is tuned
    mostly like its threshold crossings, as on real electrodes."""
    rng = _rng(seed, 0)
    strength = np.repeat(np.asarray(p.array_strength), N_ELECTRODES // len(p.array_strength))
    phon = rng.normal(size=(N_CLASSES, N_ELECTRODES)) + p.speaking_weight * rng.normal(
        size=N_ELECTRODES)
    own = rng.normal(size=(N_CLASSES, N_ELECTRODES))
    weights = np.hstack([phon * strength * p.tx_tuning,
                         (0.8 * phon + 0.6 * own) * strength * p.sbp_tuning])
    weights[0] = 0.0  # class 0 marks rest: baseline activity
    base = np.concatenate([np.log(p.tx_base_rate) + 0.5 * rng.normal(size=N_ELECTRODES),
                           0.3 * rng.normal(size=N_ELECTRODES)])
    loadings = rng.normal(size=(p.slow_noise_factors, N_FEATURES)) * p.slow_noise \
        / np.sqrt(p.slow_noise_factors)
    return _Tuning(weights, base, loadings)


def _session_tuning(shared: _Tuning, rng: np.random.Generator, p: SynthParams) -> _Tuning:
    """Day-to-day drift: mixing, gains and offsets act on the tuning and baseline, before the
    noise. (A per-channel affine map of the final features would be undone by z-scoring.)"""
    mix = np.eye(N_FEATURES) + p.drift_mix * rng.normal(size=(N_FEATURES, N_FEATURES)) \
        / np.sqrt(N_FEATURES)
    gain = np.exp(p.drift_gain * rng.normal(size=N_FEATURES))
    base = shared.base + p.drift_offset * rng.normal(size=N_FEATURES)
    return _Tuning((shared.weights @ mix) * gain, base, shared.slow_loadings)


def _frame_ids(ids: list[int], rng: np.random.Generator, p: SynthParams) -> np.ndarray:
    """Phoneme class of every 20 ms bin, 0 for rest before and after speech."""
    symbols = [PHONEMES[i] for i in ids]
    means = np.array([p.vowel_bins if s in _VOWELS else p.sil_bins if s == "SIL"
                      else p.consonant_bins for s in symbols])
    jitter = np.exp(p.rate_jitter * rng.normal())
    means *= jitter
    durations = rng.gamma(p.duration_shape, means / p.duration_shape)
    if p.words_per_minute:  # the words (one SIL after each) at the target rate, jittered like the means
        n_words = max(1, sum(s == "SIL" for s in symbols))
        durations *= n_words * 60 / p.words_per_minute / BIN_SECONDS * jitter / durations.sum()
    # The baseline's stride-4 patching gives T/4 output frames; CTC needs one per label at
    # least, so never speak faster than 4.5 bins per phoneme on average.
    durations *= max(1.0, 4.5 * len(ids) / durations.sum())
    durations = np.maximum(1, np.rint(durations)).astype(int)
    rest_before = rng.integers(p.rest_before[0], p.rest_before[1] + 1)
    rest_after = rng.integers(p.rest_after[0], p.rest_after[1] + 1)
    return np.concatenate([np.zeros(rest_before, int), np.repeat(ids, durations),
                           np.zeros(rest_after, int)])


def _slow_noise(n_bins: int, rng: np.random.Generator, p: SynthParams) -> np.ndarray:
    """(n_bins, factors) slowly varying, unit-variance noise: white noise smoothed in time,
    drawn with a margin so that the trial's edges are as smooth and as variable as its middle."""
    margin = int(4 * p.slow_noise_bins)
    white = rng.normal(size=(n_bins + 2 * margin, p.slow_noise_factors))
    slow = gaussian_filter1d(white, p.slow_noise_bins, axis=0)[margin:margin + n_bins]
    return slow * np.sqrt(2 * np.sqrt(np.pi) * p.slow_noise_bins)


def _raw_features(frame_ids: np.ndarray, tuning: _Tuning, block_base: np.ndarray,
                  rng: np.random.Generator, p: SynthParams) -> np.ndarray:
    """(T, 512) float64 before z-scoring: Poisson counts, then log-normal power."""
    n_bins = len(frame_ids)
    latent = gaussian_filter1d(np.eye(N_CLASSES)[frame_ids], p.coarticulation_bins, axis=0,
                               mode="nearest")
    log_level = block_base + latent @ tuning.weights + _slow_noise(n_bins, rng, p) \
        @ tuning.slow_loadings
    counts = rng.poisson(np.exp(log_level[:, :N_ELECTRODES]))
    power = np.exp(log_level[:, N_ELECTRODES:]
                   + p.sbp_noise * rng.normal(size=(n_bins, N_ELECTRODES)))
    return np.hstack([counts, power])


def _zscore_block(raw: list[np.ndarray]) -> list[np.ndarray]:
    """Z-score each channel over all bins of the block's trials.

    The real data z-scores over the preceding 20 trials (a running estimate). Here the whole
    block is used: within a stationary block both estimate the same mean and scale, the
    whole-block version needs no warm-up rule for a block's first trials, and what a model
    sees (per-channel unit scale, block offsets removed) is the same.
    """
    stacked = np.concatenate(raw)
    mean, std = stacked.mean(axis=0), stacked.std(axis=0)
    std[std == 0] = 1.0
    return [((r - mean) / std).astype(np.float32) for r in raw]


def simulate_session(plan: DatasetPlan, index: int) -> list[SynthTrial]:
    """All trials of session `index` of the plan, in file order (deterministic per seed)."""
    p = plan.params
    tuning = _session_tuning(_shared_tuning(plan.seed, p), _rng(plan.seed, 2, index), p)
    rng = _rng(plan.seed, 2, index, 1)
    trials = []
    for block_num in sorted({t.block_num for t in plan.trials[index]}):
        block = [t for t in plan.trials[index] if t.block_num == block_num]
        block_base = tuning.base + p.block_offset * rng.normal(size=N_FEATURES)
        ids = [sentence_ids(t.sentence_label) for t in block]
        frames = [_frame_ids(i, rng, p) for i in ids]
        raw = [_raw_features(f, tuning, block_base, rng, p) for f in frames]
        trials += [SynthTrial(plan.sessions[index], t.split, t.block_num, t.trial_num,
                              t.sentence_label, i, x, f)
                   for t, i, x, f in zip(block, ids, _zscore_block(raw), frames)]
    return trials


# ---------------------------------------------------------------- files (harness.b2txt25_writer writes the HDF5)

def _write_description(path: Path, plan: DatasetPlan) -> None:
    """The per-block description CSV in the real dataset's columns (the synthetic blocks, dates from
    the session names, post-implant days from SYNTH_IMPLANT_DATE, corpora from the plan)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DESCRIPTION_COLUMNS)
    for session, plans, corpora in zip(plan.sessions, plan.trials, plan.block_corpora):
        date = datetime.datetime.strptime(session.split(".", 1)[1], "%Y.%m.%d").date()
        for block in sorted(corpora):
            in_block = [t for t in plans if t.block_num == block]
            writer.writerow([date.isoformat(), (date - SYNTH_IMPLANT_DATE).days, block, len(in_block), corpora[block],
                             in_block[0].split])
    path.write_text(buffer.getvalue())


def _trial_report(t: SynthTrial, file: str, n: int) -> dict:
    return {"file": file, "trial": f"trial_{n:04d}", "split": t.split, "session": t.session,
            "block_num": t.block_num, "trial_num": t.trial_num,
            "n_time_steps": len(t.features), "sentence_label": t.sentence_label,
            "phoneme_ids": t.phoneme_ids,
            "features_sha256": hashlib.sha256(t.features.astype("<f4").tobytes()).hexdigest()}


def _json_params(params: SynthParams) -> dict:
    """Params as JSON gives them back (lists, not tuples), so the returned report equals the
    file's."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}


def _write_report(path: Path, report: dict) -> None:
    """JSON with one trial per line: compact yet readable and diffable."""
    head = json.dumps({k: v for k, v in report.items() if k != "trials"}, indent=1)
    rows = ",\n".join(json.dumps(t) for t in report["trials"])
    assert head.endswith("\n}")
    path.write_text(head[:-2] + ',\n "trials": [\n' + rows + "\n ]\n}\n")


def write_synthetic_dataset(out_dir: str | Path, n_sessions: int = 8,
                            trials_per_session: int = 100, seed: int = 0,
                            corpus_path: str | Path | None = None,
                            params: SynthParams | None = None, durations: str | None = None,
                            preset: str | None = None) -> dict:
    """Write `out_dir/<session>/data_{train,val,test}.hdf5` and `out_dir/synth_report.json`.

    `out_dir` plays the role of the real `hdf5_data_final/` and must be new or empty (stale
    session folders of an earlier run would otherwise be read as data). The report, written
    last, lists every trial with its sentence and phonemes, test trials included: it is the
    answer key that the unlabeled test files lack. Returns the report.

    Defaults (8 sessions x 100 trials, seed 0): 632 train, 84 val, 84 test trials of 64-249
    bins (median 134), 217 MiB, about 5 s on 2 CPU cores. Sized for a few minutes of GRU
    training on a CPU and for sentence retrieval among the 84 val sentences.
    """
    out_dir = Path(out_dir)
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    chosen = PRESETS[preset] if preset else None
    durations = durations or (chosen.durations if chosen else "short")
    if durations not in DURATIONS:
        raise UserError(f"unknown durations {durations!r} (known: {', '.join(DURATIONS)})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty folder; choose a new one")
    plan = plan_dataset(n_sessions, trials_per_session, seed, corpus_path, params or DURATIONS[durations], chosen)
    rows = []
    for index, session in enumerate(plan.sessions):
        trials = simulate_session(plan, index)
        (out_dir / session).mkdir(parents=True)
        for split in SPLITS:
            in_split = [t for t in trials if t.split == split]
            if in_split:
                file = f"{session}/data_{split}.hdf5"
                write_split(out_dir / file, in_split, labeled=split != "test")
                rows += [_trial_report(t, file, n) for n, t in enumerate(in_split)]
    _write_description(out_dir / DESCRIPTION_NAME, plan)
    lengths = np.array([r["n_time_steps"] for r in rows])
    report = {
        "generator": "b2t-bench harness.synthetic (synthetic data, not recordings)",
        "seed": seed, "preset": preset, "n_sessions": len(plan.sessions),
        "trials_per_session": trials_per_session if preset is None else None,
        "corpus": plan.corpus, "params": _json_params(plan.params), "sessions": plan.sessions,
        "n_trials": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "durations": {"name": durations if params is None else "custom",
                      "n_time_steps": {"mean": round(float(lengths.mean()), 1),
                                       **{f"p{q}": round(float(np.percentile(lengths, q)), 1) for q in (5, 25, 50, 75, 95)},
                                       "max": int(lengths.max())},
                      "seconds_mean": round(float(lengths.mean()) * BIN_SECONDS, 2)},
        "description_csv": DESCRIPTION_NAME,
        "trials": rows,
    }
    _write_report(out_dir / REPORT_NAME, report)
    return report
