import pytest
import yaml

from config import ExperimentConfig, dump_config, load_config, to_data
from harness.errors import UserError
from harness.plugins import load_plugins
from tests.conftest import REPO_ROOT, TINY_CONFIG

load_plugins()


def write(tmp_path, data, name="c.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def base():
    return yaml.safe_load(TINY_CONFIG.read_text())


def test_load_types_model_and_preprocessor_params(tmp_path):
    config = load_config(TINY_CONFIG)
    assert isinstance(config, ExperimentConfig)
    assert type(config.model_params).__name__ == "TinyParams" and config.model_params.hidden == 32
    assert type(config.data_params.preprocessors[0].params).__name__ == "ScaleParams"
    assert config.training_params.param_groups["day"].weight_decay == 0.0
    assert config.training_params.param_groups["day"].lr_max is None


def test_resolved_config_loads_back_equal(tmp_path):
    config = load_config(TINY_CONFIG, ["training_params.num_steps=7", "data_params.sessions=[a, b]"])
    path = write(tmp_path, dump_config(config), "resolved.yaml")
    again = load_config(path)
    assert again == config
    assert to_data(again) == to_data(config)


def test_unknown_key_names_path_file_and_suggestion(tmp_path):
    data = base()
    data["training_params"]["lr_mx"] = 0.1
    path = write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "training_params.lr_mx" in message and "did you mean 'lr_max'" in message


def test_unknown_key_in_model_params_uses_the_models_dataclass(tmp_path):
    data = base()
    data["model_params"]["hiden"] = 3
    with pytest.raises(UserError, match=r"model_params\.hiden: unknown key; did you mean 'hidden'"):
        load_config(write(tmp_path, data))


def test_unknown_key_in_preprocessor_params(tmp_path):
    data = base()
    data["data_params"]["preprocessors"][0]["params"] = {"factr": 2}
    with pytest.raises(UserError, match=r"data_params\.preprocessors\[0\]\.params\.factr: unknown key; did you mean 'factor'"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("path,value,expected", [
    ("training_params.num_steps", "ten", "expected int, got str 'ten'"),
    ("training_params.num_steps", 1.5, "expected int, got float 1.5"),
    ("training_params.amp_bf16", "yes", "expected bool"),
    ("training_params.lr_max", [1], "expected float, got list"),
    ("training_params.best_mode", "lowest", "'lowest' is not one of 'min', 'max'"),
    ("data_params.sessions", "t15.2023.08.11", "expected a list"),
    ("training_params.param_groups", [1], "expected a mapping"),
])
def test_wrong_types_are_errors(tmp_path, path, value, expected):
    data = base()
    section, key = path.split(".")
    data[section][key] = value
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, data))
    assert path in str(info.value) and expected in str(info.value)


def test_missing_required_and_unknown_registry_names(tmp_path):
    data = base()
    del data["model_constructor_name"]
    with pytest.raises(UserError, match="model_constructor_name: required key is missing"):
        load_config(write(tmp_path, data))
    data = base()
    data["model_constructor_name"] = "tiny_ct"
    with pytest.raises(UserError, match="did you mean 'tiny_ctc'"):
        load_config(write(tmp_path, data))
    data = base()
    data["data_params"]["preprocessors"][0]["name"] = "scale_feature"
    with pytest.raises(UserError, match=r"preprocessors\[0\]\.name.*did you mean 'scale_features'"):
        load_config(write(tmp_path, data))


def test_float_accepts_ints_and_exponent_strings(tmp_path):
    data = base()
    data["training_params"]["lr_max"] = "1e-3"  # PyYAML reads 1e-3 without a dot as a string
    data["training_params"]["eps"] = 1
    config = load_config(write(tmp_path, data))
    assert config.training_params.lr_max == 0.001 and config.training_params.eps == 1.0


def test_overrides_parse_yaml_and_validate(tmp_path):
    config = load_config(TINY_CONFIG, ["training_params.num_steps=5", "model_params.hidden=8",
                                       "training_params.betas=[0.8, 0.9]", "training_params.grad_norm_clip=null"])
    assert config.training_params.num_steps == 5 and config.model_params.hidden == 8
    assert config.training_params.betas == [0.8, 0.9] and config.training_params.grad_norm_clip is None
    with pytest.raises(UserError, match=r"--set training_params\.num_step: unknown key; did you mean 'num_steps'"):
        load_config(TINY_CONFIG, ["training_params.num_step=5"])
    with pytest.raises(UserError, match=r"--set model_params\.hidden: expected int"):
        load_config(TINY_CONFIG, ["model_params.hidden=big"])
    with pytest.raises(UserError, match="expected KEY.PATH=VALUE"):
        load_config(TINY_CONFIG, ["training_params.num_steps"])


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(UserError, match="expected a mapping of config keys"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


CONFIG_FILES = sorted((REPO_ROOT / "configs").rglob("*.yml")) + sorted((REPO_ROOT / "configs").rglob("*.yaml"))


@pytest.mark.skipif(not CONFIG_FILES, reason="no config under configs/ yet (model folders ship them)")
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_yaml_under_configs_loads(path):
    config = load_config(path)
    assert config.trial_name and config.data_params.data_dir
