"""The CTC baseline through the main loop: the tiny config learns, resume is exact with the
augmentations on, and a reference baseline checkpoint folder evaluates."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import harness.train
from harness import runner
from tests.conftest import REPO_ROOT, SHARED, make_trials, write_split

TINY = REPO_ROOT / "configs" / "ctc_baseline" / "tiny.yml"
FIXTURE = SHARED / "fixtures" / "b2txt25_tiny"


def val_per(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["val"]["per"]


def test_tiny_config_learns_far_below_an_untrained_model(synthetic_dataset, ctc_tiny_run, tmp_path):
    data = [f"data_params.data_dir={synthetic_dataset}"]
    untrained = runner.run(str(TINY), data + ["training_params.num_steps=0"], str(tmp_path / "untrained"), False, False)
    trained = ctc_tiny_run[0]  # the same config and data, trained once for the session
    # Measured on this data: untrained 0.94, after the 150 tiny steps 0.42.
    assert val_per(untrained) > 0.85
    assert val_per(trained) < 0.6
    rows = list(csv.DictReader(open(trained / "per_trial.csv")))
    assert rows[0]["predicted_phonemes"] and rows[0]["reference_phonemes"].endswith("SIL")


def test_resume_with_augmentations_gives_the_same_final_weights(synthetic_dataset, tmp_path, monkeypatch):
    overrides = [f"data_params.data_dir={synthetic_dataset}", "training_params.num_steps=12",
                 "training_params.checkpoint_every=4", "training_params.val_every=6",
                 "evaluation.bootstrap_resamples=100"]
    straight = runner.run(str(TINY), overrides, str(tmp_path / "straight"), False, False)
    real_save = harness.train.save_checkpoint

    def crash_after_step_8(path, payload):
        real_save(path, payload)
        if path.name == "last.pt" and payload["train_state"]["step"] == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(harness.train, "save_checkpoint", crash_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        runner.run(str(TINY), overrides, str(tmp_path / "resumed"), False, False)
    monkeypatch.setattr(harness.train, "save_checkpoint", real_save)
    resumed = runner.run(None, [], str(tmp_path / "resumed"), True, False)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "per_trial.csv").read_text() == (resumed / "per_trial.csv").read_text()


@pytest.fixture
def fixture_sessions_data(tmp_path):
    """Data holding the two sessions the reference fixture checkpoint knows."""
    if not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures/b2txt25_tiny not found: needs the shared reference fixture")
    rng = np.random.default_rng(5)
    root = tmp_path / "hdf5_data_final"
    for session in ["t15.2023.08.11", "t15.2023.08.13"]:
        write_split(root / session / "data_val.hdf5", make_trials(session, 3, rng, t_range=(40, 80)))
        write_split(root / session / "data_test.hdf5", make_trials(session, 2, rng, t_range=(40, 80)), labels=False)
    return root


def test_reference_checkpoint_folder_evaluates_like_the_reference_model(fixture_sessions_data, tmp_path):
    from ctc_baseline.model import CTCBaseline, CTCBaselineParams
    from ctc_baseline.reference import load_reference_checkpoint
    from harness.batching import collate
    from harness.data import FeatureStore, read_trials
    from harness.preprocessors import GaussianSmoothingParams, gaussian_smoothing
    from word_decoding import greedy_phonemes

    out, kaggle = tmp_path / "eval", tmp_path / "submission.csv"
    runner.evaluate(str(FIXTURE), str(fixture_sessions_data), "test", str(out), str(kaggle))
    rows = list(csv.DictReader(open(out / "per_trial.csv")))
    assert [r["session"] for r in rows] == ["t15.2023.08.11"] * 2 + ["t15.2023.08.13"] * 2

    # The same trials through the model built by hand from the fixture: identical phonemes.
    config, state, info = load_reference_checkpoint(FIXTURE)
    model = CTCBaseline(CTCBaselineParams(**{**config["model_params"], "pack_sequences": False}))
    model.load_state_dict(state)
    model.eval()
    trials = read_trials(fixture_sessions_data, ["t15.2023.08.11", "t15.2023.08.13"], "test", 512)
    batch = collate([(t, x) for t, x in zip(trials, FeatureStore(trials, "memory"))])
    batch = gaussian_smoothing(GaussianSmoothingParams())(batch, False)
    with torch.no_grad():
        logits, lengths = model(batch.features, batch.lengths, batch.day_indices)
    assert [r["predicted_phonemes"] for r in rows] == greedy_phonemes(logits, lengths)
    assert kaggle.read_text().splitlines()[0] == "id,text" and len(kaggle.read_text().splitlines()) == 5

    val_out = tmp_path / "eval_val"
    runner.evaluate(str(FIXTURE), str(fixture_sessions_data), "val", str(val_out), None)
    metrics = json.loads((val_out / "metrics.json").read_text())
    assert metrics["val"]["n_trials"] == 6 and 0 <= metrics["val"]["per"]


def test_reference_checkpoint_refuses_an_unknown_session(fixture_sessions_data, tmp_path, capsys):
    import main

    shutil.copytree(fixture_sessions_data / "t15.2023.08.13", fixture_sessions_data / "t15.2023.08.18")
    code = main.main(["evaluate", "--checkpoint", str(FIXTURE), "--data-dir", str(fixture_sessions_data),
                      "--split", "val", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "t15.2023.08.18" in err and "not trained on" in err
