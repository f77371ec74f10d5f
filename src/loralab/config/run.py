"""``RunConfig``: a whole run (model, lora, data, train sections) with the rules that span sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from loralab.config.base import _Section
from loralab.config.data import DataConfig
from loralab.config.lora import RESIDUAL_INITS, LoraSettings, canonical_lora_keys, init_family
from loralab.config.model import ModelConfig
from loralab.config.train import TrainConfig

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

    @model_validator(mode="before")
    @classmethod
    def _lora_key_names(cls, data: Any) -> Any:
        # here rather than only in LoraSettings, so that a refusal reads as one sentence naming the dotted keys
        if isinstance(data, dict) and isinstance(data.get("lora"), dict):
            data = {**data, "lora": canonical_lora_keys(data["lora"])}
        return data

    @model_validator(mode="after")
    def _checkpoints_can_be_ranked(self) -> "RunConfig":
        save, every = self.train.save_steps, self.train.eval_steps
        if save and every and save % every:
            raise ValueError(f"train.save_steps ({save}) must be a multiple of train.eval_steps ({every}): "
                             "the best checkpoint is chosen by the eval loss measured when it is saved")
        return self

    @model_validator(mode="after")
    def _init_fits_the_base(self) -> "RunConfig":
        init, family = self.lora.init_lora_weights, init_family(self.lora.init_lora_weights)
        if family in RESIDUAL_INITS and self.model.quantized:
            raise ValueError(f"lora.init_lora_weights={init} subtracts the initial adapter from the base weights; with "
                             f"a quantized base (model.load_in_{'4' if self.model.load_in_4bit else '8'}bit) that "
                             "residual is quantized again, so the adapter cannot be converted into one for the base "
                             "loralab loads; use a full-precision base, or init_lora_weights: loftq for a 4-bit base")
        if family == "loftq" and not (self.model.load_in_4bit and self.model.bnb_4bit_quant_type == "nf4"):
            raise ValueError("lora.init_lora_weights=loftq initialises LoRA to make up for the 4-bit NF4 quantization "
                             "error of the base weights (peft's replace_lora_weights_loftq); it needs "
                             "model.load_in_4bit: true with model.bnb_4bit_quant_type: nf4")
        return self

    @model_validator(mode="after")
    def _best_model_metric_is_measured(self) -> "RunConfig":
        metric = self.train.metric_for_best_model
        if metric != "eval_loss" and not self.train.eval_generate:
            raise ValueError(f"train.metric_for_best_model={metric} is a generation metric, measured only with "
                             "train.eval_generate: true (greedy answers to up to train.eval_generate_limit eval examples "
                             "at each evaluation); set train.eval_generate=true, or use eval_loss")
        return self

    def run_name(self) -> str:
        """The run's folder name: ``name`` or ``<model>-<data>``."""
        if self.name:
            return self.name
        model = Path(self.model.name_or_path.rstrip("/")).name or "model"
        data = self.data.label()
        return f"{model}-{data}".replace(" ", "_")

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
