"""The audio-aligned GRU (`gru_align`): the shared GRU encoder trained so that its embeddings match a
frozen audio encoder's embeddings of text-to-speech audio of the sentence. Its targets, losses and
retrieval scoring are the shared `alignment` package."""

from audio_alignment import model  # noqa: F401  registers the gru_align constructor
