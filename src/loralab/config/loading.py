"""Loading configs: YAML files, dotted ``key=value`` overrides (``--set``) and readable validation errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loralab.config.lora import KEY_ALIASES, RETIRED_KEYS
from loralab.config.run import RunConfig
from loralab.errors import ConfigError


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ``lora.r``."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(config_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so 8 is an int, [q,v] a list, true a bool)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. --set lora.r=8)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for key ``a.b``, checking the key exists in the schema.

    PEFT's names (``lora.lora_alpha``) set loralab's key (``lora.alpha``), replacing the value under either name."""
    if key in RETIRED_KEYS:
        raise ConfigError(f"config key {key!r} ({value!r}) is {RETIRED_KEYS[key]}")
    key = KEY_ALIASES.get(key, key)
    for alias, canonical in KEY_ALIASES.items():
        section = data.get(alias.split(".")[0])
        if canonical == key and isinstance(section, dict):
            section.pop(alias.split(".")[1], None)
    known = config_keys()
    if key not in known:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(known)}")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in item["loc"][:-1])
            allowed = [k[len(section) + 1 :] if section else k for k in config_keys() if k.startswith(section)]
            allowed = sorted({a.split(".")[0] for a in allowed})
            where = f"in section '{section}'" if section else "at the top level"
            lines.append(f"unknown config key {key!r} {where}; allowed: {', '.join(allowed)}")
        elif not key or key in RunConfig.model_fields:  # a rule across keys (of a section): the message names them
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"config key {key!r}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Validate a config mapping with ``key=value`` overrides applied on top."""
    merged = copy.deepcopy(data or {})
    if not isinstance(merged, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, lora, data, train), got {type(merged).__name__}")
    spelled: dict[str, tuple[str, Any]] = {}  # canonical key -> (as written, value), to catch alias conflicts
    for item in overrides or []:
        key, value = parse_override(item)
        canonical = KEY_ALIASES.get(key, key)
        first = spelled.setdefault(canonical, (key, value))
        if first[0] != key and first[1] != value:
            raise ConfigError(f"overrides {first[0]}={first[1]!r} and {key}={value!r} disagree: "
                              f"{key if key != canonical else first[0]} is PEFT's name for {canonical}; give one of them")
        set_dotted(merged, key, value)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with an error that names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = read_yaml(path) if path else {}
    return build_config(data, overrides, source=str(path) if path else "defaults")
