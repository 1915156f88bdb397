"""The HDF5 reader, batching, and every bad input's one-line error with exit status 2."""

import h5py
import numpy as np
import pytest

import main
from config import load_config
from harness.batching import TrainBatchSampler, TrialDataset, collate, eval_batches
from harness.data import FeatureStore, find_sessions, read_trials
from tests.conftest import TINY_CONFIG, make_trials, write_split


def test_reads_train_val_test_and_missing_splits(small_dataset):
    sessions = find_sessions(small_dataset)
    assert sessions == ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]
    train = read_trials(small_dataset, sessions, "train", 512)
    val = read_trials(small_dataset, sessions, "val", 512)
    test = read_trials(small_dataset, sessions, "test", 512)
    assert len(train) == 18 and len(val) == 6 and len(test) == 4
    assert {t.session for t in val} == {"t15.2023.08.13", "t15.2023.08.18"}  # first session: no val file
    assert [t.day for t in val[:3]] == [1, 1, 1]
    assert all(t.phoneme_ids is None and t.sentence is None for t in test)
    t = train[0]
    assert t.sentence == "Sentence number 0." and t.phoneme_ids[-1] == 40 and t.block_num == 1
    with h5py.File(t.path) as f:
        stored = f[t.group]["input_features"][()]
    np.testing.assert_array_equal(FeatureStore(train, "memory")[0], stored.astype(np.float32))


def test_any_subset_of_sessions_and_day_index_follow_the_given_order(small_dataset):
    train = read_trials(small_dataset, ["t15.2023.08.18", "t15.2023.08.11"], "train", 512)
    assert [t.session for t in train][::6] == ["t15.2023.08.18", "t15.2023.08.11"]
    assert {t.day for t in train if t.session == "t15.2023.08.18"} == {0}
    mapped = read_trials(small_dataset, ["t15.2023.08.13"], "train", 512, day_index={"t15.2023.08.13": 7})
    assert {t.day for t in mapped} == {7}


@pytest.mark.parametrize("feature_dtype,label_dtype", [("float64", "int64"), ("float16", "uint8"), ("int16", "int32")])
def test_any_numeric_dtype_and_bytes_attributes(tmp_path, feature_dtype, label_dtype):
    rng = np.random.default_rng(1)
    trials = make_trials("s1", 3, rng)
    write_split(tmp_path / "s1" / "data_train.hdf5", trials, feature_dtype=feature_dtype,
                label_dtype=label_dtype, bytes_attrs=True)
    read = read_trials(tmp_path, ["s1"], "train", 512)
    assert [t.sentence for t in read] == [t["sentence"] for t in trials]
    assert [list(t.phoneme_ids) for t in read] == [t["phonemes"] for t in trials]
    x = FeatureStore(read, "hdf5")[1]
    assert x.dtype == np.float32 and x.shape == (len(trials[1]["features"]), 512)


def test_sentence_from_transcription_when_label_attribute_absent(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "s1" / "data_train.hdf5"
    write_split(path, make_trials("s1", 1, rng))
    with h5py.File(path, "a") as f:
        del f["trial_0000"].attrs["sentence_label"]
    assert read_trials(tmp_path, ["s1"], "train", 512)[0].sentence == "Sentence number 0."


def _trials(n_sessions=3, per=5):
    from harness.data import Trial

    return [Trial("train", f"s{d}", d, "p", f"trial_{i:04d}", 1, i, 10 + i, (1, 40), "x")
            for d in range(n_sessions) for i in range(per)]


def test_training_batches_follow_days_per_batch_and_are_deterministic():
    trials = _trials(n_sessions=5, per=4)
    sampler = TrainBatchSampler(trials, batch_size=12, days_per_batch=3, seed=1, num_steps=50)
    batches = list(sampler)
    assert len(batches) == 50 and all(len(b) == 12 for b in batches)
    for b in batches:
        days = [trials[i].day for i in b]
        assert len(set(days)) == 3 and all(days.count(d) == 4 for d in set(days))
    assert any(len(set(b)) < len(b) for b in batches)  # with replacement within a session
    again = list(TrainBatchSampler(trials, 12, 3, seed=1, num_steps=50))
    assert batches == again
    assert batches != list(TrainBatchSampler(trials, 12, 3, seed=2, num_steps=50))
    resumed = list(TrainBatchSampler(trials, 12, 3, seed=1, num_steps=50, start_step=30))
    assert resumed == batches[30:]  # resume continues the same sequence


def test_eval_batches_in_session_order_in_chunks():
    trials = _trials(n_sessions=2, per=5)
    assert eval_batches(trials, 3) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]


def test_collate_pads_and_tracks_lengths(small_dataset):
    trials = read_trials(small_dataset, ["t15.2023.08.13"], "train", 512)
    ds = TrialDataset(trials, FeatureStore(trials, "memory"))
    batch = collate([ds[0], ds[1]])
    assert batch.features.shape[0] == 2 and batch.lengths.tolist() == [t.n_time_steps for t in trials[:2]]
    short = int(batch.lengths.min())
    row = int(batch.lengths.argmin())
    assert batch.features[row, short:].abs().sum() == 0
    assert batch.phoneme_lengths.tolist() == [len(t.phoneme_ids) for t in trials[:2]]
    test = read_trials(small_dataset, ["t15.2023.08.13"], "test", 512)
    unlabeled = collate([(t, np.zeros((t.n_time_steps, 512), np.float32)) for t in test])
    assert unlabeled.phoneme_ids is None and unlabeled.sentences == [None, None]


def test_dataloader_workers_give_identical_batches(small_dataset):
    from torch.utils.data import DataLoader

    trials = read_trials(small_dataset, find_sessions(small_dataset), "train", 512)
    store = FeatureStore(trials, "hdf5")

    def run(workers):
        sampler = TrainBatchSampler(trials, 8, 2, seed=3, num_steps=4)
        loader = DataLoader(TrialDataset(trials, store), batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        return [b.features.clone() for b in loader]

    for a, b in zip(run(0), run(2)):
        assert a.equal(b)


# ----------------------------------------------------------------------------------------------
# Bad input: one plain line, exit status 2, no traceback, no DONE


def run_cli(capsys, data_dir, out, *extra):
    code = main.main(["run", "--config", str(TINY_CONFIG), "--set", f"data_params.data_dir={data_dir}",
                      "--set", "training_params.num_steps=2", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, out, *needles, only_line=True):
    """only_line=False: the error surfaced mid-training, after progress logs; it is still the last line."""
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and (len(lines) == 1 or not only_line), err
    lines = lines[-1:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (out / "DONE").exists()


def test_missing_folder(tmp_path, capsys):
    code, err = run_cli(capsys, tmp_path / "nowhere", tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", "data folder not found", "nowhere")


def test_no_session_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, tmp_path / "empty", tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", "no session found")


def test_file_that_is_not_hdf5(small_dataset, tmp_path, capsys):
    bad = small_dataset / "t15.2023.08.13" / "data_train.hdf5"
    bad.write_text("this is not hdf5")
    code, err = run_cli(capsys, small_dataset, tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", str(bad), "not a readable HDF5 file")


def test_trial_without_input_features(small_dataset, tmp_path, capsys):
    path = small_dataset / "t15.2023.08.13" / "data_train.hdf5"
    with h5py.File(path, "a") as f:
        del f["trial_0002"]["input_features"]
    code, err = run_cli(capsys, small_dataset, tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", "trial_0002", "no input_features")


def test_feature_width_mismatch(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_split(tmp_path / "d" / "s1" / "data_train.hdf5", make_trials("s1", 2, rng, n_features=256))
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run", "--set", "data_params.n_features=512")
    assert_one_line_error(code, err, tmp_path / "run", "(T, 512)", "256", "trial_0000")


def test_sessions_of_different_widths_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_split(tmp_path / "d" / "s1" / "data_train.hdf5", make_trials("s1", 2, rng, n_features=256))
    write_split(tmp_path / "d" / "s2" / "data_train.hdf5", make_trials("s2", 2, rng, n_features=128))
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", "different feature widths", "256 wide", "is 128")


def test_the_feature_width_defaults_to_the_datas_and_config_yaml_records_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for session in ("t15.2023.08.11", "t15.2023.08.13"):
        write_split(tmp_path / "d" / session / "data_train.hdf5", make_trials(session, 8, rng, n_features=24))
        write_split(tmp_path / "d" / session / "data_val.hdf5", make_trials(session, 2, rng, n_features=24, block=2))
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run", "--set", "evaluation.splits=[val]")
    assert code == 0, err
    config = load_config(tmp_path / "run" / "config.yaml")
    assert config.data_params.n_features == 24 and config.model_params.n_features == 24


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_names_the_trial(small_dataset, tmp_path, capsys, bad_value):
    path = small_dataset / "t15.2023.08.18" / "data_val.hdf5"
    with h5py.File(path, "a") as f:
        f["trial_0001"]["input_features"][5, 7] = bad_value
    code, err = run_cli(capsys, small_dataset, tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", "data_val.hdf5 trial_0001", "NaN or Inf", "time bin 5")


def test_nan_found_when_reading_on_demand_in_a_worker(small_dataset, tmp_path, capsys):
    path = small_dataset / "t15.2023.08.13" / "data_train.hdf5"
    with h5py.File(path, "a") as f:
        f["trial_0001"]["input_features"][0, 0] = np.nan
    code, err = run_cli(capsys, small_dataset, tmp_path / "run", "--set", "data_params.features=hdf5",
                        "--set", "data_params.num_workers=1", "--set", "training_params.num_steps=30")
    assert_one_line_error(code, err, tmp_path / "run", "trial_0001", "NaN or Inf", only_line=False)


def test_seq_len_longer_than_stored_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    trials = make_trials("s1", 2, rng)
    trials[1]["seq_len"] = 501
    write_split(tmp_path / "d" / "s1" / "data_train.hdf5", trials)
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run", "trial_0001", "seq_len 501", "500 stored")


def test_short_trials_are_skipped_with_a_count_or_refused(tmp_path, capsys, caplog):
    rng = np.random.default_rng(0)
    trials = make_trials("s1", 4, rng)
    trials[2]["features"] = trials[2]["features"][:1]  # shorter than the tiny model's stride of 2
    write_split(tmp_path / "d" / "s1" / "data_train.hdf5", trials)
    write_split(tmp_path / "d" / "s1" / "data_val.hdf5", make_trials("s1", 2, rng))
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run", "--set", "evaluation.splits=[val]")
    assert code == 0, err
    assert "skipped 1 train trials shorter than the model's minimum of 2" in (tmp_path / "run" / "run.log").read_text()
    code, err = run_cli(capsys, tmp_path / "d", tmp_path / "run2", "--set", "data_params.short_trials=error")
    assert_one_line_error(code, err, tmp_path / "run2", "trial_0002", "1 time steps", "minimum 2")


def test_bad_config_value_from_the_command_line(small_dataset, tmp_path, capsys):
    code, err = run_cli(capsys, small_dataset, tmp_path / "run", "--set", "training_params.num_step=3")
    assert_one_line_error(code, err, tmp_path / "run", "--set training_params.num_step", "did you mean 'num_steps'")

