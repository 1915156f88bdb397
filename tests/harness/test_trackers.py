"""Issue 17: experiment trackers (output.trackers). TensorBoard gets the hyperparameters, a text panel
of example decodes and figures at every validation; wandb (offline) and MLflow (a file store in the
run folder) get the config, the scalars and the final metrics, and a resumed run goes on in the same
wandb and MLflow run; a tracker that is not installed is one line before the run folder exists.

wandb and MLflow are optional packages: their tests are skipped where they are not installed. Every
tracker writes only inside the run folder and nothing leaves the machine (wandb offline, its system
monitor off, MLflow's local file store)."""

import importlib.util
import json
import logging
import struct
import sys

import pytest

import main
from config import OutputParams
from harness import runner, trackers
from harness.plugins import load_plugins
from tests.conftest import REPO_ROOT, TINY_CONFIG, write_small_dataset

load_plugins()
HAVE = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name)]  # the trackers extra


def offline(monkeypatch, base) -> None:
    """Offline, hermetic trackers: no user settings, wandb's home in a temp folder."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_CONSOLE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    home = base / "wandb_home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home))
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # no system monitor: nothing probed, less to run
    monkeypatch.setenv("WANDB__DISABLE_MACHINE_INFO", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets; restored after the test


@pytest.fixture(autouse=True)
def tracker_env(monkeypatch, tmp_path_factory):
    offline(monkeypatch, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", autouse=True)
def wandb_service_stops():
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # the wandb-core process the runs started


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_small_dataset(tmp_path_factory.mktemp("trackers_data") / "hdf5_data_final")


def run(dataset, out, *sets, config=TINY_CONFIG, resume=False):
    return runner.run(str(config) if config else None, [f"data_params.data_dir={dataset}", *sets] if config else [],
                      str(out), resume, False)


@pytest.fixture(scope="module")
def tracked_run(dataset, tmp_path_factory):
    """The tiny model (20 steps, validations at 10 and 20) with every tracker installed here."""
    names = ["tensorboard", *HAVE]
    with pytest.MonkeyPatch.context() as patch:
        offline(patch, tmp_path_factory.getbasetemp())
        return run(dataset, tmp_path_factory.mktemp("tracked") / "run", f"output.trackers=[{', '.join(names)}]")


# ----------------------------------------------------------------------------------------------
# TensorBoard


def event_accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_gets_hparams_example_decodes_and_the_per_session_figure(tracked_run):
    events = event_accumulator(tracked_run / "tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["training_params.lr_max"].number_value == pytest.approx(0.01)
    assert start.hparams["model_constructor_name"].string_value == "tiny_ctc"
    assert json.loads(start.hparams["evaluation.splits"].string_value) == ["val", "test"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    shown = {m.name.tag for m in experiment.metric_infos}
    assert {"val/loss", "val/per", "final/val/per", "final/test/wer"} <= shown

    texts = events.Tensors("val/examples/text_summary")
    assert [t.step for t in texts] == [10, 20]
    panels = [t.tensor_proto.string_val[0].decode() for t in texts]
    assert panels[0].startswith("| trial | reference | predicted | errors |")
    trials = [[line.split(" | ")[0] for line in panel.splitlines()[2:]] for panel in panels]
    assert trials[0] == trials[1] and len(trials[0]) == 4  # the same trials at every validation
    assert {t.split(" block")[0].lstrip("| ") for t in trials[0]} == {"t15.2023.08.13", "t15.2023.08.18"}
    assert "phonemes" in panels[0] and "SIL" in panels[0]  # the tiny model writes phonemes, no text

    images = events.Images("val/per_session")
    assert [i.step for i in images] == [10, 20] and images[0].encoded_image_string.startswith(b"\x89PNG")
    final = events.Scalars("final/val/per")
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert [(s.step, s.value) for s in final] == [(20, pytest.approx(metrics["val"]["per"]))]
    assert {s.step for s in events.Scalars("train/loss")} == {5, 10, 15, 20}


def test_gru_align_draws_its_brain_vs_target_similarity(dataset, tmp_path):
    out = run(dataset, tmp_path / "run", "training_params.num_steps=2", "training_params.val_every=2",
              "data_params.batch_size=4", "data_params.days_per_batch=2", "evaluation.splits=[val]",
              "evaluation.bootstrap_resamples=0", "training_params.progress_bar=false",
              config=REPO_ROOT / "configs" / "gru_align" / "tiny.yml")
    events = event_accumulator(out / "tensorboard")
    assert set(events.Tags()["images"]) == {"val/per_session", "val/brain_target_similarity"}
    [image] = events.Images("val/brain_target_similarity")
    assert image.step == 2 and image.encoded_image_string.startswith(b"\x89PNG")
    panel = events.Tensors("val/examples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "Sentence number" in panel and "words" in panel  # retrieval writes text


def test_the_similarity_figure_is_brain_frames_by_target_frames():
    import torch

    from alignment.losses import LossWeights
    from audio_alignment.model import GRUAlign, GRUAlignParams
    from config import EvaluationParams
    from tests.audio_alignment.test_gru_align import HeldTargets, make_batch

    torch.manual_seed(0)
    targets = {"one": torch.randn(9, 6).half(), "two": torch.randn(5, 6).half()}
    p = GRUAlignParams(n_days=1, n_features=8, n_units=12, n_layers=1, patch_size=4, patch_stride=2, rnn_dropout=0.0,
                       loss_weights=LossWeights(cosine=1.0, infonce=1.0))
    model = GRUAlign(p, HeldTargets(targets, 6), EvaluationParams(bootstrap_resamples=0)).eval()
    with torch.no_grad():
        figures = model.validation_figures(make_batch(torch.randn(2, 20, 8), torch.tensor([20, 12]), ["one", "two"]))
    [image] = figures["brain_target_similarity"].axes[0].images
    similarity = image.get_array()
    assert similarity.shape == (9, 9)  # (20 - 4) / 2 + 1 patches of the first trial, 9 target frames
    assert abs(similarity).max() <= 1 + 1e-6


# ----------------------------------------------------------------------------------------------
# wandb and MLflow


def wandb_records(path):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_run(folder):
    """(config, [history rows], summary) of every offline run file under folder/wandb, in order."""
    config, history, summary = {}, [], {}
    for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update(wandb_items(record.run.config.update))
            elif kind == "history":
                history.append(wandb_items(record.history.item))
            elif kind == "summary":
                summary.update(wandb_items(record.summary.update))
    return config, history, summary


@pytest.mark.skipif("wandb" not in HAVE, reason="wandb is not installed (the trackers extra)")
def test_wandb_offline_writes_its_run_in_the_run_folder(tracked_run):
    run_id = json.loads((tracked_run / trackers.IDS_FILE).read_text())["wandb"]["run_id"]
    [offline] = (tracked_run / "wandb").glob("offline-run-*")
    assert offline.name.endswith(f"-{run_id}") and (offline / f"run-{run_id}.wandb").is_file()
    config, history, summary = wandb_run(tracked_run)
    assert config["training_params"]["lr_max"] == 0.01 and config["model_constructor_name"] == "tiny_ctc"
    losses = [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row]
    assert [step for step, _ in losses] == [5, 10, 15, 20]
    assert [row["_step"] for row in history if "val/per" in row] == [10, 20]
    tables = [row["val/examples/path"] for row in history if row.get("val/examples/_type") == "table-file"]
    images = [row["val/per_session/path"] for row in history if row.get("val/per_session/_type") == "image-file"]
    assert len(tables) == len(images) == 2 and all((offline / "files" / p).is_file() for p in tables + images)
    assert json.loads((offline / "files" / tables[0]).read_text())["columns"] == ["trial", "reference", "predicted",
                                                                                  "errors"]
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert summary["final/val/per"] == pytest.approx(metrics["val"]["per"])
    assert summary["final/run/steps"] == 20


def mlflow_client(folder):
    from mlflow import MlflowClient

    ids = json.loads((folder / trackers.IDS_FILE).read_text())["mlflow"]
    assert ids["tracking_uri"] == (folder / "mlruns").absolute().as_uri()
    return MlflowClient(tracking_uri=ids["tracking_uri"]), ids


@pytest.mark.skipif("mlflow" not in HAVE, reason="mlflow is not installed (the trackers extra)")
def test_mlflow_local_store_has_params_metrics_and_final_metrics(tracked_run):
    client, ids = mlflow_client(tracked_run)
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert run.data.params["training_params.lr_max"] == "0.01"
    assert json.loads(run.data.params["data_params.preprocessors"])[0]["name"] == "scale_features"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20]
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert run.data.metrics["final/val/per"] == pytest.approx(metrics["val"]["per"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "val"} <= artifacts
    shown = {a.path for a in client.list_artifacts(run.info.run_id, "val/examples")}
    assert shown == {"val/examples/step_0000010.md", "val/examples/step_0000020.md"}


@pytest.mark.skipif(len(HAVE) < 2, reason="wandb and mlflow are not installed (the trackers extra)")
def test_a_resumed_run_goes_on_in_the_same_wandb_and_mlflow_runs(dataset, tmp_path, monkeypatch):
    import harness.train

    log_step = harness.train.log_step

    def killed_at_step_15(losses, grad_norm, optimizer, state, *args):
        if state.step == 15:
            raise RuntimeError("killed")  # after last.pt at step 10
        return log_step(losses, grad_norm, optimizer, state, *args)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(harness.train, "log_step", killed_at_step_15)
        with pytest.raises(RuntimeError, match="killed"):
            run(dataset, out, "output.trackers=[wandb, mlflow]")
    ids = json.loads((out / trackers.IDS_FILE).read_text())
    client, _ = mlflow_client(out)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FAILED"
    run(dataset, out, config=None, resume=True)

    assert json.loads((out / trackers.IDS_FILE).read_text()) == ids
    assert [p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")] == [ids["wandb"]["run_id"]] * 2
    _, history, summary = wandb_run(out)
    assert [row["_step"] for row in history if "train/loss" in row] == [5, 10, 15, 20]  # 5, 10, then 15, 20
    assert summary["final/run/steps"] == 20
    [mlflow_run] = client.search_runs([ids["mlflow"]["experiment_id"]])
    assert mlflow_run.info.run_id == ids["mlflow"]["run_id"] and mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")] == [5, 10, 15, 20]
    assert "final/val/per" in mlflow_run.data.metrics


# ----------------------------------------------------------------------------------------------
# Checks before the run folder, and the fan-out


def refused(capsys, args) -> str:
    assert main.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any(line.startswith(("error", "Traceback")) for line in err[:-1]), err
    return err[-1]


@pytest.mark.parametrize("missing", ["wandb", "mlflow"])
def test_a_tracker_not_installed_is_one_line_before_the_run_folder(dataset, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    out = tmp_path / "run"
    line = refused(capsys, ["run", "--config", TINY_CONFIG, "--set", f"data_params.data_dir={dataset}",
                            "--set", f"output.trackers=[tensorboard, {missing}]", "--out", out])
    assert f"output.trackers names {missing}" in line and "-e '.[trackers]'" in line
    assert not out.exists()


def test_an_unknown_tracker_is_one_line_before_the_run_folder(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(capsys, ["run", "--config", TINY_CONFIG, "--set", f"data_params.data_dir={dataset}",
                            "--set", "output.trackers=[tensorboard, comet]", "--out", out])
    assert "output.trackers[1]" in line and "'comet' is not one of" in line
    assert not out.exists()
    line = refused(capsys, ["run", "--config", TINY_CONFIG, "--set", f"data_params.data_dir={dataset}",
                            "--set", "output.trackers=[wandb, wandb]", "--out", out])
    assert "names a tracker twice" in line and not out.exists()


def test_tensorboard_false_still_turns_tensorboard_off():
    assert trackers.active_trackers(OutputParams()) == ["tensorboard"]
    assert trackers.active_trackers(OutputParams(tensorboard=False)) == []
    assert trackers.active_trackers(OutputParams(trackers=["wandb", "tensorboard"], tensorboard=False)) == ["wandb"]


def test_config_flattening_and_final_scalars():
    assert trackers.flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": "x"}) == {
        "a.b": 1, "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "f": "x"}
    metrics = {"val": {"per": 0.5, "per_ci": [0.4, 0.6], "wer": None, "by_session": {"s": {"per": 0.1}},
                       "targets": "log_mel"}, "run": {"steps": 20, "validation_history": []}}
    assert trackers.final_scalars(metrics) == {"final/val/per": 0.5, "final/val/per_ci_low": 0.4,
                                               "final/val/per_ci_high": 0.6, "final/run/steps": 20.0}
    assert trackers.markdown_table(["a", "b"], [["x | y", "two\nlines"]]) == "| a | b |\n|---|---|\n| x \\| y | two lines |"


def test_examples_are_spread_over_the_rows():
    rows = [{"session": f"s{i // 5}", "block_num": 1, "trial_num": i % 5} for i in range(20)]
    assert trackers.pick_examples(rows) == [("s0", 1, 0), ("s1", 1, 1), ("s2", 1, 3), ("s3", 1, 4)]
    assert trackers.pick_examples(rows[:2]) == [("s0", 1, 0), ("s0", 1, 1)]


class Broken:
    name = "broken"
    closed = None

    def scalars(self, step, values):
        raise OSError("disk full")

    def close(self, failed):
        Broken.closed = failed


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning(tmp_path, caplog):
    fan_out = trackers.Trackers([], tmp_path, None)
    fan_out.started, fan_out.trackers = True, [Broken()]
    with caplog.at_level(logging.WARNING):
        fan_out.scalars(3, {"train/loss": 1.0})
    assert not fan_out.active and Broken.closed is True
    assert "output.trackers: broken failed (OSError: disk full)" in caplog.text
    fan_out.scalars(4, {"train/loss": 1.0})  # nothing left to fail
