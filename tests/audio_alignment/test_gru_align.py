"""gru_align through the harness: padding never enters the loss or the scores, retrieval results
follow the contract, the target cache is reused, the full-size config builds with tiny stand-ins
for mms-tts and Qwen2-Audio, and the tiny config learns far above chance."""

import csv
import importlib.util
import json
import re
from dataclasses import replace

import pytest
import torch

from alignment.losses import LossWeights
from audio_alignment.model import GRUAlign, GRUAlignParams
from config import EvaluationParams
from harness import runner
from harness.batching import Batch
from harness.data import Trial
from harness.errors import UserError
from tests.alignment.test_audio_targets import qwen2_folders, tiny_vits  # noqa: F401  (fixtures)
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "gru_align"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Target caches of these tests live in one temp folder, not in the repo's .cache/."""
    monkeypatch.setenv("B2T_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "b2t_cache"))


class HeldTargets:
    """A stand-in TargetStore: fixed frames, no TTS."""

    def __init__(self, frames: dict, dim: int):
        self.frames, self.dim, self.name = frames, dim, "held_test_targets"

    def get(self, sentences):
        return {s: self.frames[s] for s in sentences}


def make_batch(features, lengths, sentences, phonemes=None):
    trials = [Trial(split="val", session="s", day=0, path="", group=f"trial_{i:04d}", block_num=1, trial_num=i,
                    n_time_steps=int(n), phoneme_ids=None, sentence=s)
              for i, (n, s) in enumerate(zip(lengths.tolist(), sentences))]
    ids = lengths_ids = None
    if phonemes is not None:
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in phonemes], batch_first=True)
        lengths_ids = torch.tensor([len(p) for p in phonemes])
    return Batch(features=features, lengths=lengths, day_indices=torch.zeros(len(lengths), dtype=torch.int64),
                 phoneme_ids=ids, phoneme_lengths=lengths_ids, sentences=list(sentences), trials=trials)


@pytest.mark.parametrize("pack", [False, True])
def test_padding_never_enters_the_loss_or_the_retrieval_scores(pack):
    torch.manual_seed(0)
    sentences = ["one", "two", "three"]
    targets = {s: torch.randn(n, 6).half() for s, n in zip(sentences, (5, 9, 3))}
    p = GRUAlignParams(n_days=1, n_features=8, n_units=12, n_layers=2, patch_size=4, patch_stride=2,
                       input_dropout=0.0, rnn_dropout=0.0, pack_sequences=pack, align_frames=7,
                       loss_weights=LossWeights(cosine=1.0, infonce=1.0, ctc=0.5))
    model = GRUAlign(p, HeldTargets(targets, 6), EvaluationParams(bootstrap_resamples=0)).eval()
    lengths = torch.tensor([20, 11, 6])
    features = torch.randn(3, 20, 8)
    mask = (torch.arange(20)[None, :] < lengths[:, None]).unsqueeze(2)
    phonemes = [[3, 40], [5, 6, 40], [7]]
    clean = make_batch(features * mask, lengths, sentences, phonemes)
    noisy = make_batch(torch.where(mask, features, torch.full_like(features, 50.0)), lengths, sentences, phonemes)
    model.prepare_split("val", clean.trials)
    a, b = model.loss(clean), model.loss(noisy)
    for key in ("loss", "cosine", "infonce", "ctc"):
        torch.testing.assert_close(a[key], b[key])
    ra, rb = model.decode(clean), model.decode(noisy)
    assert [r["true_rank"] for r in ra] == [r["true_rank"] for r in rb]
    assert [r["retrieval_similarity"] for r in ra] == [r["retrieval_similarity"] for r in rb]
    assert all(r["predicted_text"] in sentences and r["predicted_phonemes"] is not None for r in ra)
    assert all(r["ctc_text"] is None for r in ra)  # the greedy word decoder writes no words


def test_ctc_words_as_text_needs_the_head_and_a_word_decoder(small_dataset):
    from config import load_config

    config = load_config(CONFIGS / "tiny.yml", [f"data_params.data_dir={small_dataset}",
                                                 "model_params.n_days=1", "model_params.text_source=ctc_words"])
    with pytest.raises(UserError, match="ctc_words needs the CTC head"):
        runner.build_model(config, ["a"], {"train": []}, torch.device("cpu"))


def test_no_ctc_head_unless_weighted_and_param_groups():
    p = GRUAlignParams(n_days=2, n_features=8, n_units=12, n_layers=1, patch_size=4, patch_stride=2, rnn_dropout=0.0)
    model = GRUAlign(p, HeldTargets({}, 6), EvaluationParams())
    assert model.ctc_head is None
    groups = {name: model.param_group(name) for name, _ in model.named_parameters()}
    assert groups["day_weights.1"] == groups["day_biases.0"] == "day"
    assert groups["gru.bias_ih_l0"] == groups["projector.bias"] == "bias"
    assert groups["gru.weight_hh_l0"] == groups["projector.weight"] == groups["h0"] == "other"
    with_head = GRUAlign(replace(p, loss_weights=LossWeights(ctc=0.3)), HeldTargets({}, 6), EvaluationParams())
    assert with_head.ctc_head.out_features == 41


def read_rows(run_dir):
    return list(csv.DictReader(open(run_dir / "per_trial.csv")))


@pytest.mark.slow
def test_tiny_config_learns_far_above_chance_and_reuses_the_target_cache(synthetic_dataset, tmp_path):
    data = [f"data_params.data_dir={synthetic_dataset}", "evaluation.splits=[val]"]
    trained = runner.run(str(CONFIGS / "tiny.yml"), data, str(tmp_path / "trained"), False, False)
    metrics = json.loads((trained / "metrics.json").read_text())["val"]
    chance = metrics["retrieval_chance_top1"]
    assert metrics["n_candidates"] == len({r["reference_text"] for r in read_rows(trained)})
    assert metrics["text_source"] == "retrieval" and metrics["targets"] == "espeak_ng+log_mel"
    # Measured on this data after the 150 tiny steps: 30 candidates, median rank of the true sentence
    # 6 (chance: 15.5), top-10 0.63 (chance 0.33), top-1 0.10 (chance 0.033; 3 trials, so noisy).
    assert metrics["n_candidates"] == 30
    assert metrics["median_true_rank"] <= 10 and metrics["retrieval_top10"] >= 0.5
    assert metrics["retrieval_top1"] > chance
    rows = read_rows(trained)
    assert all(r["predicted_text"] and int(r["true_rank"]) >= 1 for r in rows)
    assert sum(r["predicted_text"] == r["reference_text"] for r in rows) == sum(r["true_rank"] == "1" for r in rows)
    log = (trained / "run.log").read_text()
    assert re.search(r"\d+ sentences, 0 from the cache, \d+ computed", log)

    # `evaluate` rebuilds the model from the checkpoint (targets from the cache, the training target
    # statistics from the weights) and retrieves exactly what the run did
    evaluated = runner.evaluate(str(trained), str(synthetic_dataset), "val", str(tmp_path / "evaluated"), None)
    assert read_rows(evaluated) == rows
    assert re.search(r"(\d+) sentences, \1 from the cache, 0 computed", (evaluated / "run.log").read_text())


def test_full_size_config_builds_and_decodes_with_tiny_mms_tts_and_qwen2_audio(small_dataset, tmp_path, tiny_vits,
                                                                             qwen2_folders):
    """configs/gru_align/b2txt25.yml as it is, but with tiny local mms-tts and Qwen2-Audio folders,
    the small test data and no training (a full-size step belongs in benchmarks, not tests)."""
    overrides = [
        f"data_params.data_dir={small_dataset}", "data_params.sessions=null", "data_params.num_workers=0",
        f"model_params.targets.tts.params.model={tiny_vits}",
        f"model_params.targets.encoder.params.model={qwen2_folders / 'full'}",
        "model_params.targets.encoder.params.dtype=float32", "model_params.targets.device=cpu",
        "training_params.num_steps=0", "training_params.device=cpu", "evaluation.splits=[val]",
        "evaluation.bootstrap_resamples=100",
    ]
    run_dir = runner.run(str(CONFIGS / "b2txt25.yml"), overrides, str(tmp_path / "full"), False, False)
    config = (run_dir / "config.yaml").read_text()
    assert "n_units: 768" in config and "n_layers: 5" in config and "name: qwen2_audio" in config
    days, c, h, width = 3, 512, 768, 16  # small_dataset has 3 sessions; the tiny encoder is 16 wide (1280 real)
    gru = 3 * h * (14 * c + h) + 4 * 3 * h * (2 * h) + 5 * 2 * 3 * h
    expected = days * (c * c + c) + gru + h + (h * 1024 + 1024) + (1024 * width + width)
    assert f"model gru_align: {expected} trainable parameters" in (run_dir / "run.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert metrics["targets"] == "mms_tts+qwen2_audio" and metrics["n_candidates"] >= 1


def test_step_benchmark_runs_and_prints_its_ratio(synthetic_dataset, capsys):
    spec = importlib.util.spec_from_file_location("gru_align_step", REPO_ROOT / "benchmarks" / "gru_align_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--align-config", "configs/gru_align/tiny.yml", "--ctc-config", "configs/ctc_baseline/tiny.yml",
                       "--data-dir", str(synthetic_dataset), "--steps", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gru_align / ctc_baseline: \d+\.\d+ \(ratio of medians\)", out)
