"""The CTC baseline: faithfulness to the reference fixture, sizes, loss/decoding, preprocessors,
the reference checkpoint loader, and a short run through the main loop."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from config import load_config
from ctc_baseline import CTCBaseline, CTCBaselineParams, ctc_baseline, load_reference_checkpoint
from harness.batching import Batch
from harness.errors import UserError
from harness.model_api import BuildContext
from harness.preprocessors import (
    AugmentParams,
    FeatureSubsetParams,
    GaussianSmoothingParams,
    augment,
    feature_subset,
    gaussian_kernel,
    gaussian_smoothing,
)
from harness.runner import fill_data_fields
from word_decoding import greedy_phonemes

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "b2txt25_tiny"
SMALL = dict(n_days=3, n_features=8, n_units=12, n_layers=2, patch_size=5, patch_stride=2)


def make_batch(features, lengths, days, phonemes=None):
    phoneme_ids = phoneme_lengths = None
    if phonemes is not None:
        phoneme_lengths = torch.tensor([len(p) for p in phonemes])
        phoneme_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in phonemes], batch_first=True)
    n = len(features)
    return Batch(features=features, lengths=torch.as_tensor(lengths), day_indices=torch.as_tensor(days),
                 phoneme_ids=phoneme_ids, phoneme_lengths=phoneme_lengths, sentences=[None] * n, trials=[None] * n)


def small_model(**overrides) -> CTCBaseline:
    torch.manual_seed(0)
    return CTCBaseline(CTCBaselineParams(**{**SMALL, **overrides}))


# ----------------------------------------------------------------------------------------------
# Faithfulness to the reference fixture


@pytest.fixture(scope="module")
def reference():
    if not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures/b2txt25_tiny not found: the faithfulness test needs the shared reference fixture")
    config, state, info = load_reference_checkpoint(FIXTURE)
    io = {k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "reference_io.npz").items()}
    return config, state, info, io


def reference_model(reference, pack: bool) -> CTCBaseline:
    config, state, _, _ = reference
    model = CTCBaseline(CTCBaselineParams(**{**config["model_params"], "pack_sequences": pack}))
    model.load_state_dict(state)
    return model.eval()


def test_smoothing_reproduces_the_reference(reference):
    config, _, _, io = reference
    spec = config["data_params"]["preprocessors"][-1]
    assert spec == {"name": "gaussian_smoothing", "params": {"std": 2, "kernel_size": 100}}
    smooth = gaussian_smoothing(GaussianSmoothingParams(**spec["params"]))
    batch = make_batch(io["input_features"], io["n_time_steps"].long(), io["day_indices"])
    smoothed = smooth(batch, training=False).features
    torch.testing.assert_close(smoothed, io["smoothed_features"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("inputs,expected", [("input_features", "logits_unsmoothed"),
                                             ("smoothed_features", "logits_smoothed")])
def test_logits_reproduce_the_reference(reference, inputs, expected):
    *_, io = reference
    x, lengths, days = io[inputs], io["n_time_steps"].long(), io["day_indices"]
    with torch.no_grad():
        padded, n_valid = reference_model(reference, pack=False)(x, lengths, days)
        packed, _ = reference_model(reference, pack=True)(x, lengths, days)
    assert n_valid.tolist() == io["adjusted_lens"].tolist()
    # Unpacked, the GRU also runs over padding as the reference did: all 16 frames match.
    torch.testing.assert_close(padded, io[expected], rtol=0, atol=1e-5)
    for i, n in enumerate(n_valid.tolist()):  # packed: every valid frame matches
        torch.testing.assert_close(packed[i, :n], io[expected][i, :n], rtol=0, atol=1e-5)


def test_reference_checkpoint_gives_a_loadable_config(reference):
    config, state, info, _ = reference
    assert info == {"val_PER": pytest.approx(0.4321), "val_loss": pytest.approx(12.5)}
    assert all(type(v) is float for v in info.values())
    assert list(state)[:3] == ["h0", "day_weights.0", "day_weights.1"]  # `_orig_mod.` stripped
    loaded = load_config(data=config)
    assert isinstance(loaded.model_params, CTCBaselineParams)
    assert (loaded.model_params.n_units, loaded.model_params.n_layers, loaded.model_params.n_days) == (16, 2, 2)
    assert loaded.data_params.sessions == ["t15.2023.08.11", "t15.2023.08.13"]
    assert [p.name for p in loaded.data_params.preprocessors] == ["augment", "gaussian_smoothing"]


def copy_fixture(tmp_path) -> Path:
    folder = tmp_path / "baseline"
    shutil.copytree(FIXTURE / "checkpoint", folder / "checkpoint")
    for f in (folder / "checkpoint").iterdir():
        f.chmod(0o644)
    return folder


def edit_args(folder: Path, edit) -> None:
    path = folder / "checkpoint" / "args.yaml"
    args = yaml.safe_load(path.read_text())
    edit(args)
    path.write_text(yaml.safe_dump(args))


@pytest.mark.parametrize("break_it,message", [
    (lambda f: (f / "checkpoint" / "best_checkpoint").unlink(), "best_checkpoint is missing"),
    (lambda f: (f / "checkpoint" / "best_checkpoint").write_bytes(b"not a checkpoint"), "cannot be loaded"),
    (lambda f: (f / "checkpoint" / "args.yaml").write_text("model: [unclosed"), "not valid YAML"),
    (lambda f: edit_args(f, lambda a: a["model"].pop("n_units")), "missing key model.n_units"),
    (lambda f: edit_args(f, lambda a: a["dataset"]["sessions"].append("t15.2023.08.18")), "lacks keys"),
    (lambda f: edit_args(f, lambda a: a["model"].update(n_units=32)), "wrongly shaped"),
])
def test_malformed_reference_folder_is_one_clear_error(reference, tmp_path, break_it, message):
    folder = copy_fixture(tmp_path)
    break_it(folder)
    with pytest.raises(UserError, match=message) as info:
        load_reference_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_missing_reference_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a reference checkpoint folder"):
        load_reference_checkpoint(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# Sizes, keys, groups


def test_published_size_has_the_published_parameter_count():
    with torch.device("meta"):  # same modules, no memory
        model = CTCBaseline(CTCBaselineParams(n_days=45))
    count = lambda prefixes: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))  # noqa: E731
    assert sum(p.numel() for p in model.parameters()) == 44_315_177
    assert count(("day_weights.", "day_biases.")) == 11_819_520
    assert count("gru.") == 32_463_360
    assert count("out.") == 31_529
    assert count("h0") == 768


def test_state_dict_keys_are_the_reference_keys_in_order():
    gru = [f"gru.{kind}_l{k}" for k in range(2) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    expected = ["h0", "day_weights.0", "day_weights.1", "day_weights.2", "day_biases.0", "day_biases.1",
                "day_biases.2", *gru, "out.weight", "out.bias"]
    assert list(small_model().state_dict()) == expected


def test_param_groups_follow_the_reference_optimizer():
    model = small_model()
    groups = {}
    for name, _ in model.named_parameters():
        groups.setdefault(model.param_group(name), set()).add(name)
    assert groups["bias"] == {f"gru.bias_{kind}_l{k}" for k in range(2) for kind in ("ih", "hh")} | {"out.bias"}
    assert groups["day"] == {f"day_{kind}.{d}" for d in range(3) for kind in ("weights", "biases")}
    assert groups["other"] == {"h0", "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l1",
                               "gru.weight_hh_l1", "out.weight"}


def test_the_harness_fills_the_data_fields_and_the_constructor_builds():
    config = load_config(data={"trial_name": "t", "model_constructor_name": "ctc_baseline",
                               "model_params": {"n_units": 8}})
    fill_data_fields(config, n_days=2, n_features=6)
    assert (config.model_params.n_days, config.model_params.n_features) == (2, 6)
    ctx = BuildContext(config=config, sessions=["a", "b"], trials={}, device=torch.device("cpu"), cache_dir="",
                       n_features=6)
    model = ctc_baseline(config.model_params, ctx)
    assert model.min_time_steps == 14 and len(model.day_weights) == 2 and model.day_weights[0].shape == (6, 6)


def test_a_retired_setter_name_still_loads_with_a_warning():
    data = {"trial_name": "t", "model_constructor_name": "ctc_baseline", "config_setter_name": "ctc_baseline_setter"}
    with pytest.warns(DeprecationWarning, match="ctc_baseline_setter is no longer needed"):
        config = load_config(data=data)
    assert config.config_setter_name is None


# ----------------------------------------------------------------------------------------------
# Loss and decoding


def test_loss_is_the_mean_per_trial_ctc():
    model = small_model().eval()
    batch = make_batch(torch.randn(3, 21, 8), [21, 15, 11], [0, 2, 0], phonemes=[[5, 40], [3, 3, 40], [7]])
    parts = model.loss(batch)
    logits, n = model(batch.features, batch.lengths, batch.day_indices)
    per_trial = [F.ctc_loss(logits[i:i + 1, : n[i]].log_softmax(-1).transpose(0, 1), batch.phoneme_ids[i:i + 1],
                            n[i:i + 1], batch.phoneme_lengths[i:i + 1], reduction="sum") for i in range(3)]
    torch.testing.assert_close(parts["loss"], torch.stack(per_trial).mean())
    assert parts["ctc"] is parts["loss"]
    parts["loss"].backward()
    assert model.h0.grad is not None and model.day_weights[1].grad is None


def test_impossible_alignment_is_infinite_as_in_the_reference():
    batch = make_batch(torch.randn(1, 9, 8), [9], [0], phonemes=[[5, 6, 7, 8]])  # 3 frames for 4 targets
    assert torch.isinf(small_model().loss(batch)["loss"])
    assert small_model(zero_infinity=True).loss(batch)["loss"] == 0


def one_hot_frames(*frames):
    return F.one_hot(torch.tensor(frames), 41).float()[None]


@pytest.mark.parametrize("frames,expected", [
    ((1, 0, 1), "AA AA"),  # a blank separates repeats
    ((1, 1, 0), "AA"),  # repeats merge
    ((0, 0, 0), ""),
    ((40, 40, 2, 0, 2, 7), "SIL AE AE B"),
])
def test_greedy_collapse_merges_repeats_then_drops_blanks(frames, expected):
    assert greedy_phonemes(one_hot_frames(*frames), torch.tensor([len(frames)])) == [expected]


def test_greedy_decoding_stops_at_the_valid_length():
    assert greedy_phonemes(one_hot_frames(1, 2, 3), torch.tensor([2])) == ["AA AE"]


def test_decode_returns_one_row_per_trial():
    batch = make_batch(torch.randn(2, 20, 8), [20, 14], [1, 2])
    rows = small_model().eval().decode(batch)
    assert len(rows) == 2 and all(set(r) == {"predicted_phonemes"} for r in rows)


# ----------------------------------------------------------------------------------------------
# Preprocessors

REFERENCE_TAPS = [0.02763, 0.06628, 0.12383, 0.18017, 0.20416, 0.18017, 0.12383, 0.06628, 0.02763]


def test_smoothing_kernel_is_the_reference_kernel():
    np.testing.assert_allclose(gaussian_kernel(2, 100), REFERENCE_TAPS, rtol=0, atol=1e-5)


def test_smoothing_keeps_a_constant_signal_away_from_the_edges():
    batch = make_batch(torch.full((2, 30, 4), 3.0), [30, 30], [0, 0])
    smoothed = gaussian_smoothing(GaussianSmoothingParams())(batch, training=True).features
    assert smoothed.shape == (2, 30, 4)
    torch.testing.assert_close(smoothed[:, 4:-4], batch.features[:, 4:-4], rtol=0, atol=1e-5)
    assert smoothed[0, 0, 0] < 3.0  # 'same' zero padding at the edges, as the reference


def test_feature_subset_keeps_listed_columns():
    subset = feature_subset(FeatureSubsetParams(indices=[5, 0, 2]))
    assert subset.output_features(8) == 3
    x = torch.randn(2, 10, 8)
    assert torch.equal(subset(make_batch(x, [10, 7], [0, 1]), training=False).features, x[..., [5, 0, 2]])
    with pytest.raises(UserError, match="outside"):
        subset.output_features(4)


def only(**params) -> AugmentParams:
    off = dict(white_noise_std=0.0, constant_offset_std=0.0, random_walk_std=0.0, static_gain_std=0.0, random_cut=0)
    return AugmentParams(**{**off, **params})


def test_augment_is_identity_in_eval():
    batch = make_batch(torch.randn(2, 20, 8), [20, 9], [0, 1])
    assert augment(AugmentParams())(batch, training=False) is batch


def test_random_cut_drops_the_first_bins_and_shortens_lengths():
    x = torch.randn(3, 20, 8)
    batch = make_batch(x, [20, 9, 1], [0, 1, 2])
    cut = augment(only(random_cut=3))
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        out = cut(batch, training=True)
        c = 20 - out.features.shape[1]
        seen.add(c)
        assert torch.equal(out.features, x[:, c:])
        assert out.lengths.tolist() == [20 - c, 9 - c, max(0, 1 - c)]
    assert seen == {0, 1, 2}  # randint(0, random_cut): random_cut 3 -> c in {0, 1, 2}
    assert torch.equal(batch.features, x) and batch.lengths.tolist() == [20, 9, 1]  # input untouched


def test_white_noise_has_the_configured_std():
    torch.manual_seed(0)
    batch = make_batch(torch.zeros(4, 200, 64), [200] * 4, [0] * 4)
    noise = augment(only(white_noise_std=1.0))(batch, training=True).features
    assert abs(noise.std().item() - 1.0) < 0.02 and abs(noise.mean().item()) < 0.02


def test_constant_offset_is_constant_along_time():
    torch.manual_seed(0)
    x = torch.randn(8, 30, 512)
    offset = augment(only(constant_offset_std=0.2))(make_batch(x, [30] * 8, [0] * 8), training=True).features - x
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset), rtol=0, atol=1e-6)
    assert abs(offset[:, 0].std().item() - 0.2) < 0.02


def test_augment_is_reproducible_from_the_global_seed():
    batch = make_batch(torch.randn(2, 20, 8), [20, 9], [0, 1])
    params = AugmentParams(static_gain_std=0.1, random_walk_std=0.05)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(augment(params)(batch, training=True))
    assert torch.equal(outputs[0].features, outputs[1].features)
    assert torch.equal(outputs[0].lengths, outputs[1].lengths)


# ----------------------------------------------------------------------------------------------
# Through the main loop


def test_a_short_run_trains_and_decodes(small_dataset, tmp_path):
    from harness import runner

    config = {
        "trial_name": "ctc_baseline_test", "model_constructor_name": "ctc_baseline",
        # these trials are 20-40 bins long: short patches leave enough frames for the phonemes
        "model_params": {"n_units": 16, "n_layers": 2, "patch_size": 4, "patch_stride": 1},
        "data_params": {"data_dir": str(small_dataset), "batch_size": 8, "days_per_batch": 2,
                        "preprocessors": [{"name": "augment"}, {"name": "gaussian_smoothing"}]},
        "training_params": {"num_steps": 4, "val_every": 2, "checkpoint_every": 2, "progress_bar": False,
                            "param_groups": {"day": {"weight_decay": 0.0}}},
        "evaluation": {"bootstrap_resamples": 50},
        "output": {"tensorboard": False},
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    out = runner.run(str(path), [], str(tmp_path / "run"), resume=False, overwrite=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["steps"] == 4 and metrics["val"]["per"] is not None
    assert all(np.isfinite(v["loss"]) for v in metrics["run"]["validation_history"])
    assert load_config(out / "config.yaml").model_params.n_days == 3
