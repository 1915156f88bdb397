"""Frozen alignment targets: sentence -> TTS waveform -> audio-encoder frames.

The audio-aligned model learns to predict, from brain data, the frames that a frozen audio encoder
produces from synthetic speech of the attempted sentence. A `TargetMaker` strings one TTS engine and
one audio encoder together; both are chosen by name in the config (`model_params.targets`):

    targets:
      tts: {name: espeak_ng, params: {voice: en-us, rate: 175}}
      encoder: {name: log_mel, params: {n_mels: 80, pool: 4}}
      device: cpu
      batch_size: 8

Registered components (the offline default first):
- TTS: `espeak_ng` (espeak-ng formant speech, no weights, no network), `mms_tts` (VITS, e.g.
  facebook/mms-tts-eng). See tts.py.
- encoders: `log_mel` (Whisper log-mel frames pooled to 40 ms, no weights), `qwen2_audio` (the audio
  tower of Qwen2-Audio, 1280-d frames at 40 ms). See encoders.py.

Adding a TTS engine or an encoder: write a params dataclass and a builder decorated with
`register_tts()` / `register_audio_encoder()` whose first parameter is annotated with that dataclass
and whose second is the device string. The builder returns an object with
- for a TTS: `name`, `identity` (a JSON-able dict of everything that changes the audio: params,
  library versions, a digest of the weights) and `__call__(sentences) -> list of float32 mono
  waveforms at 16 kHz` (`SAMPLE_RATE`);
- for an encoder: `name`, `identity`, `dim`, `frame_rate` and `__call__(waveforms) -> list of
  (T_i, dim) float32 arrays`, T_i >= 1.
Put it in any module that is imported with the package (e.g. a new file imported from
`alignment/__init__.py`, or your own model folder); the config then names it. Params are
checked like the rest of the config: a bad key names `model_params.targets.tts.params.<key>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from config import ComponentSpec, KeyPath, at_least, component, from_data, to_data
from harness.devices import pick_device
from harness.errors import UserError
from registry import AUDIO_ENCODERS, TTS_ENGINES, register_audio_encoder, register_tts  # noqa: F401  (re-exported)

SAMPLE_RATE = 16_000  # every TTS hands 16 kHz mono float32 audio to the encoders
TARGET_FORMAT_VERSION = 2  # bump when code here changes the targets without changing any param


@dataclass
class TargetParams:
    """`model_params.targets` of the audio-aligned models."""

    tts: ComponentSpec = component(TTS_ENGINES, "espeak_ng")
    encoder: ComponentSpec = component(AUDIO_ENCODERS, "log_mel")
    device: str = "cpu"  # where the frozen TTS/encoder run while precomputing: cpu | cuda | cuda:N | auto
    batch_size: int = 8  # sentences per TTS/encoder call

    def problems(self):
        yield from at_least(self, 1, "batch_size")


class TextToSpeech(Protocol):
    name: str
    identity: dict

    def __call__(self, sentences: list[str]) -> list[np.ndarray]: ...


class AudioEncoder(Protocol):
    name: str
    identity: dict
    dim: int
    frame_rate: float

    def __call__(self, waveforms: list[np.ndarray]) -> list[np.ndarray]: ...


class TargetMaker:
    """Sentences -> target frame sequences, through one TTS engine and one audio encoder."""

    def __init__(self, tts: TextToSpeech, encoder: AudioEncoder, batch_size: int = 8):
        self.tts = tts
        self.encoder = encoder
        self.batch_size = batch_size
        self.name = f"{tts.name}+{encoder.name}"  # goes in results: says what the targets are
        self.dim = int(encoder.dim)
        self.frame_rate = float(encoder.frame_rate)
        self.identity = {"format": TARGET_FORMAT_VERSION, "tts": {"name": tts.name, **tts.identity},
                         "encoder": {"name": encoder.name, **encoder.identity}}
        # Device and batch size are left out on purpose: they do not change what a target means,
        # so a cache filled on a GPU serves a CPU run.
        self.config_hash = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    def __call__(self, sentences: list[str]) -> list[np.ndarray]:
        for sentence in sentences:
            if not sentence.strip():
                raise UserError(f"targets: cannot synthesise an empty sentence ({sentence!r})")
        frames: list[np.ndarray] = []
        for start in range(0, len(sentences), self.batch_size):
            chunk = list(sentences[start:start + self.batch_size])
            frames.extend(self.encoder(self.tts(chunk)))
        for sentence, f in zip(sentences, frames):  # a broken component is a bug, not a user mistake
            assert f.ndim == 2 and f.shape[0] >= 1 and f.shape[1] == self.dim and f.dtype == np.float32, \
                f"{self.name} gave frames of shape {f.shape} and dtype {f.dtype} for {sentence!r}"
        return frames

    def __repr__(self) -> str:
        return f"TargetMaker({self.name}, dim={self.dim}, {self.frame_rate:g} frames/s, hash {self.config_hash})"


def resolve_target_params(params: TargetParams | dict, path: str = "model_params.targets") -> TargetParams:
    """`params` (a mapping or TargetParams) checked and typed as a config file's are (idempotent):
    an unknown component name or a bad param is a UserError naming the key under `path`."""
    data = to_data(params) if dataclasses.is_dataclass(params) else params
    return from_data(TargetParams, data, KeyPath(), path)


def build_target_maker(params: TargetParams) -> TargetMaker:
    """Load the TTS engine and the encoder named in `params`. Raises UserError on unknown names or
    bad params (and on models that cannot be loaded)."""
    if params.batch_size < 1:
        raise UserError(f"model_params.targets.batch_size: must be at least 1, got {params.batch_size}")
    device = str(pick_device(params.device, "model_params.targets.device"))
    tts = TTS_ENGINES.build(params.tts, device, path="model_params.targets.tts")
    encoder = AUDIO_ENCODERS.build(params.encoder, device, path="model_params.targets.encoder")
    return TargetMaker(tts, encoder, params.batch_size)


def weights_digest(model) -> str:
    """A digest of a torch module's parameters and buffers: identifies the weights wherever they were
    loaded from (hub id, local copy), so the target cache follows the weights, not the path."""
    import torch

    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()
