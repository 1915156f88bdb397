"""benchmarks/validation_pass.py at a toy size: both paths agree (it checks before timing) and it
prints its per-trial figures and ratio."""

import re

from benchmarks.validation_pass import main


def test_validation_pass_benchmark_runs_and_prints_its_ratio(capsys):
    results = main(["--models", "gru_align", "--batches", "1", "--repeats", "1", "--mean-bins", "40"])
    assert set(results["gru_align"]) == {"two-forward", "one-forward"}
    assert all(seconds > 0 for seconds in results["gru_align"].values())
    assert re.search(r"gru_align \(tiny size\): two-forward [\d.]+ ms/trial, one-forward [\d.]+ ms/trial, "
                     r"ratio [\d.]+x", capsys.readouterr().out)
