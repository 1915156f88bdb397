"""`compare` on decoders of several seeds, run groups and protocols, and the report's analyses.

Run folders and group folders are built by hand (tests.harness.test_compare.make_run plus a config.yaml
and, for groups, group.json / summary.json), so the answers are known and no model is trained.
"""

import json

import numpy as np
import pytest
import yaml

import main
from harness import results
from harness.compare import compare
from harness.errors import UserError
from harness.paired_stats import paired_comparison
from tests.harness.test_compare import make_run, read_csv, squeeze, trial_row

N = 40  # trials per run: above analyses.TOO_FEW_TRIALS unless a test wants fewer
COUNT = 20  # phonemes per trial
RESAMPLES = 200


@pytest.fixture(autouse=True)
def unrendered(request, monkeypatch):
    """Figures are built but not rendered (savefig is most of a comparison's time): each PNG is a stub.
    The end-to-end test draws them for real."""
    if request.function.__name__ == "test_end_to_end_on_two_groups":
        return

    def save(fig, path):
        path.write_bytes(b"not rendered")
        return path

    monkeypatch.setattr("harness.plots._save", save)


def config(seed=1, lr_max=0.01, trial="tiny", model="ctc", fraction=1.0):
    """A config.yaml as a dict: what a decoder is, its seeds, and an output path that differs per run."""
    return {"trial_name": trial, "model_constructor_name": model,
            "data_params": {"seed": seed, "train_fraction": fraction, "batch_size": 16},
            "training_params": {"seed": seed, "lr_max": lr_max, "best_metric": "per", "best_mode": "min"},
            "output": {"results_dir": f"/results/{seed}"}, "slurm": {"partition": None}}


def rows_of(edits, *, session=lambda i: f"s{i % 2}", true_rank=None, n_time_steps=None, predicted_text=""):
    """Per-trial rows with the given phoneme edits of COUNT phonemes each; real phonemes, so the confusion
    matrix stays small."""
    rows = []
    for i, e in enumerate(edits):
        row = trial_row(i, session=session(i), phonemes=(int(e), COUNT), predicted_text=predicted_text,
                        true_rank=None if true_rank is None else true_rank[i])
        row["predicted_phonemes"] = "S EH SIL" if e else "S EH N SIL"
        if n_time_steps is not None:
            row["n_time_steps"] = n_time_steps[i]
        rows.append(row)
    return rows


def member(path, edits, *, protocol=None, **kwargs):
    """A finished run folder with config(**kwargs); `protocol`: metrics.json's protocol section."""
    rows_kwargs = {k: kwargs.pop(k) for k in ("session", "true_rank", "n_time_steps", "predicted_text") if k in kwargs}
    extra = kwargs.pop("extra_metrics", None)
    by_split = kwargs.pop("by_split", None)
    run = make_run(path, rows_of(edits, **rows_kwargs), trial=kwargs.get("trial", "tiny"),
                   model=kwargs.get("model", "ctc"), extra_metrics=extra, by_split=by_split, done=False)
    results.atomic_write_text(run / "config.yaml", yaml.safe_dump(config(**kwargs)))
    if protocol is not None:
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["protocol"] = protocol
        results.write_json(run / "metrics.json", metrics)
    results.mark_done(run)
    return run


def group(path, protocol, members, *, seeds=(), axis=None, points=(), lr_max=0.01):
    """A group folder: group.json, group.yaml, summary.json (points) and DONE, around member folders
    made by the caller (members: names for group.json)."""
    path.mkdir(parents=True, exist_ok=True)
    results.write_json(path / "group.json", {
        "version": 1, "protocol": protocol, "seeds": list(seeds), "trial_name": "tiny",
        "members": [{"name": name, "overrides": [], "coords": {}, "recalibrate": protocol == "recalibration"}
                    for name in members]})
    results.atomic_write_text(path / "group.yaml", yaml.safe_dump(config(lr_max=lr_max)))
    results.write_json(path / "summary.json", {"protocol": protocol, "axis": axis, "points": list(points)})
    results.mark_done(path)
    return path


def report(out):
    return squeeze((out / "comparison.md").read_text())


def seed_edits(rng, shift):
    return np.clip(rng.binomial(COUNT, 0.4, N) + shift, 0, COUNT)


@pytest.fixture
def two_decoders(tmp_path):
    """Decoders A (lr_max 0.01) and B (lr_max 0.003), seeds 1 and 2 each: (folders, edits per run)."""
    rng = np.random.default_rng(0)
    edits = {"a1": seed_edits(rng, 0), "a2": seed_edits(rng, 1), "b1": seed_edits(rng, -2), "b2": seed_edits(rng, -1)}
    dirs = [member(tmp_path / name, edits[name], seed=int(name[1]), lr_max=0.01 if name[0] == "a" else 0.003)
            for name in ("a1", "a2", "b1", "b2")]
    return dirs, edits


# --------------------------------------------------------------------------- seeds


def test_seeds_of_one_config_are_one_decoder_with_mean_sd_and_seed_averaged_pairs(two_decoders, tmp_path):
    dirs, e = two_decoders
    out = tmp_path / "cmp"
    compare([str(d) for d in dirs], str(out), n_resamples=RESAMPLES)

    table = read_csv(out / "comparison.csv")
    assert [r["run"] for r in table] == ["tiny (lr_max=0.01)", "tiny (lr_max=0.003)"]
    for row, (x, y) in zip(table, (("a1", "a2"), ("b1", "b2"))):
        pers = [e[x].sum() / (N * COUNT), e[y].sum() / (N * COUNT)]
        assert row["n_seeds"] == "2" and row["runs"] == f"{x};{y}" and row["n_trials"] == str(N)
        assert float(row["per"]) == pytest.approx(np.mean(pers))
        assert float(row["per_sd"]) == pytest.approx(np.std(pers, ddof=1))
        assert float(row["per_ci_low"]) < float(row["per"]) < float(row["per_ci_high"])
    assert len(read_csv(out / "runs.csv")) == 4  # each run's own row is kept

    (pair,) = read_csv(out / "paired.csv")
    a, b, counts = (e["a1"] + e["a2"]) / 2, (e["b1"] + e["b2"]) / 2, np.full(N, COUNT)
    expected = paired_comparison(a, counts, b, counts, n_resamples=RESAMPLES)
    assert float(pair["difference"]) == pytest.approx((b.sum() - a.sum()) / (N * COUNT))
    assert [float(pair["difference_ci_low"]), float(pair["difference_ci_high"])] == pytest.approx(expected["difference_ci"])
    assert (int(pair["b_better"]), int(pair["a_better"])) == (expected["b_better"], expected["a_better"])
    assert (pair["n_seeds_a"], pair["n_seeds_b"], pair["n_trials"]) == ("2", "2", str(N))

    text = report(out)
    assert "| tiny (lr_max=0.01) | 2 | a1, a2 | 1, 2 |" in text  # the Decoders table
    assert "## What differs" in text and "training_params.lr_max" in text
    differs = read_csv(out / "what_differs.csv")
    assert list(differs[0]) == ["run", "n_seeds", "training_params.lr_max"]  # not the seeds, not output.*
    assert [d["training_params.lr_max"] for d in differs] == ["0.01", "0.003"]


@pytest.mark.parametrize("far", [True, False], ids=["seeds-far-apart", "seeds-close"])
def test_a_difference_within_the_seed_spread_is_flagged(tmp_path, far):
    spread = 4 if far else 0  # A's seeds at 12 and 4 edits of 20 (sd 28 pts), or both at 8
    low = np.full(N, 8 - spread)
    low[0] += 0 if far else 1  # close seeds still differ a little
    runs = [member(tmp_path / "a1", np.full(N, 8 + spread), seed=1), member(tmp_path / "a2", low, seed=2),
            member(tmp_path / "b1", np.full(N, 7), seed=1, lr_max=0.003),
            member(tmp_path / "b2", np.full(N, 7), seed=2, lr_max=0.003)]
    out = tmp_path / "cmp"
    compare([str(r) for r in runs], str(out), n_resamples=RESAMPLES)
    (pair,) = read_csv(out / "paired.csv")
    assert pair["within_seed_spread"] == str(far)
    text = report(out)
    assert "smaller than the larger of the two decoders' standard deviations" in text  # the rule, stated
    assert ("is within the seed spread**" in text) is far
    assert ("| 2 / 2 | 28.3 / 0.0 | **yes** |" if far else "| 2 / 2 | 0.1 / 0.0 | no |") in text


def test_one_run_per_decoder_keeps_the_run_names_and_no_seed_columns(tmp_path):
    runs = [member(tmp_path / "x", np.full(N, 3)), member(tmp_path / "y", np.full(N, 2), lr_max=0.003)]
    out = tmp_path / "cmp"
    compare([str(r) for r in runs], str(out), n_resamples=RESAMPLES)
    table = read_csv(out / "comparison.csv")
    assert [r["run"] for r in table] == ["x (lr_max=0.01)", "y (lr_max=0.003)"]  # same model and trial: told apart
    assert [r["n_seeds"] for r in table] == ["1", "1"] and table[0]["per_sd"] == ""
    assert "## Decoders" not in report(out) and "seeds A / B" not in report(out)


# --------------------------------------------------------------------------- groups and protocols


def test_a_group_folder_stands_for_its_finished_members(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gdir = tmp_path / "results" / "g"
    for seed in (1, 2):
        member(gdir / f"seed-{seed}", seed_edits(rng, 0), seed=seed)
    make_run(gdir / "seed-3", rows_of(seed_edits(rng, 0)), done=False)  # still running
    group(gdir, "fixed", ["seed-1", "seed-2", "seed-3"], seeds=(1, 2, 3))
    for args in ([str(gdir)], []):  # given, or found under --results-dir
        out = tmp_path / "cmp"
        compare(args, str(out), results_dir=str(tmp_path / "results"), n_resamples=RESAMPLES)
        (row,) = read_csv(out / "comparison.csv")
        assert (row["run"], row["n_seeds"], row["runs"]) == ("g", "2", "seed-1;seed-2")  # named by its group
        assert f"unfinished (no DONE), left out: {gdir / 'seed-3'}" in capsys.readouterr().out


def test_runs_of_different_protocols_are_refused(tmp_path, capsys):
    edits = np.full(N, 5)
    recal = tmp_path / "g2"
    member(recal / "base", edits, protocol={"name": "cross_session"})
    member(recal / "k-3_draw-1", edits, protocol={"name": "recalibration", "k": 3, "draw": 1})
    group(recal, "recalibration", ["base"], axis="k")
    plain = member(tmp_path / "plain", edits)
    with pytest.raises(UserError, match=r"different evaluation protocols: recalibration \(g2\) vs fixed \(plain\)"):
        compare([str(recal), str(plain)], str(tmp_path / "cmp"))
    assert main.main(["compare", str(plain), str(recal), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "fixed" in err and "recalibration" in err
    assert not (tmp_path / "cmp").exists()


def scaling_group(path, lr_max, per_by_fraction):
    names = []
    for fraction, per in per_by_fraction.items():
        name = f"fraction-{fraction:g}"
        member(path / name, np.full(N, round(per * COUNT)), fraction=fraction, lr_max=lr_max,
               by_split={"train": {"keys_hash": f"train-{fraction}"}, "val": {"keys_hash": "val"}})
        names.append(name)
    points = [{"protocol": "data_scaling", "split": "val", "axis": "fraction", "x": f, "metric": "per", "value": per,
               "ci_low": per - 0.02, "ci_high": per + 0.02, "sd": None, "n_runs": 1, "n_trials": N}
              for f, per in per_by_fraction.items()]
    return group(path, "data_scaling", names, axis="fraction", points=points, lr_max=lr_max)


def test_two_data_scaling_groups_overlay_their_curves(tmp_path):
    first = scaling_group(tmp_path / "ga", 0.01, {0.5: 0.5, 1.0: 0.4})
    second = scaling_group(tmp_path / "gb", 0.003, {0.5: 0.45, 1.0: 0.3})
    out = tmp_path / "cmp"
    compare([str(first), str(second)], str(out), n_resamples=RESAMPLES)  # train splits differ by design: compared
    assert (out / "protocol_per.png").is_file() and not (out / "protocol_wer.png").exists()
    text = report(out)
    assert "## data_scaling curves" in text and "](protocol_per.png)" in text
    runs = [r["run"] for r in read_csv(out / "comparison.csv")]
    assert runs[0] == "ga/fraction-0.5 (train_fraction=0.5, lr_max=0.01)"  # same member names: group/member
    assert len(runs) == 4


# --------------------------------------------------------------------------- report details


def test_retrieved_text_is_marked(tmp_path):
    ranks = [1, 3, 1, 2] * (N // 4)
    ranked = member(tmp_path / "ranker", np.full(N, 4), true_rank=ranks, trial="ranker", model="rank", predicted_text="a b",
                    extra_metrics={"val": {"retrieval_top1": 0.5, "retrieval_top10": 1.0, "n_candidates": 50}})
    plain = member(tmp_path / "plain", np.full(N, 5))
    out = tmp_path / "cmp"
    compare([str(ranked), str(plain)], str(out), n_resamples=RESAMPLES)
    table = {r["run"]: r for r in read_csv(out / "comparison.csv")}
    assert table["ranker"]["text_from"] == "retrieval (50 candidates)" and table["plain"]["text_from"] == "decoding"
    text = report(out)
    assert "| text from |" in text and "| retrieval (50 candidates) |" in text
    examples = text.split("## Example sentences (val)")[1]
    assert "| ranker (text, retrieved) | a b |" in examples and "| plain |" in examples and "*retrieved*" in examples
    assert (out / "retrieval_val.png").is_file()


def test_few_trials_are_warned_about(tmp_path):
    out = tmp_path / "cmp"
    compare([str(member(tmp_path / "small", np.full(6, 3)))], str(out), n_resamples=RESAMPLES)
    assert "**val: CIs from 6 trials say little**" in report(out)
    compare([str(member(tmp_path / "big", np.full(N, 3)))], str(out), n_resamples=RESAMPLES)
    assert "say little" not in report(out)


def test_training_curves_get_the_selection_metric(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("harness.compare_figures.plots.training_curves", lambda runs, path: seen.extend(runs))
    compare([str(member(tmp_path / "a", np.full(N, 3)))], str(tmp_path / "cmp"), n_resamples=RESAMPLES)
    (run,) = seen
    assert run[0] == "a" and run[3] == {"metric": "per", "mode": "min", "best_step": 100}


def test_end_to_end_on_two_groups(tmp_path, capsys):
    rng = np.random.default_rng(2)
    dated = lambda i: f"t15.2023.08.{11 + 2 * (i % 3):02d}"  # noqa: E731  days from the session names
    steps = [150 + 10 * i for i in range(N)]  # 3 to 11 s
    groups = []
    for name, lr_max, shift in (("ga", 0.01, 0), ("gb", 0.003, -2)):
        for seed in (1, 2):
            member(tmp_path / name / f"seed-{seed}", seed_edits(rng, shift), seed=seed, lr_max=lr_max,
                   session=dated, n_time_steps=steps)
        groups.append(group(tmp_path / name, "fixed", ["seed-1", "seed-2"], seeds=(1, 2), lr_max=lr_max))
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "forest_val_7_9.png").write_bytes(b"from an earlier comparison")
    assert main.main(["compare", *map(str, groups), "--out", str(out)]) == 0
    wrote = capsys.readouterr().out.splitlines()[-1]
    expected = ["comparison.md", "comparison.csv", "runs.csv", "per_corpus.csv", "paired.csv", "what_differs.csv",
                "edit_operations.csv", "per_session_val.png", "error_by_day_val.png", "error_by_length_val.png",
                "error_by_duration_val.png", "edit_operations_val.png", "forest_val_1_2.png"]
    for name in expected:
        assert (out / name).is_file() and str(out / name) in wrote, name
    confusions = sorted(p.name for p in out.glob("confusion_val_*.png"))
    assert confusions == ["confusion_val_1_ga__lr_max_0.01_.png", "confusion_val_2_gb__lr_max_0.003_.png"]
    assert not (out / "forest_val_7_9.png").exists()  # stale
    text = report(out)
    assert "days since the first session" in text
    for name in [*expected[7:], *confusions]:
        assert f"]({name})" in text, name
    assert "| gb (lr_max=0.003) | word |" not in text  # no word-level edits: phonemes only
    assert "| gb (lr_max=0.003) | phoneme |" in text
    assert {r["level"] for r in read_csv(out / "edit_operations.csv")} == {"phoneme"}


def test_wilcoxon_with_ties_on_few_trials_is_scipys_exact_test_quickly():
    """A session of a per-session comparison has a few trials, ties among them: scipy's exact permutation
    test, enumerated at once (harness.paired_stats) rather than one Python call per sign flip."""
    import warnings

    from scipy import stats

    from harness.paired_stats import wilcoxon_signed_rank

    rng = np.random.default_rng(3)
    for n in (1, 3, 5, 8, 8, 9):
        a = rng.integers(0, 4, n).astype(float)
        b = a + rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], n)
        if not np.any(b - a):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy: "sample size too small for normal approximation"
            expected = stats.wilcoxon(b - a, zero_method="wilcox")
        assert wilcoxon_signed_rank(a, b) == pytest.approx((expected.statistic, expected.pvalue), abs=1e-12)


def test_two_groups_of_one_config_stay_two_decoders_named_by_their_folders(tmp_path):
    """Two seed groups of the same config (seeds 1,2 and 1,2,3): a user compares the groups, so
    each is one decoder, named by its folder, never five runs paired against each other."""
    first, second = tmp_path / "cs_seeds", tmp_path / "cs_more"
    rng = np.random.default_rng(3)
    for folder, seeds in ((first, (1, 2)), (second, (1, 2, 3))):
        for seed in seeds:
            member(folder / f"seed-{seed}", seed_edits(rng, 0), seed=seed)
    group(first, "fixed", ["seed-1", "seed-2"], seeds=(1, 2))
    group(second, "fixed", ["seed-1", "seed-2", "seed-3"], seeds=(1, 2, 3))
    out = tmp_path / "cmp"
    compare([str(first), str(second)], str(out), n_resamples=RESAMPLES)
    rows = read_csv(out / "comparison.csv")
    assert [(r["run"], r["n_seeds"]) for r in rows] == [("cs_seeds", "2"), ("cs_more", "3")]
    assert len(read_csv(out / "paired.csv")) == len({r["metric"] for r in read_csv(out / "paired.csv")})  # one pair
