"""Smoke test of benchmarks/ctc_train_step.py at a toy size, so the benchmark does not rot: the
same-math check passes, every variant trains a step, the memory subprocess answers, the table renders."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ctc_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ctc_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_variant_runs_and_the_math_is_the_same(bench, synthetic_dataset):
    # the published config (45 day layers, the data's 4 days mapped into them) at a toy width
    size = replace(bench.SIZES["published"], name="toy-published", model_overrides={"n_units": 16, "n_layers": 2},
                   data_overrides={"batch_size": 8})
    setup = bench.make_setup(size, synthetic_dataset)
    assert setup.params.n_days == 45 and {t.day for t in setup.trials} == {0, 1, 2, 3}

    check = bench.same_math_check(setup, ["ours", "ours+pack", "ours+atenpack"])
    assert check["ok"] and check["same_data"], check
    for name in ("ours", "ours+pack", "ours+atenpack"):
        assert check[name]["max_abs_logit_diff"] <= 1e-4 and check[name]["max_rel_grad_diff"] <= 1e-3

    timing = bench.time_interleaved(setup, list(bench.VARIANTS), steps=1, warmup=1, log=None)
    assert set(timing) == set(bench.VARIANTS)
    for row in timing.values():
        assert row["median_s"] > 0 and row["trials_per_s"] > 0 and row["n"] == 1 and "ratio" in row
    assert timing["reference"]["ratio"] == 1.0

    memory = bench.measure_memory_here(setup, "reference", steps=1)
    assert memory["peak_rss_mb"] > 0
    results = {"toy-published": {"timing": timing, "memory": {"reference": memory}}}
    text = bench.table(results, torch.device("cpu"))
    assert "| toy-published | ours+pack |" in text and "ours+atenpack" in bench.phase_table(results)


def test_cli_with_a_memory_subprocess(bench, synthetic_dataset, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--size", "toy", "--variants", "reference", "--steps", "1", "--warmup", "0",
                     "--memory-steps", "1", "--data-dir", str(synthetic_dataset), "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "same math: PASS" in printed and "| toy | reference |" in printed
    assert out.is_file() and "reference: peak_rss_mb" in printed
    shares = json.loads(out.read_text())["results"]["toy"]["valid_shares"]
    assert 0 < shares["gru_frames"] < 1 and 0 < shares["input_bins"] < 1  # the test data's lengths vary


def test_recalibration_step_benchmark_runs_at_a_toy_size(monkeypatch, capsys):
    """benchmarks/recalibration_step.py end to end on the tiny model and short trials: both variants
    step, and the table and the ratio print."""
    spec = importlib.util.spec_from_file_location("recalibration_step", SCRIPT.parent / "recalibration_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["recalibration_step.py", "--size", "tiny", "--steps", "1", "--warmup", "0",
                                      "--bins", "40", "--batch-size", "2"])
    module.main()
    out = capsys.readouterr().out
    assert "day_layer           262,656" in out and "day_layer / all:" in out


def test_convert_speed_benchmark_runs_at_a_toy_size(monkeypatch, capsys):
    """benchmarks/convert_speed.py end to end on half a minute of 8 channels: it converts, reads and
    prints the median and the ratio."""
    spec = importlib.util.spec_from_file_location("convert_speed", SCRIPT.parent / "convert_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["convert_speed.py", "--minutes", "0.5", "--channels", "8", "--repeats", "1"])
    module.main()
    out = capsys.readouterr().out
    assert "features: high_gamma" in out and "convert / read =" in out
