"""The pre-flight check: a model that breaks the model API contract is stopped before any run folder
exists, with one line naming its function; a sound model runs with the same results with or without it."""

import re
from dataclasses import dataclass

import pytest
import torch

from harness import runner
from harness.errors import UserError
from harness.plugins import load_plugins
from registry import register_data_preprocessor, register_model_constructor
from tests.conftest import REPO_ROOT, TINY_CONFIG
from tests.tiny_plugin import TinyCTC, TinyParams

load_plugins()


@dataclass
class BrokenParams(TinyParams):
    breach: str = "none"


class BrokenCTC(TinyCTC):
    """The tiny CTC model with one contract breach, chosen by `breach`."""

    def __init__(self, p: BrokenParams):
        super().__init__(p)
        self.breach = p.breach

    def loss(self, batch):
        out = super().loss(batch)
        if self.breach == "loss_tensor":
            return out["loss"]
        if self.breach == "loss_nan":
            return {"loss": out["loss"] * float("nan")}
        if self.breach == "loss_vector":
            return {"loss": out["loss"].repeat(3)}
        return out

    def decode(self, batch):
        rows = super().decode(batch)
        if self.breach == "rows_short":
            return rows[:-1]
        if self.breach == "rows_tuple":
            return tuple(rows)
        if self.breach == "phoneme_unknown":
            rows[0]["predicted_phonemes"] = "AA1 B"
        if self.breach == "text_bytes":
            rows[0]["predicted_text"] = b"hello"
        if self.breach == "too_many":
            rows[0]["predicted_phonemes"] = " ".join(["AA"] * (batch.lengths[0].item() + 1))
        return rows

    def evaluate(self, batch, *, with_loss, decode_words=True):
        parts, rows = super().evaluate(batch, with_loss=with_loss, decode_words=decode_words)
        if self.breach == "evaluate_rows_only":
            return rows
        if self.breach == "evaluate_no_loss":
            return None, rows
        return parts, rows


@register_model_constructor()
def broken_ctc(params: BrokenParams, ctx):
    return BrokenCTC(params)


@dataclass
class HalfParams:
    pass


@register_data_preprocessor()
def half_width_undeclared(params: HalfParams):
    """Drops half the features without saying so (no output_features)."""

    def preprocess(batch, training):
        batch.features = batch.features[..., : batch.features.shape[-1] // 2]
        return batch

    return preprocess


def run_broken(small_dataset, tmp_path, *sets):
    out = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        runner.run(str(TINY_CONFIG), [f"data_params.data_dir={small_dataset}", "model_constructor_name=broken_ctc",
                                      *sets], str(out), False, False)
    assert not out.exists(), "the pre-flight check must fail before the run folder is made"
    message = str(caught.value)
    assert "\n" not in message
    return message


# validation's call (the tiny model's rows break the contract there first)
VALIDATION = r"BrokenCTC.evaluate\(batch, with_loss=True, decode_words=False\)\[1\]"


@pytest.mark.parametrize("breach, expected", [
    ("loss_tensor", r"BrokenCTC.loss\(batch\) returned Tensor .*must return a dict with the key 'loss'"),
    ("loss_nan", r"BrokenCTC.loss\(batch\)\['loss'\] is nan .*must be finite"),
    ("loss_vector", r"BrokenCTC.loss\(batch\)\['loss'\] is Tensor .*must be a scalar tensor"),
    ("rows_short", VALIDATION + r" returned 3 rows for 4 trials"),
    ("rows_tuple", VALIDATION + r" returned tuple .*list with one dict per trial"),
    ("phoneme_unknown", VALIDATION + r"\[0\]\['predicted_phonemes'\] holds AA1, not in the phoneme inventory"),
    ("text_bytes", VALIDATION + r"\[0\]\['predicted_text'\] is bytes .*must be a str"),
    ("too_many", VALIDATION + r"\[0\] has \d+ phonemes for a trial of \d+ time steps"),
    ("evaluate_rows_only", r"BrokenCTC.evaluate\(batch, with_loss=True, decode_words=False\) returned list .*must "
                           r"return \(loss parts or None, rows\)"),
    ("evaluate_no_loss", r"BrokenCTC.evaluate\(batch, with_loss=True, decode_words=False\)\[0\] returned NoneType "
                         r"None; it must return a dict with the key 'loss'"),
])
def test_a_contract_breach_is_one_line_before_any_folder(small_dataset, tmp_path, breach, expected):
    message = run_broken(small_dataset, tmp_path, f"model_params.breach={breach}")
    assert re.search(expected, message), message


def test_an_undeclared_width_change_and_an_unknown_best_metric_are_caught(small_dataset, tmp_path):
    message = run_broken(small_dataset, tmp_path, "data_params.preprocessors=[{name: half_width_undeclared}]")
    assert "the preprocessors give 256 features per bin, but the model was built for 512" in message
    message = run_broken(small_dataset, tmp_path, "training_params.best_metric=wer_typo")
    assert "training_params.best_metric 'wer_typo' is not among the metrics validation reports" in message
    assert "per" in message  # it lists what there is


def test_the_check_changes_no_result_and_takes_little_time(small_dataset, tmp_path):
    sets = [f"data_params.data_dir={small_dataset}", "training_params.num_steps=4", "training_params.val_every=2"]
    checked = runner.run(str(TINY_CONFIG), sets, str(tmp_path / "checked"), False, False, check=True)
    unchecked = runner.run(str(TINY_CONFIG), sets, str(tmp_path / "unchecked"), False, False, check=False)
    assert (checked / "per_trial.csv").read_text() == (unchecked / "per_trial.csv").read_text()
    a = torch.load(checked / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(unchecked / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (checked / "run.log").read_text()
    assert "pre-flight check of the model" in log and "pre-flight" not in (unchecked / "run.log").read_text()


def test_the_check_alone_before_a_slurm_submission(small_dataset, capsys):
    from config import load_config

    runner.check_model(load_config(TINY_CONFIG, [f"data_params.data_dir={small_dataset}"]))
    assert re.search(r"pre-flight check of tiny_ctc on this machine's CPU: passed in \d+\.\d s", capsys.readouterr().out)
    broken = load_config(TINY_CONFIG, [f"data_params.data_dir={small_dataset}", "model_constructor_name=broken_ctc",
                                       "model_params.breach=loss_nan"])
    with pytest.raises(UserError, match="must be finite"):
        runner.check_model(broken)


def test_a_word_metric_without_validation_words_names_val_decode_words(synthetic_dataset, monkeypatch, tmp_path):
    """ctc_baseline's tiny config (lexicon + 3-gram) validates on greedy phonemes unless
    val_decode_words: a best_metric that needs its words is refused, naming the fix."""
    from config import load_config

    monkeypatch.setenv("B2T_CACHE_DIR", str(tmp_path / "cache"))
    tiny = REPO_ROOT / "configs" / "ctc_baseline" / "tiny.yml"
    sets = [f"data_params.data_dir={synthetic_dataset}", "training_params.best_metric=wer"]  # trials long enough for CTC
    with pytest.raises(UserError) as caught:
        runner.check_model(load_config(tiny, sets))
    message = str(caught.value)
    assert "\n" not in message and "'wer' is not among the metrics validation reports for CTCBaseline" in message
    assert "training_params.val_decode_words: true" in message and "per" in message
    runner.check_model(load_config(tiny, [*sets, "training_params.val_decode_words=true"]))  # passes
    # a word decoder that writes no words: val_decode_words would not help, so it is not named
    with pytest.raises(UserError) as caught:
        runner.check_model(load_config(tiny, [*sets, "model_params.word_decoder={name: greedy}"]))
    assert "val_decode_words" not in str(caught.value)
