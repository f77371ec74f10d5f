"""Can this model go through the engines the config asks for? bitsandbytes quantization, FSDP, DeepSpeed.

Answered from the model's config alone, with an empty (meta-device) skeleton of the model, so a wrong combination
fails with one message before any weights load or any process of a multi-process run starts training.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from loralab.config import RunConfig
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

# What transformers' bitsandbytes integration replaces (nn.Linear, and GPT-2 style Conv1D); the output layer stays
_QUANTIZABLE = ("Linear", "Conv1D")


def model_skeleton(hf_config: Any, task_type: str, trust_remote_code: bool = False) -> nn.Module:
    """The model built from its config on the meta device: module names and classes, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    auto = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
            "SEQ_CLS": AutoModelForSequenceClassification, "FEATURE_EXTRACTION": AutoModel,
            "QUESTION_ANSWERING": AutoModelForQuestionAnswering, "TOKEN_CLS": AutoModelForTokenClassification}[task_type]
    with init_empty_weights():
        return auto.from_config(hf_config, trust_remote_code=trust_remote_code)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers bitsandbytes would quantize (linear layers other than the output projection)."""
    skip = set(getattr(model, "_keep_in_fp32_modules", None) or []) | {"lm_head", "score", "classifier"}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if type(module).__name__ in _QUANTIZABLE and module is not output and name.split(".")[-1] not in skip]


def check_quantization(config: RunConfig, hf_config: Any, model: nn.Module | None) -> None:
    """``model.load_in_4bit`` / ``load_in_8bit`` on a base bitsandbytes can quantize, with engines that can shard it."""
    key = "model.load_in_4bit" if config.model.load_in_4bit else "model.load_in_8bit"
    existing = getattr(hf_config, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        method = str(getattr(method, "value", method) or "unknown")
        raise LoralabError(
            f"{key}: {config.model.name_or_path!r} is already quantized ({method}, in its config.json); "
            f"bitsandbytes quantizes a full-precision base. Use the unquantized model, or drop {key} to train LoRA "
            f"on the {method} weights as they are")
    if model is not None and not quantizable_layers(model):
        model_type = getattr(hf_config, "model_type", type(model).__name__)
        raise LoralabError(
            f"{key}: model type {model_type!r} has no linear layers bitsandbytes can quantize (it replaces nn.Linear "
            f"and Conv1D layers); train it without {key}")
    if config.model.load_in_8bit and (config.train.fsdp != "off" or config.train.deepspeed):
        engine = "train.fsdp" if config.train.fsdp != "off" else "train.deepspeed"
        raise LoralabError(f"{key} with {engine}: 8-bit bitsandbytes weights cannot be sharded; use "
                           "model.load_in_4bit (FSDP / ZeRO-3 QLoRA) or a single process per model copy (DDP)")


def check_fsdp(config: RunConfig, hf_config: Any, model: nn.Module) -> None:
    """FSDP wraps each decoder layer (the classes in the model's ``_no_split_modules``); without them it cannot shard."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    model_type = getattr(hf_config, "model_type", type(model).__name__)
    if not names:
        raise LoralabError(
            f"train.fsdp={config.train.fsdp}: model type {model_type!r} declares no layer class to wrap "
            "(transformers' _no_split_modules), so FSDP would hold the whole model as one unit on every process; "
            "use train.fsdp: off (DDP) or train.deepspeed (ZeRO)")
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in names if name not in present]
    if missing:
        raise LoralabError(f"train.fsdp={config.train.fsdp}: model type {model_type!r} names layer classes to wrap "
                           f"that it does not contain ({', '.join(missing)}); use train.fsdp: off (DDP)")


def check_engines(config: RunConfig, task_type: str | None = None, hf_config: Any = None) -> None:
    """Refuse, with one clear message, a quantization or sharding setting the model cannot go through."""
    if not (config.model.quantized or config.train.fsdp != "off"):
        return
    from loralab.models import load_model_config, resolve_task_type

    hf_config = hf_config if hf_config is not None else load_model_config(config.model)
    task_type = task_type or resolve_task_type(config)
    try:
        model = model_skeleton(hf_config, task_type, config.model.trust_remote_code)
    except Exception as exc:  # an architecture transformers cannot build: loading will say so precisely
        log.debug("no meta-device skeleton for %s: %s", config.model.name_or_path, exc)
        model = None
    if config.model.quantized:
        from loralab.models import quantization_config

        quantization_config(config.model)  # bitsandbytes installed?
        check_quantization(config, hf_config, model)
    if config.train.fsdp != "off" and model is not None:
        check_fsdp(config, hf_config, model)
