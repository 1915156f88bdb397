"""Progress of the long phases (feature cache, LM build, evaluation, word decoding, generation).

A tqdm bar with counts and ETA on a terminal (none in a log file, under slurm or in CI: tqdm's
`disable=None` hides it when stderr is not a TTY; the ranks other than 0 never show one), and one
INFO line per phase with its count and duration, which lands in run.log."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from tqdm import tqdm

log = logging.getLogger("b2t.progress")


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "it", show: bool = True, logger: logging.Logger = log):
    """`with phase("decode val", total=n, unit="trial") as bar: ... bar.update(k)`; logs
    "decode val: 1435 trials in 12.3 s (116.7 trials/s)" when the block ends without an error."""
    bar = Counted(tqdm(total=total, desc=name, unit=unit, dynamic_ncols=True, leave=False,
                       disable=None if show and is_rank_zero() else True))
    started = time.monotonic()
    try:
        yield bar
    finally:
        bar.close()
    seconds = time.monotonic() - started
    count = bar.count
    rate = f" ({count / seconds:.1f} {unit}s/s)" if count and seconds > 0 else ""
    logger.info("%s: %d %s%s in %.1f s%s", name, count, unit, "" if count == 1 else "s", seconds, rate)


def is_rank_zero() -> bool:
    """torchrun's RANK (0 outside torchrun); read from the environment so that this module, imported by
    the data reader, does not import torch into processes that only read features."""
    return int(os.environ.get("RANK", "0")) == 0


class Counted:
    """The bar, counting what it is told even when hidden (a disabled tqdm ignores update())."""

    def __init__(self, bar: tqdm):
        self.bar, self.count = bar, 0

    def update(self, n: int = 1) -> None:
        self.count += n
        self.bar.update(n)

    def __getattr__(self, name):  # set_postfix, close, ...: the bar's own
        return getattr(self.bar, name)
