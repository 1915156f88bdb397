"""Which torch device a config key names."""

from __future__ import annotations

import torch

from harness.errors import UserError


def pick_device(name: str, key: str = "training_params.device") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device that exists; `key` names the config key in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}: {name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is {name!r} but no CUDA device is available (use auto or cpu)")
    return device
