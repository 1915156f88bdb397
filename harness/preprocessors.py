"""Data preprocessors of the reference trainer (docs/reference.md, section 5): feature subset,
train-only augmentations, Gaussian smoothing. Each is a registered factory returning
`preprocess(batch, training) -> batch`; they return an updated copy of the batch and never modify
its tensors in place."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from config import above, at_least, non_negative
from harness.errors import UserError
from registry import register_data_preprocessor

# ----------------------------------------------------------------------------------------------
# Gaussian smoothing (train and eval)


@dataclass
class GaussianSmoothingParams:
    std: float = 2.0  # dataset.data_transforms.smooth_kernel_std (above 0: leave the preprocessor out for none)
    kernel_size: int = 100  # smooth_kernel_size: length of the impulse the kernel is cut from

    def problems(self):
        yield from above(self, 0, "std")
        yield from at_least(self, 1, "kernel_size")


def gaussian_kernel(std: float, kernel_size: int) -> np.ndarray:
    """The reference kernel: a unit impulse at kernel_size // 2 in float32 zeros, filtered by
    scipy's gaussian_filter1d, taps > 0.01 kept, normalised (9 taps for std 2)."""
    impulse = np.zeros(kernel_size, dtype=np.float32)
    impulse[kernel_size // 2] = 1
    kernel = gaussian_filter1d(impulse, std)
    kernel = kernel[kernel > 0.01]
    return kernel / kernel.sum()


@register_data_preprocessor()
def gaussian_smoothing(params: GaussianSmoothingParams):
    kernel = torch.from_numpy(gaussian_kernel(params.std, params.kernel_size))

    def preprocess(batch, training):
        # Depthwise conv along time with 'same' zero padding over the whole padded batch, as the
        # reference: near each trial's valid end the smoothed values mix in the padding's zeros
        # (or, in training, the noise the augmentations added there). Reproduced on purpose.
        x = batch.features
        weight = kernel.to(x.device, x.dtype).view(1, 1, -1).repeat(x.shape[-1], 1, 1)  # (C, 1, taps)
        smoothed = F.conv1d(x.transpose(1, 2), weight, padding="same", groups=x.shape[-1])
        return replace(batch, features=smoothed.transpose(1, 2))

    return preprocess


# ----------------------------------------------------------------------------------------------
# Feature subset (the reference's dataset.feature_subset)


@dataclass
class FeatureSubsetParams:
    indices: list[int]  # feature columns to keep, in this order

    def problems(self):
        if not self.indices:
            yield "indices", "is empty: name at least one feature column to keep"
        negative = [i for i in self.indices if i < 0]
        if negative:
            yield "indices", f"holds {negative[:5]}: feature columns are counted from 0"


class _FeatureSubset:
    def __init__(self, indices: list[int]):
        if not indices:
            raise UserError("feature_subset: params.indices is empty")
        self.indices = list(indices)

    def output_features(self, n: int) -> int:
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise UserError(f"feature_subset: indices {bad[:5]} are outside the {n} input features")
        return len(self.indices)

    def __call__(self, batch, training):
        index = torch.tensor(self.indices, device=batch.features.device)
        return replace(batch, features=batch.features.index_select(-1, index))


@register_data_preprocessor()
def feature_subset(params: FeatureSubsetParams):
    return _FeatureSubset(params.indices)


# ----------------------------------------------------------------------------------------------
# Augmentations (train only)


@dataclass
class AugmentParams:
    """The reference's dataset.data_transforms names and defaults (rnn_args.yaml). A std of 0 turns
    that augmentation off."""

    white_noise_std: float = 1.0  # per element
    constant_offset_std: float = 0.2  # per trial and channel, the same for every bin
    random_walk_std: float = 0.0  # off by default
    random_walk_axis: int = -1  # cumsum axis of (B, T, C): -1 is the channel axis, as in the reference
    static_gain_std: float = 0.0  # off by default
    random_cut: int = 3  # drop the first c bins, c = randint(0, random_cut): c in {0, 1, 2}; 0 (or 1): off

    def problems(self):
        yield from non_negative(self, "white_noise_std", "constant_offset_std", "random_walk_std", "static_gain_std")
        yield from at_least(self, 0, "random_cut")
        if not -3 <= self.random_walk_axis <= 2:
            yield "random_walk_axis", (f"is {self.random_walk_axis}: it must be an axis of the (batch, time, channel) "
                                       "features, -3 to 2 (-1: channels, 1 or -2: time)")


@register_data_preprocessor()
def augment(params: AugmentParams):
    p = params

    def preprocess(batch, training):
        # The reference code's order (docs/reference.md, section 5): static gain, white noise,
        # constant offset, random walk, random cut.
        # Draws come from torch's global RNG on the batch's device, so a resumed run that restores
        # the RNG state replays them; the reference draws the cut with numpy instead.
        if not training:
            return batch
        x, lengths = batch.features, batch.lengths
        batch_size, _, channels = x.shape
        if p.static_gain_std > 0:  # one random (C, C) mixing per trial
            gain = torch.eye(channels, device=x.device) + p.static_gain_std * torch.randn(
                batch_size, channels, channels, device=x.device)
            x = x @ gain
        if p.white_noise_std > 0:  # also over the padding, as the reference
            x = x + p.white_noise_std * torch.randn(x.shape, device=x.device)
        if p.constant_offset_std > 0:
            x = x + p.constant_offset_std * torch.randn(batch_size, 1, channels, device=x.device)
        if p.random_walk_std > 0:
            x = x + torch.cumsum(p.random_walk_std * torch.randn(x.shape, device=x.device), dim=p.random_walk_axis)
        if p.random_cut > 0:  # one cut for the whole batch
            cut = int(torch.randint(0, p.random_cut, (1,), device=x.device))
            x, lengths = x[:, cut:], (lengths - cut).clamp(min=0)
        return replace(batch, features=x, lengths=lengths)

    return preprocess
