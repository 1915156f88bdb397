"""The audio-aligned GRU (issue 5): frozen TTS + audio-encoder targets, their cache, the model."""

from audio_alignment import targets  # noqa: F401  registries and TargetMaker first: the components register into them
from audio_alignment import cache, encoders, tts  # noqa: F401
from audio_alignment import losses, model, retrieval  # noqa: F401  the gru_align model (registers its constructor and setter)
