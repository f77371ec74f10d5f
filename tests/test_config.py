"""Config: defaults, dotted overrides, and errors that name the key and the allowed values."""

import pytest

from loralab.config import RunConfig, build_config, config_keys, load_config, parse_override
from loralab.errors import ConfigError


def test_defaults_are_the_builtin_model_and_demo_data():
    config = load_config()
    assert config.model.name_or_path == "smollm2-135m-instruct"
    assert config.data.path is None and config.data.eval_split == 0.2 and config.data.seed == 42
    assert config.lora.target_modules is None  # the per-architecture preset
    assert config.run_dir().as_posix() == "runs/smollm2-135m-instruct-demo"


def test_overrides_parse_types():
    config = build_config(overrides=["lora.r=8", "train.learning_rate=2e-4", "lora.target_modules=[q_proj, v_proj]",
                                     "data.train_on_prompt=true", "model.task_type=causal_lm"])
    assert config.lora.r == 8 and config.train.learning_rate == pytest.approx(2e-4)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.train_on_prompt is True
    assert config.model.task_type == "CAUSAL_LM"
    assert parse_override("lora.target_modules=all-linear") == ("lora.target_modules", "all-linear")


def test_yaml_file_and_override_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\n  alpha: 8\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["lora.r=16"])
    assert (config.lora.r, config.lora.alpha, config.train.epochs) == (16, 8, 3)
    again = build_config(__import__("yaml").safe_load(config.to_yaml()))
    assert again == config


@pytest.mark.parametrize("override, fragment", [
    ("lora.r=0", "lora.r"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("model.task_type=TOKEN_MAGIC", "CAUSAL_LM"),
    ("lora.bias=some", "'none', 'all' or 'lora_only'"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_values_name_key_and_allowed_values(override, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=[override])
    assert fragment in str(info.value)


def test_unknown_keys_list_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'.*lora.r"):
        build_config(overrides=["lora.rank=3"])
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rank' in section 'lora'; allowed: .*alpha"):
        load_config(path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  r: 4\n  alpha: [8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line \d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_section_key_is_listed():
    keys = config_keys()
    for key in ("lora.use_dora", "lora.init_lora_weights", "data.prompt_field", "train.gradient_checkpointing", "train.resume"):
        assert key in keys
    assert RunConfig().run_name() == "smollm2-135m-instruct-demo"
