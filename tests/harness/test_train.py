"""The optimizer groups and the learning-rate schedule of the training loop (docs/reference.md, section 4)."""

import math

import pytest

from config import ParamGroupParams, TrainingParams
from harness.train import TrainState, build_optimizer, is_better, lr_lambda


def test_warmup_then_cosine_to_lr_min_then_flat():
    f = lr_lambda(0.005, 0.0001, warmup=1000, decay=120000, kind="cosine")
    r = 0.0001 / 0.005
    assert f(0) == 0 and f(500) == pytest.approx(0.5) and f(1000) == pytest.approx(1.0)
    middle = 1000 + (120000 - 1000) // 2
    assert f(middle) == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-4)
    assert f(120000) == pytest.approx(r) and f(200000) == pytest.approx(r)
    assert lr_lambda(1.0, 0.1, 0, 10, "linear")(5) == pytest.approx(0.55)
    assert lr_lambda(1.0, 0.1, 2, 10, "constant")(9) == 1.0


def test_param_groups_take_their_own_settings():
    from ctc_baseline.model import CTCBaseline, CTCBaselineParams

    model = CTCBaseline(CTCBaselineParams(n_days=2, n_features=8, n_units=4, n_layers=2))
    tp = TrainingParams(num_steps=100, lr_max=0.005, lr_min=0.0001, weight_decay=0.001, eps=0.1, lr_warmup_steps=10,
                        param_groups={"bias": ParamGroupParams(weight_decay=0.0),
                                      "day": ParamGroupParams(lr_max=0.01, weight_decay=0.0, lr_warmup_steps=0)})
    optimizer, scheduler = build_optimizer(model, tp)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"bias", "day", "other"}
    assert groups["bias"]["weight_decay"] == 0.0 and groups["other"]["weight_decay"] == 0.001
    assert groups["day"]["weight_decay"] == 0.0 and optimizer.defaults["eps"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups["bias"]["params"]) == sorted(
        ["gru.bias_ih_l0", "gru.bias_hh_l0", "gru.bias_ih_l1", "gru.bias_hh_l1", "out.bias"])
    assert "h0" in {names[id(p)] for p in groups["other"]["params"]}
    # step 0: warmup groups start at 0, the day group (no warmup) at its own lr_max
    assert groups["other"]["lr"] == 0.0 and groups["day"]["lr"] == pytest.approx(0.01)
    for _ in range(10):
        optimizer.step()  # no gradients: a no-op, keeps the call order torch expects
        scheduler.step()
    assert groups["other"]["lr"] == pytest.approx(0.005)


def test_best_checkpoint_ties_go_to_the_lower_loss():
    state = TrainState(best_value=0.3, best_loss=2.0)
    assert is_better(0.2, 9.0, state, "min") and not is_better(0.4, 0.1, state, "min")
    assert is_better(0.3, 1.5, state, "min") and not is_better(0.3, 2.5, state, "min")
    assert is_better(0.4, 9.0, state, "max")
