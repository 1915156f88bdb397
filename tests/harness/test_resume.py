"""Exact resume after a real kill -9: `run --out DIR --resume` continues from the last checkpoint and
ends with the predictions and weights of an uninterrupted run; a kill in the middle of writing a
checkpoint leaves the previous one usable.

The model is the CTC baseline's tiny config with its augmentations and dropout on, so the random
draws after the checkpoint must come back too (every rank's RNG state is in it), on one CPU thread
(deterministic kernels). Waiting is polling of files with a deadline, never a sleep that assumes a speed.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT

STEPS, EVERY = 20, 4  # checkpoints at steps 4, 8, 12, 16, 20


def overrides(data_dir) -> list[str]:
    sets = [f"data_params.data_dir={data_dir}", "data_params.batch_size=8", f"training_params.num_steps={STEPS}",
            f"training_params.checkpoint_every={EVERY}", "training_params.val_every=10", "training_params.log_every=1",
            "model_params.word_decoder={name: greedy}", "evaluation.splits=[val]",
            "evaluation.bootstrap_resamples=100"]
    return [arg for s in sets for arg in ("--set", s)]


def env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def start(args: list, log_file, python_args=()) -> subprocess.Popen:
    """main.py in a child process, its output to a file (a full pipe would block it)."""
    return subprocess.Popen([sys.executable, *python_args, *map(str, args)], cwd=REPO_ROOT, env=env(),
                            stdout=log_file, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, output, timeout=300) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
        output.seek(0)


def main_py(*args):
    return [REPO_ROOT / "main.py", *args]


def wait_for(condition, process, what: str, deadline_s=240.0, poll_s=0.01):
    deadline = time.monotonic() + deadline_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll_s)


def logged_steps(run_dir) -> list[int]:
    log = run_dir / "run.log"
    return [int(n) for n in re.findall(r" step (\d+) loss", log.read_text())] if log.is_file() else []


def saved_step(path) -> int:
    return torch.load(path, weights_only=True)["train_state"]["step"]


def run_ok(tmp_path, name, args):
    with open(tmp_path / f"{name}.out", "w+") as output:
        status = finish(start(main_py(*args), output), output)
        assert status == 0, output.read()[-3000:]


def assert_same_run(a, b):
    """Same predictions (the whole per_trial.csv), same final weights, same validation history."""
    assert (a / "per_trial.csv").read_text() == (b / "per_trial.csv").read_text()
    last_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert last_a["train_state"] == last_b["train_state"]
    assert last_a["train_state"]["step"] == STEPS
    for key in last_a["model"]:
        assert torch.equal(last_a["model"][key], last_b["model"][key]), key


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_ok(tmp, "run", ["run", "--config", REPO_ROOT / "configs/ctc_baseline/tiny.yml",
                        *overrides(synthetic_dataset), "--out", tmp / "run"])
    return tmp / "run"


@pytest.mark.slow
def test_resume_after_kill_9_ends_as_an_uninterrupted_run(uninterrupted, synthetic_dataset, tmp_path):
    run_dir = tmp_path / "killed"
    with open(tmp_path / "killed.out", "w+") as output:
        process = start(main_py("run", "--config", REPO_ROOT / "configs/ctc_baseline/tiny.yml",
                                *overrides(synthetic_dataset), "--out", run_dir), output)
        try:
            # a step logged after the first checkpoint (written at the end of step 4, before step 5 starts)
            wait_for(lambda: any(s > EVERY and s % EVERY for s in logged_steps(run_dir)), process,
                     "a step past the first checkpoint")
            process.send_signal(signal.SIGKILL)
        finally:
            finish(process, output)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "DONE").exists()
    checkpoint_step = saved_step(run_dir / "checkpoints" / "last.pt")
    assert EVERY <= checkpoint_step < max(logged_steps(run_dir)) < STEPS  # work after the checkpoint was lost

    run_ok(tmp_path, "resumed", ["run", "--out", run_dir, "--resume"])
    assert re.search(rf"resumed from .* at step {checkpoint_step}$", (run_dir / "run.log").read_text(), re.M)
    assert_same_run(run_dir, uninterrupted)


# A child that runs main.py and SIGKILLs itself halfway through writing the n-th last.pt: its temp
# file then holds half of the bytes and the rename never happens. Only harness.results' own view of
# `os` and `tempfile` is wrapped, so nothing else in the process notices.
DIE_MID_WRITE = r"""
import os, signal, sys, tempfile
import harness.results as results
import main

kill_at, seen, doomed = int(sys.argv[1]), [0], set()

class HalfThenKill:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def __getattr__(self, name): return getattr(self.f, name)
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush(); os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

class Tempfile:
    def __getattr__(self, name): return getattr(tempfile, name)
    def mkstemp(self, **kwargs):
        fd, name = tempfile.mkstemp(**kwargs)
        if kwargs.get("prefix", "").startswith(".last.pt."):
            seen[0] += 1
            if seen[0] == kill_at: doomed.add(fd)
        return fd, name

class Os:
    def __getattr__(self, name): return getattr(os, name)
    def fdopen(self, fd, *args, **kwargs):
        f = os.fdopen(fd, *args, **kwargs)
        return HalfThenKill(f) if fd in doomed else f

results.tempfile, results.os = Tempfile(), Os()
sys.exit(main.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(uninterrupted, synthetic_dataset, tmp_path):
    run_dir, checkpoints = tmp_path / "cut", tmp_path / "cut" / "checkpoints"
    with open(tmp_path / "cut.out", "w+") as output:
        process = start(["2", "run", "--config", REPO_ROOT / "configs/ctc_baseline/tiny.yml",
                         *overrides(synthetic_dataset), "--out", run_dir], output, python_args=["-c", DIE_MID_WRITE])
        status = finish(process, output)
        assert status == -signal.SIGKILL, output.read()[-3000:]
    partial = list(checkpoints.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017  torch raises one of several types for a cut zip
        torch.load(partial[0], weights_only=True)  # half a checkpoint: unreadable
    assert saved_step(checkpoints / "last.pt") == EVERY  # the second write (step 8) died; the first is intact

    run_ok(tmp_path, "resumed", ["run", "--out", run_dir, "--resume"])
    assert not list(checkpoints.glob(".*.tmp"))
    assert "a checkpoint write that did not finish" in (run_dir / "run.log").read_text()
    assert_same_run(run_dir, uninterrupted)


def torchrun(*args):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]  # after the python of start()


@pytest.mark.slow
def test_a_two_rank_run_resumes_every_ranks_random_draws(synthetic_dataset, tmp_path):
    """Under torchrun rank 0's checkpoint holds both ranks' RNG states (augmentation and dropout
    differ between ranks); killed while writing its second checkpoint and resumed, the run ends as an
    uninterrupted two-rank run."""
    config = ["--config", REPO_ROOT / "configs/ctc_baseline/tiny.yml", *overrides(synthetic_dataset)]
    with open(tmp_path / "straight.out", "w+") as output:
        status = finish(start(torchrun(REPO_ROOT / "main.py", "run", *config, "--out", tmp_path / "straight"), output), output)
        assert status == 0, output.read()[-3000:]
    script = tmp_path / "die_mid_write.py"
    script.write_text(DIE_MID_WRITE)
    with open(tmp_path / "cut.out", "w+") as output:
        status = finish(start(torchrun(script, "2", "run", *config, "--out", tmp_path / "cut"), output), output)
        assert status != 0 and not (tmp_path / "cut" / "DONE").exists(), output.read()[-3000:]
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["train_state"]["step"] == EVERY and len(saved["rng_by_rank"]) == 2
    assert not torch.equal(saved["rng_by_rank"][0]["torch"], saved["rng_by_rank"][1]["torch"])

    with open(tmp_path / "resumed.out", "w+") as output:
        status = finish(start(torchrun(REPO_ROOT / "main.py", "run", "--out", tmp_path / "cut", "--resume"), output), output)
        assert status == 0, output.read()[-3000:]
    assert_same_run(tmp_path / "cut", tmp_path / "straight")
