"""Paired statistics of two decoders on the same trials: is B really better than A?

Both tests use the trial-by-trial pairing, which is far more sensitive than comparing two
independent confidence intervals (the same hard sentence is hard for both decoders):

- the paired bootstrap CI of the difference B - A of a summed-ratio metric: resample the joined
  trials with replacement (both decoders' values of a trial drawn together), recompute each
  decoder's summed ratio on the resample, take the 2.5 / 97.5 percentiles of the difference;
- the Wilcoxon signed-rank test (scipy.stats.wilcoxon) on the per-trial differences of error
  counts: a p-value for "the per-trial differences are symmetric around 0".
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from harness.metrics import percentile_bootstrap, ratio_statistic, summed_ratio


def _difference_statistic(a_values, a_counts, b_values, b_counts, axis=-1):
    """B's summed ratio minus A's, vectorised over resamples (NaN where a ratio is undefined)."""
    return ratio_statistic(b_values, b_counts, axis=axis) - ratio_statistic(a_values, a_counts, axis=axis)


EXACT_MAX = 13  # scipy.stats.wilcoxon's bound for its exact permutation test where there are ties or zeros


def _exact_with_ties(differences: np.ndarray) -> tuple[float, float]:
    """(statistic, two-sided p) as scipy.stats.wilcoxon gives them for at most EXACT_MAX differences
    with ties or zeros: the exact distribution of the positive rank sum over all 2^n sign flips. scipy
    computes it with a Python call per flip (seconds for 13 trials, as on one session of a
    per-session comparison); this is the same enumeration as one matrix product."""
    nonzero = differences[differences != 0]
    ranks = stats.rankdata(np.abs(nonzero))
    observed = float(ranks[nonzero > 0].sum())
    flips = (np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1
    null = flips @ ranks  # the positive rank sum of every sign pattern
    gamma = abs(1e-14 * observed)  # scipy.stats.permutation_test's tolerance for equal statistics
    p = 2 * min(np.mean(null <= observed + gamma), np.mean(null >= observed - gamma))
    return min(observed, float(ranks.sum()) - observed), float(min(p, 1.0))


def wilcoxon_signed_rank(a_values, b_values) -> tuple[float | None, float | None]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test on per-trial differences B - A.

    Trials where both decoders made the same number of errors carry no information about which is
    better and are dropped (zero_method="wilcox", scipy's default). When every difference is zero
    there is nothing left to test and we return (None, None) rather than a made-up p-value.
    """
    differences = np.asarray(b_values, dtype=np.float64) - np.asarray(a_values, dtype=np.float64)
    if not np.any(differences):
        return None, None
    nonzero = np.abs(differences[differences != 0])
    if len(differences) <= EXACT_MAX and (len(nonzero) < len(differences) or len(np.unique(nonzero)) < len(nonzero)):
        return _exact_with_ties(differences)
    result = stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def paired_comparison(a_values, a_counts, b_values, b_counts, *, higher_is_better: bool = False,
                      n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Compare decoders A and B on the same trials (row i of every array is the same trial).

    values / counts per trial: edits / reference length for an error rate (lower is better), or
    hits / 1 for a retrieval accuracy (higher_is_better=True). Returns
      n_trials; a, b: each decoder's summed ratio on these trials; difference: b - a;
      difference_ci: paired bootstrap 95% CI of b - a (None with fewer than 2 trials or
      n_resamples=0); b_better, a_better, equal: trials where B is better, worse, the same;
      wilcoxon_statistic, wilcoxon_p: see wilcoxon_signed_rank (None when all trials are equal).
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (a_values, a_counts, b_values, b_counts)]
    n = len(arrays[0])
    if any(len(x) != n or x.ndim != 1 for x in arrays):
        raise ValueError("a_values, a_counts, b_values, b_counts must be 1-D and of the same length")
    a_v, a_c, b_v, b_c = arrays
    a, b = summed_ratio(a_v, a_c), summed_ratio(b_v, b_c)
    out = {"n_trials": n, "a": a, "b": b, "difference": None if a is None or b is None else b - a,
           "difference_ci": None}
    if out["difference"] is not None and n >= 2 and n_resamples > 0:
        out["difference_ci"] = list(percentile_bootstrap(arrays, _difference_statistic, n_resamples, seed))
    # Per trial, compare rates (values / count): both decoders saw the same trial, so for equal
    # counts this is the same as comparing error counts, and it stays right if counts differ.
    with np.errstate(divide="ignore", invalid="ignore"):
        a_rate, b_rate = a_v / a_c, b_v / b_c
    sign = 1 if higher_is_better else -1
    out["b_better"] = int(np.sum(sign * (b_rate - a_rate) > 0))
    out["a_better"] = int(np.sum(sign * (b_rate - a_rate) < 0))
    out["equal"] = n - out["b_better"] - out["a_better"]
    out["wilcoxon_statistic"], out["wilcoxon_p"] = wilcoxon_signed_rank(a_v, b_v)
    return out
