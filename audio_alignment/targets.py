"""Deprecated: the alignment targets moved to the shared package `alignment` (CHANGELOG, 0.2.0).
This module re-exports `alignment.targets` until 0.3."""

import warnings

from alignment.targets import *  # noqa: F401,F403
from alignment.targets import SAMPLE_RATE, TargetMaker, TargetParams, build_target_maker  # noqa: F401
from config import ComponentSpec  # noqa: F401
from registry import register_audio_encoder, register_tts  # noqa: F401

warnings.warn("audio_alignment.targets moved to alignment.targets; this path goes in 0.3",
              DeprecationWarning, stacklevel=2)
