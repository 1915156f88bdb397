"""Audio encoders for the alignment targets: `log_mel` (offline default) and `qwen2_audio`.

Each takes 16 kHz float32 waveforms and returns one (T, dim) float32 array of frames per waveform,
keeping only frames that cover the real audio (never the padding).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from alignment.targets import SAMPLE_RATE, register_audio_encoder, weights_digest
from config import at_least
from harness.errors import UserError

HOP = 160  # Whisper log-mels: one frame per 10 ms at 16 kHz


def _at_least(waveform: np.ndarray, n_samples: int) -> np.ndarray:
    """Zero-pad a (very) short waveform so that it yields at least one output frame."""
    return np.pad(waveform, (0, max(0, n_samples - len(waveform))))


# ----------------------------------------------------------------------------------------------
# log_mel: Whisper log-mel frames, no weights


@dataclass
class LogMelParams:
    n_mels: Literal[80, 128] = 80  # Whisper's feature sizes (Qwen2-Audio uses 128)
    pool: int = 4  # 10 ms mel frames averaged into one target frame: 4 -> 40 ms, Qwen2-Audio's frame rate
    normalize: Literal["none", "mean", "mean_std"] = "none"  # "mean"/"mean_std": per utterance and mel channel
    dim: int | None = None  # None: n_mels; else a fixed random projection (seeded) to this width
    projection_seed: int = 0  # numpy's generator: 0 or more

    def problems(self):
        yield from at_least(self, 1, "pool", "dim")
        yield from at_least(self, 0, "projection_seed")


class LogMelEncoder:
    """Whisper log-mel spectrogram (transformers.WhisperFeatureExtractor, built from its defaults, no
    download: log10 power, floored 8 below the utterance's peak, scaled as (x + 4) / 4), average-pooled
    over `pool` frames, then optionally a fixed Gaussian projection.

    Normalisation: none by default, beyond Whisper's own scaling. The model learns to predict these
    frames and retrieval compares them by cosine similarity. All Whisper log-mel frames share a large
    common offset, which would dominate every cosine; the model side removes it by subtracting the
    mean training target frame (the same for every sentence). Removing each utterance's own mean
    (`mean`, `mean_std`) would also remove it, but with it the sentence's average spectrum, which is
    what tells sentences apart when frames are averaged over the sentence (sentence-level losses,
    pooled retrieval). The voice is one synthetic voice at one loudness, so there is no speaker or
    channel variation that a per-utterance normalisation would be needed against.
    """

    name = "log_mel"

    def __init__(self, params: LogMelParams):
        import transformers
        from transformers import WhisperFeatureExtractor

        self.params = params
        self.extractor = WhisperFeatureExtractor(feature_size=params.n_mels)
        assert self.extractor.hop_length == HOP and self.extractor.sampling_rate == SAMPLE_RATE
        self.dim = params.dim or params.n_mels
        self.frame_rate = SAMPLE_RATE / HOP / params.pool
        self.projection = None
        if params.dim is not None:  # scaled so that unit-variance channels give unit-variance outputs
            rng = np.random.default_rng(params.projection_seed)
            self.projection = (rng.standard_normal((params.n_mels, params.dim)) / np.sqrt(params.n_mels)).astype(np.float32)
        self.identity = {**vars(params), "transformers": transformers.__version__}

    def __call__(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        return [self.frames(mel) for mel in self.log_mels(waveforms)]

    def log_mels(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Each waveform's (n_samples // 160, n_mels) Whisper log-mels, in one batched call.

        Half a window of silence is appended to each waveform first, so that the STFT frames at the
        end of the speech see the same samples whether the batch pads the waveform further or not:
        a sentence's frames never depend on the other sentences of its batch.
        """
        tail = np.zeros(self.extractor.n_fft // 2, np.float32)
        padded = [np.concatenate([_at_least(w.astype(np.float32), HOP * self.params.pool), tail]) for w in waveforms]
        with _one_torch_thread():
            features = self.extractor(padded, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False,
                                      return_tensors="np")["input_features"]
        return [f[:, : (len(w) - len(tail)) // HOP].T.astype(np.float32) for f, w in zip(features, padded)]

    def frames(self, mel: np.ndarray) -> np.ndarray:
        if self.params.normalize != "none":
            mel = mel - mel.mean(axis=0)
            if self.params.normalize == "mean_std":
                mel = mel / np.maximum(mel.std(axis=0), 1e-3)
        starts = np.arange(0, len(mel), self.params.pool)  # the last pool may be partial: real frames only
        pooled = np.add.reduceat(mel, starts, axis=0) / np.diff(np.append(starts, len(mel)))[:, None]
        if self.projection is not None:
            pooled = pooled @ self.projection
        return pooled.astype(np.float32)


@register_audio_encoder()
def log_mel(params: LogMelParams, device: str) -> LogMelEncoder:
    """Weight-free log-mel frames; computed on the CPU whatever the device (cheap)."""
    if params.pool < 1:
        raise UserError(f"model_params.targets.encoder.params.pool: must be at least 1, got {params.pool}")
    if params.dim is not None and params.dim < 1:
        raise UserError(f"model_params.targets.encoder.params.dim: must be at least 1, got {params.dim}")
    return LogMelEncoder(params)


# ----------------------------------------------------------------------------------------------
# qwen2_audio: the audio tower of Qwen2-Audio

# A full Qwen2-Audio checkpoint stores the tower under `audio_tower.` (transformers 5 models under
# `model.audio_tower.`); a folder saved from the encoder alone has no prefix. Mapping both prefixes
# away lets one from_pretrained call read either.
_TOWER_KEYS = {r"^(model\.)?audio_tower\.": ""}


@dataclass
class Qwen2AudioParams:
    model: str = "Qwen/Qwen2-Audio-7B-Instruct"  # hub id or local folder: the full model or the encoder alone
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: for GPUs


class Qwen2AudioTargets:
    """Qwen2AudioEncoder frames (d_model wide, 1280 for Qwen2-Audio; one per 40 ms).

    The encoder only accepts exactly `max_source_positions * 2` mel frames (3000 = 30 s): each
    waveform is padded to 30 s of silence as Qwen2-Audio's processor does, with the same attention
    mask over the padding as Qwen2AudioModel builds, and only the output frames covering the real
    audio are kept (`_get_feat_extract_output_lengths`). Speech longer than 30 s is cut into 30 s
    windows that are encoded separately and whose frames are concatenated.
    """

    name = "qwen2_audio"

    def __init__(self, params: Qwen2AudioParams, device: str):
        import torch
        import transformers
        from transformers import Qwen2AudioEncoder, WhisperFeatureExtractor

        self.device, self.dtype = device, getattr(torch, params.dtype)
        try:
            with _quiet_transformers():  # a full checkpoint lists every language-model key as unexpected
                model, info = Qwen2AudioEncoder.from_pretrained(params.model, key_mapping=_TOWER_KEYS,
                                                                dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError) as error:
            raise UserError(f"model_params.targets.encoder.params.model: cannot load Qwen2AudioEncoder from "
                            f"{params.model!r}: {str(error).splitlines()[0]}") from None
        if info["missing_keys"]:
            missing = ", ".join(sorted(info["missing_keys"])[:3])
            raise UserError(f"model_params.targets.encoder.params.model: {params.model!r} holds no Qwen2-Audio "
                            f"audio tower (missing {missing}, ...)")
        self.identity = {"dtype": params.dtype, "weights": weights_digest(model),
                         "transformers": transformers.__version__}
        self.model = model.to(device=device, dtype=self.dtype).eval()
        config = model.config
        self.window_frames = config.max_source_positions * model.conv1.stride[0] * model.conv2.stride[0]  # 3000
        self.window_samples = self.window_frames * HOP
        # Qwen2-Audio's preprocessor is Whisper's with 128 mels; built from the encoder's config, so an
        # encoder-only folder needs no preprocessor file.
        self.extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        self.dim = config.d_model
        self.frame_rate = SAMPLE_RATE / HOP / (model.conv2.stride[0] * model.avg_pooler.stride[0])  # 25

    def __call__(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        windows, owners = [], []
        for i, waveform in enumerate(waveforms):
            waveform = _at_least(waveform, 4 * HOP)  # 4 mel frames: at least one output frame
            for start in range(0, len(waveform), self.window_samples):
                windows.append(waveform[start:start + self.window_samples])
                owners.append(i)
        features, keep = self.mel_windows(windows)
        with torch.inference_mode():
            hidden = self.model(features.to(self.device, self.dtype),
                                attention_mask=self.attention_mask(features, keep)).last_hidden_state
        _, n_out = self.model._get_feat_extract_output_lengths(keep)
        parts: list[list[np.ndarray]] = [[] for _ in waveforms]
        for row, (owner, n) in enumerate(zip(owners, n_out.tolist())):
            parts[owner].append(hidden[row, :n].float().cpu().numpy())
        return [np.concatenate(p) for p in parts]

    def mel_windows(self, windows: list[np.ndarray]):
        """(B, n_mels, 3000) log-mels of the windows padded to 30 s, and the number of real mel frames."""
        out = self.extractor(windows, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=self.window_samples,
                             truncation=True, return_attention_mask=True, return_tensors="pt")
        assert out["input_features"].shape[-1] == self.window_frames
        return out["input_features"], out["attention_mask"].sum(-1)

    def attention_mask(self, features, mel_lengths):
        """The mask Qwen2AudioModel gives its audio tower: attend only to frames of real audio."""
        import torch
        from transformers.masking_utils import create_bidirectional_mask

        after_conv, _ = self.model._get_feat_extract_output_lengths(mel_lengths)
        n_positions = (features.shape[-1] - 2) // 2 + 1
        real = torch.arange(n_positions)[None, :] < after_conv[:, None]
        dummy = torch.zeros(len(features), n_positions, 1, dtype=self.dtype, device=self.device)
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=dummy,
                                         attention_mask=real.long().to(self.device))


@register_audio_encoder()
def qwen2_audio(params: Qwen2AudioParams, device: str) -> Qwen2AudioTargets:
    """Qwen2AudioEncoder.from_pretrained(params.model), frozen, eval mode, no gradients."""
    return Qwen2AudioTargets(params, device)


@contextlib.contextmanager
def _one_torch_thread():
    """The STFT of a few seconds of audio is too small to share between threads: on the busy 2-core
    machine one thread made log_mel several times faster than two (BENCHMARKS.md, "Target precompute")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)
