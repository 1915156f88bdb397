"""training_params.ema_decay: an exponential moving average of the weights (harness/train.py, WeightAverage).

The raw weights after every optimizer step are read by an optimizer step hook, independently of the
average's own code, and the average is computed from them by hand. The model is the tiny CTC plugin
of tests/tiny_plugin on small_dataset, in process.
"""

import csv

import pytest
import torch

import harness.train
import main
from config import TrainingParams, load_config
from harness import runner
from harness.errors import UserError
from harness.plugins import load_plugins
from tests.conftest import TINY_CONFIG

load_plugins()  # the in-process checks read configs that name the test plugin's model

DECAY = 0.8


def record_raw_weights(monkeypatch) -> list[dict]:
    """The model's parameters after every optimizer step of the next runs, one dict per step."""
    steps = []
    real_build = harness.train.build_optimizer

    def build(model, tp):
        optimizer, scheduler = real_build(model, tp)
        optimizer.register_step_post_hook(
            lambda *_: steps.append({n: p.detach().clone() for n, p in model.named_parameters()}))
        return optimizer, scheduler

    monkeypatch.setattr(harness.train, "build_optimizer", build)
    return steps


def by_hand(steps: list[dict], decay: float) -> list[dict]:
    """The average after each step: the weights after step 1, then decay * average + (1 - decay) * weights."""
    averages = [{n: w.double() for n, w in steps[0].items()}]
    for weights in steps[1:]:
        averages.append({n: decay * averages[-1][n] + (1 - decay) * w.double() for n, w in weights.items()})
    return averages


def averaged_weights(checkpoint: dict) -> dict:
    """last.pt's average as model weights (its "ema" is AveragedModel's state: n_averaged, module.<name>)."""
    return {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}


def load(path):
    return torch.load(path, weights_only=True)


def predictions(run_dir, split="val") -> list[str]:
    with open(run_dir / "per_trial.csv", newline="") as f:
        return [row["predicted_phonemes"] for row in csv.DictReader(f) if row["split"] == split]


def run(data, out, *sets) -> object:
    return runner.run(str(TINY_CONFIG), [f"data_params.data_dir={data}", "evaluation.splits=[val]", *sets],
                      str(out), False, False)


def test_the_average_is_the_exponential_average_of_the_weights_after_each_optimizer_step(
        small_dataset, tmp_path, monkeypatch):
    steps = record_raw_weights(monkeypatch)
    out = run(small_dataset, tmp_path / "run", "training_params.num_steps=6", "training_params.grad_accum_steps=2",
              "training_params.val_every=3", "training_params.checkpoint_every=0", f"training_params.ema_decay={DECAY}")
    assert len(steps) == 6  # one update per optimizer step, not per micro-batch (12 batches)
    last = load(out / "checkpoints" / "last.pt")
    assert int(last["ema"]["n_averaged"]) == 6
    expected = by_hand(steps, DECAY)
    average = averaged_weights(last)
    assert set(average) == set(steps[0])  # every trainable parameter (the tiny model has no buffers)
    for name, value in average.items():
        assert torch.allclose(value.double(), expected[-1][name], rtol=1e-5, atol=1e-6), name
        assert torch.equal(last["model"][name], steps[-1][name]), name  # last.pt's "model": the trained weights
    assert any(not torch.allclose(average[n], steps[-1][n], atol=1e-3) for n in average)  # not the weights

    best = load(out / "checkpoints" / "best.pt")
    best_step = last["train_state"]["best_step"]
    assert best_step in (3, 6) and "ema" not in best
    for name in average:  # best.pt's "model": the average at the best validation
        assert torch.allclose(best["model"][name].double(), expected[best_step - 1][name], rtol=1e-5, atol=1e-6)


def test_best_pt_and_the_decoding_use_the_average(small_dataset, tmp_path):
    sets = ["training_params.val_every=0"]  # validated once, at the end: best.pt holds the final average
    # the final decoding with the last weights: those the model ends training with, the average
    on = run(small_dataset, tmp_path / "on", *sets, f"training_params.ema_decay={DECAY}",
             "evaluation.use_best_checkpoint=false")
    off = run(small_dataset, tmp_path / "off", *sets)
    last_on, best_on = load(on / "checkpoints" / "last.pt"), load(on / "checkpoints" / "best.pt")
    last_off = load(off / "checkpoints" / "last.pt")
    assert "ema" not in last_off and load_config(off / "config.yaml").training_params.ema_decay is None
    for name, value in averaged_weights(last_on).items():
        assert torch.equal(best_on["model"][name], value), name
    for name, value in last_off["model"].items():  # the average changes nothing of the training itself
        assert torch.equal(last_on["model"][name], value), name
    assert predictions(on) != predictions(off)

    # `evaluate` of best.pt (the averaged weights) gives the run's predictions; of last.pt (the trained
    # weights), the ema-off run's
    evaluated = runner.evaluate(str(on / "checkpoints" / "best.pt"), str(small_dataset), "val", str(tmp_path / "eval"),
                                None)
    assert predictions(evaluated) == predictions(on)
    evaluated = runner.evaluate(str(on / "checkpoints" / "last.pt"), str(small_dataset), "val",
                                str(tmp_path / "eval_last"), None)
    assert predictions(evaluated) == predictions(off)


def interrupt_after_step(monkeypatch, step: int):
    real_save = harness.train.save_checkpoint

    def crash(path, payload):
        real_save(path, payload)
        if path.name == "last.pt" and payload["train_state"]["step"] == step:
            raise KeyboardInterrupt  # as if killed right after the checkpoint

    monkeypatch.setattr(harness.train, "save_checkpoint", crash)
    return real_save


def test_resume_after_interruption_matches_an_uninterrupted_run(small_dataset, tmp_path, monkeypatch):
    sets = ["training_params.checkpoint_every=5", "training_params.val_every=10", f"training_params.ema_decay={DECAY}"]
    straight = run(small_dataset, tmp_path / "straight", *sets)

    real_save = interrupt_after_step(monkeypatch, 5)  # between two validations
    with pytest.raises(KeyboardInterrupt):
        run(small_dataset, tmp_path / "resumed", *sets)
    assert int(load(tmp_path / "resumed" / "checkpoints" / "last.pt")["ema"]["n_averaged"]) == 5
    monkeypatch.setattr(harness.train, "save_checkpoint", real_save)
    resumed = runner.run(None, [], str(tmp_path / "resumed"), True, False)

    a, b = load(straight / "checkpoints" / "last.pt"), load(resumed / "checkpoints" / "last.pt")
    assert a["train_state"] == b["train_state"] and a["train_state"]["step"] == 20
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert set(a["ema"]) == set(b["ema"]) and int(b["ema"]["n_averaged"]) == 20
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    best_a, best_b = load(straight / "checkpoints" / "best.pt"), load(resumed / "checkpoints" / "best.pt")
    for key in best_a["model"]:
        assert torch.equal(best_a["model"][key], best_b["model"][key]), key
    assert (straight / "per_trial.csv").read_text() == (resumed / "per_trial.csv").read_text()


def test_resuming_with_an_average_from_a_checkpoint_without_one_is_refused(small_dataset, tmp_path, monkeypatch):
    """A config.yaml edited to turn the average on: starting it from the resumed weights would not be the
    run's average, so the resume stops with one line."""
    out = tmp_path / "run"
    real_save = interrupt_after_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(small_dataset, out, "training_params.checkpoint_every=5")
    monkeypatch.setattr(harness.train, "save_checkpoint", real_save)
    text = (out / "config.yaml").read_text()
    assert text.count("  ema_decay: null\n") == 1
    (out / "config.yaml").write_text(text.replace("  ema_decay: null\n", f"  ema_decay: {DECAY}\n"))
    with pytest.raises(UserError, match=r"last\.pt: holds no average of the weights, and training_params\.ema_decay "
                                        r"is set: resume with ema_decay: null"):
        runner.run(None, [], str(out), True, False)


@pytest.mark.parametrize("value", ["1.5", "0", "1", "-0.5", ".nan"])
def test_a_decay_outside_0_1_is_refused_in_one_line(value, capsys):
    with pytest.raises(UserError) as error:
        load_config(TINY_CONFIG, [f"training_params.ema_decay={value}"])
    message = str(error.value)
    assert message.startswith("--set training_params.ema_decay: is ") and "\n" not in message, message
    assert message.endswith("it must be above 0 and below 1 (null: no average)"), message

    assert main.main(["run", "--config", str(TINY_CONFIG), "--set", f"training_params.ema_decay={value}"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_average_is_off_by_default():
    assert TrainingParams().ema_decay is None
    assert load_config(TINY_CONFIG).training_params.ema_decay is None
    for value in ["0.5", "0.999", "null"]:
        load_config(TINY_CONFIG, [f"training_params.ema_decay={value}"])
