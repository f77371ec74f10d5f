"""Typed, validated run configuration: model, LoRA, data and training settings.

A config is a YAML file (or nothing: every field has a default) plus dotted ``key=value`` overrides.
Every error names the offending key and what was expected.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loralab.errors import ConfigError

TaskType = Literal["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
DEFAULT_MODEL = "smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to fine-tune and how to load it."""

    name_or_path: str = DEFAULT_MODEL
    task_type: TaskType | None = None  # auto-detected from the model's config when omitted
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    load_in_4bit: bool = False  # QLoRA: NF4 base weights with double quantization (bitsandbytes)

    @field_validator("task_type", mode="before")
    @classmethod
    def _upper_task(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class LoraSettings(_Section):
    """The fields of ``peft.LoraConfig`` that users set (``alpha`` is ``lora_alpha``)."""

    task_type: TaskType | None = None  # follows model.task_type when omitted
    target_modules: list[str] | str | None = None  # None: the per-architecture preset
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | Literal["gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal"] = True
    inference_mode: bool = False
    use_rslora: bool = False
    use_dora: bool = False

    @field_validator("task_type", mode="before")
    @classmethod
    def _upper_task(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, be a regex, 'all-linear', or be omitted for the preset")
        return value


class DataConfig(_Section):
    """Where the examples come from and how they become token ids."""

    path: str | None = None  # None: the bundled demo dataset
    format: Literal["auto", "pairs", "alpaca", "messages"] = "auto"
    prompt_field: str = "instruction"
    response_field: str = "response"
    input_field: str = "input"  # alpaca: optional context appended to the instruction
    messages_field: str = "messages"
    label_field: str = "label"  # SEQ_CLS
    eval_path: str | None = None  # a separate eval file instead of splitting
    eval_split: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 42
    max_length: int = Field(512, gt=8)
    train_on_prompt: bool = False
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    system_prompt: str | None = None


class TrainConfig(_Section):
    """Optimisation and bookkeeping settings passed to the Hugging Face Trainer."""

    learning_rate: float = Field(3e-4, gt=0)
    epochs: float = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.05, ge=0)  # < 1: fraction of steps; >= 1: number of steps
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    save_total_limit: int = Field(2, gt=0)
    save_steps: int | None = Field(None, gt=0)  # a checkpoint every N optimizer steps (default: each epoch); bounds
    # what an interruption can lose. Evaluation follows (a checkpoint is ranked by its eval loss).
    eval_steps: int | None = Field(None, gt=0)  # evaluate every N steps (default: with each checkpoint)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    resume: bool = False
    logging_steps: int = Field(5, gt=0)
    group_by_length: bool = False  # length-grouped batches: less padding but all-short / all-long batches, which
    # measured a worse loss after an epoch than random order (benchmarks/train_throughput.py)
    packing: bool = True  # causal LM: pack each batch's examples into rows, attention kept inside each example, so
    # random-order batches carry no padding (18% faster than padding them, same loss)
    pack_length: int | None = Field(None, gt=8)  # tokens per packed row (default: data.max_length)
    supervised_logits_only: bool = True  # causal LM: vocabulary projection only where labels are supervised
    eval_generate: bool = False  # generation metrics on the eval split after each epoch
    eval_generate_limit: int = Field(32, gt=0)


class RunConfig(_Section):
    """A whole run: what to train, on what, how, and where its folder goes."""

    name: str | None = None  # default: derived from model and data; a folder name inside output_dir
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0")
                                  or value.startswith("~")):
            raise ValueError("must be a plain folder name inside output_dir (no '/', '\\', '..' or '~'); "
                             "use output_dir (or --output) to put the run elsewhere")
        return value

    @model_validator(mode="after")
    def _checkpoints_can_be_ranked(self) -> "RunConfig":
        save, every = self.train.save_steps, self.train.eval_steps
        if save and every and save % every:
            raise ValueError(f"train.save_steps ({save}) must be a multiple of train.eval_steps ({every}): "
                             "the best checkpoint is chosen by the eval loss measured when it is saved")
        return self

    def run_name(self) -> str:
        """The run's folder name: ``name`` or ``<model>-<data>``."""
        if self.name:
            return self.name
        model = Path(self.model.name_or_path.rstrip("/")).name or "model"
        data = Path(self.data.path).stem if self.data.path else "demo"
        return f"{model}-{data}".replace(" ", "_")

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- loading and overrides


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
    """Set ``data['a']['b'] = value`` for key ``a.b``, checking the key exists in the schema."""
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
        elif not key:  # a rule across keys: the message names them
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"config key {key!r}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Validate a config mapping with ``key=value`` overrides applied on top."""
    merged = copy.deepcopy(data or {})
    if not isinstance(merged, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, lora, data, train), got {type(merged).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
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
