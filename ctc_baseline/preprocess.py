"""Deprecated: the data preprocessors moved to `harness.preprocessors` (CHANGELOG, 0.2.0).
This module re-exports them until 0.3."""

import warnings

from harness.preprocessors import (  # noqa: F401
                                   AugmentParams,
                                   FeatureSubsetParams,
                                   GaussianSmoothingParams,
                                   augment,
                                   feature_subset,
                                   gaussian_kernel,
                                   gaussian_smoothing,
)

warnings.warn("ctc_baseline.preprocess moved to harness.preprocessors; this path goes in 0.3",
              DeprecationWarning, stacklevel=2)
