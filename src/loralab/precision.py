"""Precision for this hardware and model: bf16 where it runs natively, fp16 on older GPUs, fp32 elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


FP16_OVERFLOW_TYPES = ("t5", "mt5", "umt5")  # T5 / mT5 / mt0 / flan-T5: activations overflow fp16 (NaN losses)


def gpu_precision() -> str | None:
    """The reduced precision the CUDA GPU runs natively: bf16, fp16 (older GPUs such as a T4), or None without one."""
    if not torch.cuda.is_available():
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def model_type_of(model: Any) -> str | None:
    """A (PEFT-wrapped) model's ``config.model_type``, for :func:`resolve_precision`."""
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_precision(precision: str, model_type: str | None = None) -> str:
    """``auto`` becomes bf16 where the hardware runs it natively, else fp16 (older GPUs) or fp32.

    On a GPU without bf16, T5-family models (``model_type`` t5, mt5, umt5) get fp32: they overflow in fp16."""
    if precision != "auto":
        return precision
    gpu = gpu_precision()
    if gpu == "fp16" and model_type in FP16_OVERFLOW_TYPES:
        return "fp32"
    if gpu:
        return gpu
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device, model_type: str | None = None) -> Any:
    """The mixed-precision context of training for a ``train.precision`` (resolved for this hardware and model)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, model_type))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
