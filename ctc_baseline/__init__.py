"""The published Brain-to-Text '25 baseline (NEJM 2024 GRU + CTC phoneme decoder) in b2t-bench.

Registers the model constructor `ctc_baseline`, its config setter `ctc_baseline_setter`, and the
reference's data preprocessors `gaussian_smoothing`, `feature_subset` and `augment`.
`load_reference_checkpoint(folder)` reads a checkpoint folder written by the reference trainer.
"""

from ctc_baseline.model import CTCBaseline, CTCBaselineParams, ctc_baseline, ctc_baseline_setter, greedy_phonemes
from ctc_baseline.preprocess import (AugmentParams, FeatureSubsetParams, GaussianSmoothingParams, augment,
                                     feature_subset, gaussian_kernel, gaussian_smoothing)
from ctc_baseline.reference import load_reference_checkpoint

__all__ = [
    "AugmentParams", "CTCBaseline", "CTCBaselineParams", "FeatureSubsetParams", "GaussianSmoothingParams",
    "augment", "ctc_baseline", "ctc_baseline_setter", "feature_subset", "gaussian_kernel", "gaussian_smoothing",
    "greedy_phonemes", "load_reference_checkpoint",
]
