"""The published Brain-to-Text '25 baseline (NEJM 2024 GRU + CTC phoneme decoder) in b2t-bench.

Registers the model constructor `ctc_baseline` and the checkpoint format `reference_baseline`
(`evaluate --checkpoint` of a folder written by the reference trainer). The reference's data
transforms are the harness's preprocessors (`gaussian_smoothing`, `feature_subset`, `augment`) and
its word decoding is the shared `word_decoding` package.
`load_reference_checkpoint(folder)` reads a checkpoint folder written by the reference trainer.
"""

from ctc_baseline.model import CTCBaseline, CTCBaselineParams, ctc_baseline
from ctc_baseline.reference import load_reference_checkpoint

__all__ = ["CTCBaseline", "CTCBaselineParams", "ctc_baseline", "load_reference_checkpoint"]
