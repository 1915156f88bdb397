"""`run --launcher slurm` against a real one-node slurm (tests/harness/slurm_cluster.py): a job writes a
complete run folder, a sweep is a capped job array, a job submitted by `make ... LAUNCHER=slurm`
survives `scontrol requeue` and submitit's preemption signal and ends exactly like an uninterrupted
run, and a finished run is never run again.

Without accounting, submitit cannot see a job's end (local-slurm.md): the tests wait for the run
folder's DONE, never on job.result(). Every test has its own log folder (job ids restart at 1)."""

import csv
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main
from config import SlurmParams, load_config
from harness.launch import expand_sweeps, make_executor
from tests.conftest import REPO_ROOT, TINY_CONFIG, make_trials, write_split
from tests.harness.slurm_cluster import slurm_cluster, wait_for  # noqa: F401 (slurm_cluster is a fixture)

SUBMITTED = re.compile(r"^submitted slurm job (\S+): run folder (.+), log (.+)$", re.M)
LONG = ["training_params.num_steps=2000", "training_params.checkpoint_every=25", "training_params.val_every=500"]


def env():
    # The jobs inherit this environment through sbatch (SLURM_CONF too, set by the fixture).
    return dict(os.environ, B2T_PLUGINS="tests.tiny_plugin", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def cli(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env(), timeout=120)


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def scontrol(*args):
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two sessions in the real format (tests/conftest.py's writer), for the tiny test model."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("slurm_data")
    for session in ["t15.2023.08.13", "t15.2023.08.18"]:
        write_split(root / session / "data_train.hdf5", make_trials(session, 6, rng, block=1))
        write_split(root / session / "data_val.hdf5", make_trials(session, 3, rng, block=2))
        write_split(root / session / "data_test.hdf5", make_trials(session, 2, rng, block=3), labels=False)
    return root


def base(dataset, logs):
    return sets(f"data_params.data_dir={dataset}", f"slurm.log_dir={logs}", "slurm.cpus_per_task=1",
                "output.tensorboard=false")


@pytest.fixture(scope="module")
def finished_job(slurm_cluster, dataset, tmp_path_factory):
    """One run submitted by the CLI and waited for: (job id, run folder, log, seconds the CLI took).
    Two tasks, as for two GPUs (gpus_per_node=2), but on CPU: the job sets up DDP (gloo) from slurm's
    environment."""
    tmp = tmp_path_factory.mktemp("slurm_run")
    start = time.monotonic()
    result = cli("run", "--launcher", "slurm", "--config", TINY_CONFIG, *base(dataset, tmp / "logs"),
                 "--set", "slurm.sbatch.ntasks_per_node=2", "--out", tmp / "run")
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    [(job_id, folder, log)] = SUBMITTED.findall(result.stdout)
    assert not (tmp / "run" / "DONE").exists()  # returned at once, before the job could finish
    wait_for(lambda: (tmp / "run" / "DONE").is_file(), 90, f"job {job_id} to finish (log {log})")
    return job_id, tmp / "run", log, took


def test_submitted_job_writes_a_complete_run_folder(finished_job):
    job_id, out, log, took = finished_job
    print(f"submitting took {took:.1f} s")
    for name in ["config.yaml", "per_trial.csv", "metrics.json", "meta.json", "run.log", "checkpoints/last.pt"]:
        assert (out / name).is_file(), name
    rows = read_csv(out / "per_trial.csv")
    assert [r["split"] for r in rows] == ["val"] * 6 + ["test"] * 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["n_trials"] == 6 and metrics["run"]["steps"] == 20
    meta = json.loads((out / "meta.json").read_text())
    assert meta["slurm_job_id"] == job_id and meta["world_size"] == 2
    assert f"slurm job {job_id}, restart 0: run folder {out}" in open(log).read()
    assert "global_rank=1(2)" in open(log.replace("_0_log.out", "_1_log.out")).read()  # the second task


@pytest.mark.slow
def test_finished_run_is_never_run_again(finished_job, dataset, tmp_path):
    job_id, out, log, _ = finished_job
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    # Submitting it again submits nothing.
    result = cli("run", "--launcher", "slurm", *base(dataset, tmp_path / "logs"), "--out", out, "--resume")
    assert result.returncode == 0, result.stderr
    assert "already finished (DONE): nothing to submit" in result.stdout and not (tmp_path / "logs").exists()

    # Its job requeued after the end runs again, finds DONE and leaves the folder alone.
    scontrol("requeue", job_id)
    wait_for(lambda: re.search(r"JobState=COMPLETED .*Restarts=1", " ".join(scontrol("show", "job", job_id).split())),
             60, f"requeued job {job_id} to complete again")
    assert "is finished (DONE): nothing to do" in open(log).read()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_sweep_is_a_job_array_capped_at_array_parallelism(slurm_cluster, dataset, tmp_path):
    result = cli("run", "--launcher", "slurm", "--config", TINY_CONFIG, *base(dataset, tmp_path / "logs"),
                 "--set", "slurm.array_parallelism=1", "--sweep", "model_params.hidden=8,16", "--out", tmp_path / "sweep")
    assert result.returncode == 0, result.stderr
    array_id = re.search(r"submitted slurm job array (\d+): 2 runs, at most 1 at once", result.stdout).group(1)
    jobs = SUBMITTED.findall(result.stdout)
    assert [j for j, _, _ in jobs] == [f"{array_id}_0", f"{array_id}_1"]

    metas = []
    for (job_id, folder, log), hidden in zip(jobs, [8, 16]):
        assert os.path.basename(folder).startswith(f"tiny_test_hidden-{hidden}_")
        wait_for(lambda: os.path.isfile(os.path.join(folder, "DONE")), 90,  # noqa: B023 (called now)
                 f"job {job_id} to finish (log {log})")
        assert f"hidden: {hidden}\n" in open(os.path.join(folder, "config.yaml")).read()
        metas.append(json.loads(open(os.path.join(folder, "meta.json")).read()))
    first, second = sorted(metas, key=lambda m: m["start"])
    assert second["start"] >= first["end"]  # at most one at once: the second started after the first ended


@pytest.mark.slow
def test_seed_group_is_one_job_array_and_the_last_job_writes_the_summary(slurm_cluster, dataset, tmp_path):
    out = tmp_path / "group"
    result = cli("run", "--launcher", "slurm", "--config", TINY_CONFIG, *base(dataset, tmp_path / "logs"),
                 "--seeds", "1,2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert re.search(r"submitted slurm job array \d+: 2 runs", result.stdout)
    assert sorted(folder for _, folder, _ in SUBMITTED.findall(result.stdout)) == [str(out / "seed-1"), str(out / "seed-2")]
    wait_for(lambda: (out / "DONE").is_file(), 120, f"the group's jobs to finish (logs {tmp_path / 'logs'})")
    assert (out / "seed-1" / "DONE").is_file() and (out / "seed-2" / "DONE").is_file()
    summary = read_csv(out / "summary.csv")
    assert {row["n_runs"] for row in summary} == {"2"} and {row["split"] for row in summary} == {"val"}


@pytest.mark.slow
def test_make_launcher_slurm_job_survives_requeue_and_preemption_and_resumes_exactly(slurm_cluster, dataset, tmp_path):
    overrides = [*base(dataset, tmp_path / "logs"), *sets(*LONG, "evaluation.splits=[val]")]
    reference = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), "run", "--config", TINY_CONFIG,
                                  *overrides, "--out", tmp_path / "straight"], cwd=REPO_ROOT, env=env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # `make ctc-baseline` with the tiny config: the last --config wins; -o: setup and data are not
    # this test's business (the run reads its own dataset)
    args = " ".join(map(str, ["--config", TINY_CONFIG, *overrides, "--out", tmp_path / "run"]))
    result = subprocess.run(["make", "-s", "-o", ".venv/.b2t-setup-stamp", "-o", "data/synthetic/synth_report.json",
                             "ctc-baseline", "LAUNCHER=slurm", f"ARGS={args}"], cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [(job_id, out, log)] = SUBMITTED.findall(result.stdout)
    run_log = tmp_path / "run" / "run.log"
    resumes = lambda: run_log.read_text().count("resumed from") if run_log.is_file() else 0

    # An operator's requeue, once the run has a checkpoint to resume from.
    wait_for(lambda: (tmp_path / "run" / "checkpoints" / "last.pt").is_file(), 60, f"job {job_id}'s first checkpoint")
    scontrol("requeue", job_id)
    wait_for(lambda: resumes() == 1, 90, f"job {job_id} to resume after the requeue (log {log})")
    # Preemption or time-out: slurm sends submitit's signal; submitit requeues the job itself.
    subprocess.run(["scancel", "-s", "USR2", job_id], check=True)
    wait_for(lambda: (tmp_path / "run" / "DONE").is_file(), 120, f"job {job_id} to finish (log {log})")

    assert resumes() == 2
    text = open(log).read()
    assert "Caught signal SIGUSR2" in text and f"slurm job {job_id}, restart 2" in text
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    straight = tmp_path / "straight"
    assert (tmp_path / "run" / "per_trial.csv").read_text() == (straight / "per_trial.csv").read_text()
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert a["train_state"]["step"] == b["train_state"]["step"] == 2000
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_sweep_values_make_every_combination():
    assert expand_sweeps(["a.lr=0.1,0.01", "b.size=[1,2],3"]) == [
        ("lr-0.1_size-1_2", ["a.lr=0.1", "b.size=[1, 2]"]), ("lr-0.1_size-3", ["a.lr=0.1", "b.size=3"]),
        ("lr-0.01_size-1_2", ["a.lr=0.01", "b.size=[1, 2]"]), ("lr-0.01_size-3", ["a.lr=0.01", "b.size=3"])]


@pytest.mark.parametrize("args, message", [
    (["--sweep", "training_params.num_steps"], "expected KEY.PATH=v1,v2"),
    (["--sweep", "slurm.nodes=1,2"], "share one slurm job array"),
    (["--sweep", "training_params.nmu_steps=1,2"], "did you mean 'num_steps'"),
    (["--launcher", "slurm", "--set", "slurm.gpus=2"], "--set slurm.gpus: unknown key"),
])
def test_mistakes_fail_here_in_one_line_before_anything_is_submitted(args, message, tmp_path, capsys):
    code = main.main(["run", "--config", str(TINY_CONFIG), "--set", f"slurm.log_dir={tmp_path / 'logs'}", *args,
                      "--out", str(tmp_path / "runs")])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists() and not (tmp_path / "runs").exists()


def test_slurm_section_becomes_sbatch_options(tmp_path):
    params = SlurmParams(partition="gpu", account="lab", nodes=2, gpus_per_node=4, cpus_per_task=8, mem_gb=1.5,
                         time_min=240, log_dir=str(tmp_path / "logs"), sbatch={"qos": "high", "exclusive": True})
    script = make_executor(params, "gru_align")._make_submission_file_text("CMD", "uid")
    for line in ["--partition=gpu", "--account=lab", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--cpus-per-task=8", "--mem=1536M", "--time=240", "--job-name=gru_align", "--qos=high",
                 "--exclusive", "--requeue", "--signal=USR2@90", f"--output={tmp_path}/logs/%j/%j_0_log.out"]:
        assert f"#SBATCH {line}\n" in script, line
    one_cpu_task = make_executor(SlurmParams(), "x")._make_submission_file_text("CMD", "uid")
    assert "--ntasks-per-node=1\n" in one_cpu_task and "gpus" not in one_cpu_task and "--mem" not in one_cpu_task


def test_without_sbatch_nothing_is_left_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    code = main.main(["run", "--launcher", "slurm", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "run")])
    assert code == 2 and "sbatch not found" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # --overwrite on a folder that holds a run: refused before the folder is emptied
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("{}")
    code = main.main(["run", "--launcher", "slurm", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "old"),
                      "--overwrite"])
    assert code == 2 and "sbatch not found" in capsys.readouterr().err
    assert (tmp_path / "old" / "metrics.json").read_text() == "{}"


def test_local_sweep_runs_every_value_here_one_after_the_other(small_dataset, tmp_path):
    args = ["run", "--config", str(TINY_CONFIG), "--set", f"data_params.data_dir={small_dataset}", "--set",
            "output.tensorboard=false", "--sweep", "model_params.hidden=8,16", "--out", str(tmp_path / "sweep")]
    assert main.main(args) == 0
    runs = sorted((tmp_path / "sweep").iterdir(), key=lambda p: json.loads((p / "meta.json").read_text())["start"])
    assert [r.name.split("_2")[0] for r in runs] == ["tiny_test_hidden-8", "tiny_test_hidden-16"]
    assert all((r / "DONE").is_file() for r in runs)
    assert [load_config(r / "config.yaml").model_params.hidden for r in runs] == [8, 16]


def test_slurm_is_installed_only_when_asked(monkeypatch):
    """Without slurm's programs, the fixture installs nothing unless B2T_TEST_SLURM=install: it skips,
    saying how to ask. Asked, it goes on to the installing (stopped here at the root check)."""
    import tests.harness.slurm_cluster as cluster

    def no_commands(*args, **kwargs):
        raise AssertionError(f"ran {args}: nothing may be installed")

    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)  # no slurm on this machine
    monkeypatch.setattr(cluster.subprocess, "run", no_commands)
    monkeypatch.delenv(cluster.INSTALL_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"slurm is not installed: B2T_TEST_SLURM=install lets the tests "
                                                    r"install it \(root, apt-get\)"):
        cluster.install_packages()
    monkeypatch.setenv(cluster.INSTALL_ENV, "yes")  # anything but install is not asking
    with pytest.raises(pytest.skip.Exception, match="B2T_TEST_SLURM=install"):
        cluster.install_packages()

    monkeypatch.setenv(cluster.INSTALL_ENV, "install")
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="installing it needs root"):
        cluster.install_packages()

    # slurm's programs there: nothing to install, asked or not
    monkeypatch.delenv(cluster.INSTALL_ENV)
    monkeypatch.setattr(cluster.shutil, "which", lambda name: f"/usr/bin/{name}")
    cluster.install_packages()
