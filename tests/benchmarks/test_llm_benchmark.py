"""Smoke test of benchmarks/llm_decoder_step.py, so the benchmark does not rot: the Qwen2-Audio-7B code
path runs at toy widths on the CPU (gradient checkpointing on), the table renders, and without a GPU the
7b size says it was skipped instead of measuring anything."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_decoder_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("llm_decoder_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_qwen2_audio_shaped_step_runs_at_toy_size(bench, synthetic_dataset):
    args = argparse.Namespace(device="cpu", data_dir=str(synthetic_dataset), steps=1, warmup=1, compile=False)
    result = bench.run_one("toy", {"dtype": "float32", "checkpointing": True}, args)
    assert result["median_ms"] > 0 and result["peak_rss_mb"] > 0 and result["batch_size"] == 8
    assert result["lm"] == "qwen2-audio-7b-shaped-random"
    assert result["frozen_parameters"] > 0 and result["trainable_parameters"] > 0
    text = bench.table([result, {"size": "7b", "dtype": "bfloat16", "checkpointing": False, "error": "out of memory"}])
    assert "| toy | float32 | on | 8 |" in text and "| 7b | bfloat16 | off | | out of memory |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_the_7b_size_is_skipped_without_a_gpu(bench, capsys):
    assert bench.main(["--sizes", "7b"]) == 0
    assert "7b: no GPU: skipped" in capsys.readouterr().out
