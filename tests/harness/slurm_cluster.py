"""A real one-node slurm for the tests: the `slurm_cluster` session fixture.

Uses a slurm that already answers `sinfo`; otherwise, with slurm's programs installed, starts a
munged, slurmctld and slurmd of its own. Installing Debian's packages is only done when asked:
B2T_TEST_SLURM=install (which .ci/run sets; root and apt-get needed); otherwise, and where that is not
possible, the tests skip and say why (`make test` on a laptop installs nothing). Its daemons run on
localhost: its own munge socket and free ports, so that concurrent test sessions never meet; a
slurm.conf, state and spool under a temp folder; no cgroups, no systemd (proctrack/linuxproc,
task/none). At the end it cancels its jobs and stops exactly the daemons it started, by PID.
Facts behind the settings: docs/local-slurm.md.
Hand-written because no maintained pytest plugin starts a slurm (they all expect a cluster).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "munged"]
INSTALL_ENV = "B2T_TEST_SLURM"  # =install: the tests may install PACKAGES with apt-get
NOT_ASKED = f"slurm is not installed: {INSTALL_ENV}=install lets the tests install it (root, apt-get)"
JOB_CPUS = 16  # slurm's idea of the node (SlurmdParameters=config_overrides), so that jobs run side by side


def answers(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_for(predicate, timeout: float, what: str | None):
    """Poll `predicate` until it returns something truthy; on time-out fail the test with `what`,
    or with what=None give up quietly (returns None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    if what is not None:
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_packages() -> None:
    """Return when slurm's programs are there; install them only with B2T_TEST_SLURM=install, else
    skip the test saying how to ask."""
    if all(shutil.which(name) for name in PROGRAMS):
        return
    if os.environ.get(INSTALL_ENV, "").strip().lower() != "install":
        pytest.skip(NOT_ASKED)
    if os.geteuid() != 0:
        pytest.skip("slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("slurm is not installed and there is no apt-get to install it")
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # a stale package list: update once and try again
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"could not install slurm ({' '.join(command)}): {lines[-1]}")


def start_munge(folder: Path) -> tuple[int, Path]:
    """A munged of our own on a socket of our own (in `folder`, which the munge user owns): another
    test session starting or stopping the machine's munged cannot take it away. Returns (PID, socket)."""
    shutil.chown(folder, "munge", "munge")
    folder.chmod(0o755)  # munged: "execute permissions for all required" on the socket folder
    socket_path, pid_file = folder / "munge.socket", folder / "munged.pid"
    subprocess.run(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "/usr/sbin/munged",
                    f"--socket={socket_path}", f"--pid-file={pid_file}", f"--log-file={folder / 'munged.log'}",
                    f"--seed-file={folder / 'munged.seed'}"], check=True, capture_output=True)
    check = f"munge -S {socket_path} -n | unmunge -S {socket_path}"
    wait_for(lambda: answers("bash", "-c", check), 10, "munged to answer")
    return int(pid_file.read_text()), socket_path


def write_slurm_conf(root: Path, munge_socket: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    memory = int(probe.split("RealMemory=")[1].split()[0])
    for folder in ["ctld", "d"]:
        (root / folder).mkdir(parents=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=b2t-test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: requeued jobs otherwise wait about 2 minutes for their old credential to expire
AuthInfo=cred_expire=5,socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# submitit ignores SIGTERM (it waits for its own signal): a requeued job is killed 2 s after it
KillWait=2
MailProg=/bin/true
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/d
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmdParameters=config_overrides
NodeName={host} CPUs={JOB_CPUS} RealMemory={int(memory * 0.95)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def stop(pids: list[int]) -> None:
    """SIGTERM to all at once (each takes about 2 s to exit), then wait for them."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A slurm that takes jobs; SLURM_CONF is set in os.environ for the session when it is ours."""
    if answers("sinfo"):
        yield None
        return
    install_packages()
    started = []
    root = tmp_path_factory.mktemp("slurm")
    munge_folder = Path(tempfile.mkdtemp(prefix="b2t-munge-"))  # not under pytest's root-only folder
    with pytest.MonkeyPatch.context() as patch:
        try:
            munge_pid, munge_socket = start_munge(munge_folder)
            started.append(munge_pid)
            conf = write_slurm_conf(root, munge_socket)
            patch.setenv("SLURM_CONF", str(conf))  # for the daemons, sbatch/scontrol, and the jobs they start
            for daemon, pid_file in [(["slurmctld", "-c"], "slurmctld.pid"), (["slurmd"], "slurmd.pid")]:
                subprocess.run(daemon, check=True, capture_output=True)
                started.append(int(wait_for(lambda: _read(root / pid_file), 10, f"{pid_file}")))  # noqa: B023 (called now)
            state = lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
            wait_for(lambda: state() == "idle", 30, f"the node to be idle (see {root}/slurmctld.log, slurmd.log)")
            yield conf
        finally:
            if len(started) == 3:  # jobs left by a failed test would outlive the daemons: cancel them first
                subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
                wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), 20, None)
            stop(started)
            shutil.rmtree(munge_folder, ignore_errors=True)


def _read(path: Path) -> str | None:
    text = path.read_text().strip() if path.is_file() else ""
    return text or None
