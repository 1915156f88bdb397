"""Protocols (harness/protocols.py, recalibration.py, groups.py, group_summary.py): what each run
trains on and decodes, the day-layer policies, the k-shot draws, the nested data subsets, the
pooled summary, and each protocol end to end on a small synthetic dataset."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import main
from config import load_config
from harness import protocols, recalibration
from harness.data import Trial
from harness.errors import UserError
from harness.group_summary import pooled_point
from harness.groups import plan_members
from harness.plugins import load_plugins
from tests.conftest import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "ctc_baseline" / "tiny.yml")
SESSIONS = ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18", "t15.2023.09.01", "t15.2023.10.01"]
# the tiny CTC baseline at its smallest: a few steps, greedy phonemes, no word search
FAST = ["model_params.n_units=16", "model_params.word_decoder={name: greedy}", "training_params.num_steps=4",
        "training_params.val_every=2", "training_params.checkpoint_every=2", "evaluation.bootstrap_resamples=50",
        "data_params.preprocessors=[]"]


def config_with(*sets):
    load_plugins()
    config = load_config(CONFIG, ["data_params.data_dir=unused", *sets])
    config.data_params.sessions = list(SESSIONS)
    return config


def trial(session, i, split="train", sentence="a b"):
    return Trial(split, session, SESSIONS.index(session), "p", f"trial_{i:04d}", 1, i, 30, (1, 40), sentence)


# ------------------------------------------------------------------------------------------ the cut


def test_last_sessions_holds_out_the_latest_sessions():
    train, held = protocols.held_out_sessions(SESSIONS, config_with("evaluation.held_out.last_sessions=2"))
    assert train == SESSIONS[:3] and held == SESSIONS[3:]


def test_from_date_holds_out_sessions_on_or_after_it_in_date_order():
    config = config_with("evaluation.held_out.from_date='2023-09-01'")
    train, held = protocols.held_out_sessions(list(reversed(SESSIONS)), config)  # listed order does not matter
    assert train == SESSIONS[:3] and held == SESSIONS[3:]
    assert protocols.days_between(train[-1], held[0]) == 14


@pytest.mark.parametrize("cut, message", [
    ("evaluation.held_out.last_sessions=5", "leaves no training session"),
    ("evaluation.held_out.from_date='2023.08.01'", "leaves no training session"),
    ("evaluation.held_out.from_date='2024.01.01'", "no session is held out"),
])
def test_a_cut_that_leaves_nothing_is_refused(cut, message):
    with pytest.raises(UserError, match=message):
        protocols.held_out_sessions(SESSIONS, config_with(cut))


def test_select_trials_keeps_training_sessions_and_adds_labelled_held_out_trials():
    config = config_with("evaluation.protocol=cross_session", "evaluation.held_out.last_sessions=1")
    trials = {"train": [trial(s, i) for s in SESSIONS for i in range(3)],
              "val": [trial(s, 10, "val") for s in SESSIONS],
              "test": [trial(s, 20, "test", sentence=None) for s in SESSIONS]}
    selected = protocols.select_trials(trials, config)
    assert sorted(selected) == ["held_out/train", "held_out/val", "train", "val"]  # the unlabeled test: none
    assert {t.session for t in selected["train"] + selected["val"]} == set(SESSIONS[:4])
    assert {t.session for t in selected["held_out/train"]} == {SESSIONS[4]} and len(selected["held_out/train"]) == 3


def test_training_subsets_are_per_session_seeded_and_nested():
    trials = [trial(s, i) for s in SESSIONS[:2] for i in range(20)]
    quarter = protocols.training_subset(trials, 0.25, seed=1)
    half = protocols.training_subset(trials, 0.5, seed=1)
    assert [sum(t.session == s for t in quarter) for s in SESSIONS[:2]] == [5, 5]
    assert set(quarter) <= set(half) and len(half) == 20
    assert protocols.training_subset(trials, 0.25, seed=1) == quarter  # seeded
    assert protocols.training_subset(trials, 0.25, seed=2) != quarter
    assert len(protocols.training_subset(trials[:3], 0.1, seed=1)) == 1  # at least one per session


# ------------------------------------------------------------------------------------------ day layers


class DayModel(torch.nn.Module):
    def __init__(self, n_days, width=3):
        super().__init__()
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.full((width, width), float(d + 1))) for d in range(n_days))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.full((1, width), float(d + 1))) for d in range(n_days))

    def day_layer_parameters(self, day):
        return self.w[day], self.b[day]


@pytest.mark.parametrize("policy, weight, bias", [
    ("nearest_previous", torch.full((3, 3), 3.0), torch.full((1, 3), 3.0)),  # the third session: the last trained
    ("mean", torch.full((3, 3), 2.0), torch.full((1, 3), 2.0)),  # (1 + 2 + 3) / 3
    ("identity", torch.eye(3), torch.zeros(1, 3)),
])
def test_day_layer_policies(policy, weight, bias):
    model = DayModel(5)
    sources = protocols.day_layer_sources(SESSIONS, SESSIONS[:3], SESSIONS[3:], policy)
    assert protocols.set_day_layers(model, SESSIONS, sources, policy, SESSIONS[:3])
    for day in (3, 4):
        assert torch.equal(model.w[day], weight) and torch.equal(model.b[day], bias)
    assert torch.equal(model.w[0], torch.full((3, 3), 1.0))  # training sessions untouched
    if policy == "nearest_previous":
        assert sources == {SESSIONS[3]: SESSIONS[2], SESSIONS[4]: SESSIONS[2]}


# ------------------------------------------------------------------------------------------ recalibration draws


def test_calibration_draws_are_disjoint_seeded_and_differ_between_draws():
    cal, rest = recalibration.calibration_draw(20, 5, 1, seed=0)
    assert len(cal) == 5 and len(rest) == 15 and not set(cal) & set(rest) and set(cal) | set(rest) == set(range(20))
    assert recalibration.calibration_draw(20, 5, 1, seed=0) == (cal, rest)
    assert recalibration.calibration_draw(20, 5, 2, seed=0)[0] != cal
    assert recalibration.calibration_draw(20, 0, 1, seed=0) == ([], list(range(20)))


def test_k_as_large_as_a_held_out_session_is_refused():
    config = config_with("evaluation.protocol=recalibration", "evaluation.held_out.last_sessions=1",
                         "evaluation.recalibration.k=[0,3]")
    trials = {"held_out/val": [trial(SESSIONS[4], i, "val") for i in range(3)]}
    with pytest.raises(UserError, match="k has 3, but held-out session t15.2023.10.01 has only 3"):
        recalibration.check_k(config, trials)


# ------------------------------------------------------------------------------------------ groups and summaries


def test_group_members_cross_seeds_with_the_protocol_axis():
    config = config_with("evaluation.protocol=data_scaling", "evaluation.data_scaling.fractions=[0.5,1.0]")
    members = plan_members(config, [1, 2])
    assert [m.name for m in members] == ["seed-1_fraction-0.5", "seed-1_fraction-1", "seed-2_fraction-0.5",
                                         "seed-2_fraction-1"]
    assert members[2].overrides == ["training_params.seed=2", "data_params.seed=2", "evaluation.protocol=fixed",
                                    "data_params.train_fraction=0.5"]
    recal = plan_members(config_with("evaluation.protocol=recalibration", "evaluation.held_out.last_sessions=1"), [])
    assert [(m.name, m.prefix, m.recalibrate) for m in recal] == [("base", "", True)]


def test_pooled_point_averages_each_trial_over_runs_before_summing():
    def frame(edits):
        return pd.DataFrame({"split": "val", "session": "s", "block_num": 1, "trial_num": [0, 1],
                             "phoneme_edits": edits, "phoneme_count": [10.0, 30.0]})

    point = pooled_point([frame([2.0, 6.0]), frame([4.0, 12.0])], "per", n_resamples=200)
    # per trial: (2 + 4) / 2 = 3 and (6 + 12) / 2 = 9 errors; (3 + 9) / 40
    assert point["value"] == pytest.approx(12 / 40)
    assert point["sd"] == pytest.approx(np.std([8 / 40, 16 / 40], ddof=1))
    assert (point["n_runs"], point["n_trials"]) == (2, 2)
    assert pooled_point([frame([2.0, 6.0])], "wer") is None


# ------------------------------------------------------------------------------------------ end to end


def cli(*args):
    return main.main(["run", "--config", CONFIG, *[a for s in FAST for a in ("--set", s)], *args])


def test_cross_session_run_decodes_the_held_out_sessions(synthetic_dataset, tmp_path):
    out = tmp_path / "cs"
    assert cli("--set", f"data_params.data_dir={synthetic_dataset}", "--set", "evaluation.protocol=cross_session",
               "--set", "evaluation.held_out.last_sessions=2", "--set", "evaluation.held_out.day_layer=mean",
               "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    section = metrics["protocol"]
    sessions = sorted(p.name for p in synthetic_dataset.iterdir() if p.is_dir())
    assert section["held_out_sessions"] == sessions[2:] and section["train_sessions"] == sessions[:2]
    assert section["day_layer"] == "mean"
    rows = pd.read_csv(out / "per_trial.csv")
    assert set(rows["session"]) == set(sessions[2:])  # only the held-out sessions are decoded
    assert rows["reference_text"].notna().all()  # every labelled trial, none unlabeled
    days = {r["session"]: r["days_since_training"] for r in section["by_days_since_training"]}
    assert days == {s: protocols.days_between(sessions[1], s) for s in sessions[2:]}
    assert set(rows["days_since_training"]) == set(days.values())
    assert section["held_out"]["n_trials"] == len(rows)
    from harness.train import load_checkpoint
    weights = load_checkpoint(out / "checkpoints" / "best.pt")["model"]
    assert not torch.equal(weights["day_weights.0"], torch.eye(512))  # trained
    # evaluate sets the held-out day layers as the run did: the same decodes of the held-out val trials
    assert main.main(["evaluate", "--checkpoint", str(out), "--data-dir", str(synthetic_dataset), "--split", "val",
                      "--out", str(tmp_path / "eval")]) == 0
    again = pd.read_csv(tmp_path / "eval" / "per_trial.csv").set_index(["session", "block_num", "trial_num"])
    held = rows[rows["split"] == "val"].set_index(["session", "block_num", "trial_num"])
    assert len(held) and (again.loc[held.index, "predicted_phonemes"] == held["predicted_phonemes"]).all()


def test_recalibration_group_end_to_end_and_resume(synthetic_dataset, tmp_path):
    out = tmp_path / "recal"
    common = ["--set", f"data_params.data_dir={synthetic_dataset}", "--set", "evaluation.protocol=recalibration",
              "--set", "evaluation.held_out.last_sessions=1", "--set", "evaluation.recalibration.k=[0,2]",
              "--set", "evaluation.recalibration.draws=2", "--set", "evaluation.recalibration.steps=2"]
    assert cli(*common, "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "k-2_draw-1", "k-2_draw-2"]
    assert (out / "DONE").is_file() and (out / "summary.png").is_file()
    base = pd.read_csv(out / "base" / "per_trial.csv")
    first = json.loads((out / "k-2_draw-1" / "metrics.json").read_text())
    calibrated = {tuple(map(str, key)) for keys in first["protocol"]["calibration_trials"].values() for key in keys}
    assert len(calibrated) == 2
    rows = pd.read_csv(out / "k-2_draw-1" / "per_trial.csv")
    assert len(rows) == len(base) - 2  # the rest of the held-out session
    decoded = {(r.split, r.session, str(r.block_num), str(r.trial_num)) for r in rows.itertuples()}
    assert not decoded & {(k[0], k[1], k[2], k[3]) for k in calibrated}
    assert "recalibration k=2, draw 1" in (out / "k-2_draw-1" / "run.log").read_text()
    assert first["run"]["n_train_trials"] == json.loads((out / "base" / "metrics.json").read_text())["run"]["n_train_trials"]
    fingerprints = [json.loads((out / name / "meta.json").read_text())["data_fingerprint"] for name in ("base", "k-2_draw-1")]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]  # compare matches the folders of one group
    summary = pd.read_csv(out / "summary.csv")
    per = summary[summary["metric"] == "per"]
    assert list(per["x"]) == [0, 2] and list(per["n_runs"]) == [1, 2]
    # a killed fine-tune: --resume redoes only what is unfinished, then the summary
    (out / "DONE").unlink()
    (out / "k-2_draw-2" / "DONE").unlink()
    before = (out / "k-2_draw-1" / "metrics.json").stat().st_mtime_ns
    assert main.main(["run", "--resume", "--out", str(out)]) == 0
    assert (out / "DONE").is_file() and (out / "k-2_draw-2" / "DONE").is_file()
    assert (out / "k-2_draw-1" / "metrics.json").stat().st_mtime_ns == before


def test_seeds_of_data_scaling_make_one_group(synthetic_dataset, tmp_path):
    out = tmp_path / "scaling"
    assert cli("--set", f"data_params.data_dir={synthetic_dataset}", "--set", "evaluation.protocol=data_scaling",
               "--set", "evaluation.data_scaling.fractions=[0.5,1.0]", "--seeds", "1,2", "--out", str(out)) == 0
    runs = {p.name: json.loads((p / "metrics.json").read_text())["run"] for p in out.iterdir() if p.is_dir()}
    assert sorted(runs) == ["seed-1_fraction-0.5", "seed-1_fraction-1", "seed-2_fraction-0.5", "seed-2_fraction-1"]
    assert runs["seed-1_fraction-0.5"]["n_train_trials"] * 2 == pytest.approx(runs["seed-1_fraction-1"]["n_train_trials"], abs=4)
    config = load_config(out / "seed-2_fraction-0.5" / "config.yaml")
    assert (config.training_params.seed, config.data_params.seed, config.data_params.train_fraction) == (2, 2, 0.5)
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["x"]) == {0.5, 1.0} and set(summary["n_runs"]) == {2}


@pytest.mark.parametrize("sets, message", [
    (["evaluation.protocol=cross_session"], "--set evaluation.protocol: cross_session needs a cut"),
    (["evaluation.protocol=cross_session", "evaluation.held_out.last_sessions=4"], "leaves no training session"),
    (["evaluation.protocol=cross_session", "evaluation.held_out.last_sessions=1",
      "evaluation.held_out.day_layer=nearest"], "(did you mean 'nearest_previous'?)"),
    (["evaluation.protocol=recalibration", "evaluation.held_out.last_sessions=1", "evaluation.recalibration.k=[0,500]"],
     "k has 500"),
])
def test_bad_protocol_input_is_one_line_and_makes_nothing(synthetic_dataset, tmp_path, capsys, sets, message):
    out = tmp_path / "never"
    args = [a for s in [f"data_params.data_dir={synthetic_dataset}", *sets] for a in ("--set", s)]
    assert cli(*args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_a_group_checks_every_member_before_its_folder_exists(synthetic_dataset, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli("--set", f"data_params.data_dir={synthetic_dataset}", "--set", "evaluation.protocol=cross_session",
               "--set", "evaluation.held_out.from_date=2030.01.01", "--seeds", "1,2", "--out", str(out)) == 2
    assert "no session is held out" in capsys.readouterr().err
    assert not out.exists()
    assert cli("--set", f"data_params.data_dir={synthetic_dataset}", "--seeds", "1,x", "--out", str(out)) == 2
    assert cli("--set", f"data_params.data_dir={synthetic_dataset}", "--seeds", "1,2", "--sweep",
               "training_params.lr_max=0.1,0.2", "--out", str(out)) == 2
    assert "sweep the seed as well" in capsys.readouterr().err
    assert not out.exists()


def test_a_group_is_refused_under_torchrun(synthetic_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "never"
    assert cli("--set", f"data_params.data_dir={synthetic_dataset}", "--seeds", "1,2", "--out", str(out)) == 2
    assert "not under torchrun" in capsys.readouterr().err and not out.exists()
