#!/usr/bin/env python
"""How long `main.py convert` takes on a one-hour recording: the issue's target is at most a minute
for 128 channels at 1 kHz on the 2-core development machine.

The recording is random data shaped like an ECoG session: `--channels` ECoG channels at `--sfreq`
for `--minutes`, one sentence annotation every 6 s (4 s long), a measurement date, saved as a FIF
(float32) in a temporary folder. Each repetition runs the whole command in a fresh process (`python
main.py convert REC --out DIR`: imports, reading, filtering, features, labels, writing), as a user
runs it; the median of the repetitions is printed, with the time to read the file alone (mne's
read_raw + load_data, also in a fresh process, run between the conversions) for the ratio.

    .venv/bin/python benchmarks/convert_speed.py                  # 60 min, 128 channels, 1 kHz, 3 repetitions
    .venv/bin/python benchmarks/convert_speed.py --minutes 5 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mne  # noqa: E402
import numpy as np  # noqa: E402

from harness.sentences import unique_sentences  # noqa: E402

READ_ONLY = "import mne, sys; mne.set_log_level('error'); mne.io.read_raw(sys.argv[1], preload=True)"


def write_recording(path: Path, minutes: float, channels: int, sfreq: float) -> int:
    """The recording as a FIF; returns its number of sentences."""
    mne.set_log_level("error")
    rng = np.random.default_rng(0)
    n = int(minutes * 60 * sfreq)
    data = rng.standard_normal((channels, n), dtype=np.float32).astype(np.float64) * 1e-5
    raw = mne.io.RawArray(data, mne.create_info(channels, sfreq, "ecog"))
    del data
    raw.set_meas_date(datetime.datetime(2024, 3, 5, tzinfo=datetime.UTC))
    n_sentences = int(minutes * 10)  # one every 6 s
    texts = unique_sentences(rng, n_sentences)
    raw.set_annotations(mne.Annotations(np.arange(n_sentences) * 6.0 + 0.5, [4.0] * n_sentences,
                                        [f"sentence: {t}" for t in texts]))
    raw.save(path, overwrite=True, fmt="single")
    return n_sentences


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--sfreq", type=float, default=1000.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="b2t-convert-bench-") as tmp:
        recording = Path(tmp) / "session_raw.fif"
        n_sentences = write_recording(recording, args.minutes, args.channels, args.sfreq)
        convert, read = [], []
        for i in range(args.repeats):
            out = Path(tmp) / f"out{i}"
            convert.append(timed([sys.executable, "main.py", "convert", str(recording), "--out", str(out)]))
            read.append(timed([sys.executable, "-c", READ_ONLY, str(recording)]))
        report = json.loads((Path(tmp) / "out0" / "convert_report.json").read_text())
    median, read_median = statistics.median(convert), statistics.median(read)
    print(f"convert of {args.minutes:g} min x {args.channels} channels at {args.sfreq:g} Hz ({n_sentences} sentences), "
          f"{platform.node()}, {datetime.date.today()}")
    print(f"features: {report.get('features', {}).get('kind', report.get('features'))}")
    print(f"convert (whole command, {args.repeats} runs): median {median:.1f} s "
          f"(min {min(convert):.1f}, max {max(convert):.1f})")
    print(f"reading the file alone:                    median {read_median:.1f} s; convert / read = "
          f"{median / read_median:.1f}")
    print(f"target: at most 60 s for 60 min x 128 channels at 1 kHz -> {median / 60:.2f} of the budget")


if __name__ == "__main__":
    main()
