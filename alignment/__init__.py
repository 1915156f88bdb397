"""Shared audio-alignment components: what the audio-aligned GRU and the LLM decoder both use.

- targets.py: a TTS engine + an audio encoder -> target frames (`TargetParams`, `build_target_maker`);
  tts.py and encoders.py register the engines and encoders;
- cache.py: the on-disk target cache; store.py: targets in memory, standardised and padded, and the
  projector from GRU outputs to the target width;
- losses.py: the alignment losses and their assembly (`LossWeights`, `alignment_losses`);
- retrieval.py: candidate sentences scored against brain embeddings (ranking only; the accuracy is a
  harness metric).
"""

from alignment import (  # noqa: F401
    cache,
    encoders,
    losses,
    retrieval,
    store,
    targets,  # noqa: F401  first: the components below register through it
    tts,
)
