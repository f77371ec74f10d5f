"""Typed, validated run configuration: model, LoRA, data and training settings.

A config is a YAML file (or nothing: every field has a default) plus dotted ``key=value`` overrides.
Every error names the offending key and what was expected.

One module per section (:mod:`.model`, :mod:`.lora`, :mod:`.data`, :mod:`.train`), :mod:`.run` for the whole
:class:`RunConfig`, :mod:`.loading` for YAML files and ``--set`` overrides, :mod:`.remote_code` for the remote-code
guard; every name is importable from ``loralab.config``.
"""

from loralab.config.base import TASK_TYPES, TaskType
from loralab.config.data import DataConfig, SourceConfig
from loralab.config.loading import build_config, config_keys, load_config, parse_override, read_yaml, set_dotted
from loralab.config.lora import (INIT_NOT_SUPPORTED, INIT_SUPPORTED, KEY_ALIASES, LORA_ALIASES, RESIDUAL_INITS,
                                 RETIRED_KEYS, CordaSettings, EvaSettings, LoraSettings, canonical_lora_keys,
                                 init_family)
from loralab.config.model import DEFAULT_MODEL, ModelConfig
from loralab.config.remote_code import check_remote_code, remote_code_allowed
from loralab.config.run import RunConfig
from loralab.config.train import TRACKERS, TrainConfig

__all__ = [
    # sections
    "TaskType", "TASK_TYPES", "DEFAULT_MODEL", "ModelConfig",
    "LORA_ALIASES", "KEY_ALIASES", "RETIRED_KEYS", "INIT_SUPPORTED", "RESIDUAL_INITS", "INIT_NOT_SUPPORTED",
    "init_family", "canonical_lora_keys", "EvaSettings", "CordaSettings", "LoraSettings",
    "SourceConfig", "DataConfig", "TRACKERS", "TrainConfig", "RunConfig",
    # loading and overrides
    "config_keys", "parse_override", "set_dotted", "build_config", "read_yaml", "load_config",
    # remote code
    "remote_code_allowed", "check_remote_code",
]

# private helpers, importable from here as before the split (not part of __all__)
from loralab.config.base import _Section  # noqa: E402,F401
from loralab.config.data import _short_name  # noqa: E402,F401
from loralab.config.loading import _format_validation_error  # noqa: E402,F401
from loralab.config.lora import _names  # noqa: E402,F401
from loralab.config.remote_code import _REMOTE_CODE  # noqa: E402,F401
