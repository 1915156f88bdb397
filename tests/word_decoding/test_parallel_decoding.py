"""The word search spread over worker processes (word_decoding/parallel.py): the same text and
n-best lists as the serial search, num_workers resolution, worker lifetime, and the knob's check."""

import gc
import logging
import re

import numpy as np
import psutil
import pytest
import torch

from config import ComponentSpec
from harness.errors import UserError
from harness.phonemes import BLANK_ID, N_CLASSES, PHONEME_TO_ID, SIL_ID
from harness.pronounce import cmu_dict
from word_decoding import ngram, parallel
from word_decoding.decoders import build_word_decoder

pytest.importorskip("kenlm")

SENTENCES = ["the cat sat on the mat", "a dog ran to the red mat", "the dog sat", "a cat ran on the road",
             "the red cat is on the road", "my dog is red"]


def decoder(cache_dir, **params):
    spec = ComponentSpec("lexicon_ngram", {"lm_order": 3, "beam_size": 50, "nbest": 8, **params})
    return build_word_decoder(spec, SENTENCES, cache_dir)


def noisy_trials(n, seed=0):
    """(n, T, 41) log-probs spelling random vocabulary words (1-3 frames per phoneme) under noise,
    so that the searches find real, competing sentences; and the valid frames of each trial."""
    rng = np.random.default_rng(seed)
    vocabulary = sorted({w for s in SENTENCES for w in s.split()})
    rows = []
    for _ in range(n):
        frames = []
        for word in rng.choice(vocabulary, size=rng.integers(1, 5)):
            for phoneme in cmu_dict()[word][0]:
                frames += [PHONEME_TO_ID[phoneme.rstrip("012")]] * int(rng.integers(1, 4)) + [BLANK_ID]
            frames.append(SIL_ID)
        rows.append(frames)
    width = max(map(len, rows))
    logits = rng.normal(0, 1.5, (n, width, N_CLASSES)).astype(np.float32)
    for i, frames in enumerate(rows):
        logits[i, np.arange(len(frames)), frames] += 4.0
    return torch.from_numpy(logits).log_softmax(-1), torch.tensor([len(r) for r in rows])


def alive(pid):
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_two_workers_give_the_serial_text_and_nbest_in_trial_order(tmp_path):
    log_probs, lengths = noisy_trials(12)
    serial, spread = decoder(tmp_path, num_workers=1), decoder(tmp_path, num_workers=2)
    assert serial.workers == 1 and spread.workers == 2
    try:
        assert spread.decode(log_probs[:1], lengths[:1]) == serial.decode(log_probs[:1], lengths[:1])
        assert spread.pool is None  # one trial: decoded in this process, no pool
        expected = serial.nbest(log_probs, lengths)
        found = spread.nbest(log_probs, lengths)
        assert len(spread.pool.executor._processes) == 2  # really decoded by two worker processes
        assert found == expected  # words, acoustic, n-gram and total scores, every entry, in order
        assert len({h[0].text for h in expected}) > 6 and max(map(len, expected)) > 1  # distinct, non-trivial
        assert spread.decode(log_probs, lengths) == serial.decode(log_probs, lengths)
        assert serial.pool is None
    finally:
        spread.close()


def test_close_stops_the_workers_and_so_does_collecting_the_decoder(tmp_path):
    log_probs, lengths = noisy_trials(4, seed=1)
    spread = decoder(tmp_path, num_workers=2)
    text = spread.decode(log_probs, lengths)
    pool = spread.pool
    first = list(pool.executor._processes)  # concurrent.futures has no public accessor for the pids
    assert len(first) == 2 and all(map(alive, first))
    assert spread.decode(log_probs, lengths) == text and spread.pool is pool  # reused by later calls
    spread.close()
    assert spread.pool is None and not any(map(alive, first))

    assert spread.decode(log_probs, lengths) == text  # a later call starts new workers
    second = list(spread.pool.executor._processes)
    assert len(second) == 2 and all(map(alive, second)) and not set(first) & set(second)
    assert spread.pool._finalizer.atexit  # also stopped at the end of the program
    del spread, pool
    gc.collect()
    assert not any(map(alive, second))


def test_num_workers_0_is_the_cores_divided_by_the_ranks_on_this_machine(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert parallel.resolve_workers(0) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert parallel.resolve_workers(0) == 2  # 8 // 3
    assert parallel.resolve_workers(5) == 5  # given: as given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert parallel.resolve_workers(0) == 1  # at least one
    monkeypatch.delattr(parallel.os, "sched_getaffinity")  # macOS, Windows: every core
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert parallel.resolve_workers(0) == 3

    built = decoder(tmp_path)  # the default, num_workers 0
    assert built.workers == 3
    with caplog.at_level(logging.INFO):
        built.decode(*noisy_trials(1))  # one trial: in this process, and the report is logged
    assert built.pool is None
    assert "beam search in 3 worker processes (num_workers 0: 6 cores / 2 ranks on this machine)" in caplog.text


def test_negative_num_workers_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="num_workers: is -1: it must be at least 0"):
        decoder(tmp_path, num_workers=-1)


def test_the_lm_build_logs_its_duration(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        decoder(tmp_path, num_workers=1, lm_order=2)
    # harness.progress.phase logs the bar's count, and tqdm counts nothing while its bar is hidden
    # (no terminal, as here), hence \d+ rather than the 6 sentences
    assert re.search(rf"2-gram LM \({ngram.builder_name()}\): \d+ sentences? in \d+\.\d s", caplog.text)


def test_workers_end_when_their_process_is_killed(tmp_path):
    """kill -9 of the process that owns the pool (no cleanup runs) still ends its workers: each
    asked the kernel for a signal when its parent dies (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    script = f"""
import sys, time
sys.path.insert(0, {str(REPO_ROOT)!r}); sys.path.insert(0, {str(REPO_ROOT / 'tests' / 'word_decoding')!r})
from test_parallel_decoding import decoder, noisy_trials
d = decoder({str(tmp_path)!r}, num_workers=2)
d.decode(*noisy_trials(4, seed=2))
print(" ".join(map(str, d.pool.executor._processes)), flush=True)
time.sleep(120)
"""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    workers = []
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(workers) == 2 and all(map(alive, workers))
        owner.kill()
        owner.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(alive, workers))
    finally:
        owner.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
