"""The beam search spread over CPU cores: a pool of worker processes, each holding its own search.

flashlight's search is single-threaded C++, and at the published settings (5-gram, beam 500,
100-best) it is what an evaluation waits for. Trials are independent, so each worker decodes whole
trials with its own `LexiconBeamSearch`, built ONCE in the worker's initializer from picklable
inputs (the Lexicon, the LM path, the BeamSearchParams): the lexicon trie and the KenLM model are
native objects that cannot be sent to a process, so every worker builds (and holds) its own copy.
The text is the serial search's: the same search decodes each trial, and its ties are broken by
the words (beam_search.py).

Imports: a worker unpickles its initializer from this module, which imports the word_decoding
package: numpy, flashlight, config/registry and the CMU dictionary reader, but not torch or scipy
(ctc.py, decoders.py and rescoring.py import them only where they are used), so a worker starts
in well under a second and does not map libtorch.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import weakref
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from word_decoding.beam_search import BeamSearchParams, Hypothesis, LexiconBeamSearch
from word_decoding.lexicon import Lexicon

# "spawn": a fresh interpreter per worker. fork would copy a parent that may already run torch's
# threads or hold a CUDA context (unsafe), and it could not share the parent's search anyway (native
# objects). Measured on this 2-core Xeon (load about 8, so noisy), 2 workers, tiny LM, the parent
# with torch imported: from the first submit until both workers have answered, spawn 1.6-2.7 s,
# forkserver 1.8 s; each worker 40 MB RSS (223 MB when a worker imports torch, as it does when the
# __main__ script imports torch at its top: spawn re-imports __main__ in every worker, forkserver
# once, in its server). No gain from forkserver for main.py (whose top imports almost nothing), and
# spawn needs no process-wide server.
START_METHOD = "spawn"

_search: LexiconBeamSearch | None = None  # the worker's own search (one per worker process)


def _die_with_parent() -> None:
    """End this worker when the process that started it dies, even by kill -9, instead of staying on,
    orphaned, with its LM in memory: Linux's PR_SET_PDEATHSIG (no portable library offers it; elsewhere
    the pool's own shutdown is all there is)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call: nothing will signal us
        os._exit(1)


def _start_worker(lexicon: Lexicon, lm_path: str, params: BeamSearchParams) -> None:
    global _search
    _die_with_parent()
    # KenLM writes its loading progress to the C-level stderr; the main process has printed it once
    # already (its own search, same file), so the workers' copies go to /dev/null. Errors still come
    # back as exceptions (the pool reports a worker that failed to start).
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        _search = LexiconBeamSearch(lexicon, lm_path, params)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _search_one(log_probs: np.ndarray) -> list[Hypothesis]:
    return _search.search(log_probs)


def _shutdown(executor: ProcessPoolExecutor, owner: int) -> None:
    if os.getpid() == owner:  # a forked child (a fork-started data loader worker) must not touch the copy it holds
        executor.shutdown(wait=True, cancel_futures=True)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity: what taskset, slurm or a container allow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_ranks() -> int:
    """Processes of this run on this machine: torchrun sets LOCAL_WORLD_SIZE; 1 without it."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_workers(num_workers: int) -> int:
    """num_workers as given, or for 0 this rank's share of the cores (at least 1)."""
    return num_workers if num_workers > 0 else max(1, available_cores() // local_ranks())


class SearchPool:
    """`workers` processes, each with its own LexiconBeamSearch; `search(trials)` -> n-best lists
    in trial order. close() (or garbage collection, or the end of the program) stops the workers.

    concurrent.futures.ProcessPoolExecutor: the standard library's pool, with an initializer per
    worker, futures that carry a worker's exception back, and detection of a dead worker."""

    def __init__(self, lexicon: Lexicon, lm_path: str, params: BeamSearchParams, workers: int):
        self.workers = workers
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(START_METHOD),
                                            initializer=_start_worker, initargs=(lexicon, str(lm_path), params))
        # shut down when the pool is collected or at exit, whichever comes first; never holds self
        self._finalizer = weakref.finalize(self, _shutdown, self.executor, os.getpid())

    def search(self, trials: list[np.ndarray]) -> list[list[Hypothesis]]:
        # Longest first: the caller waits for the last trial of its batch, and search time grows
        # with the frames, so a long trial started last would leave the other cores idle.
        order = sorted(range(len(trials)), key=lambda i: -len(trials[i]))
        futures = {i: self.executor.submit(_search_one, trials[i]) for i in order}
        return [futures[i].result() for i in range(len(trials))]

    def close(self) -> None:
        self._finalizer()
