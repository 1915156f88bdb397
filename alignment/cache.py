"""On-disk cache of alignment targets: each sentence synthesised and encoded once per target config.

Layout: `<root>/<config_hash>/<first 2 hex digits>/<sha256 of the sentence>.npz`, plus
`<root>/<config_hash>/target_config.json` describing the TargetMaker (for people, not read back).
An entry holds the frames (float16: half the disk of float32, and far finer than what the model
can predict), the sentence itself (guards against hash collisions) and a checksum of the frames.
An entry that cannot be read, or whose checksum or sentence does not match, is recomputed.

Writes go to a temporary file in the same folder, then `os.replace`: a reader sees either no entry
or a complete one, and two processes filling the same cache at once at worst compute an entry twice.
Why no library (diskcache, joblib.Memory): this needs a content check and atomic replace of small
numpy files, about forty lines; those libraries bring their own formats and locking for much more.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness.results import atomic_write_bytes, atomic_write_text

STORED_DTYPE = np.float16


class TargetCache:
    """`get(sentences)` returns each sentence's target frames, computing only what is missing.

    Frames come back as stored (float16, shape (T, dim)) whether they were read or just computed, so
    a run sees the same values on its first and later epochs; cast them where they are used.
    """

    def __init__(self, root: str | Path, maker):
        self.maker = maker
        self.folder = Path(root) / maker.config_hash
        self.hits = 0
        self.misses = 0

    def path(self, sentence: str) -> Path:
        key = hashlib.sha256(sentence.encode("utf-8")).hexdigest()
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, sentences: Iterable[str], progress: bool = True) -> dict[str, np.ndarray]:
        unique = list(dict.fromkeys(sentences))
        found = {s: self.read(s) for s in unique}
        missing = [s for s in unique if found[s] is None]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            self._describe_config()
            show = progress and sys.stderr.isatty()
            batch = self.maker.batch_size
            with tqdm(total=len(missing), desc=f"targets {self.maker.name}", unit="sentence", disable=not show) as bar:
                for start in range(0, len(missing), batch):  # written as they come: an interrupted fill keeps its work
                    chunk = missing[start:start + batch]
                    for sentence, frames in zip(chunk, self.maker(chunk)):
                        found[sentence] = self.write(sentence, frames)
                    bar.update(len(chunk))
        return found

    def read(self, sentence: str) -> np.ndarray | None:
        """The stored frames, or None if the entry is absent, partial or corrupted."""
        try:
            with np.load(self.path(sentence), allow_pickle=False) as entry:
                frames, stored_sentence, checksum = entry["frames"], str(entry["sentence"]), str(entry["checksum"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # truncated or garbage
            return None
        if stored_sentence != sentence or checksum != _checksum(frames) or frames.dtype != STORED_DTYPE:
            return None
        return frames

    def write(self, sentence: str, frames: np.ndarray) -> np.ndarray:
        stored = np.asarray(frames).astype(STORED_DTYPE)
        if not np.isfinite(stored).all():
            raise ValueError(f"{self.maker.name}: targets of {sentence!r} do not fit in float16 (inf or NaN)")
        buffer = io.BytesIO()
        np.savez(buffer, frames=stored, sentence=np.array(sentence), checksum=np.array(_checksum(stored)))
        atomic_write_bytes(self.path(sentence), buffer.getvalue())
        return stored

    def _describe_config(self):
        info = {"name": self.maker.name, "dim": self.maker.dim, "frame_rate": self.maker.frame_rate,
                "config_hash": self.maker.config_hash, "identity": getattr(self.maker, "identity", None),
                "stored_dtype": np.dtype(STORED_DTYPE).name}
        path = self.folder / "target_config.json"
        if not path.exists():
            atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True))


def _checksum(frames: np.ndarray) -> str:
    return hashlib.blake2b(f"{frames.shape}{frames.dtype}".encode() + frames.tobytes(), digest_size=16).hexdigest()

