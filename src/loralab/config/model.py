"""``model``: which base model to fine-tune and how to load it (dtype, remote code, QLoRA quantization)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from loralab.config.base import TaskType, _Section

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(_Section):
    """Which base model to fine-tune and how to load it."""

    name_or_path: str = DEFAULT_MODEL
    task_type: TaskType | None = None  # auto-detected from the model's config when omitted
    dtype: Literal["auto", "float32", "bfloat16", "float16", "checkpoint"] = "auto"
    # dtype of the base weights as loaded. "auto": bfloat16 when training runs in bf16 (train.precision bf16, or auto
    # on a GPU with bf16 or a CPU with AVX512-BF16 / AMX), else float32; loading for eval / compare / export and QLoRA's
    # non-quantized parts use float32. "checkpoint": the dtype the checkpoint was saved in (transformers' dtype="auto",
    # what "auto" meant before). float32 / bfloat16 / float16: exactly that. LoRA weights are trained in float32.
    trust_remote_code: bool = False
    # QLoRA (bitsandbytes; transformers' BitsAndBytesConfig names): a 4-bit (or 8-bit) frozen base, LoRA in fp32
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 where it runs natively

    @field_validator("task_type", mode="before")
    @classmethod
    def _upper_task(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_quantization(self) -> "ModelConfig":
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are both true; choose one")
        return self

    @property
    def quantized(self) -> bool:
        """Whether the base weights are loaded quantized (bitsandbytes 4-bit or 8-bit)."""
        return self.load_in_4bit or self.load_in_8bit
