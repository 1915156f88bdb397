"""Binned neural features of a continuous recording (`main.py convert`, harness.convert).

One block (one recording file or BIDS run) at a time, over the whole block at once: the picked
channels are read in groups of CHANNEL_CHUNK (memory stays bounded on hour-long recordings),
filtered with MNE (`mne.filter.filter_data`, zero-phase FIR, n_jobs=1) and cut into bins of
`bin_ms` (20 ms, as the real data) by a reshape, or by `np.add.reduceat` where a bin is not a
whole number of samples (bin k covers samples round(k * s) to round((k + 1) * s), s = samples per
bin; the block's last partial bin is dropped). Bin k starts k * bin_ms after the block's first
sample.

Feature kinds, per picked channel:

- `spikes` (broadband intracortical signals, e.g. Utah arrays at 30 kHz): the spike band
  (250-5000 Hz by default) band-passed; per bin, the number of threshold crossings (a crossing is
  the first sample beyond threshold x RMS, -4.5 x RMS by default: below it for a negative
  multiplier, above it for a positive one; RMS per channel over the whole band-passed block) and
  the spike-band power (mean square of the band-passed signal in the bin). All crossing channels
  come first, then all power channels: the real data's layout (256 threshold crossings, then 256
  spike-band powers), so 2 features per channel.
- `high_gamma` (ECoG, sEEG, MEG): the band (70-150 Hz by default) band-passed; per bin the mean
  square of the band-passed signal. Mean square rather than the squared Hilbert envelope: it is the
  same definition as the spike-band power above and in the real data, needs nothing beyond the
  filter (a Hilbert transform of an hour-long block costs an FFT of the whole block per channel),
  and on a 20 ms bin, which holds 1.4 cycles or more of any frequency in the band, it follows the
  band's power as closely as a z-scored feature needs (a pure tone in the band gives A^2 / 2 with a
  ripple of at most 1 / (2 pi 1.4), 11 %, at the band's 70 Hz edge and none at whole cycles).
- `as_is`: signals already at the bin rate (sfreq == 1000 / bin_ms, e.g. features extracted
  elsewhere and saved at 50 Hz) are taken sample by sample: sample k is bin k. A signal at another
  rate is first resampled to the bin rate with MNE (`Raw.resample(method="polyphase")`, n_jobs=1),
  whose anti-alias low-pass keeps only what the bin rate can carry (below 25 Hz for 20 ms bins).
  Polyphase rather than MNE's default FFT method: its output sample k stands for the time k x bin,
  as a native bin-rate sample does (the FFT method's sample k shows the signal half a bin later,
  10 ms, measured from 250 Hz to 50 Hz).
- `auto` chooses by the sampling rate and the channel types (`choose_kind`):
  1. sfreq equal to the bin rate: `as_is`;
  2. else Nyquist (sfreq / 2) above the spike band's top (> 10 kHz sampling for 5000 Hz) and no
     MEG channel (mag, grad) among the picks: `spikes` (only broadband microelectrode recordings
     are sampled that fast; EEG-typed channels qualify because EDF and BrainVision files call
     every channel EEG);
  3. else Nyquist above the high-gamma band's top (> 300 Hz sampling for 150 Hz): `high_gamma`;
  4. else a UserError: the rate is too low for band features (name `--features as_is` to resample).

A band whose top edge is at or above Nyquist is a UserError naming the rate and the band.

Every feature is z-scored per block over all of the block's bins (mean 0, standard deviation 1; a
constant feature becomes 0) and stored as float32, as the real data is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.errors import UserError

FEATURE_KINDS = ("spikes", "high_gamma", "as_is")
HIGH_GAMMA_BAND = (70.0, 150.0)
SPIKE_BAND = (250.0, 5000.0)
THRESHOLD_RMS = -4.5
BIN_MS = 20.0
CHANNEL_CHUNK = 16  # channels filtered at once: 16 x 1 h at 1 kHz is 0.46 GB of float64
MEG_TYPES = frozenset({"mag", "grad"})


@dataclass(frozen=True)
class FeatureSettings:
    """What to compute; `kind` may be "auto" until `choose_kind` resolves it."""

    kind: str = "auto"
    bin_ms: float = BIN_MS
    band: tuple[float, float] = HIGH_GAMMA_BAND  # high_gamma
    spike_band: tuple[float, float] = SPIKE_BAND  # spikes
    threshold: float = THRESHOLD_RMS  # spikes: threshold = threshold x RMS per channel

    @property
    def bin_s(self) -> float:
        return self.bin_ms / 1000.0

    @property
    def bin_rate(self) -> float:
        return 1000.0 / self.bin_ms


def check_settings(settings: FeatureSettings) -> None:
    """UserError for settings no recording could satisfy."""
    if settings.kind not in ("auto", *FEATURE_KINDS):
        raise UserError(f"unknown features {settings.kind!r} (known: auto, {', '.join(FEATURE_KINDS)})")
    if not (math.isfinite(settings.bin_ms) and settings.bin_ms > 0):
        raise UserError(f"--bin-ms must be a positive number of milliseconds (got {settings.bin_ms:g})")
    for option, (low, high) in (("--band", settings.band), ("--spike-band", settings.spike_band)):
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
            raise UserError(f"{option} must be LOW HIGH in Hz with 0 < LOW < HIGH (got {low:g} {high:g})")
    if not (math.isfinite(settings.threshold) and settings.threshold != 0):
        raise UserError(f"--threshold must be a non-zero multiple of the RMS, e.g. -4.5 (got {settings.threshold:g})")


def at_bin_rate(sfreq: float, settings: FeatureSettings) -> bool:
    return abs(sfreq * settings.bin_s - 1.0) < 1e-9


def band_of(kind: str, settings: FeatureSettings) -> tuple[float, float] | None:
    return {"spikes": settings.spike_band, "high_gamma": settings.band}.get(kind)


def choose_kind(settings: FeatureSettings, sfreq: float, ch_types: list[str], where: str) -> str:
    """The feature kind for a block: settings.kind, or the auto rule of the module docstring.
    UserError when the rate is too low for the kind (`where` names the recording)."""
    kind = settings.kind
    if kind == "auto":
        if at_bin_rate(sfreq, settings):
            kind = "as_is"
        elif sfreq / 2 > settings.spike_band[1] and not MEG_TYPES & set(ch_types):
            kind = "spikes"
        elif sfreq / 2 > settings.band[1]:
            kind = "high_gamma"
        else:
            low, high = settings.band
            raise UserError(f"{where}: sampling rate {sfreq:g} Hz is too low for high-gamma features "
                            f"({low:g}-{high:g} Hz needs more than {2 * high:g} Hz) and is not the bin rate "
                            f"({settings.bin_rate:g} Hz); pass --features as_is to resample it to the bin rate, "
                            f"or a lower --band")
    check_rate(kind, sfreq, settings, where)
    return kind


def check_rate(kind: str, sfreq: float, settings: FeatureSettings, where: str) -> None:
    """UserError when the band's top edge is not below Nyquist."""
    band = band_of(kind, settings)
    if band is not None and band[1] >= sfreq / 2:
        option = "--spike-band" if kind == "spikes" else "--band"
        raise UserError(f"{where}: sampling rate {sfreq:g} Hz is too low for {kind} features: the band "
                        f"{band[0]:g}-{band[1]:g} Hz reaches Nyquist ({sfreq / 2:g} Hz); it needs more than "
                        f"{2 * band[1]:g} Hz (choose another --features or {option})")


def features_per_channel(kind: str) -> int:
    return 2 if kind == "spikes" else 1


def feature_names(kind: str, ch_names: list[str]) -> list[str]:
    """The name of every feature column, in order."""
    if kind == "spikes":
        return [f"{c}:threshold_crossings" for c in ch_names] + [f"{c}:spike_band_power" for c in ch_names]
    if kind == "high_gamma":
        return [f"{c}:high_gamma_power" for c in ch_names]
    return [f"{c}:as_is" for c in ch_names]


# ---------------------------------------------------------------- bins

def n_bins(n_samples: int, sfreq: float, bin_s: float) -> int:
    """Whole bins in a block of n_samples (the last partial bin is dropped)."""
    return int(math.floor(n_samples / (sfreq * bin_s) + 1e-9))


def bin_sums(x: np.ndarray, sfreq: float, bin_s: float) -> np.ndarray:
    """(channels, samples) -> (channels, bins): the sum over each bin's samples."""
    per_bin = sfreq * bin_s
    count = n_bins(x.shape[-1], sfreq, bin_s)
    whole = round(per_bin)
    if abs(per_bin - whole) < 1e-9:
        return x[:, :count * whole].reshape(x.shape[0], count, whole).sum(axis=-1)
    starts = np.rint(np.arange(count) * per_bin).astype(np.int64)
    end = int(round(count * per_bin))
    return np.add.reduceat(x[:, :end], starts, axis=-1)


def bin_counts(n_samples: int, sfreq: float, bin_s: float) -> np.ndarray:
    """Samples in each bin (bins of a non-integer number of samples vary by one)."""
    per_bin = sfreq * bin_s
    count = n_bins(n_samples, sfreq, bin_s)
    return np.diff(np.rint(np.arange(count + 1) * per_bin).astype(np.int64))


def bin_means(x: np.ndarray, sfreq: float, bin_s: float) -> np.ndarray:
    return bin_sums(x, sfreq, bin_s) / bin_counts(x.shape[-1], sfreq, bin_s)


# ---------------------------------------------------------------- features before z-scoring

def band_pass(data: np.ndarray, sfreq: float, band: tuple[float, float], copy: bool = True) -> np.ndarray:
    """MNE's zero-phase FIR band-pass (its default design). copy=False filters a float64 `data` in
    place (a copy of 16 channels of an hour at 1 kHz costs most of a second)."""
    import mne

    data = np.array(data, dtype=np.float64) if copy or data.dtype != np.float64 else data
    return mne.filter.filter_data(data, sfreq, band[0], band[1], n_jobs=1, copy=False, verbose="error")


def band_power(data: np.ndarray, sfreq: float, band: tuple[float, float], bin_s: float,
               copy: bool = True) -> np.ndarray:
    """(channels, samples) -> (bins, channels): mean square of the band-passed signal per bin
    (a sinusoid of amplitude A inside the band gives about A^2 / 2, one outside about 0)."""
    filtered = band_pass(data, sfreq, band, copy)
    return bin_means(np.square(filtered, out=filtered), sfreq, bin_s).T


def crossings(filtered: np.ndarray, threshold: float) -> np.ndarray:
    """(channels, samples) bool, True at each threshold crossing: the first sample beyond
    threshold x RMS (below it when threshold < 0), RMS per channel over all samples."""
    level = threshold * np.sqrt(np.mean(np.square(filtered), axis=-1, keepdims=True))
    beyond = filtered < level if threshold < 0 else filtered > level
    out = np.zeros_like(beyond)
    out[:, 1:] = beyond[:, 1:] & ~beyond[:, :-1]
    return out


def spike_features(data: np.ndarray, sfreq: float, band: tuple[float, float], bin_s: float,
                   threshold: float, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(channels, samples) -> threshold crossings per bin and spike-band power per bin, each
    (bins, channels)."""
    filtered = band_pass(data, sfreq, band, copy)
    counts = bin_sums(crossings(filtered, threshold).astype(np.float64), sfreq, bin_s).T
    power = bin_means(np.square(filtered, out=filtered), sfreq, bin_s).T
    return counts, power


def zscore(features: np.ndarray) -> np.ndarray:
    """Per column over all rows (bins of one block), float32; a constant column becomes 0."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std == 0] = 1.0
    return ((features - mean) / std).astype(np.float32)


# ---------------------------------------------------------------- one block

def raw_features(raw, picks: list[int], kind: str, settings: FeatureSettings) -> np.ndarray:
    """(bins, features) float64 of one block before z-scoring, in `feature_names` order."""
    sfreq = float(raw.info["sfreq"])
    if kind == "as_is":
        if at_bin_rate(sfreq, settings):
            return np.asarray(raw.get_data(picks=picks), dtype=np.float64).T
        picked = raw.copy().pick(picks).load_data(verbose="error")
        picked.resample(settings.bin_rate, method="polyphase", n_jobs=1, verbose="error")
        data = picked.get_data()
        return data[:, :n_bins(data.shape[-1], settings.bin_rate, settings.bin_s)].T.astype(np.float64)
    chunks = [picks[i:i + CHANNEL_CHUNK] for i in range(0, len(picks), CHANNEL_CHUNK)]
    # raw.get_data returns a new array (a file's samples, or a RawArray's rows picked by index): filter it in place
    if kind == "high_gamma":
        return np.hstack([band_power(raw.get_data(picks=c), sfreq, settings.band, settings.bin_s, copy=False)
                          for c in chunks])
    if kind == "spikes":
        parts = [spike_features(raw.get_data(picks=c), sfreq, settings.spike_band, settings.bin_s, settings.threshold,
                                copy=False) for c in chunks]
        return np.hstack([p[0] for p in parts] + [p[1] for p in parts])
    raise ValueError(f"unknown feature kind {kind!r}")


def block_features(raw, picks: list[int], kind: str, settings: FeatureSettings, where: str) -> np.ndarray:
    """(bins, features) float32 of one block, z-scored over the block; UserError on non-finite
    samples (`where` names the recording)."""
    features = raw_features(raw, picks, kind, settings)
    bad = ~np.isfinite(features).all(axis=0)
    if bad.any():
        names = feature_names(kind, [raw.ch_names[i] for i in picks])
        raise UserError(f"{where}: non-finite values (NaN or infinity) in {int(bad.sum())} features, the first "
                        f"{names[int(np.flatnonzero(bad)[0])]}; drop the channel with --picks or repair the recording")
    return zscore(features)
