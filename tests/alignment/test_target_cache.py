"""The on-disk target cache: hits and misses, reuse across instances (runs), corrupted entries,
and two processes filling one cache at once."""

import multiprocessing
import zipfile

import numpy as np
import pytest

from alignment.cache import TargetCache
from alignment.targets import TargetParams, build_target_maker, resolve_target_params
from tests.alignment.test_audio_targets import one_torch_thread  # noqa: F401  (autouse: one torch thread here too)

SENTENCES = ["I want to go home now.", "The dog finds a red ball.", "Can you bring my coat?"]


class Counting:
    """Wraps a real TargetMaker and records which sentences it was asked to compute."""

    def __init__(self, maker):
        self.maker = maker
        self.asked: list[str] = []
        self.name, self.dim, self.frame_rate = maker.name, maker.dim, maker.frame_rate
        self.config_hash, self.identity, self.batch_size = maker.config_hash, maker.identity, 2

    def __call__(self, sentences):
        self.asked.extend(sentences)
        return self.maker(sentences)


@pytest.fixture(scope="module")
def maker():
    return build_target_maker(TargetParams())


def test_misses_are_computed_once_and_then_read(tmp_path, maker, capsys):
    counting = Counting(maker)
    cache = TargetCache(tmp_path, counting)
    first = cache.get(SENTENCES + SENTENCES[:1])  # a repeated sentence is computed once
    assert (cache.hits, cache.misses) == (0, 3) and counting.asked == SENTENCES
    assert list(first) == SENTENCES
    for sentence, frames in zip(SENTENCES, maker(SENTENCES)):  # stored as float16: half the disk
        assert first[sentence].dtype == np.float16 and first[sentence].shape == frames.shape
        np.testing.assert_allclose(first[sentence], frames, rtol=2e-3, atol=2e-3)
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal

    again = cache.get(SENTENCES[::-1] + ["A new sentence here."])
    assert (cache.hits, cache.misses) == (3, 4) and counting.asked == SENTENCES + ["A new sentence here."]
    assert all(np.array_equal(again[s], first[s]) for s in SENTENCES)  # exactly what the first run saw

    next_run = TargetCache(tmp_path, Counting(maker))  # another run, same target config: all hits
    read_back = next_run.get(SENTENCES)
    assert all(np.array_equal(read_back[s], first[s]) for s in SENTENCES)
    assert (next_run.hits, next_run.misses, next_run.maker.asked) == (3, 0, [])
    entries = list((tmp_path / maker.config_hash).rglob("*.npz"))
    assert len(entries) == 4 and not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / maker.config_hash / "target_config.json").is_file()


def test_another_target_config_has_its_own_entries(tmp_path, maker):
    TargetCache(tmp_path, maker).get(SENTENCES)
    faster = build_target_maker(resolve_target_params({"tts": {"name": "espeak_ng", "params": {"rate": 250}}}))
    other = TargetCache(tmp_path, faster)
    targets = other.get(SENTENCES)
    assert (other.hits, other.misses) == (0, 3)
    assert len(targets[SENTENCES[0]]) < len(TargetCache(tmp_path, maker).get(SENTENCES)[SENTENCES[0]])


def _break_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_garbage(path):
    path.write_bytes(b"not a numpy file at all")


def _break_values(path):  # a valid file whose frames no longer match their checksum
    with np.load(path) as entry:
        parts = {k: entry[k] for k in entry.files}
    parts["frames"] = parts["frames"].copy()
    parts["frames"][0, 0] += 1
    with open(path, "wb") as f:
        np.savez(f, **parts)


def _break_other_sentence(path):  # a complete entry of another sentence at this path
    with np.load(path) as entry:
        parts = {k: entry[k] for k in entry.files}
    parts["sentence"] = np.array("Something else entirely.")
    with open(path, "wb") as f:
        np.savez(f, **parts)


def _break_empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_break_truncate, _break_garbage, _break_values, _break_other_sentence,
                                    _break_empty])
def test_partial_or_corrupted_entries_are_recomputed(tmp_path, maker, damage):
    cache = TargetCache(tmp_path, maker)
    good = cache.get(SENTENCES, progress=False)
    damage(cache.path(SENTENCES[1]))
    assert cache.read(SENTENCES[1]) is None
    fresh = TargetCache(tmp_path, Counting(maker))
    repaired = fresh.get(SENTENCES)
    assert (fresh.hits, fresh.misses, fresh.maker.asked) == (2, 1, [SENTENCES[1]])
    assert np.array_equal(repaired[SENTENCES[1]], good[SENTENCES[1]])
    assert fresh.read(SENTENCES[1]) is not None  # and written back whole


class _SlowFake:
    """Targets derived from the sentence's bytes, made slowly, so two processes overlap. A stand-in
    for a TargetMaker (the cache is what is under test here, not the targets)."""

    name, dim, frame_rate, config_hash, identity, batch_size = "fake", 6, 25.0, "fakehash", {}, 1

    def __call__(self, sentences):
        import time

        time.sleep(0.005)
        return [np.frombuffer(s.encode().ljust(6 * 40, b"."), np.uint8)[: 6 * 40].reshape(40, 6).astype(np.float32)
                for s in sentences]


def _fill(root, sentences, barrier, results):
    barrier.wait()  # both start together
    cache = TargetCache(root, _SlowFake())
    got = cache.get(sentences, progress=False)
    results.put((cache.misses, {s: got[s].tobytes() for s in sentences}))


def test_two_processes_filling_one_cache_do_not_corrupt_it(tmp_path):
    sentences = [f"Sentence number {i} of the shared corpus." for i in range(80)]
    context = multiprocessing.get_context("fork")  # separate processes with their own memory, as two runs
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_fill, args=(tmp_path, order, barrier, results))
               for order in (sentences, sentences[::-1])]
    for worker in workers:
        worker.start()
    (_, got_a), (_, got_b) = results.get(timeout=60), results.get(timeout=60)
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    expected = {s: f.astype(np.float16).tobytes() for s, f in zip(sentences, _SlowFake()(sentences))}
    assert got_a == expected and got_b == expected
    check = TargetCache(tmp_path, _SlowFake())
    assert {s: f.tobytes() for s, f in check.get(sentences).items()} == expected
    assert (check.hits, check.misses) == (80, 0)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind
    for entry in (tmp_path / "fakehash").rglob("*.npz"):
        assert zipfile.is_zipfile(entry)


def test_an_interrupted_fill_keeps_what_it_wrote(tmp_path, maker):
    class FailsOnThird(Counting):
        def __call__(self, sentences):
            if SENTENCES[2] in sentences:
                raise KeyboardInterrupt
            return super().__call__(sentences)

    cache = TargetCache(tmp_path, FailsOnThird(maker))  # batch_size 2: the first two, then the third
    with pytest.raises(KeyboardInterrupt):
        cache.get(SENTENCES)
    resumed = TargetCache(tmp_path, Counting(maker))
    resumed.get(SENTENCES)
    assert resumed.maker.asked == [SENTENCES[2]] and (resumed.hits, resumed.misses) == (2, 1)
