"""harness.progress.phase: one log line per phase with its count and duration, bar or no bar."""

import logging

import pytest

from harness.progress import phase


@pytest.mark.parametrize("show", [True, False])
def test_a_phase_logs_its_count_without_a_terminal(caplog, show):
    caplog.set_level(logging.INFO)
    with phase("decode val", total=10, unit="trial", show=show) as bar:  # pytest's stderr is no terminal
        bar.update(4)
        bar.update(6)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode val")]
    assert line.startswith("decode val: 10 trials") and " s" in line


def test_a_phase_that_fails_logs_nothing(caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(ValueError), phase("feature cache", total=3):
        raise ValueError("bad data")
    assert not [r for r in caplog.records if r.getMessage().startswith("feature cache")]
