"""Run groups: one parent folder for several training runs of one config (README, "Protocols").

A group is made by `run --seeds 1,2,3` (one run per seed) and by the protocols that train more than
once: data_scaling (one run per fraction of the training trials) and recalibration (the training run,
then one folder per k calibration sentences and draw, harness/recalibration.py). Its folder holds:

    group.yaml      the group's resolved config (each member is it plus the member's --set list)
    group.json      the plan: protocol, seeds and the members with their --set lists and coordinates
    <member>/       one run folder per member (seed-2, seed-1_fraction-0.5, base, k-10_draw-1, ...)
    summary.json, summary.csv, summary.md, summary.png   made when every member is finished
    DONE            last

Members run here one after another, or on slurm as one job array (harness/launch.py's SlurmRun per
member), each member resumable like any run; `--resume --out GROUP` goes on with the unfinished ones.
Whoever finishes the last member writes the summary (harness/group_summary.py) and DONE.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from config import SEED_KEYS, ExperimentConfig, dump_config, load_config
from harness import recalibration, results
from harness.errors import UserError
from harness.results import GROUP_CONFIG, GROUP_FILE

GROUP_PROTOCOLS = ("data_scaling", "recalibration")  # protocols that train more than once


@dataclass
class Member:
    """One training run of a group: its folder name, its --set list on top of group.yaml, and where
    it sits on the group's axes (seed, fraction)."""

    name: str
    overrides: list[str]
    coords: dict = field(default_factory=dict)
    recalibrate: bool = False  # recalibration: fine-tunes follow the training run

    @property
    def prefix(self) -> str:
        """The start of its recalibration folders' names: "seed-2_" (or "" with one seed)."""
        return self.name.removesuffix("base")


def parse_seeds(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected whole numbers separated by commas, e.g. --seeds 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct seeds, e.g. --seeds 1,2,3")
    return seeds


def needs_group(config: ExperimentConfig, seeds: list[int]) -> bool:
    return bool(seeds) or config.evaluation.protocol in GROUP_PROTOCOLS


def plan_members(config: ExperimentConfig, seeds: list[int]) -> list[Member]:
    """The members of the group: every seed (the config's own if none given) by every point of the
    protocol's axis."""
    seed_axis = [(f"seed-{s}", [f"{key}={s}" for key in SEED_KEYS], {"seed": s}) for s in seeds] or \
        [("", [], {"seed": config.training_params.seed})]
    protocol = config.evaluation.protocol
    if protocol == "data_scaling":
        axis = [(f"fraction-{f:g}", ["evaluation.protocol=fixed", f"data_params.train_fraction={f}"], {"fraction": f})
                for f in config.evaluation.data_scaling.fractions]
    elif protocol == "recalibration":  # the training run is a cross_session run that keeps its checkpoints
        axis = [("base", ["evaluation.protocol=cross_session", "output.keep_checkpoints=true"], {"k": 0})]
    else:
        axis = [("", [], {})]
    members = []
    for seed_name, seed_sets, seed_coords in seed_axis:
        for name, sets, coords in axis:
            members.append(Member("_".join(n for n in (seed_name, name) if n), [*seed_sets, *sets],
                                  {**seed_coords, **coords}, recalibrate=protocol == "recalibration"))
    return members


def write_plan(folder: Path, config: ExperimentConfig, seeds: list[int], members: list[Member]) -> None:
    results.atomic_write_text(folder / GROUP_CONFIG, dump_config(config))
    results.write_json(folder / GROUP_FILE, {"version": 1, "protocol": config.evaluation.protocol, "seeds": seeds,
                                             "trial_name": config.trial_name,
                                             "members": [asdict(m) for m in members]})


def read_plan(folder: Path) -> tuple[dict, list[Member]]:
    try:
        plan = json.loads((folder / GROUP_FILE).read_text())
        return plan, [Member(**m) for m in plan["members"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder / GROUP_FILE}: not a readable group plan ({error})") from None


def member_configs(config_path: str, overrides: list[str], members: list[Member]) -> list[ExperimentConfig]:
    """Every member's config, validated now (a bad value of one member is said before anything runs)."""
    return [load_config(config_path, [*overrides, *m.overrides]) for m in members]


def check_group(config: ExperimentConfig, configs: list[ExperimentConfig], check: bool) -> None:
    """What a member's run would refuse, said before the group folder exists: every member's config
    (load_config, by the caller); then, on one member, since they differ only in seeds and in the share
    of training trials (at least one per session), the data and the protocol's cut (recalibration: k
    against the held-out sessions' trials) and the pre-flight check of the model."""
    from harness.runner import check_model, needed_splits, prepare_data

    first = configs[0]
    trials, _ = prepare_data(copy.deepcopy(first), needed_splits(first))
    if config.evaluation.protocol == "recalibration":
        recalibration.check_k(first, trials)
    if check:
        check_model(first)


# ---------------------------------------------------------------------------------------------- running


def run_group(config_path: str | None, overrides: list[str], out: str | None, resume: bool, overwrite: bool,
              seeds: list[int], check: bool = True) -> Path:
    """A group here, member after member; with --resume, the unfinished members of --out's group."""
    from harness.runner import run

    if resume:
        if out is None:
            raise UserError("--resume needs --out GROUP_DIR")
        if results.is_finished(out):
            print(f"{out} is already finished (DONE): nothing to do")
            return Path(out)
        if config_path is not None or overrides or seeds:
            raise UserError(f"--resume of the group {out} takes its own group.yaml and plan: omit --config, --set "
                            "and --seeds")
        _, members = read_plan(Path(out))
        config_path = str(Path(out) / GROUP_CONFIG)
        config = load_config(config_path)
    else:
        if config_path is None:
            raise UserError("run needs --config FILE")
        config = load_config(config_path, overrides)
        members = plan_members(config, seeds)
        check_group(config, member_configs(config_path, overrides, members), check)
        protected = {"the config file": config_path, "data_params.data_dir": config.data_params.data_dir}
        if out is not None:
            results.check_out_dir(out, False, overwrite, protected)
    folder = (results.prepare_out_dir(out, resume, overwrite, {"data_params.data_dir": config.data_params.data_dir})
              if out is not None else results.new_run_dir(config.output.results_dir, config.trial_name, claim=True))
    with folder as path:
        if not resume:
            write_plan(path, config, seeds, members)
            config_path, overrides = str(path / GROUP_CONFIG), []
        print(f"run group: {path} ({len(members)} training run{'s' if len(members) > 1 else ''})", flush=True)
        for member in members:
            child = path / member.name
            if not results.is_finished(child):  # started before (killed, or --resume): go on from its checkpoint
                run(config_path, [*overrides, *member.overrides], str(child), results.is_run_folder(child), False, check)
            finish_member(member, child, path, config)
        write_summary(path)
    return path


def finish_member(member: Member, child: Path, group_dir: Path, config: ExperimentConfig) -> None:
    """After a member's training run: its recalibration folders (and then, if the group's config
    keeps no checkpoints, the training run's)."""
    if not member.recalibrate:
        return
    recalibration.recalibrate(child, group_dir, member.prefix)
    if not config.output.keep_checkpoints:
        shutil.rmtree(child / "checkpoints", ignore_errors=True)


def unfinished(group_dir: Path) -> list[str]:
    """The members' folders (training runs and recalibration folders) not finished yet."""
    _, members = read_plan(group_dir)
    names = [m.name for m in members]
    config = load_config(group_dir / GROUP_CONFIG)
    for m in members:
        if m.recalibrate:
            names += [recalibration.child_name(m.prefix, k, d) for k in config.evaluation.recalibration.k if k > 0
                      for d in range(1, recalibration.draws_of(config, k) + 1)]
    return [n for n in names if not results.is_finished(group_dir / n)]


def write_summary(group_dir: Path) -> None:
    """summary.* and DONE, once every member is finished."""
    from harness.group_summary import summarize

    left = unfinished(group_dir)
    if left:
        raise RuntimeError(f"{group_dir}: members not finished: {', '.join(left)}")
    summarize(group_dir)
    results.mark_done(group_dir)
    print(f"run group finished: {group_dir} (summary.md)", flush=True)


def finish_group(group_dir: Path) -> bool:
    """A slurm member's last step: write the summary if every member is finished. Serialised on the
    group's lock (blocking: members finishing together take turns); True if this call finished it."""
    fd = os.open(group_dir / results.LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if results.is_finished(group_dir) or unfinished(group_dir):
            return False
        write_summary(group_dir)
        return True
    finally:
        os.close(fd)
