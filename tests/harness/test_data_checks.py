"""Malformed data found by the reader before a run starts (issue 19): each is a one-line UserError
naming the file and trial, never a traceback and never silently accepted."""

import json
import os

import h5py
import numpy as np
import pytest

import harness.data
from harness.data import find_sessions, open_feature_stores, read_trials
from harness.errors import UserError
from tests.conftest import make_trials, write_split
from tests.harness.test_data import assert_one_line_error, run_cli


def one_file(tmp_path, n=4, split="train", **kwargs):
    """<tmp_path>/d/s1/data_<split>.hdf5 with n labeled trials; returns (data_dir, path, trials)."""
    trials = make_trials("s1", n, np.random.default_rng(0))
    path = tmp_path / "d" / "s1" / f"data_{split}.hdf5"
    write_split(path, trials, **kwargs)
    return tmp_path / "d", path, trials


def refused(data_dir, split="train", *needles, sessions=("s1",), cache_dir=None):
    with pytest.raises(UserError) as info:
        read_trials(data_dir, list(sessions), split, 512, cache_dir=cache_dir)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- 1. phoneme ids


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("bad", [41, 0, -3])
def test_phoneme_id_outside_1_to_40_is_refused(tmp_path, split, bad):
    trials = make_trials("s1", 3, np.random.default_rng(0))
    trials[1]["phonemes"][1] = bad  # inside seq_len (write_split stores seq_len = len(phonemes))
    write_split(tmp_path / "d" / "s1" / f"data_{split}.hdf5", trials)
    refused(tmp_path / "d", split, f"data_{split}.hdf5 trial_0001", f"seq_class_ids holds {bad} at position 1",
            "1 to 40")


def test_a_fractional_phoneme_id_in_a_float_dtype_is_refused(tmp_path):
    trials = make_trials("s1", 2, np.random.default_rng(0))
    trials[0]["phonemes"][0] = 3.5  # the int64 cast would silently make it 3
    write_split(tmp_path / "d" / "s1" / "data_train.hdf5", trials, label_dtype="float32")
    refused(tmp_path / "d", "train", "trial_0000", "seq_class_ids holds 3.5")


def test_ids_after_seq_len_are_padding_and_not_checked(tmp_path):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        f["trial_0000"]["seq_class_ids"][-1] = 99
    assert len(read_trials(data_dir, ["s1"], "train", 512)) == 4


# --- 2. attributes that are no whole number


@pytest.mark.parametrize("name", ["block_num", "trial_num", "n_time_steps", "seq_len"])
@pytest.mark.parametrize("value", ["abc", np.array([3, 4]), 2.5], ids=["string", "array", "fraction"])
def test_a_non_numeric_attribute_is_named(tmp_path, name, value):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        f["trial_0002"].attrs[name] = value
    refused(data_dir, "train", "data_train.hdf5 trial_0002", f"attribute {name} is", "expected a whole number")


def test_numbers_as_one_element_arrays_floats_or_strings_are_read(tmp_path):
    data_dir, path, trials = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        f["trial_0001"].attrs["block_num"] = np.array([[7]])  # a 1x1 MATLAB matrix
        f["trial_0001"].attrs["trial_num"] = 9.0
        f["trial_0002"].attrs["trial_num"] = "12"
    read = read_trials(data_dir, ["s1"], "train", 512)
    assert (read[1].block_num, read[1].trial_num, read[2].trial_num) == (7, 9, 12)


def test_a_trial_group_without_a_number_needs_trial_num(tmp_path):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        f.move("trial_0003", "trial_extra")
    assert read_trials(data_dir, ["s1"], "train", 512)[-1].trial_num == 3  # its attribute is enough
    with h5py.File(path, "a") as f:
        del f["trial_extra"].attrs["trial_num"]
    refused(data_dir, "train", "trial_extra", "no trial_num attribute")


def test_labels_or_features_that_hold_no_numbers_are_refused(tmp_path):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["trial_0001"]["seq_class_ids"]
        f["trial_0001"]["seq_class_ids"] = np.array([b"AA", b"B"])
    refused(data_dir, "train", "trial_0001", "seq_class_ids is of dtype |S2, expected numbers")


# --- 3. text that is not UTF-8


@pytest.mark.parametrize("kind", ["fixed bytes", "utf-8 string"])
def test_a_sentence_label_that_is_not_utf8_is_refused(tmp_path, kind):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        attrs = f["trial_0001"].attrs
        if kind == "fixed bytes":
            attrs["sentence_label"] = np.bytes_(b"caf\xe9")  # Latin-1: read back as bytes that do not decode
        else:  # h5py reads invalid bytes of a UTF-8 string as surrogates, silently
            attrs.create("sentence_label", b"caf\xe9", dtype=h5py.string_dtype("utf-8"))
    refused(data_dir, "train", "data_train.hdf5 trial_0001", "attribute sentence_label is not UTF-8 text")


def test_a_transcription_code_beyond_unicode_is_refused(tmp_path):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["trial_0000"].attrs["sentence_label"]
        f["trial_0000"]["transcription"][0] = 0x110000
    refused(data_dir, "train", "trial_0000", "transcription holds 1114112")


# --- 4. duplicate keys


def test_two_trials_with_the_same_block_and_trial_num_are_refused(tmp_path):
    trials = make_trials("s1", 4, np.random.default_rng(0))
    trials[3]["trial"] = trials[1]["trial"]
    write_split(tmp_path / "d" / "s1" / "data_val.hdf5", trials)
    refused(tmp_path / "d", "val", "data_val.hdf5", "trial_0001 and trial_0003", "block_num 1", "trial_num 1")


def test_the_same_trial_num_in_two_blocks_is_fine(tmp_path):
    rng = np.random.default_rng(0)
    write_split(tmp_path / "d" / "s1" / "data_train.hdf5",
                make_trials("s1", 2, rng, block=1) + make_trials("s1", 2, rng, block=2))
    assert len(read_trials(tmp_path / "d", ["s1"], "train", 512)) == 4


# --- 5. a data file that is no file, or holds no trial


def test_a_broken_link_is_refused_not_skipped(tmp_path):
    data_dir, _, _ = one_file(tmp_path)
    link = data_dir / "s1" / "data_val.hdf5"
    link.symlink_to(tmp_path / "moved" / "data_val.hdf5")
    refused(data_dir, "val", str(link), "a broken link", "moved")
    with pytest.raises(UserError, match="broken link"):
        find_sessions(data_dir)


def test_a_session_holding_only_a_broken_link_is_refused(tmp_path):
    data_dir, _, _ = one_file(tmp_path)
    (data_dir / "s2").mkdir()
    (data_dir / "s2" / "data_train.hdf5").symlink_to(tmp_path / "nowhere.hdf5")
    with pytest.raises(UserError, match="s2/data_train.hdf5: a broken link"):
        find_sessions(data_dir)


def test_a_folder_named_like_a_data_file_is_refused(tmp_path):
    data_dir, _, _ = one_file(tmp_path)
    (data_dir / "s1" / "data_val.hdf5").mkdir()
    with pytest.raises(UserError, match="data_val.hdf5: a folder, not an HDF5 file"):
        find_sessions(data_dir)
    refused(data_dir, "val", "data_val.hdf5: a folder, not an HDF5 file")


def test_an_hdf5_file_without_trials_is_refused(tmp_path):
    data_dir, _, _ = one_file(tmp_path)
    with h5py.File(data_dir / "s1" / "data_val.hdf5", "w") as f:
        f.create_group("something_else")
    refused(data_dir, "val", "data_val.hdf5: no trial_* group")


# --- 6. labels on part of a split


def test_a_partly_labeled_file_is_refused(tmp_path):
    data_dir, path, _ = one_file(tmp_path, n=6)
    with h5py.File(path, "a") as f:
        for name in ("trial_0002", "trial_0004"):
            del f[name]["seq_class_ids"], f[name]["transcription"]
            del f[name].attrs["sentence_label"], f[name].attrs["seq_len"]
    refused(data_dir, "train", "2 of 6 train trials have no seq_class_ids", "data_train.hdf5 trial_0002")


def test_a_split_labeled_in_one_session_only_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    write_split(tmp_path / "d" / "s1" / "data_val.hdf5", make_trials("s1", 3, rng))
    write_split(tmp_path / "d" / "s2" / "data_val.hdf5", make_trials("s2", 2, rng), labels=False)
    refused(tmp_path / "d", "val", "2 of 5 val trials have no seq_class_ids", "s2/data_val.hdf5 trial_0000",
            sessions=("s1", "s2"))


def test_phonemes_without_a_sentence_on_part_of_a_split_are_refused(tmp_path):
    data_dir, path, _ = one_file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["trial_0003"]["transcription"], f["trial_0003"].attrs["sentence_label"]
    refused(data_dir, "train", "1 of 4 train trials have no sentence", "trial_0003")


# --- 7. NaN or Inf, whatever the feature source


def nan_file(tmp_path, bad_value=np.nan, feature_dtype="float32"):
    data_dir, path, _ = one_file(tmp_path, feature_dtype=feature_dtype)
    with h5py.File(path, "a") as f:
        f["trial_0001"]["input_features"][5, 7] = bad_value
    return data_dir, path


@pytest.mark.parametrize("bad_value,dtype", [(np.nan, "float32"), (np.inf, "float32"), (1e300, "float64")],
                         ids=["nan", "inf", "beyond-float32"])
def test_nan_is_found_when_the_hdf5_source_is_opened(tmp_path, bad_value, dtype):
    data_dir, path = nan_file(tmp_path, bad_value, dtype)
    trials = {"train": read_trials(data_dir, ["s1"], "train", 512, cache_dir=tmp_path / "cache")}
    with pytest.raises(UserError, match=r"data_train.hdf5 trial_0001: input_features holds NaN or Inf .first at "
                                        r"time bin 5"):
        open_feature_stores(trials, "hdf5", tmp_path / "cache")


def test_nan_is_found_when_the_memory_source_reads(tmp_path):
    data_dir, _ = nan_file(tmp_path)
    trials = {"train": read_trials(data_dir, ["s1"], "train", 512)}
    with pytest.raises(UserError, match="trial_0001: input_features holds NaN or Inf .first at time bin 5"):
        open_feature_stores(trials, "memory", tmp_path / "cache")


def index_files(cache_dir):
    return [json.loads(p.read_text()) for p in (cache_dir / "trial_index").glob("*.json")]


def test_the_finite_verdict_is_kept_per_file_version(tmp_path, monkeypatch):
    data_dir, path, _ = one_file(tmp_path)
    cache = tmp_path / "cache"
    trials = {"train": read_trials(data_dir, ["s1"], "train", 512, cache_dir=cache)}
    open_feature_stores(trials, "hdf5", cache)
    assert [i["finite"] for i in index_files(cache)] == [True]
    read_trials(data_dir, ["s1"], "train", 512, cache_dir=cache)  # a later start keeps the verdict
    assert [i["finite"] for i in index_files(cache)] == [True]

    with monkeypatch.context() as m:
        def no_read(*args, **kwargs):
            raise AssertionError("read the features again")

        m.setattr(harness.data, "_check_file_finite", no_read)
        open_feature_stores(trials, "hdf5", cache)

    with h5py.File(path, "a") as f:  # a new version of the file is read again
        f["trial_0002"]["input_features"][0, 0] = np.nan
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    trials = {"train": read_trials(data_dir, ["s1"], "train", 512, cache_dir=cache)}
    with pytest.raises(UserError, match="trial_0002"):
        open_feature_stores(trials, "hdf5", cache)


def test_a_trial_index_from_before_these_checks_is_not_trusted(tmp_path):
    data_dir, path, _ = one_file(tmp_path)
    cache = tmp_path / "cache"
    read_trials(data_dir, ["s1"], "train", 512, cache_dir=cache)
    (index_path,) = (cache / "trial_index").glob("*.json")
    old = json.loads(index_path.read_text())
    del old["version"]  # as written before versions
    old["trials"][0]["phoneme_ids"] = [41]  # what the unchecked reader accepted
    index_path.write_text(json.dumps(old))
    assert read_trials(data_dir, ["s1"], "train", 512, cache_dir=cache)[0].phoneme_ids != (41,)
    assert [i["version"] for i in index_files(cache)] == [harness.data.INDEX_VERSION]


def test_nan_read_on_demand_stops_the_run_before_its_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for session in ("s1", "s2"):
        write_split(tmp_path / "d" / session / "data_train.hdf5", make_trials(session, 4, rng))
        write_split(tmp_path / "d" / session / "data_val.hdf5", make_trials(session, 4, rng))
    with h5py.File(tmp_path / "d" / "s2" / "data_val.hdf5", "a") as f:  # a trial the pre-flight check does not read
        f["trial_0003"]["input_features"][3, 0] = np.nan
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run", "--set", "data_params.features=hdf5",
                        "--set", "evaluation.splits=[val]")
    assert_one_line_error(code, err, tmp_path / "run", "s2/data_val.hdf5 trial_0003", "NaN or Inf", "time bin 3")
    assert not (tmp_path / "run").exists()


# --- 8. a damaged HDF5 file


@pytest.mark.parametrize("damage", ["random bytes", "truncated to half"])
def test_a_damaged_file_is_one_line(tmp_path, damage):
    data_dir, path, _ = one_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(np.random.default_rng(0).bytes(len(data)) if damage == "random bytes" else data[:len(data) // 2])
    assert find_sessions(data_dir) == ["s1"]
    refused(data_dir, "train", str(path), "not a readable HDF5 file")
