"""A merged model's weights and hyperparameters as a GGUF file, in the layout llama.cpp's ``convert_hf_to_gguf.py``
produces (with the PyPI ``gguf`` package's writer, names and quantizers).

- Llama-style attention (Llama, SmolLM2, Mistral): llama.cpp's rotary embedding pairs dimension ``i`` with ``i + 1``,
  transformers pairs ``i`` with ``i + d/2``, so the q and k projections' rows are permuted (``LlamaModel.permute``).
  Qwen2 uses the same pairing as transformers in llama.cpp: no permutation.
- Gemma 3: ``Gemma3RMSNorm`` multiplies by ``1 + weight``, llama.cpp by ``weight``: every norm weight is stored + 1;
  the embedding scaling by sqrt(hidden size) is applied by llama.cpp at run time (weights unchanged); the embedding
  rows are cut to the tokenizer's size; which layers use sliding-window attention is written layer by layer.
- Quantization: 1-D tensors (norms, biases) stay float32; matrices go to the chosen type; for q4_0 / q5_0 the token
  embedding and output matrices are q8_0 (llama-quantize too keeps them at more bits); a matrix whose rows do not
  split into 32-value blocks falls back to f16, as in the converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch

from loralab.errors import LoralabError

Q = gguf.GGMLQuantizationType
QUANTS = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_0": Q.Q5_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


@dataclass(frozen=True)
class Architecture:
    """How one transformers model type becomes a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    label: str
    permute_qk: bool = False  # Llama-style rotary pairing
    norm_shift: float = 0.0  # added to every norm weight
    trim_embeddings: bool = False  # embedding rows cut to the tokenizer's size


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, "Llama (SmolLM2, Llama 2/3)", permute_qk=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, "Mistral", permute_qk=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, "Qwen2 / Qwen2.5"),
    "gemma3_text": Architecture(gguf.MODEL_ARCH.GEMMA3, "Gemma 3 (text)", norm_shift=1.0, trim_embeddings=True),
}
ROPE_TYPES = ("default", "linear", "llama3")


def supported() -> str:
    return ", ".join(f"{a.label} [{name}]" for name, a in ARCHITECTURES.items())


def architecture(config: Any) -> Architecture:
    """The architecture for a model config, or one clear message listing what GGUF export supports."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        hint = " (a multimodal Gemma 3: export its text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise LoralabError(f"GGUF export does not support {model_type!r} models{hint}; supported: {supported()}")
    return ARCHITECTURES[model_type]


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rows of each head reordered from half-split to interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


def head_dim(config: Any) -> int:
    return _get(config, "head_dim", config.hidden_size // config.num_attention_heads)


def rope_parameters(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rotary settings of the global (full-attention) layers and of the sliding-window layers."""
    params = dict(_get(config, "rope_parameters", None) or _get(config, "rope_scaling", None) or {})
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention", {})), dict(params.get("sliding_attention", {}))
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params, {}


def check_config(config: Any, arch: Architecture) -> None:
    """Refuse what llama.cpp would compute differently from transformers, naming the setting."""
    full, _ = rope_parameters(config)
    rope_type = full.get("rope_type", full.get("type", "default"))
    problems = []
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if arch.arch == gguf.MODEL_ARCH.GEMMA3:
        if _get(config, "query_pre_attn_scalar", head_dim(config)) != head_dim(config):
            problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {head_dim(config)} "
                            "(llama.cpp scales attention by 1/sqrt(head_dim))")
        if getattr(config, "attn_logit_softcapping", None):
            problems.append("attn_logit_softcapping (Gemma 3 has none; llama.cpp ignores it)")
        if _get(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            problems.append(f"hidden_activation {config.hidden_activation!r} (llama.cpp uses gelu_pytorch_tanh)")
    elif getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window (llama.cpp runs this architecture without a sliding window)")
    if getattr(config, "attention_bias", False) and arch.arch == gguf.MODEL_ARCH.LLAMA:
        problems.append("attention_bias")
    if problems:
        raise LoralabError(f"GGUF export of this {config.model_type} model: {'; '.join(problems)} is not supported")


def add_hparams(writer: gguf.GGUFWriter, config: Any, arch: Architecture, quant: str) -> None:
    """The hyperparameters, as ``TextModel.set_gguf_parameters`` and the architecture's converter write them."""
    full, sliding = rope_parameters(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_get(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_layer_norm_rms_eps(_get(config, "rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type == "linear" and full.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    default_theta = 1_000_000.0 if arch.arch == gguf.MODEL_ARCH.GEMMA3 else 10_000.0
    writer.add_rope_freq_base(full.get("rope_theta", default_theta))
    if arch.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    if arch.arch == gguf.MODEL_ARCH.GEMMA3:
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        layer_types = list(_get(config, "layer_types", []))
        if "sliding_attention" in layer_types:
            writer.add_sliding_window(config.sliding_window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            if sliding.get("rope_theta") is not None:
                writer.add_rope_freq_base_swa(sliding["rope_theta"])
    writer.add_file_type(FILE_TYPES[quant])


def llama3_rope_factors(config: Any, params: dict[str, Any]) -> torch.Tensor:
    """The ``rope_freqs`` tensor llama.cpp reads for Llama 3.1+ rope scaling (``LlamaModel.generate_extra_tensors``)."""
    base, dim = params.get("rope_theta", 10000.0), head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensors(model: Any, arch: Architecture, n_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight, permuted / shifted / cut as llama.cpp expects."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, _get(config, "num_key_value_heads", config.num_attention_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses the token embedding as output layer when there is no output tensor
        if "rotary_emb" in name:
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise LoralabError(f"GGUF export: no llama.cpp tensor for {name!r} of this {config.model_type} model")
        data = tensor.detach().to(torch.float32).cpu()
        if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        if arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_kv)
        if arch.norm_shift and name.endswith("norm.weight"):
            data = data + arch.norm_shift
        if arch.trim_embeddings and name.endswith("embed_tokens.weight"):
            data = data[:n_vocab]
        yield new_name, data
    full, _ = rope_parameters(config)
    if full.get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config, full)


def tensor_type(name: str, data: torch.Tensor, quant: str) -> Q:
    """The GGUF type of one tensor for the chosen quantization."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or name == "rope_freqs.weight":
        return Q.F32
    qtype = QUANTS[quant]
    if qtype in (Q.Q4_0, Q.Q5_0) and name.split(".")[0] in ("token_embd", "output"):
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block == 0 else Q.F16


def encode(data: torch.Tensor, qtype: Q) -> np.ndarray:
    """The bytes (or float array) of one tensor in its GGUF type."""
    array = data.numpy()
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def write_gguf(path: Path, model: Any, tokenizer: Any, quant: str, *, name: str, chat_template: str | None,
               end_of_turn: int | None, metadata: dict[str, str],
               on_tensor: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the merged ``model`` (float32 weights) and its tokenizer to ``path``. Returns what was written."""
    from loralab.export.gguf_tokenizer import add_tokenizer

    if quant not in QUANTS:
        raise LoralabError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    config = model.config
    arch = architecture(config)
    check_config(config, arch)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key, value in metadata.items():
        writer.add_string(f"loralab.{key}", value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config, arch, quant)
    n_vocab = len(tokenizer) if arch.trim_embeddings else config.vocab_size
    info = add_tokenizer(writer, tokenizer, n_vocab, chat_template, end_of_turn)
    tensors = list(gguf_tensors(model, arch, info.n_tokens))
    types: dict[str, int] = {}
    for i, (tensor_name, data) in enumerate(tensors, 1):
        qtype = tensor_type(tensor_name, data, quant)
        writer.add_tensor(tensor_name, encode(data, qtype), raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        if on_tensor is not None:
            on_tensor(i, len(tensors))
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch.arch], "tensors": len(tensors), "tensor_types": types,
            "tokenizer": {"model": info.model, "pre": info.pre, "tokens": info.n_tokens, "add_bos": info.add_bos,
                          "add_eos": info.add_eos}}
