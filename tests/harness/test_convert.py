"""`main.py convert` (issue 16, harness.convert): recordings written by MNE itself (a RawArray with
sentence annotations saved as FIF, exported as EDF and BrainVision, and a BIDS tree written by
mne-bids) become session folders in the Brain-to-Text '25 format.

Checked by hand computations (the z-scored samples, the band power of sinusoids, threshold crossings
of injected spikes at known bins), by plain h5py reads and by the harness's own reader; bad inputs
are one line, exit 2 and nothing written; a tiny CTC run trains on a converted recording. No
network: every test runs with outgoing connections refused.
"""

import datetime
import json
import socket

import h5py
import mne
import numpy as np
import pytest

import main
from harness.data import read_trials
from harness.phonemes import phonemes_to_ids
from harness.pronounce import sentence_ids
from harness.recording_features import band_power, spike_features, zscore
from harness.sentences import unique_sentences
from tests.conftest import REPO_ROOT

mne.set_log_level("error")
DAY1 = datetime.datetime(2024, 3, 5, 10, 0, tzinfo=datetime.UTC)
DAY2 = datetime.datetime(2024, 3, 7, 9, 30, tzinfo=datetime.UTC)
SENTENCES = ["The cat sat.", "Hello world", "I like green tea", "Where is the station", "We can go now"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing may download anything (MNE's sample data, pooch): internet connections fail."""
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test_convert: no network ({address})")
        return real(self, address)
    monkeypatch.setattr(socket.socket, "connect", connect)


def make_raw(data, sfreq, sentences, date=DAY1, ch_type="ecog", names=None):
    """A RawArray with `sentence: ...` annotations at (onset, duration, text)."""
    names = names or [f"E{i:02d}" for i in range(len(data))]
    raw = mne.io.RawArray(np.asarray(data, dtype=float), mne.create_info(names, float(sfreq), ch_type))
    if date is not None:
        raw.set_meas_date(date)
    raw.set_annotations(mne.Annotations([o for o, _, _ in sentences], [d for _, d, _ in sentences],
                                        [f"sentence: {t}" for _, _, t in sentences]))
    return raw


def spaced(texts, start=1.0, duration=1.5, gap=0.5):
    """(onset, duration, text), one sentence after another."""
    return [(start + i * (duration + gap), duration, t) for i, t in enumerate(texts)]


def save(raw, path):
    raw.save(path, overwrite=True)
    return str(path)


def convert(capsys, *args):
    """main.main(["convert", ...]) -> (exit status, stdout, stderr)."""
    rc = main.main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def read_file(path):
    """[(group, {dataset: array}, {attr: value})] of one data_*.hdf5, read with plain h5py."""
    with h5py.File(path, "r") as f:
        return [(name, {k: f[name][k][()] for k in f[name]}, dict(f[name].attrs)) for name in f]


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def all_trials(out):
    """{(session, block, trial): (split, sentence or None, features)} of a converted folder."""
    found = {}
    for path in sorted(out.glob("*/data_*.hdf5")):
        for _, data, attrs in read_file(path):
            key = (text(attrs["session"]), int(attrs["block_num"]), int(attrs["trial_num"]))
            assert key not in found
            label = text(attrs["sentence_label"]) if "sentence_label" in attrs else None
            found[key] = (path.stem.removeprefix("data_"), label, data["input_features"])
    return found


# ---------------------------------------------------------------- features by hand

def test_as_is_features_are_the_block_zscored_samples_and_labels_are_cmu_phonemes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 50 * 20)) * 1e-5 + np.arange(3)[:, None] * 1e-5  # 20 s at the bin rate (50 Hz)
    sentences = [(1.03, 1.5, "The cat sat."), (4.0, 2.0, "Hello world"), (7.5, 1.0, "I like green tea")]
    path = save(make_raw(data, 50, sentences), tmp_path / "a_raw.fif")
    out = tmp_path / "out"
    rc, stdout, err = convert(capsys, path, "--out", out, "--val-fraction", "0")
    assert rc == 0, err
    assert "1 session (rec.2024.03.05), 3 train trials; 3 features (as_is, 20 ms bins)" in stdout
    expected = (data - data.mean(axis=1, keepdims=True)) / data.std(axis=1, keepdims=True)
    trials = read_file(out / "rec.2024.03.05" / "data_train.hdf5")
    assert [name for name, _, _ in trials] == ["trial_0000", "trial_0001", "trial_0002"]
    for (onset, duration, sentence), (_, d, attrs) in zip(sentences, trials):
        first, n = int(np.floor(onset * 50)), round(duration * 50)
        x = d["input_features"]
        assert x.dtype == np.float32 and x.shape == (n, 3) and int(attrs["n_time_steps"]) == n
        np.testing.assert_allclose(x, expected[:, first:first + n].T, rtol=1e-5, atol=1e-5)
        assert text(attrs["sentence_label"]) == sentence and text(attrs["session"]) == "rec.2024.03.05"
        assert d["transcription"][:len(sentence)].tolist() == [ord(c) for c in sentence]
        assert d["transcription"].shape == d["seq_class_ids"].shape == (500,)
        assert d["seq_class_ids"][:int(attrs["seq_len"])].tolist() == sentence_ids(sentence)
        assert int(attrs["block_num"]) == 1
    # the CMU phonemes without stress, SIL after every word, by hand for the first sentence
    assert trials[0][1]["seq_class_ids"][:11].tolist() == phonemes_to_ids("DH AH SIL K AE T SIL S AE T SIL".split())
    assert int(trials[0][2]["seq_len"]) == 11 and [int(t[2]["trial_num"]) for t in trials] == [0, 1, 2]
    # the harness reads it as it reads the real data
    read = read_trials(out, ["rec.2024.03.05"], "train", n_features=3)
    assert [t.sentence for t in read] == [s for _, _, s in sentences]
    report = json.loads((out / "convert_report.json").read_text())
    assert report["features"]["order"] == ["E00:as_is", "E01:as_is", "E02:as_is"]
    assert report["sessions"]["rec.2024.03.05"]["channels"][0] == {"name": "E00", "type": "ecog"}
    assert report["blocks"][0]["n_bins"] == 1000 and report["n_trials"] == {"train": 3, "val": 0, "test": 0}


def test_as_is_resamples_another_rate_to_the_bin_rate(tmp_path, capsys):
    """A 1 Hz tone at 250 Hz, as_is: MNE resamples it to 50 Hz; the bins are the tone's z-scored samples."""
    t = np.arange(250 * 12) / 250
    data = np.stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t)]) * 1e-5
    path = save(make_raw(data, 250, [(2.0, 4.0, "The cat sat.")]), tmp_path / "slow_raw.fif")
    out = tmp_path / "out"
    rc, stdout, err = convert(capsys, path, "--out", out, "--features", "as_is", "--val-fraction", "0")
    assert rc == 0, err
    x = all_trials(out)[("rec.2024.03.05", 1, 0)][2]
    bins = np.arange(100, 300) / 50  # the trial's bins, at 50 Hz
    np.testing.assert_allclose(x, np.sqrt(2) * np.stack([np.sin(2 * np.pi * bins), np.cos(2 * np.pi * bins)]).T,
                               atol=1e-3)  # a whole number of periods: mean 0, standard deviation 1/sqrt(2)


def test_band_power_of_sinusoids_inside_and_outside_the_band():
    sfreq, a = 1000.0, 3.0
    t = np.arange(int(10 * sfreq)) / sfreq
    signals = np.stack([a * np.sin(2 * np.pi * 100 * t), a * np.sin(2 * np.pi * 20 * t), a * np.sin(2 * np.pi * 300 * t)])
    power = band_power(signals, sfreq, (70.0, 150.0), 0.02)
    assert power.shape == (500, 3)
    middle = power[25:-25]  # away from the filter's edges
    np.testing.assert_allclose(middle[:, 0], a ** 2 / 2, rtol=0.02)  # inside the band: A^2 / 2
    assert middle[:, 1:].max() < 0.01 * a ** 2 / 2  # outside: nothing


def test_high_gamma_through_convert_follows_the_band_amplitude(tmp_path, capsys):
    """A 100 Hz tone whose amplitude doubles halfway: two power levels, A^2/2 and 4 A^2/2, which the
    block z-score maps to -1 and +1; a 20 Hz tone beside it changes nothing."""
    sfreq, seconds = 1000.0, 20
    t = np.arange(int(seconds * sfreq)) / sfreq
    amplitude = np.where(t < seconds / 2, 1.0, 2.0)
    rng = np.random.default_rng(1)
    data = np.stack([amplitude * np.sin(2 * np.pi * 100 * t), amplitude * np.sin(2 * np.pi * 20 * t)
                     + 1e-3 * rng.normal(size=t.size)]) * 1e-5
    path = save(make_raw(data, sfreq, [(2.0, 4.0, "The cat sat."), (12.0, 4.0, "Hello world")]), tmp_path / "hg_raw.fif")
    out = tmp_path / "out"
    rc, stdout, err = convert(capsys, path, "--out", out, "--val-fraction", "0")
    assert rc == 0, err
    assert "(high_gamma, 20 ms bins)" in stdout  # auto: 1 kHz, ECoG
    trials = all_trials(out)
    low, high = trials[("rec.2024.03.05", 1, 0)][2], trials[("rec.2024.03.05", 1, 1)][2]
    assert low.shape == high.shape == (200, 2)
    np.testing.assert_allclose(low[:, 0], -1.0, atol=0.03)
    np.testing.assert_allclose(high[:, 0], 1.0, atol=0.03)
    # the same z-score from the pre-z-score function: power levels 1/2 and 2 (times the scale)
    powers = band_power(data, sfreq, (70.0, 150.0), 0.02)
    np.testing.assert_allclose(powers[100:300, 0] / 1e-10, 0.5, rtol=0.02)
    np.testing.assert_allclose(zscore(powers)[100:300], low, atol=1e-5)


def test_spike_crossings_and_power_at_known_bins(tmp_path, capsys):
    sfreq, seconds, n_ch = 30000.0, 4, 3
    rng = np.random.default_rng(6)  # a seed whose noise alone crosses -4.5 RMS nowhere (others do, about once a channel)
    data = rng.normal(size=(n_ch, int(sfreq * seconds)))
    spike_bins = {0: [60, 61, 75, 130], 1: [64, 100], 2: []}  # bins of 20 ms (600 samples)
    shape = -12 * np.exp(-0.5 * ((np.arange(-30, 31)) / 6) ** 2)  # a 0.2 ms-wide negative spike
    for ch, bins in spike_bins.items():
        for b in bins:
            centre = b * 600 + 300
            data[ch, centre - 30:centre + 31] += shape
    counts, power = spike_features(data, sfreq, (250.0, 5000.0), 0.02, -4.5)
    assert counts.shape == power.shape == (200, n_ch)
    for ch, bins in spike_bins.items():
        assert np.flatnonzero(counts[:, ch]).tolist() == bins
        assert counts[bins, ch].tolist() == [1.0] * len(bins)
        if bins:  # the spike-band power is higher where the spikes are
            assert power[bins, ch].min() > 3 * np.median(power[:, ch])
    # through convert: 30 kHz, so auto picks spikes; crossings of every channel first, then power
    path = save(make_raw(data * 1e-6, sfreq, [(1.0, 2.0, "The cat sat.")], ch_type="seeg"), tmp_path / "ua_raw.fif")
    out = tmp_path / "out"
    rc, stdout, err = convert(capsys, path, "--out", out, "--val-fraction", "0")
    assert rc == 0, err
    assert "6 features (spikes, 20 ms bins)" in stdout
    x = all_trials(out)[("rec.2024.03.05", 1, 0)][2]  # bins 50..149
    assert x.shape == (100, 2 * n_ch)
    np.testing.assert_allclose(x, zscore(np.hstack([counts, power]))[50:150], atol=1e-4)
    assert (np.flatnonzero(x[:, 0] > 0) + 50).tolist() == [60, 61, 75, 130]
    report = json.loads((out / "convert_report.json").read_text())
    assert report["features"]["order"][:4] == ["E00:threshold_crossings", "E01:threshold_crossings",
                                                "E02:threshold_crossings", "E00:spike_band_power"]


# ---------------------------------------------------------------- formats

def test_fif_edf_brainvision_and_bids_give_the_same_trials(tmp_path, capsys):
    import mne_bids

    rng = np.random.default_rng(3)
    data = rng.normal(size=(6, 16000)) * 2e-5  # 16 s at 1 kHz
    raw = make_raw(data, 1000, spaced(SENTENCES[:4], start=1.0, duration=2.0, gap=1.0))
    fif = save(raw, tmp_path / "rec_raw.fif")
    mne.export.export_raw(tmp_path / "rec.edf", raw)
    mne.export.export_raw(tmp_path / "rec.vhdr", raw)
    bids_root = tmp_path / "bids"
    mne_bids.write_raw_bids(mne.io.read_raw(fif), mne_bids.BIDSPath(subject="01", session="1", task="speech", run=1,
                                                                    datatype="ieeg", root=bids_root), verbose=False)
    results = {}
    for name, source in (("fif", fif), ("edf", tmp_path / "rec.edf"), ("vhdr", tmp_path / "rec.vhdr"),
                         ("bids", bids_root)):
        out = tmp_path / f"out_{name}"
        rc, stdout, err = convert(capsys, source, "--out", out, "--features", "high_gamma", "--session-prefix", "p1")
        assert rc == 0, f"{name}: {err}"
        results[name] = all_trials(out)
    reference = results["fif"]
    assert len(reference) == 4 and {k[0] for k in reference} == {"p1.2024.03.05"}
    assert sorted(s for s, _, _ in reference.values()) == ["train", "train", "train", "val"]
    for name, trials in results.items():
        assert trials.keys() == reference.keys(), name
        for key, (split, label, x) in trials.items():
            assert (split, label) == reference[key][:2], name
            np.testing.assert_allclose(x, reference[key][2], atol=2e-2, err_msg=name)  # EDF stores 16-bit samples


def test_bids_filters_sessions_and_runs(tmp_path, capsys):
    import mne_bids

    rng = np.random.default_rng(4)
    root = tmp_path / "bids"
    for session, run, date in (("1", 1, DAY1), ("1", 2, DAY1 + datetime.timedelta(hours=1)), ("2", 1, DAY2)):
        raw = make_raw(rng.normal(size=(4, 400)) * 1e-5, 50, spaced(SENTENCES[:3]), date=date)
        fif = save(raw, tmp_path / f"s{session}r{run}_raw.fif")
        mne_bids.write_raw_bids(mne.io.read_raw(fif), mne_bids.BIDSPath(subject="07", session=session, task="speech",
                                                                        run=run, datatype="ieeg", root=root), verbose=False)
    out = tmp_path / "all"
    rc, stdout, err = convert(capsys, root, "--out", out, "--test-blocks", "sub-07.2024.03.05:2", "--unlabeled-test")
    assert rc == 0, err
    trials = all_trials(out)
    assert {k[:2] for k in trials} == {("sub-07.2024.03.05", 1), ("sub-07.2024.03.05", 2), ("sub-07.2024.03.07", 1)}
    assert {v[0] for k, v in trials.items() if k[1] == 2} == {"test"}
    assert all(v[1] is None for v in trials.values() if v[0] == "test")
    only = tmp_path / "ses2"
    rc, _, err = convert(capsys, root, "--out", only, "--session", "2", "--run", "1")
    assert rc == 0, err
    assert sorted(p.name for p in only.iterdir() if p.is_dir()) == ["sub-07.2024.03.07"]


# ---------------------------------------------------------------- splits

def test_seeded_val_share_keeps_a_sentence_in_one_split(tmp_path, capsys):
    texts = unique_sentences(np.random.default_rng(5), 30)
    texts = texts + texts[:5]  # five sentences said twice
    raw = make_raw(np.random.default_rng(5).normal(size=(2, 50 * 75)), 50, spaced(texts, start=0.5, duration=1.5, gap=0.5))
    path = save(raw, tmp_path / "a_raw.fif")

    def splits(name, *args):
        out = tmp_path / name
        rc, _, err = convert(capsys, path, "--out", out, *args)
        assert rc == 0, err
        return {k: (v[0], v[1]) for k, v in all_trials(out).items()}
    first = splits("a")
    by_split = {s: {label for split, label in first.values() if split == s} for s in ("train", "val")}
    assert len(by_split["val"]) == 3 and len(by_split["train"]) == 27  # 10 % of 30 distinct sentences
    assert not by_split["val"] & by_split["train"]
    assert splits("b") == first  # same seed, same split
    assert splits("c", "--seed", "1") != first
    share = splits("d", "--val-fraction", "0.2")
    assert sum(label in {label for split, label in share.values() if split == "val"} for label in set(texts)) == 6


def test_block_splits_by_option_and_by_tsv(tmp_path, capsys):
    rng = np.random.default_rng(6)
    paths = []
    for i in range(3):  # three recordings of one day: three blocks of one session, in time order
        raw = make_raw(rng.normal(size=(2, 400)), 50, spaced(SENTENCES[i:i + 3]), date=DAY1 + datetime.timedelta(hours=2 - i))
        paths.append(save(raw, tmp_path / f"b{i}_raw.fif"))
    out = tmp_path / "out"
    rc, _, err = convert(capsys, *paths, "--out", out, "--val-blocks", "2", "--test-blocks", "b0_raw.fif", "--unlabeled-test")
    assert rc == 0, err
    trials = all_trials(out)
    # b2 is the earliest (block 1), b1 block 2, b0 block 3
    assert {k[1]: v[0] for k, v in trials.items()} == {1: "train", 2: "val", 3: "test"}
    assert {v[1] for k, v in trials.items() if k[1] == 1} == set(SENTENCES[2:5])
    test = read_file(out / "rec.2024.03.05" / "data_test.hdf5")
    assert len(test) == 3 and all(set(d) == {"input_features"} and "seq_len" not in a for _, d, a in test)
    tsv = tmp_path / "splits.tsv"
    tsv.write_text("session\tblock\tsplit\nrec.2024.03.05\t1\ttest\nrec.2024.03.05\t3\tval\n")
    out2 = tmp_path / "out2"
    rc, _, err = convert(capsys, *paths, "--out", out2, "--splits", tsv)
    assert rc == 0, err
    assert {k[1]: v[0] for k, v in all_trials(out2).items()} == {1: "test", 2: "train", 3: "val"}
    assert all(v[1] is not None for v in all_trials(out2).values())  # labeled test without --unlabeled-test


def test_events_tsv_replaces_the_annotations(tmp_path, capsys):
    rng = np.random.default_rng(7)
    paths = [save(make_raw(rng.normal(size=(2, 400)), 50, [], date=DAY1 + datetime.timedelta(hours=i)),
                  tmp_path / f"e{i}_raw.fif") for i in range(2)]
    tsv = tmp_path / "events.tsv"
    tsv.write_text("onset\tduration\tsentence\trecording\n1.0\t2.0\tThe cat sat.\te0_raw.fif\n"
                   "4.0\t1.0\tHello world\te1_raw.fif\n0.5\t1.0\tWe can go now\te1_raw.fif\n")
    out = tmp_path / "out"
    rc, _, err = convert(capsys, *paths, "--out", out, "--events", tsv, "--val-fraction", "0")
    assert rc == 0, err
    assert {k: v[1] for k, v in all_trials(out).items()} == {
        ("rec.2024.03.05", 1, 0): "The cat sat.", ("rec.2024.03.05", 2, 0): "We can go now",
        ("rec.2024.03.05", 2, 1): "Hello world"}
    assert all_trials(out)[("rec.2024.03.05", 1, 0)][2].shape == (100, 2)


def test_undated_recordings_are_sessions_of_their_own_in_input_order(tmp_path, capsys):
    rng = np.random.default_rng(12)
    paths = [save(make_raw(rng.normal(size=(2, 400)), 50, spaced(SENTENCES[i:i + 2]), date=None), tmp_path / f"u{i}_raw.fif")
             for i in range(2)]
    out = tmp_path / "out"
    rc, stdout, err = convert(capsys, *paths, "--out", out, "--session-prefix", "t15")
    assert rc == 0, err
    assert "2 sessions (t15.01, t15.02)" in stdout
    assert {k[0]: v[1] for k, v in all_trials(out).items() if k[2] == 0} == {"t15.01": SENTENCES[0], "t15.02": SENTENCES[1]}


def test_skip_unknown_words_counts_the_skipped_trials(tmp_path, capsys):
    raw = make_raw(np.random.default_rng(8).normal(size=(2, 500)), 50,
                   spaced(["The cat sat.", "The zzyzxq sat", "Hello world", "I like green tea"]))
    path = save(raw, tmp_path / "a_raw.fif")
    out = tmp_path / "out"
    rc, stdout, err = convert(capsys, path, "--out", out, "--skip-unknown-words", "--val-fraction", "0")
    assert rc == 0, err
    assert "3 train trials" in stdout and "1 trial skipped" in stdout
    assert sorted(k[2] for k in all_trials(out)) == [0, 2, 3]  # trial numbers keep the sentence's place
    skipped = json.loads((out / "convert_report.json").read_text())["skipped"]
    assert [(s["trial_num"], s["sentence"], s["reason"]) for s in skipped] == [
        (1, "The zzyzxq sat", "words not in the CMU dictionary: zzyzxq")]


def test_overwrite_replaces_only_a_previous_conversion(tmp_path, capsys):
    path = save(make_raw(np.random.default_rng(9).normal(size=(2, 400)), 50, spaced(SENTENCES[:3])), tmp_path / "a_raw.fif")
    out = tmp_path / "out"
    assert convert(capsys, path, "--out", out)[0] == 0
    rc, _, err = convert(capsys, path, "--out", out)
    assert rc == 2 and "exists and is not empty" in err
    (out / "stale.txt").write_text("x")
    rc, _, err = convert(capsys, path, "--out", out, "--overwrite", "--val-fraction", "0")
    assert rc == 0, err
    assert not (out / "stale.txt").exists() and {v[0] for v in all_trials(out).values()} == {"train"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, _, err = convert(capsys, path, "--out", other, "--overwrite")
    assert rc == 2 and "no convert_report.json" in err and (other / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*converting*")) and not list(tmp_path.glob(".*.old"))


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _bad_inputs(tmp_path):
    rng = np.random.default_rng(10)
    ok = spaced(SENTENCES[:3])

    def fif(name, data, sfreq=50, sentences=ok, **kw):
        return [save(make_raw(data, sfreq, sentences, **kw), tmp_path / f"{name}_raw.fif")]
    garbage = tmp_path / "broken_raw.fif"
    garbage.write_bytes(b"not a fif file" * 10)
    tiny = tmp_path / "notes_raw.fif"
    tiny.write_text("hello\n")  # MNE fails on it with an AttributeError, not a ValueError
    garbage_edf = tmp_path / "broken.edf"
    garbage_edf.write_bytes(b"0       " + b"x" * 300)
    late = tmp_path / "late.tsv"  # (MNE itself crops annotations to the data; an events TSV is not)
    late.write_text("onset\tduration\tsentence\n1.0\t1.0\tThe cat sat.\n7.0\t2.0\tHello world\n")
    return {
        "no sentences": (fif("none", rng.normal(size=(2, 400)), sentences=[]), [], "no sentence annotation"),
        "overlap": (fif("overlap", rng.normal(size=(2, 400)), sentences=[(1.0, 2.0, "The cat sat."), (2.5, 1.0, "Hello world")]),
                    [], "overlapping sentences: 'The cat sat.' at 1-3 s and 'Hello world' from 2.5 s"),
        "rate too low": (fif("slow", rng.normal(size=(2, 2000)), sfreq=250), ["--features", "high_gamma"],
                         "sampling rate 250 Hz is too low for high_gamma features: the band 70-150 Hz"),
        "auto rate too low": (fif("slow2", rng.normal(size=(2, 2000)), sfreq=250), [],
                              "sampling rate 250 Hz is too low for high-gamma features (70-150 Hz"),
        "pick selects nothing": (fif("pick", rng.normal(size=(2, 400))), ["--picks", "seeg"],
                                 "--picks seeg selects no channel"),
        "unreadable fif": ([str(garbage)], [], f"cannot read recording {garbage}"),
        "tiny text file as fif": ([str(tiny)], [], f"cannot read recording {tiny}"),
        "unreadable edf": ([str(garbage_edf)], [], f"cannot read recording {garbage_edf}"),
        "missing file": ([str(tmp_path / "nope.fif")], [], "recording not found"),
        "unknown words": (fif("oov", rng.normal(size=(2, 400)), sentences=spaced(
            ["The blorfen sat", "Hello world", "I like qwzzk and blorfen"])), [],
            "words not in the CMU dictionary: blorfen, qwzzk (in 'The blorfen sat' (oov_raw.fif at 1 s); "
            "'I like qwzzk and blorfen' (oov_raw.fif at 5 s))"),
        "channel counts": (fif("d1", rng.normal(size=(2, 400))) + fif("d2", rng.normal(size=(3, 400)), date=DAY2), [],
                           "different channel counts: rec.2024.03.05 has 2 channels (2 features), rec.2024.03.07 has 3"),
        "outside the recording": (fif("late", rng.normal(size=(2, 400)), sentences=[]), ["--events", str(late)],
                                  "the sentence 'Hello world' at 7-9 s lies outside the recording (0-8 s)"),
        "unknown block": (fif("blk", rng.normal(size=(2, 400))), ["--test-blocks", "rec.2024.03.05:4"],
                          "--test-blocks rec.2024.03.05:4: no such block"),
        "BIDS filter on files": (fif("files", rng.normal(size=(2, 400))), ["--subject", "01"],
                                 "--subject, --session, --task and --run select runs of a BIDS root"),
        "folder that is no BIDS root": ([str(tmp_path)], [], "is a folder but no BIDS root"),
        "non-finite samples": (fif("nan", np.where(np.arange(400) == 7, np.nan, rng.normal(size=(2, 400)))), [],
                               "nan_raw.fif: non-finite values (NaN or infinity) in 2 features, the first E00:as_is"),
    }


# the last fails while the features are computed, after every check, when the folder beside --out exists
BAD_CASES = ["no sentences", "overlap", "rate too low", "auto rate too low", "pick selects nothing", "unreadable fif",
             "tiny text file as fif",
             "unreadable edf", "missing file", "unknown words", "channel counts", "outside the recording", "unknown block",
             "BIDS filter on files", "folder that is no BIDS root", "non-finite samples"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    inputs, args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "nested" / "out"
    rc, stdout, err = convert(capsys, *inputs, "--out", out, *args)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists() and not (tmp_path / "nested").exists()  # nor the temporary folder beside it


# ---------------------------------------------------------------- end to end

def test_a_converted_recording_trains_end_to_end(tmp_path, capsys):
    """2 days = 2 sessions of 30 sentences, 64 channels at the bin rate, then a 4-step CTC run."""
    rng = np.random.default_rng(11)
    texts = unique_sentences(rng, 60)
    paths = []
    for day, date in enumerate((DAY1, DAY2)):
        sentences, onset = [], 0.5
        for t in texts[30 * day:30 * day + 30]:  # long enough for CTC: 5 bins a phoneme after the 14-bin patch
            duration = 0.02 * (5 * len(sentence_ids(t)) + 14)
            sentences.append((onset, duration, t))
            onset += duration + 0.4
        raw = make_raw(rng.normal(size=(64, int(50 * (onset + 1)))), 50, sentences, date=date)
        paths.append(save(raw, tmp_path / f"day{day}_raw.fif"))
    data = tmp_path / "converted"
    rc, stdout, err = convert(capsys, *paths, "--out", data)
    assert rc == 0, err
    assert "2 sessions (rec.2024.03.05, rec.2024.03.07), 54 train, 6 val trials; 64 features" in stdout
    run_dir = tmp_path / "run"
    # a shipped config, unedited but for speed: the feature width (64) comes from the data
    rc = main.main(["run", "--config", str(REPO_ROOT / "configs" / "ctc_baseline" / "tiny.yml"),
                    "--set", f"data_params.data_dir={data}", "--set", "training_params.num_steps=4",
                    "--set", "model_params.word_decoder={name: greedy}", "--out", str(run_dir)])
    assert rc == 0, capsys.readouterr().err
    assert (run_dir / "DONE").exists()
    assert "n_features: 64" in (run_dir / "config.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"]["n_trials"] == 6
