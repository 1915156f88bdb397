"""Load a checkpoint folder written by the reference Brain-to-Text '25 trainer (docs/reference.md, section 7).

    <folder>/checkpoint/args.yaml         the trainer's config: model size, session list, transforms
    <folder>/checkpoint/best_checkpoint   torch.save dict: model_state_dict (keys prefixed `_orig_mod.`),
                                          optimizer/scheduler states, val_PER (float), val_loss (numpy.float64)

`load_reference_checkpoint(folder)` gives a config dict for this project (model `ctc_baseline`, the
reference's data transforms as preprocessors, its session list, which fixes the day indices) and
the state dict with the reference key names, ready for `CTCBaseline.load_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from ctc_baseline.model import CTCBaseline, CTCBaselineParams
from harness.errors import UserError
from registry import register_checkpoint_format

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar

# What weights_only unpickling must additionally accept: val_loss is a numpy.float64, pickled as
# numpy's scalar() reconstructor applied to a dtype. A file written under numpy 1.x names the
# reconstructor numpy.core.multiarray.scalar, under numpy 2 numpy._core.multiarray.scalar.
NUMPY_SAFE_GLOBALS = [
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),  # numpy.dtypes.Float64DType: the dtype object's class, set up by BUILD
]
PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel/DDP wrappers

NUMBER = (int, float)
# args.yaml key -> (CTCBaselineParams field, type)
MODEL_KEYS = {
    "model.n_input_features": ("n_features", int),
    "model.n_units": ("n_units", int),
    "model.n_layers": ("n_layers", int),
    "model.patch_size": ("patch_size", int),
    "model.patch_stride": ("patch_stride", int),
    "model.input_network.input_layer_dropout": ("input_dropout", NUMBER),
    "model.rnn_dropout": ("rnn_dropout", NUMBER),
    "dataset.n_classes": ("n_classes", int),
}
# dataset.data_transforms keys of the augment preprocessor (AugmentParams has the same names)
AUGMENT_KEYS = {"white_noise_std": NUMBER, "constant_offset_std": NUMBER, "random_walk_std": NUMBER,
                "random_walk_axis": int, "static_gain_std": NUMBER, "random_cut": int}
TRANSFORMS = "dataset.data_transforms."


def load_reference_checkpoint(folder) -> tuple[dict, dict, dict]:
    """-> (config dict for ExperimentConfig, state dict, info with val_PER and val_loss as floats).
    Raises UserError with one line when the folder is not a well-formed reference checkpoint."""
    folder = Path(folder)
    args_path, checkpoint_path = folder / "checkpoint" / "args.yaml", folder / "checkpoint" / "best_checkpoint"
    for path in (args_path, checkpoint_path):
        if not path.is_file():
            raise UserError(f"{folder} is not a reference checkpoint folder: {path} is missing")
    args = _read_args(args_path)
    config = reference_config(args, args_path, name=folder.name)
    checkpoint = _read_checkpoint(checkpoint_path)
    state = strip_prefixes(checkpoint["model_state_dict"])
    _check_state(state, CTCBaselineParams(**config["model_params"]), checkpoint_path)
    info = {"val_PER": _float(checkpoint, "val_PER", checkpoint_path),
            "val_loss": _float(checkpoint, "val_loss", checkpoint_path)}
    return config, state, info


@register_checkpoint_format()
def reference_baseline(path: Path) -> dict | None:
    """`evaluate --checkpoint FOLDER` of a reference trainer's folder (it holds checkpoint/args.yaml);
    None for any other path."""
    if not (Path(path) / "checkpoint" / "args.yaml").is_file():
        return None
    config, state, _ = load_reference_checkpoint(path)
    return {"config": config, "model": state, "file": Path(path) / "checkpoint" / "best_checkpoint"}


def reference_config(args: dict, source, name: str = "reference") -> dict:
    """The project config equivalent to the reference args: model size, sessions, data transforms
    (feature subset, then train-only augmentations, then smoothing: the reference's order)."""
    sessions = _get(args, "dataset.sessions", list, source)
    if not sessions:
        raise UserError(f"{source}: dataset.sessions is empty")
    model_params = {field: _get(args, key, kind, source) for key, (field, kind) in MODEL_KEYS.items()}
    model_params["n_days"] = len(sessions)
    transforms = _get(args, "dataset.data_transforms", dict, source)
    preprocessors = []
    subset = _get(args, "dataset.feature_subset", (list, type(None)), source, required=False)
    if subset:
        preprocessors.append({"name": "feature_subset", "params": {"indices": list(subset)}})
    preprocessors.append({"name": "augment", "params": {
        key: _get(transforms, key, kind, source, prefix=TRANSFORMS) for key, kind in AUGMENT_KEYS.items()}})
    if _get(transforms, "smooth_data", bool, source, prefix=TRANSFORMS):
        preprocessors.append({"name": "gaussian_smoothing", "params": {
            "std": _get(transforms, "smooth_kernel_std", NUMBER, source, prefix=TRANSFORMS),
            "kernel_size": _get(transforms, "smooth_kernel_size", int, source, prefix=TRANSFORMS),
        }})
    data_params = {"sessions": [str(s) for s in sessions], "preprocessors": preprocessors}
    if not subset:  # with a subset the files keep their full width (the default 512)
        data_params["n_features"] = model_params["n_features"]
    return {"trial_name": f"reference_{name}", "model_constructor_name": "ctc_baseline",
            "model_params": model_params, "data_params": data_params}


def strip_prefixes(state: dict) -> dict:
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, in any nesting."""
    stripped = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _read_args(path: Path) -> dict:
    try:
        args = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(args, dict):
        raise UserError(f"{path}: expected a mapping of trainer arguments")
    return args


def _get(mapping: dict, dotted: str, kind, source, required: bool = True, prefix: str = ""):
    """mapping['a']['b'] for 'a.b', type-checked; a missing or mistyped key is a UserError."""
    value = mapping
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            if not required:
                return None
            raise UserError(f"{source}: missing key {prefix}{dotted}")
        value = value[part]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # YAML true is no number
        raise UserError(f"{source}: {prefix}{dotted} has an unexpected value {value!r}")
    return value


def _read_checkpoint(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, or a global weights_only refuses: one line, no traceback
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: cannot be loaded as a reference checkpoint: {first_line}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise UserError(f"{path}: no model_state_dict inside: not a reference trainer checkpoint")
    return checkpoint


def _check_state(state: dict, params: CTCBaselineParams, path: Path) -> None:
    """Keys and shapes must be those of the model args.yaml describes (built on the meta device:
    no memory, no time)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CTCBaseline(params).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    for problem, keys in (("lacks", missing), ("has unexpected", unexpected), ("has wrongly shaped", wrong)):
        if keys:
            raise UserError(f"{path}: the state dict {problem} keys for the model in args.yaml: {', '.join(keys[:4])}"
                            + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""))


def _float(checkpoint: dict, key: str, path: Path) -> float:
    try:
        return float(checkpoint[key])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: {key} is missing or not a number") from None
