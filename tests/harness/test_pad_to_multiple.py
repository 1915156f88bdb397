"""data_params.pad_to_multiple: collate pads the time axis up to a multiple, the training loader
passes it on, and a value below 1 is refused before anything runs."""

import numpy as np
import pytest
import torch

from config import DataParams, TrainingParams, load_config
from harness.batching import collate
from harness.data import Trial
from harness.errors import UserError
from harness.train import train_loader
from tests.conftest import TINY_CONFIG


def items(lengths, n_features=4):
    rng = np.random.default_rng(0)
    return [(Trial("train", "s", i % 2, "p", f"trial_{i}", 1, i, n, (1, 2, 3), "a sentence."),
             rng.standard_normal((n, n_features)).astype(np.float32)) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("multiple, padded", [(1, 70), (8, 72), (64, 128), (70, 70), (35, 70)])
def test_collate_pads_time_up_to_the_multiple_and_keeps_the_true_lengths(multiple, padded):
    batch = collate(items([70, 33, 5]), pad_to_multiple=multiple)
    plain = collate(items([70, 33, 5]))
    assert batch.features.shape == (3, padded, 4)
    assert torch.equal(batch.lengths, torch.tensor([70, 33, 5]))
    assert torch.equal(batch.features[:, :70], plain.features)  # the trials themselves are untouched
    assert not batch.features[:, 70:].any()  # the extra steps are zeros, like the rest of the padding


def test_the_training_loader_pads_with_the_configs_multiple():
    trial_items = items([50, 41, 37, 29, 66, 12])
    dp = DataParams(batch_size=4, days_per_batch=2, pad_to_multiple=16)
    tp = TrainingParams(num_steps=3)
    loader = train_loader([t for t, _ in trial_items], [x for _, x in trial_items], dp, tp, 0, torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch.features.shape[1] % 16 == 0 and batch.features.shape[1] - int(batch.lengths.max()) < 16


@pytest.mark.parametrize("value", [0, -64])
def test_pad_to_multiple_below_one_is_a_user_error(value):
    with pytest.raises(UserError, match=r"--set data_params.pad_to_multiple: is -?\d+: it must be at least 1"):
        load_config(TINY_CONFIG, [f"data_params.pad_to_multiple={value}"])
    assert load_config(TINY_CONFIG).data_params.pad_to_multiple == 1  # the default passes
