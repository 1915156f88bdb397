"""Issue 19: every check before the run folder exists, one writer per run folder, --overwrite that deletes
only run folders, nothing written outside its folder, and one line (exit 2) for every user mistake.

Each test reproduces a case that used to go wrong: a folder left behind by a value error, a traceback, a
second writer, a deleted data folder or a file written outside results_dir."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import main
from harness import results, runner
from harness.batching import TrainBatchSampler
from harness.data import Trial
from harness.plugins import load_plugins
from tests.conftest import REPO_ROOT, TINY_CONFIG

load_plugins()


def run_args(data_dir, out=None, *sets, config=TINY_CONFIG):
    args = ["run", "--config", str(config), "--set", f"data_params.data_dir={data_dir}"]
    for s in sets:
        args += ["--set", s]
    return args + (["--out", str(out)] if out is not None else [])


def refused(capsys, args) -> str:
    """main.main(args) ends with exit 2 and one line, its last on stderr (returned); no traceback."""
    assert main.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any(line.startswith(("error", "Traceback")) for line in err[:-1]), err
    return err[-1]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------------------------------------
# 1. Values, data and paths: checked before any folder is made


@pytest.mark.parametrize("setting, problem", [
    ("data_params.batch_size=0", "at least 1"),
    ("data_params.days_per_batch=-1", "at least 1"),
    ("data_params.eval_batch_size=0", "at least 1"),
    ("data_params.num_workers=-2", "at least 0"),
    ("training_params.num_steps=-5", "at least 0"),
    ("training_params.lr_max=.nan", "finite number"),
    ("training_params.lr_min=-0.1", "finite number"),
    ("training_params.grad_norm_clip=.inf", "finite number above 0"),
    ("training_params.betas=[0.9, 1.0]", "below 1"),
    ("training_params.eps=0", "above 0"),
    ("training_params.log_every=0", "at least 1"),
    ("training_params.val_every=-1", "at least 0"),
    ("training_params.checkpoint_every=-1", "at least 0"),
    ("training_params.early_stop_patience=-1", "at least 0"),
    ("training_params.grad_accum_steps=0", "at least 1"),
    ("training_params.param_groups.day.lr_max=-1", "finite number"),
    ("evaluation.bootstrap_resamples=-1", "at least 0"),
    ("trial_name=../../escaped", "not a plain name"),
    ("trial_name=/tmp/escaped", "not a plain name"),
    ("trial_name=a/b", "not a plain name"),
    ("trial_name=..", "not a plain name"),
])
def test_a_bad_value_is_one_line_and_makes_nothing(small_dataset, tmp_path, capsys, setting, problem):
    results_dir = tmp_path / "results"
    line = refused(capsys, run_args(small_dataset, None, setting, f"output.results_dir={results_dir}"))
    key = setting.split("=")[0]
    assert line.startswith(f"error: --set {key}: ") and problem in line
    assert not results_dir.exists() and not (tmp_path / "escaped").exists()
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", setting))
    assert not (tmp_path / "out").exists()


def test_a_list_index_in_set_names_set(small_dataset, tmp_path, capsys):
    config = tmp_path / "c.yml"
    config.write_text(TINY_CONFIG.read_text().replace("  num_steps: 20\n", "  num_steps: 20\n  betas: [0.9, 0.999]\n"))
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", "training_params.betas.0=1.5", config=config))
    assert line == "error: --set training_params.betas: is [1.5, 0.999]: it must be two numbers, each at least 0 and below 1"
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", "data_params.preprocessors[0].params.factr=2"))
    assert line.startswith("error: --set data_params.preprocessors[0].params.factr: unknown key; did you mean 'factor'")
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", "data_params.preprocessors[3].name=x"))
    assert "data_params.preprocessors has 1 elements, no [3]" in line
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", "training_params.betas.0=0.5"))  # not in the file
    assert line.startswith("error: --set training_params.betas.0: training_params.betas is not in the config given")
    assert not (tmp_path / "out").exists()


def test_set_with_a_list_index_sets_the_element(small_dataset, tmp_path):
    from config import load_config

    config = load_config(TINY_CONFIG, ["data_params.preprocessors[0].params.factor=2.5",
                                       "evaluation.splits.1=train"])
    assert config.data_params.preprocessors[0].params.factor == 2.5
    assert config.evaluation.splits == ["val", "train"]


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    line = refused(capsys, ["run", "--config", config, "--out", tmp_path / "out"])
    assert "not a text file in UTF-8" in line and not (tmp_path / "out").exists()


def test_days_per_batch_above_the_sessions_keeps_the_batch_size(caplog):
    trials = [Trial("train", f"s{d}", d, "p", f"trial_{i}", 1, i, 10, (1,), "x") for d in range(3) for i in range(5)]
    sampler = TrainBatchSampler(trials, batch_size=16, days_per_batch=4, seed=0, num_steps=5)
    assert [len(b) for b in sampler] == [16] * 5  # 6 + 5 + 5 (was 5 x 3 = 15: a silently smaller batch)
    assert all(len({trials[i].day for i in b}) == 3 for b in sampler)
    same = TrainBatchSampler(trials, batch_size=15, days_per_batch=3, seed=0, num_steps=5)
    assert [len(b) for b in same] == [15] * 5  # a divisor: as before, 5 per day


def test_days_per_batch_above_the_sessions_warns_once(small_dataset, tmp_path):
    out = tmp_path / "run"
    runner.run(str(TINY_CONFIG), [f"data_params.data_dir={small_dataset}", "data_params.days_per_batch=9",
                                  "training_params.num_steps=2", "evaluation.splits=[val]"], str(out), False, False)
    log = (out / "run.log").read_text()
    assert log.count("days_per_batch is 9 but 3 sessions have training trials") == 1 and "still 16 trials" in log


def test_a_model_minimum_no_trial_reaches_is_refused(small_dataset, tmp_path, capsys):
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", "model_params.stride=1000"))
    assert "every train trial" in line and "shorter than the model's minimum of 1000 time steps" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(Path("/proc/sys/vm/overcommit_memory").exists()
                    and Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="memory overcommit is on: a too-large model would be allocated, not refused")
def test_a_model_too_large_for_memory_is_one_line(small_dataset, tmp_path, capsys):
    line = refused(capsys, run_args(small_dataset, tmp_path / "out", "model_params.hidden=1000000000"))
    assert "does not fit in memory on cpu" in line and not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_cannot_be_written(small_dataset, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    assert "is a file, not a folder" in refused(capsys, run_args(small_dataset, a_file))
    assert "is a file, not a folder" in refused(capsys, run_args(small_dataset, a_file / "run"))
    assert "cannot write in /proc" in refused(capsys, run_args(small_dataset, "/proc/b2t-run"))
    assert a_file.read_text() == "mine"
    line = refused(capsys, run_args(small_dataset, None, "output.results_dir=/proc/b2t"))
    assert line.startswith("error: output.results_dir /proc/b2t: cannot write in /proc")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders: nothing to refuse")
def test_out_in_a_read_only_folder(small_dataset, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "cannot write in" in refused(capsys, run_args(small_dataset, locked / "run"))
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------------------------
# 2. Never lose data: --overwrite, one writer per folder


@pytest.fixture
def quick_run(small_dataset, tmp_path):
    """A finished run folder (two steps, val only)."""
    out = tmp_path / "run"
    runner.run(str(TINY_CONFIG), [f"data_params.data_dir={small_dataset}", "training_params.num_steps=2",
                                  "evaluation.splits=[val]"], str(out), False, False)
    return out


def test_overwrite_refuses_a_folder_that_is_not_a_run(small_dataset, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("years of work")
    line = refused(capsys, run_args(small_dataset, home) + ["--overwrite"])
    assert "is not a b2t-bench run folder (it holds thesis)" in line
    assert (home / "thesis" / "chapter1.tex").read_text() == "years of work"
    line = refused(capsys, run_args(small_dataset, home) + ["--resume"])
    assert "is not a b2t-bench run folder" in line


def test_overwrite_refuses_a_run_folder_with_other_files_in_it(quick_run, small_dataset, capsys):
    (quick_run / "notes.txt").write_text("mine")
    line = refused(capsys, run_args(small_dataset, quick_run) + ["--overwrite"])
    assert "it holds notes.txt" in line and (quick_run / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_the_data_or_the_config(small_dataset, tmp_path, capsys):
    # a run folder that holds the data: its contract files only, the data folder under checkpoints/
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("trial_name: x\n")
    data = out / "checkpoints" / "data"
    shutil.copytree(small_dataset, data)
    line = refused(capsys, run_args(data, out) + ["--overwrite"])
    assert "holds data_params.data_dir" in line and tree(data) == tree(small_dataset)
    linked = tmp_path / "linked"  # the data reached through a link to the run folder
    linked.symlink_to(out)
    line = refused(capsys, run_args(linked / "checkpoints" / "data", out) + ["--overwrite"])
    assert "holds data_params.data_dir" in line and tree(data) == tree(small_dataset)
    config = out / "checkpoints" / "my.yml"
    config.write_text(TINY_CONFIG.read_text())
    line = refused(capsys, run_args(small_dataset, out, config=config) + ["--overwrite"])
    assert "holds the config file" in line and config.is_file()


def test_overwrite_deletes_only_after_every_check_passed(quick_run, small_dataset, capsys):
    before = tree(quick_run)
    refused(capsys, run_args(small_dataset, quick_run, "model_params.stride=1000") + ["--overwrite"])
    assert tree(quick_run) == before and (quick_run / "DONE").is_file()
    assert main.main(run_args(small_dataset, quick_run, "training_params.num_steps=1", "evaluation.splits=[val]")
                     + ["--overwrite"]) == 0
    assert "num_steps: 1" in (quick_run / "config.yaml").read_text()


CLAIM = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from harness import results
    from harness.errors import UserError
    try:
        folder = results.prepare_out_dir(sys.argv[1], False, False)
    except UserError as error:
        print("refused:", error)
        sys.exit(2)
    results.atomic_write_text(folder.path / "config.yaml", "trial_name: x\\n")
    (folder.path / "run.log").write_text(sys.argv[2])
    time.sleep(float(sys.argv[3]))
    folder.release()
""")


def test_two_writers_started_together_one_is_refused(tmp_path):
    script = tmp_path / "claim.py"
    script.write_text(CLAIM.format(repo=str(REPO_ROOT)))
    for attempt in range(15):
        out = tmp_path / f"run{attempt}"
        procs = [subprocess.Popen([sys.executable, str(script), str(out), str(i), "0.3"], stdout=subprocess.PIPE,
                                  text=True) for i in range(2)]
        codes = [p.wait(timeout=60) for p in procs]
        outputs = [p.stdout.read() for p in procs]
        assert sorted(codes) == [0, 2], (codes, outputs)
        loser = outputs[codes.index(2)]
        assert "in use by another b2t-bench process" in loser or "already holds" in loser
        assert (out / "run.log").read_text() == str(codes.index(0))


def test_the_lock_goes_with_a_killed_process(tmp_path):
    script = tmp_path / "claim.py"
    script.write_text(CLAIM.format(repo=str(REPO_ROOT)))
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, str(script), str(out), "0", "600"])
    try:
        deadline = time.monotonic() + 60
        while not (out / "run.log").exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        with pytest.raises(results.UserError, match=rf"in use by another b2t-bench process \(pid {holder.pid}\)"):
            results.prepare_out_dir(out, True, False)
    finally:
        holder.send_signal(signal.SIGKILL)  # the test's own child, by its pid
        holder.wait(timeout=60)
    with results.prepare_out_dir(out, True, False) as path:  # kill -9 left nothing stuck
        assert path == out


def test_resume_while_the_run_goes_on_is_refused(small_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    with results.prepare_out_dir(out, False, False):  # as a running run holds it
        line = refused(capsys, run_args(small_dataset, out) + ["--resume"])
        assert "in use by another b2t-bench process" in line
        assert not (out / "run.log").exists()


# ----------------------------------------------------------------------------------------------
# 3. evaluate: the checkpoint is data


def test_evaluate_checks_weights_and_kaggle_path_before_its_folder(quick_run, small_dataset, tmp_path, capsys):
    payload = torch.load(quick_run / "checkpoints" / "best.pt", weights_only=True)
    name = next(iter(payload["model"]))
    payload["model"][name] = torch.zeros(3, 3)
    crafted = tmp_path / "crafted.pt"
    torch.save(payload, crafted)
    line = refused(capsys, ["evaluate", "--checkpoint", crafted, "--data-dir", small_dataset, "--split", "val",
                            "--out", tmp_path / "ev"])
    assert "its weights do not fit the TinyCTC its config builds" in line and not (tmp_path / "ev").exists()
    line = refused(capsys, ["evaluate", "--checkpoint", quick_run, "--data-dir", small_dataset, "--split", "val",
                            "--out", tmp_path / "ev", "--kaggle-csv", "/proc/kaggle/x.csv"])
    assert line.startswith("error: --kaggle-csv /proc/kaggle: cannot write in /proc") and not (tmp_path / "ev").exists()


def test_evaluate_never_lets_the_checkpoint_choose_where_results_go(quick_run, small_dataset, tmp_path, monkeypatch,
                                                                     capsys):
    payload = torch.load(quick_run / "checkpoints" / "best.pt", weights_only=True)
    payload["config"]["output"]["results_dir"] = str(tmp_path / "elsewhere")
    crafted = tmp_path / "crafted.pt"
    torch.save(payload, crafted)
    monkeypatch.chdir(tmp_path)
    assert main.main(["evaluate", "--checkpoint", str(crafted), "--data-dir", str(small_dataset), "--split", "val",
                      "--no-preflight"]) == 0
    assert not (tmp_path / "elsewhere").exists() and len(list((tmp_path / "results").iterdir())) == 1
    payload["config"]["trial_name"] = "../../escaped"
    torch.save(payload, crafted)
    line = refused(capsys, ["evaluate", "--checkpoint", crafted, "--data-dir", small_dataset, "--split", "val"])
    assert "(its config): trial_name: '../../escaped' is not a plain name" in line
    assert len(list((tmp_path / "results").iterdir())) == 1 and not (tmp_path.parent / "escaped-eval-val").exists()


def test_evaluate_overwrite_never_deletes_the_checkpoint(quick_run, small_dataset, capsys):
    line = refused(capsys, ["evaluate", "--checkpoint", quick_run, "--data-dir", small_dataset, "--split", "val",
                            "--out", quick_run, "--overwrite"])
    assert "holds the checkpoint" in line and (quick_run / "checkpoints" / "best.pt").is_file()


# ----------------------------------------------------------------------------------------------
# 4. Noisy cases: one line


def test_resume_from_a_truncated_or_crafted_checkpoint_is_one_line(quick_run, small_dataset, tmp_path, capsys):
    (quick_run / "DONE").unlink()  # an unfinished run, as after a kill
    last = quick_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    line = refused(capsys, ["run", "--resume", "--out", quick_run])
    assert f"{last}: cannot resume from it" in line
    assert f"ERROR b2t: {last}: cannot resume from it" in (quick_run / "run.log").read_text()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    last.write_bytes(pickle.dumps({"model": Evil()}))
    line = refused(capsys, ["run", "--resume", "--out", quick_run])
    assert "cannot resume from it (UnpicklingError" in line and not (tmp_path / "pwned").exists()


def test_a_full_disk_is_one_line_and_the_run_resumes(small_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    sets = ["training_params.num_steps=4", "training_params.checkpoint_every=2", "evaluation.splits=[val]"]
    real_fdopen = os.fdopen
    writes = {"n": 0}

    def full_after_first_checkpoint(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "checkpoints" in os.readlink(f"/proc/self/fd/{fd}"):
            writes["n"] += 1
            if writes["n"] > 1:  # the second checkpoint write finds the disk full
                f.close()
                return open("/dev/full", "wb")
        return f

    monkeypatch.setattr(results.os, "fdopen", full_after_first_checkpoint)
    line = refused(capsys, run_args(small_dataset, out, *sets))
    assert line.startswith("error: no space left on device writing ") and "checkpoints" in line
    assert line.endswith("(free some space, then --resume)")
    assert not results.partial_writes(out / "checkpoints") and not (out / "DONE").exists()
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 2
    assert "OSError" in (out / "run.log").read_text()
    monkeypatch.setattr(results.os, "fdopen", real_fdopen)
    assert main.main(["run", "--resume", "--out", str(out)]) == 0 and (out / "DONE").is_file()


def test_two_runs_started_together_on_one_out(small_dataset, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(REPO_ROOT / "main.py"), *map(str, run_args(small_dataset, out, "training_params.num_steps=2",
                                                                          "evaluation.splits=[val]"))]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read().strip().splitlines() for p in procs]
    assert sorted(codes) == [0, 2], errors
    line = errors[codes.index(2)][-1]
    assert "in use by another b2t-bench process" in line or "already holds an unfinished run" in line \
        or "already holds a finished run" in line
    assert (out / "DONE").is_file() and results.is_run_folder(out)


def test_a_run_from_before_a_new_config_key_resumes(quick_run):
    # a key added to the schema after the run began (here: as if val_decode_words were new) is no change
    (quick_run / "DONE").unlink()
    saved = quick_run / "config.yaml"
    assert "  val_decode_words: false\n" in saved.read_text()
    saved.write_text(saved.read_text().replace("  val_decode_words: false\n", ""))
    assert main.main(["run", "--resume", "--out", str(quick_run)]) == 0 and (quick_run / "DONE").is_file()
    saved.write_text(saved.read_text().replace("  num_steps: 2\n", "  num_steps: 3\n"))
    (quick_run / "DONE").unlink()
    assert main.main(["run", "--resume", "--out", str(quick_run), "--config", str(TINY_CONFIG)]) == 2


def test_overwrite_looks_inside_the_run_folders_own_folders(quick_run, small_dataset, capsys):
    (quick_run / "checkpoints" / "mine.txt").write_text("precious")
    line = refused(capsys, run_args(small_dataset, quick_run) + ["--overwrite"])
    assert "it holds checkpoints/mine.txt" in line and (quick_run / "checkpoints" / "mine.txt").is_file()
    (quick_run / "checkpoints" / "mine.txt").unlink()
    (quick_run / "tensorboard" / "notes").mkdir()
    assert "it holds tensorboard/notes" in refused(capsys, run_args(small_dataset, quick_run) + ["--overwrite"])


def test_resume_without_config_on_a_folder_that_is_not_a_run(small_dataset, tmp_path, capsys):
    assert "holds no run to continue (no config.yaml)" in refused(capsys, ["run", "--resume", "--out", tmp_path / "new"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("mine")
    assert "is not a b2t-bench run folder (it holds README.md)" in refused(capsys, ["run", "--resume", "--out", mine])
    assert refused(capsys, ["run", "--config", tmp_path]).endswith("is a folder: give a YAML file, e.g. "
                                                                    "configs/ctc_baseline/tiny.yml")


def test_a_folder_being_written_is_in_use_for_every_other_command(small_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    with results.prepare_out_dir(out, False, False) as path:  # as a run that has begun writing
        results.atomic_write_text(path / "config.yaml", TINY_CONFIG.read_text())
        for extra in ([], ["--overwrite"], ["--resume"]):
            line = refused(capsys, run_args(small_dataset, out) + extra)
            assert f"is in use by another b2t-bench process (pid {os.getpid()})" in line, extra


def test_another_processs_write_probe_is_not_the_users_file(tmp_path):
    """check_writable makes and removes a folder in --out; a second run starting on the same --out at
    that instant sees it. It is neither the user's file nor a reason to refuse the folder."""
    out = tmp_path / "run"
    out.mkdir()
    probe = out / (results.WRITE_PROBE + "abc123")
    probe.mkdir()
    results.check_out_dir(out, False, False)  # only a probe: as good as empty
    with results.prepare_out_dir(out, False, False) as path:
        results.atomic_write_text(path / "config.yaml", "trial_name: x\n")
        assert results.foreign_entries(path) == [] and results.is_run_folder(path)
