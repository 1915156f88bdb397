"""Where a run starts: here (`--launcher local`) or as a slurm job (`--launcher slurm`), and
`--sweep KEY=v1,v2,...` expanded into one run per combination of values.

A slurm launch validates every config here, picks every run folder now (a requeued job must find
its own again), submits through submitit and returns at once. The job is `SlurmRun`: plain data
(the config's text, the `--set` list, the folder) pickled by submitit, never a shell string. It
runs the run with resume semantics, so running it again is always right: `DONE` -> nothing to do,
a checkpoint -> resume, nothing yet -> start. Slurm runs it again after a preemption or a time-out
(submitit's signal handler requeues it through `checkpoint()`) or an `scontrol requeue`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import submitit
import yaml
from submitit.core.utils import FailedJobError, FailedSubmissionError

from config import ExperimentConfig, SlurmParams, load_config
from harness import groups, results
from harness.errors import UserError
from harness.plugins import load_plugins
from harness.runner import check_model, run_inputs


def launch(config_path: str | None, overrides: list[str], out: str | None, resume: bool, overwrite: bool,
           launcher: str = "local", sweeps: list[str] = (), check: bool = True, seeds: str | None = None) -> None:
    """main.py run: one run, a group of runs (--seeds, or a protocol that trains several times) or a
    sweep, here or on slurm."""
    from harness.runner import run

    group_seeds = groups.parse_seeds(seeds)
    if is_group_launch(config_path, overrides, out, resume, group_seeds):
        if sweeps:
            raise UserError("--sweep and a run group (--seeds, or evaluation.protocol data_scaling/recalibration) do "
                            "not combine: give one. To sweep a value over seeds, sweep the seed as well (--sweep "
                            "training_params.seed=1,2,3); compare pools the runs that differ only in their seeds")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # every rank would make the group folder: a group's members are started by one process
            raise UserError("a run group (--seeds, or evaluation.protocol data_scaling/recalibration) is started with "
                            "plain python, not under torchrun: with slurm each member is a multi-GPU job "
                            "(slurm.gpus_per_node); here, start each member as its own torchrun run")
        load_plugins()
        if launcher == "local":
            groups.run_group(config_path, overrides, out, resume, overwrite, group_seeds, check)
        else:
            submit_group(config_path, overrides, out, resume, overwrite, group_seeds, check)
        return
    if launcher == "local" and not sweeps:
        run(config_path, overrides, out, resume, overwrite, check)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--sweep and --launcher slurm start runs of their own: start them with plain python, not under "
                        "torchrun (NPROC); a slurm job gets its GPUs from slurm.gpus_per_node")
    if sweeps and (resume or overwrite):
        raise UserError("--sweep starts new runs: it takes neither --resume nor --overwrite")
    load_plugins()
    if sweeps:
        config, planned = plan_sweep(config_path, overrides, out, sweeps, launcher, check)
    else:
        config, planned = plan_single(config_path, overrides, out, resume, overwrite, check)
        if planned is None:
            return
    if launcher == "local":
        for folder, run_overrides in planned:
            run(config_path, run_overrides, str(folder), False, False, check)
    else:
        submit(config, config_path, planned, check)


def is_group_launch(config_path, overrides, out, resume: bool, seeds: list[int]) -> bool:
    """A run group: --seeds, a --resume of a group folder, or a protocol that trains more than once."""
    if seeds or (resume and out is not None and results.is_group(out)):
        return True
    if config_path is None:
        return False
    load_plugins()
    return groups.needs_group(load_config(config_path, overrides), seeds)


# ----------------------------------------------------------------------------------------------
# Planning: validated configs and their run folders


def expand_sweeps(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=v1,v2` strings (each value YAML) -> (folder suffix, --set list) for every combination."""
    axes = []
    for item in sweeps:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise UserError(f"--sweep {item!r}: expected KEY.PATH=v1,v2,..., e.g. --sweep training_params.lr_max=0.01,0.003")
        if key.split(".")[0] == "slurm":
            raise UserError(f"--sweep {key}: the runs of a sweep share one slurm job array; set slurm.* with --set")
        try:
            values = yaml.safe_load(f"[{raw}]")  # a YAML flow list: "0.1,0.2" and "[1,2],[3,4]" both work
        except yaml.YAMLError:
            raise UserError(f"--sweep {item!r}: the values are not a valid comma-separated YAML list") from None
        axes.append([(f"{key.split('.')[-1]}-{_for_name(v)}", f"{key}={json.dumps(v)}") for v in values])
    return [("_".join(s for s, _ in combo), [o for _, o in combo]) for combo in itertools.product(*axes)]


def _for_name(value) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", value if isinstance(value, str) else json.dumps(value)).strip("_")


def plan_sweep(config_path, overrides, out, sweeps, launcher,
               check: bool = True) -> tuple[ExperimentConfig, list[tuple[Path, list[str]]]]:
    """Every combination validated before any folder is made; each gets a new folder under --out
    (default: the config's results_dir) named after the trial and its values."""
    if config_path is None:
        raise UserError("--sweep needs --config FILE")
    combos = expand_sweeps(sweeps)
    configs = [load_config(config_path, [*overrides, *sets]) for _, sets in combos]
    if launcher == "slurm":
        require_sbatch()
        if check:  # a local sweep checks each run as it starts
            for config in configs:
                check_model(config)
    parent = Path(out) if out else Path(configs[0].output.results_dir)
    planned = [(results.new_run_dir(parent, f"{config.trial_name}_{suffix}"), [*overrides, *sets])
               for config, (suffix, sets) in zip(configs, combos)]
    return configs[0], planned


def plan_single(config_path, overrides, out, resume, overwrite, check: bool = True):
    """One run for slurm: its folder now (emptied with --overwrite here, never in the job)."""
    if resume and out is None:
        raise UserError("--resume needs --out RUN_DIR (the run folder to continue)")
    if resume and results.is_finished(out):
        print(f"{out} is already finished (DONE): nothing to submit")
        return None, None
    from harness.runner import load_run_config

    config = load_run_config(config_path, overrides, out, resume)
    require_sbatch()  # before --overwrite empties the folder
    if check:
        check_model(config)
    if out is not None:
        with results.prepare_out_dir(out, resume, overwrite, run_inputs(config, config_path)) as folder:
            pass  # made (and emptied with --overwrite) here; the job claims it again when it runs
    else:
        folder = results.new_run_dir(config.output.results_dir, config.trial_name)
    return config, [(folder, list(overrides))]


# ----------------------------------------------------------------------------------------------
# Slurm


class SlurmRun(submitit.helpers.Checkpointable):
    """One run as a slurm job, in a folder fixed at submit time. Checkpointable's checkpoint()
    resubmits it unchanged when submitit catches the preemption/time-out signal: the run's own
    checkpoints (training_params.checkpoint_every) hold the progress, not this object."""

    def __init__(self, config_text: str | None, overrides: list[str], out: str, check: bool = True):
        self.config_text = config_text  # the config as submitted: editing the file later changes nothing
        self.overrides = list(overrides)
        self.out = out
        self.check = check  # the pre-flight check again in the job, on its own device (--no-preflight: never)

    def __call__(self) -> str:
        from harness.runner import run

        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"slurm job {os.environ.get('SLURM_JOB_ID')}, restart {restarts}: run folder {self.out}", flush=True)
        if results.is_finished(self.out):
            print(f"{self.out} is finished (DONE): nothing to do", flush=True)
            return self.out
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for torch.distributed's env://;
            # every task keeps seeing all of its node's GPUs and picks one by LOCAL_RANK, as under torchrun
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        with tempfile.TemporaryDirectory() as tmp:
            config_path = None  # resuming a folder without a config given: the run's own config.yaml
            if self.config_text is not None:
                config_path = Path(tmp) / "config.yml"
                config_path.write_text(self.config_text)
            run(config_path and str(config_path), self.overrides, self.out, True, False, self.check)
        return self.out


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: slurm is not installed here (use --launcher local)")


def make_executor(sp: SlurmParams, job_name: str) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=Path(sp.log_dir).absolute() / "%j", max_num_timeout=sp.max_timeouts)
    params = dict(job_name=job_name, nodes=sp.nodes, ntasks_per_node=max(1, sp.gpus_per_node),
                  cpus_per_task=sp.cpus_per_task, time=sp.time_min, array_parallelism=sp.array_parallelism,
                  stderr_to_stdout=True, additional_parameters={"requeue": True, **sp.sbatch})
    optional = {"partition": sp.partition, "account": sp.account, "gpus_per_node": sp.gpus_per_node or None,
                "mem": f"{round(sp.mem_gb * 1024)}M" if sp.mem_gb else None}
    executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    return executor


def submit(config: ExperimentConfig, config_path: str | None, planned: list[tuple[Path, list[str]]],
           check: bool = True) -> list:
    """Submit one job (one planned run) or one job array (a sweep); print ids, folders and logs."""
    config_text = Path(config_path).read_text() if config_path is not None else None
    calls = [SlurmRun(config_text, run_overrides, str(folder.absolute()), check) for folder, run_overrides in planned]
    return submit_calls(config, calls, planned)


def submit_calls(config: ExperimentConfig, calls: list[SlurmRun], planned: list[tuple[Path, list[str]]]) -> list:
    executor = make_executor(config.slurm, config.trial_name)
    try:
        if len(calls) == 1:
            jobs = [executor.submit(calls[0])]
        else:
            with executor.batch():  # one job array, at most slurm.array_parallelism running at once
                jobs = [executor.submit(call) for call in calls]
    except (FailedJobError, FailedSubmissionError) as error:
        _remove_empty(planned)
        raise UserError(f"sbatch refused the job: {str(error).strip().splitlines()[-1]}") from None
    if len(jobs) > 1:
        print(f"submitted slurm job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} runs, "
              f"at most {config.slurm.array_parallelism} at once")
    for job, (folder, _) in zip(jobs, planned):
        print(f"submitted slurm job {job.job_id}: run folder {folder}, log {job.paths.stdout}")
    return jobs


def _remove_empty(planned) -> None:
    for folder, _ in planned:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ----------------------------------------------------------------------------------------------
# Run groups on slurm (harness/groups.py): one job array, a job per training run


class SlurmGroupMember(SlurmRun):
    """A group member's job: its training run (SlurmRun: resumable, requeued), then its recalibration
    fine-tunes if any, then the group's summary if this was the last member to finish."""

    def __init__(self, config_text: str, member: dict, group_dir: str, check: bool = True):
        super().__init__(config_text, member["overrides"], str(Path(group_dir) / member["name"]), check)
        self.member, self.group_dir = member, group_dir

    def __call__(self) -> str:
        super().__call__()
        group_dir = Path(self.group_dir)
        member = groups.Member(**self.member)
        groups.finish_member(member, Path(self.out), group_dir, load_config(group_dir / results.GROUP_CONFIG))
        if groups.finish_group(group_dir):
            print(f"run group finished: {group_dir}", flush=True)
        return self.out


def submit_group(config_path: str | None, overrides: list[str], out: str | None, resume: bool, overwrite: bool,
                 seeds: list[int], check: bool = True) -> list:
    """A run group as one slurm job array: every member validated and the group folder made here."""
    require_sbatch()
    if resume:
        if out is None or not results.is_group(out):
            raise UserError("--resume of a run group needs --out GROUP_DIR (a folder with group.json)")
        if results.is_finished(out):
            print(f"{out} is already finished (DONE): nothing to submit")
            return []
        folder = Path(out)
        _, members = groups.read_plan(folder)
        config = load_config(folder / results.GROUP_CONFIG)
        left = set(groups.unfinished(folder))
        members = [m for m in members if m.name in left or any(n.startswith(m.prefix + "k-") for n in left)]
    else:
        if config_path is None:
            raise UserError("run needs --config FILE")
        config = load_config(config_path, overrides)
        members = groups.plan_members(config, seeds)
        groups.check_group(config, groups.member_configs(config_path, overrides, members), check)
        protected = {"the config file": config_path, "data_params.data_dir": config.data_params.data_dir}
        if out is not None:
            with results.prepare_out_dir(out, False, overwrite, protected) as folder:
                pass
        else:
            folder = results.new_run_dir(config.output.results_dir, config.trial_name)
        groups.write_plan(folder, config, seeds, members)
    config_text = (folder / results.GROUP_CONFIG).read_text()
    calls = [SlurmGroupMember(config_text, asdict(m), str(folder.absolute()), check) for m in members]
    print(f"run group {folder}: {len(calls)} training runs to submit")
    return submit_calls(config, calls, [(folder / m.name, m.overrides) for m in members])
