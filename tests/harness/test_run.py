"""`run`, `evaluate` and `compare` end to end on a small dataset in the real format."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import harness.train
import main
from config import load_config
from harness import runner
from harness.plugins import load_plugins
from harness.results import BASE_COLUMNS
from tests.conftest import REPO_ROOT, TINY_CONFIG, write_small_dataset

load_plugins()  # the in-process checks read configs that name the test plugin's model


def cli(*args, timeout=300):
    env = dict(os.environ, B2T_PLUGINS="tests.tiny_plugin", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dataset(tmp_path_factory):
    """small_dataset, shared by the tests of finished_run (which only read it)."""
    return write_small_dataset(tmp_path_factory.mktemp("run_dataset") / "hdf5_data_final")


@pytest.fixture(scope="module")
def finished_run(run_dataset, tmp_path_factory):
    """One finished run for the tests that read it (made once: the tests must not change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli("run", "--config", TINY_CONFIG, "--set", f"data_params.data_dir={run_dataset}", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_run_writes_a_complete_run_folder(finished_run):
    out = finished_run
    for name in ["config.yaml", "per_trial.csv", "metrics.json", "meta.json", "DONE", "run.log",
                 "checkpoints/best.pt", "checkpoints/last.pt"]:
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # DONE is the last result file written (run.log goes on logging "finished" after it)
    results_files = [p for p in out.iterdir() if p.is_file() and p.name != "run.log"]
    assert (out / "DONE").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in results_files)

    rows = read_csv(out / "per_trial.csv")
    assert list(rows[0])[: len(BASE_COLUMNS)] == BASE_COLUMNS and "n_frames" in rows[0]  # model column kept
    val = [r for r in rows if r["split"] == "val"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(val) == 6 and len(test) == 4
    assert all(r["reference_phonemes"].endswith("SIL") and r["phoneme_count"] for r in val)
    assert all(r["reference_text"] == "" and r["phoneme_edits"] == "" for r in test)  # unlabeled: predictions only
    assert [(r["session"], r["trial_num"]) for r in val][:2] == [("t15.2023.08.13", "0"), ("t15.2023.08.13", "1")]

    metrics = json.loads((out / "metrics.json").read_text())
    edits = sum(int(r["phoneme_edits"]) for r in val)
    count = sum(int(r["phoneme_count"]) for r in val)
    assert metrics["val"]["per"] == pytest.approx(edits / count)  # summed ratio, not a mean of rates
    assert metrics["val"]["n_trials"] == 6 and len(metrics["val"]["per_ci"]) == 2
    assert set(metrics["val"]["by_session"]) == {"t15.2023.08.13", "t15.2023.08.18"}
    assert metrics["val"]["wer"] is None  # the tiny model writes no text
    assert metrics["test"]["per"] is None and metrics["test"]["n_trials"] == 4
    assert metrics["run"]["steps"] == 20 and metrics["run"]["best_step"] in (10, 20)

    meta = json.loads((out / "meta.json").read_text())
    assert meta["packages"]["torch"].startswith("2.13.0") and meta["device"] == "cpu" and meta["wall_seconds"] > 0
    assert meta["data_fingerprint"]["n_trials"] == {"train": 18, "val": 6, "test": 4}
    assert meta["data_fingerprint"]["content_hash"]

    resolved = load_config(out / "config.yaml")
    assert resolved.data_params.sessions == ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]
    assert resolved.model_params.n_days == 3 and resolved.model_params.n_features == 512  # filled by the harness
    assert resolved.model_params.n_train_trials == 18  # set by the plugin's own config setter
    assert meta["plugins"] and all(p["file"] for p in meta["plugins"])
    assert "tests.tiny_plugin" in [p["module"] for p in meta["plugins"]]


def test_resolved_config_reproduces_the_run(finished_run, tmp_path):
    again = tmp_path / "again"
    result = cli("run", "--config", finished_run / "config.yaml", "--out", again)
    assert result.returncode == 0, result.stderr
    assert (again / "per_trial.csv").read_text() == (finished_run / "per_trial.csv").read_text()


def test_out_folder_is_protected(finished_run):
    result = cli("run", "--config", TINY_CONFIG, "--out", finished_run)
    assert result.returncode == 2 and "already holds a finished run" in result.stderr
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    result = cli("run", "--config", finished_run / "config.yaml", "--out", finished_run, "--resume")
    assert result.returncode == 0 and "already finished" in result.stderr


def test_without_out_each_run_gets_a_new_folder_named_after_the_trial(small_dataset, tmp_path, capsys):
    args = ["run", "--config", str(TINY_CONFIG), "--set", f"data_params.data_dir={small_dataset}",
            "--set", f"output.results_dir={tmp_path / 'results'}", "--set", "training_params.num_steps=1",
            "--set", "evaluation.splits=[val]"]
    assert main.main(args) == 0 and main.main(args) == 0
    runs = sorted((tmp_path / "results").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("tiny_test_") and (r / "DONE").is_file() for r in runs)


def test_resume_after_interruption_matches_an_uninterrupted_run(small_dataset, tmp_path, monkeypatch):
    overrides = [f"data_params.data_dir={small_dataset}", "training_params.checkpoint_every=5",
                 "training_params.val_every=10", "evaluation.splits=[val]"]
    straight = runner.run(str(TINY_CONFIG), overrides, str(tmp_path / "straight"), False, False)

    real_save = harness.train.save_checkpoint

    def crash_after_step_5(path, payload):
        real_save(path, payload)
        if path.name == "last.pt" and payload["train_state"]["step"] == 5:
            raise KeyboardInterrupt  # as if killed right after the checkpoint

    monkeypatch.setattr(harness.train, "save_checkpoint", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        runner.run(str(TINY_CONFIG), overrides, str(tmp_path / "resumed"), False, False)
    assert not (tmp_path / "resumed" / "DONE").exists()
    monkeypatch.setattr(harness.train, "save_checkpoint", real_save)
    runner.run(None, [], str(tmp_path / "resumed"), True, False)

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["train_state"]["step"] == b["train_state"]["step"] == 20
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (straight / "per_trial.csv").read_text() == (tmp_path / "resumed" / "per_trial.csv").read_text()


def test_evaluate_a_saved_run_and_write_kaggle_csv(finished_run, run_dataset, tmp_path):
    out, kaggle = tmp_path / "eval", tmp_path / "submission.csv"
    result = cli("evaluate", "--checkpoint", finished_run, "--data-dir", run_dataset, "--split", "val",
                 "--out", out, "--kaggle-csv", kaggle)
    assert result.returncode == 0, result.stderr
    assert (out / "DONE").is_file()
    evaluated = [r for r in read_csv(out / "per_trial.csv")]
    trained = [r for r in read_csv(finished_run / "per_trial.csv") if r["split"] == "val"]
    assert [r["predicted_phonemes"] for r in evaluated] == [r["predicted_phonemes"] for r in trained]
    lines = kaggle.read_text().splitlines()
    assert lines[0] == "id,text" and [line.split(",")[0] for line in lines[1:]] == [str(i) for i in range(6)]


def test_evaluate_refuses_sessions_the_checkpoint_does_not_know(finished_run, small_dataset, tmp_path):
    # small_dataset: the same files as the run's, in a folder of this test's own, changed here
    (small_dataset / "t15.2030.01.01").mkdir()
    (small_dataset / "t15.2023.08.13" / "data_val.hdf5").rename(small_dataset / "t15.2030.01.01" / "data_val.hdf5")
    result = cli("evaluate", "--checkpoint", finished_run, "--data-dir", small_dataset, "--split", "val")
    assert result.returncode == 2 and "t15.2030.01.01" in result.stderr and "not trained on" in result.stderr


def test_compare_two_runs_and_list_unfinished(finished_run, tmp_path):
    second = tmp_path / "second"
    assert cli("run", "--config", finished_run / "config.yaml", "--out", second,
               "--set", "training_params.num_steps=3").returncode == 0
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("x: 1\n")
    result = cli("compare", finished_run, second, unfinished, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    assert f"unfinished (no DONE), left out: {unfinished}" in result.stdout
    table = read_csv(tmp_path / "cmp" / "comparison.csv")
    # test: unlabeled, no scores; two runs of one trial name are told apart by what differs in their configs
    assert {(r["run"], r["runs"], r["split"]) for r in table} == {("run (num_steps=20)", "run", "val"),
                                                                  ("second (num_steps=3)", "second", "val")}
    report = " ".join((tmp_path / "cmp" / "comparison.md").read_text().split())
    assert "| decoder | model (trial) | split |" in report and "| second (num_steps=3) |" in report


def test_every_command_has_help():
    for command in ["run", "evaluate", "compare", "synth", "list"]:
        result = cli(command, "--help")
        assert result.returncode == 0 and "usage: main.py" in result.stdout, command


def test_evaluate_names_the_plugin_a_checkpoint_needs(finished_run, run_dataset, tmp_path):
    env = dict(os.environ, B2T_PLUGINS="", PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "evaluate", "--checkpoint", str(finished_run),
                             "--data-dir", str(run_dataset), "--split", "val", "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "model 'tiny_ctc' is registered by no loaded plugin" in result.stderr
    assert "set B2T_PLUGINS=tests.tiny_plugin" in result.stderr and "tests/tiny_plugin/__init__.py" in result.stderr
    assert not out.exists()


def test_an_error_after_the_folder_exists_lands_in_run_log(small_dataset, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner, "train", fail)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        runner.run(str(TINY_CONFIG), [f"data_params.data_dir={small_dataset}"], str(out), False, False)
    log = (out / "run.log").read_text()
    assert "the run stopped: RuntimeError: disk on fire (resume it with --resume --out RUN_DIR)" in log
    assert "Traceback (most recent call last)" in log and "in fail" in log
    assert "pre-flight check of the model" in log  # what was logged before the folder existed comes first
    assert log.index("pre-flight check") < log.index("run folder:")


@pytest.mark.slow
def test_kill_ends_a_run_as_ctrl_c_does_and_run_log_says_so(run_dataset, tmp_path):
    """`kill PID` (SIGTERM): the run stops through its finally blocks (lock released, exit 130) and
    run.log's last line says it stopped and how to go on, where Python alone would exit silently."""
    import signal
    import time

    out = tmp_path / "killed"
    env = dict(os.environ, B2T_PLUGINS="tests.tiny_plugin", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), "run", "--config", str(TINY_CONFIG),
                                "--set", f"data_params.data_dir={run_dataset}", "--set", "training_params.num_steps=100000",
                                "--out", str(out)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "run.log").is_file() and "step " in (out / "run.log").read_text()):
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130
        assert process.stderr.read().strip().endswith("interrupted")
        last = (out / "run.log").read_text().splitlines()[-1]
        assert "the run was interrupted (signal 15): resume it with --resume" in last
        from harness.results import lock_holder
        assert lock_holder(out) is None  # the folder's lock is free
    finally:
        process.kill()
