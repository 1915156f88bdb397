"""Text-to-speech engines for the alignment targets: `espeak_ng` (offline default) and `mms_tts`.

Each returns float32 mono waveforms at 16 kHz (targets.SAMPLE_RATE), one per sentence.
"""

from __future__ import annotations

import ctypes
import difflib
import hashlib
import json
import os
import threading
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from alignment.targets import SAMPLE_RATE, register_tts, weights_digest
from config import above
from harness.errors import UserError


def to_sample_rate(waveform: np.ndarray, rate: int) -> np.ndarray:
    """Resample to 16 kHz with a polyphase filter (scipy), float32."""
    if rate == SAMPLE_RATE:
        return waveform.astype(np.float32, copy=False)
    ratio = Fraction(SAMPLE_RATE, rate)
    return resample_poly(waveform, ratio.numerator, ratio.denominator).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# espeak-ng through the library of the espeakng-loader wheel
#
# Why a ctypes binding: the Python espeak packages either phonemise only (phonemizer, misaki) or
# drive the `espeak-ng` program (not installed here; the wheel ships the library and its data, not
# the program) or play audio (pyttsx3). Synthesis into memory takes five calls of the C API
# (speak_lib.h), bound below. espeak-ng keeps global state and is not thread-safe, so every use
# holds one lock per process; each process (DataLoader worker, spawned or forked) loads its own copy.

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesise in the calling thread, hand chunks to the callback
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of exiting the process
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _WORDGAP = 1, 3, 7  # espeak_PARAMETER
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """The process's espeak-ng library, initialised once; use only while holding `lock`."""

    lock = threading.Lock()
    _instance: _Espeak | None = None

    @classmethod
    def get(cls) -> _Espeak:
        with cls.lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        import espeakng_loader

        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(),
                                                 _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {self.data_path}")
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: espeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav, n_samples, events) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0  # 0: go on synthesising

    def set_voice(self, voice: str) -> bool:
        return self.lib.espeak_SetVoiceByName(voice.encode()) == 0

    def synthesise(self, text: str, params: EspeakParams) -> np.ndarray:
        """int16 samples at self.sample_rate. Sets every setting each time: other engines in the
        same process may use other voices."""
        if not self.set_voice(params.voice):
            raise UserError(f"espeak-ng: voice {params.voice!r} not found")
        self.lib.espeak_SetParameter(_RATE, params.rate, 0)
        self.lib.espeak_SetParameter(_PITCH, params.pitch, 0)
        self.lib.espeak_SetParameter(_WORDGAP, params.word_gap, 0)
        self.lib.espeak_ng_SetRandSeed(params.seed)  # its noise source: same text, same samples
        self._chunks = []
        encoded = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak-ng failed (status {status}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _reset_lock_after_fork():  # a fork while another thread held the lock would leave it held forever
    _Espeak.lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def espeak_voice_names(data_path: str) -> tuple[list[str], list[str]]:
    """The voices (files under lang/, matched without case) and variants (voices/!v/, with case)
    that the data holds, for "did you mean"."""
    voices = sorted({p.name.lower() for p in (Path(data_path) / "lang").rglob("*") if p.is_file()})
    variants = sorted(p.name for p in (Path(data_path) / "voices" / "!v").iterdir() if p.is_file())
    return voices, variants


def _unknown(kind: str, name: str, known: list[str], folder: Path) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"model_params.targets.tts.params.voice: unknown espeak-ng {kind} '{name}'{hint} (the {kind}s are the files in {folder})"


@dataclass
class EspeakParams:
    # voice[+variant]. Storm has no pitch flutter: espeak-ng keeps its flutter phase in a static
    # variable that nothing resets, so with a flutter (every voice without a flutter-0 variant) a
    # sentence's audio depends slightly on the sentences synthesised before it in the process.
    voice: str = "en-us+Storm"
    rate: int = 175  # words per minute, 80-450
    pitch: int = 50  # base pitch, 0-100
    word_gap: int = 0  # extra pause between words, in 10 ms units at the default rate
    seed: int = 0  # espeak's own noise generator (breath and Klatt voices), fixed per sentence

    def problems(self):
        for key, low, high in (("rate", 80, 450), ("pitch", 0, 100), ("word_gap", 0, 1000)):  # as espeak_ng()
            value = getattr(self, key)
            if not low <= value <= high:
                yield key, f"{value} is outside {low}..{high}"


class EspeakTTS:
    """espeak-ng formant speech: not a neural voice (robotic, but intelligible); with a flutter-free
    voice such as the default, the same sentence always gives the same samples."""

    name = "espeak_ng"

    def __init__(self, params: EspeakParams):
        self.params = params
        engine = _Espeak.get()
        voice, _, variant = params.voice.partition("+")
        voices, variants = espeak_voice_names(engine.data_path)
        with _Espeak.lock:
            known_voice = engine.set_voice(voice)
        if not known_voice:
            raise UserError(_unknown("voice", voice, voices, Path(engine.data_path) / "lang"))
        if variant and variant not in variants:  # espeak-ng itself ignores an unknown variant without a word
            raise UserError(_unknown("variant", variant, variants, Path(engine.data_path) / "voices" / "!v"))
        self.identity = {**vars(params), "espeak_ng": engine.version}

    def __call__(self, sentences: list[str]) -> list[np.ndarray]:
        engine = _Espeak.get()
        waveforms = []
        for sentence in sentences:
            with _Espeak.lock:
                samples = engine.synthesise(sentence, self.params)
            waveforms.append(to_sample_rate(samples.astype(np.float32) / 32768.0, engine.sample_rate))
        return waveforms


@register_tts()
def espeak_ng(params: EspeakParams, device: str) -> EspeakTTS:
    """espeak-ng speech from the espeakng-loader wheel; runs on the CPU whatever the device."""
    for key, value, low, high in (("rate", params.rate, 80, 450), ("pitch", params.pitch, 0, 100),
                                  ("word_gap", params.word_gap, 0, 1000)):
        if not low <= value <= high:
            raise UserError(f"model_params.targets.tts.params.{key}: {value} is outside {low}..{high}")
    return EspeakTTS(params)


# ----------------------------------------------------------------------------------------------
# MMS-TTS (VITS) through transformers


@dataclass
class MmsTtsParams:
    model: str = "facebook/mms-tts-eng"  # hub id or local folder (VitsModel + VitsTokenizer)
    seed: int = 0  # VITS samples noise (durations, latents): fixed per sentence, see MmsTTS
    speaking_rate: float = 1.0  # > 1 speaks faster; must be above 0

    def problems(self):
        yield from above(self, 0, "speaking_rate")


class MmsTTS:
    """VITS speech, one sentence at a time under a seed derived from (seed, sentence).

    Why not batched: VITS draws its noise for the whole padded batch, so a sentence's audio would
    depend on which sentences shared its batch; the target cache needs audio that depends only on the
    sentence and the config. VITS is small (36M parameters), so this costs little.
    """

    name = "mms_tts"

    def __init__(self, params: MmsTtsParams, device: str):
        import torch
        import transformers
        from transformers import VitsModel, VitsTokenizer

        self.params, self.device = params, device
        try:
            self.tokenizer = VitsTokenizer.from_pretrained(params.model)
            self.model = VitsModel.from_pretrained(params.model, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise UserError(f"model_params.targets.tts.params.model: cannot load VITS from {params.model!r}: "
                            f"{str(error).splitlines()[0]}") from None
        self.model.to(device).eval()
        vocabulary = json_digest(self.tokenizer.get_vocab())
        tokenizer_flags = {k: getattr(self.tokenizer, k) for k in ("add_blank", "normalize", "phonemize", "is_uroman")}
        self.identity = {"seed": params.seed, "speaking_rate": params.speaking_rate,
                         "weights": weights_digest(self.model), "vocabulary": vocabulary,
                         "tokenizer": tokenizer_flags, "transformers": transformers.__version__}

    def __call__(self, sentences: list[str]) -> list[np.ndarray]:
        import torch

        waveforms = []
        for sentence in sentences:
            inputs = self.tokenizer(sentence, return_tensors="pt").to(self.device)
            if inputs["input_ids"].shape[1] == 0:
                raise UserError(f"mms_tts: no character of {sentence!r} is in the model's vocabulary")
            devices = [self.device] if self.device.startswith("cuda") else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():  # leaves the caller's RNG alone
                torch.manual_seed(sentence_seed(self.params.seed, sentence))
                out = self.model(**inputs, speaking_rate=self.params.speaking_rate)
            waveform = out.waveform[0, : int(out.sequence_lengths[0])] if out.sequence_lengths is not None else out.waveform[0]
            waveforms.append(to_sample_rate(waveform.float().cpu().numpy(), self.model.config.sampling_rate))
        return waveforms


@register_tts()
def mms_tts(params: MmsTtsParams, device: str) -> MmsTTS:
    """VitsModel + VitsTokenizer.from_pretrained(params.model): facebook/mms-tts-eng by default."""
    if params.speaking_rate <= 0:
        raise UserError(f"model_params.targets.tts.params.speaking_rate: must be > 0, got {params.speaking_rate}")
    return MmsTTS(params, device)


def sentence_seed(seed: int, sentence: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(sentence.encode("utf-8"))) % (2**63)


def json_digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
