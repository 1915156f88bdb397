"""The Brain-to-Text '25 baseline's brain encoder (day layers, patching, GRU), shared by decoders.

Registers nothing: decoder folders (e.g. ctc_baseline) subclass `GRUEncoder` and add a head.
"""

from gru_decoder.encoder import GRUEncoder, GRUEncoderParams, output_lengths, patchify

__all__ = ["GRUEncoder", "GRUEncoderParams", "output_lengths", "patchify"]
