"""Training-speed levers, each measured by benchmarks/train_throughput.py and tested to keep the loss unchanged.

- ``cast_frozen_weights``: frozen base weights stored in bf16 (no per-step autocast copies), LoRA weights stay fp32.
- ``supervised_lm_loss``: the vocabulary projection and loss only at supervised positions (causal LMs, on CPU;
  on accelerators every position is projected, which avoids a host-device sync per step), through the model's own
  forward, so autocast, DDP/FSDP wrappers and the model's own logit processing (soft-capping) all apply.
- ``head_cross_entropy`` (``head_loss``): with ``supervised_lm_loss(fused_head=True)``, the output layer's
  projection and the loss in row chunks, no ``[N, vocabulary]`` logits tensor.
- ``FastDropout``: LoRA dropout masks drawn as 16-bit random integers, ~2.5x cheaper than ``bernoulli_`` on CPU.
- ``PackingCollator``: several short causal-LM examples in one row, ``position_ids`` restarting per example so
  attention stays inside each example (transformers builds the block-diagonal mask from them, but only when the
  model runs without a KV cache: training sets ``config.use_cache = False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab.data import IGNORE_INDEX
from loralab.speed.head_loss import head_cross_entropy

# Causal LMs known to honour the restarting position ids of packed rows (``PackingCollator``); packing is used only
# for these. The supervised-logits loss does not need this list (``supervised_logits_exact``). Gemma 3: transformers
# builds both its full and its sliding-window masks per packed example (window measured in each example's own
# positions); tests/test_gemma.py checks loss and gradients against padded batches.
# Causal LMs whose forward returns ``lm_head(hidden)`` as the logits, with nothing applied after it (checked in
# transformers' modeling files); Gemma 3 only where ``final_logit_softcapping`` is unset.
FUSED_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "gemma", "gemma3_text"}
PACKING_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "smollm3", "olmo2", "phi3", "gemma", "gemma3_text"}


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen floating-point parameter in ``dtype``; trainable ones stay as they are. Returns the count."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def random_int16(count: int) -> torch.Tensor:
    """``count`` uniform int16 values from torch's generator, drawn as full-range int64 words."""
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    return words.view(torch.int16)[:count]


class FastDropout(nn.Module):
    """Inverted dropout whose CPU mask compares 16-bit random integers with a threshold.

    Same distribution as ``nn.Dropout`` with p rounded to a multiple of 1/65536 (an error below 1e-5). The bits come
    from torch's generator 64 at a time (four 16-bit draws per call), which makes the mask ~5x cheaper than
    ``bernoulli_``, whose cost dominated LoRA's extra work on CPU. On GPUs the fused kernel is used.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # P(uniform int16 < threshold) = p

    @property
    def scale(self) -> float:
        """Inverted dropout's factor for the kept elements, ``1 / (1 - p)``."""
        return 1.0 / (1.0 - self.p)

    def masks(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` draws a mask with ``zero_dropped`` (training, p > 0, on CPU)."""
        return self.training and self.p > 0 and x.device.type == "cpu"

    def zero_dropped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the dropped elements zeroed, not yet multiplied by ``scale``. ``torch.where`` on the bool mask:
        a multiply by it would first copy the mask to ``x``'s dtype, in the forward and again in the backward."""
        keep = random_int16(x.numel()).view(x.shape) >= self.threshold
        return torch.where(keep, x, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if not self.masks(x):
            return F.dropout(x, self.p, training=True)
        return self.zero_dropped(x).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Replace the ``nn.Dropout`` modules of PEFT's LoRA layers with ``FastDropout``; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    dropouts[name] = FastDropout(dropout.p)
                    replaced += 1
    return replaced


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and what it wraps through ``.module`` (DataParallel, DDP, FSDP, DeepSpeed's engine), outermost first."""
    chain = [model]
    while isinstance(getattr(chain[-1], "module", None), nn.Module) and len(chain) < 16:
        chain.append(chain[-1].module)
    return chain


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside the training wrappers and peft."""
    inner = wrapper_chain(model)[-1]
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_with_output_layer(base: nn.Module) -> bool:
    """A decoder-only transformers model with an output-embedding module (``lm_head``)."""
    config = getattr(base, "config", None)
    return (config is not None and not getattr(config, "is_encoder_decoder", False)
            and hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None)


def supports_packing(model: nn.Module) -> bool:
    """True for decoder-only architectures known to keep packed examples apart (``PACKING_MODEL_TYPES``)."""
    base = unwrap_model(model)
    return getattr(getattr(base, "config", None), "model_type", "") in PACKING_MODEL_TYPES and decoder_with_output_layer(base)


def supervised_logits_exact(model: nn.Module) -> bool:
    """Whether ``supervised_lm_loss`` gives the model's own loss for ``model`` as it is wrapped.

    Any decoder-only model with an output-embedding module (``lm_head``) qualifies: the loss runs the model's own
    forward and only narrows the rows its output layer sees (checked again at run time). Not taken for a
    ``DataParallel`` over several devices (its replicas would run the selection on scattered rows) nor for a
    ``torch.compile``-d model (the per-step hook would force recompilation).
    """
    chain = wrapper_chain(model)
    for wrapper in chain:
        if isinstance(wrapper, nn.DataParallel) and len(wrapper.device_ids) > 1:
            return False
        if hasattr(wrapper, "_orig_mod"):  # torch.compile's OptimizedModule
            return False
    return decoder_with_output_layer(unwrap_model(model))


def supervised_lm_loss(model: nn.Module, inputs: dict[str, torch.Tensor],
                       fused_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised positions and their count, as the model's own loss.

    ``model`` (wrapped or not) runs its own forward without labels, exactly as the Trainer calls it, so accelerate's
    autocast, DDP/FSDP and the model's own logit processing all apply. A temporary forward pre-hook on the
    output-embedding module replaces its input, the final hidden states ``[B, T, H]``, by the rows whose next label
    is supervised (``[1, N, H]``, on CPU) or by every row but the last (``[B, T-1, H]``, on accelerators, where a
    data-dependent selection would cost a host-device sync; ignore_index then skips masked positions). The logits
    the model returns are those rows' logits, after whatever the model applies to them (e.g. Gemma 2 soft-capping).
    If the output layer does not see full hidden states (the hook leaves it alone) the model's full logits are used;
    anything else unexpected raises rather than giving a different loss.

    ``fused_head`` (on CPU, where ``fused_head_applies``): the output layer is called on no rows and the supervised
    rows' logits and loss are computed by ``head_cross_entropy`` in chunks, never as one ``[N, V]`` tensor.
    """
    if not supervised_logits_exact(model):
        raise ValueError("supervised_lm_loss is not exact for this model or wrapper (see supervised_logits_exact)")
    head = unwrap_model(model).get_output_embeddings()
    labels = inputs["labels"]
    batch, length = labels.shape
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    state: dict[str, Any] = {"calls": 0, "targets": None, "hidden": None}
    fused_head = fused_head and fused_head_applies(model)

    def select(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        state["calls"] += 1
        hidden = args[0] if args else None
        if (state["calls"] > 1 or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3
                or tuple(hidden.shape[:2]) != (batch, length)):
            return None  # left as it is; checked below
        if hidden.device.type == "cpu":
            state["targets"] = targets[keep].unsqueeze(0)
            rows = hidden[:, :-1][keep.to(hidden.device)].unsqueeze(0)
            if fused_head:  # the layer runs on no rows; head_cross_entropy below computes these rows' logits
                autocast = torch.is_autocast_enabled("cpu")
                state["hidden"] = rows.to(torch.get_autocast_dtype("cpu")) if autocast else rows
                rows = rows[:, :0]
            return (rows, *args[1:]), kwargs
        state["targets"] = targets
        return (hidden[:, :-1], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
    finally:
        handle.remove()
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if state["calls"] > 1:
        raise RuntimeError(f"the output layer ran {state['calls']} times in one forward: the supervised-logits loss "
                           "cannot tell which logits are the model's; set train.supervised_logits_only=false")
    wanted = state["targets"]
    if state["hidden"] is not None:
        if tuple(logits.shape[:2]) != (1, 0):
            raise RuntimeError(f"the output layer returned logits of shape {tuple(logits.shape)} for no rows; set "
                               "train.fused_cross_entropy=false")
        return head_cross_entropy(state["hidden"][0], head.weight, wanted[0]), keep.sum()
    if wanted is None:  # the output layer did not see the full hidden states: the model's logits, every position
        logits, wanted = logits[:, :-1], targets
    if tuple(logits.shape[:-1]) != tuple(wanted.shape):
        raise RuntimeError(f"the model returned logits of shape {tuple(logits.shape)} for targets of shape "
                           f"{tuple(wanted.shape)}; set train.supervised_logits_only=false")
    loss = F.cross_entropy(logits.flatten(0, -2).float(), wanted.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, keep.sum()


def fused_head_applies(model: nn.Module) -> bool:
    """Whether ``head_cross_entropy`` computes what ``model``'s output layer and loss do: a decoder whose forward
    returns its output layer's result unchanged (``FUSED_HEAD_MODEL_TYPES``, no final soft-capping), the layer a
    plain frozen ``nn.Linear`` without bias or hooks, its weight an ordinary tensor (not sharded by FSDP or ZeRO-3)."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if decoder_with_output_layer(base) else None
    if (head is None or type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad
            or getattr(config, "model_type", "") not in FUSED_HEAD_MODEL_TYPES
            or getattr(config, "final_logit_softcapping", None) is not None):
        return False
    from loralab.speed.lora_forward import has_hooks

    weight = head.weight
    return (not has_hooks(head) and type(weight.data) is torch.Tensor and not hasattr(weight, "ds_id")
            and weight.device.type == "cpu")


class PackingCollator:
    """Concatenate a batch of causal-LM examples into rows of at most ``pack_length`` tokens.

    Each example keeps its own positions (0, 1, ...) and the first label of each example is masked, so no token
    attends to or predicts across an example boundary. No padding is needed inside a row; rows are padded to the
    longest row with -100 labels and their own position ids. With ``segments`` (for ``segment_attention``, whose
    cost does not grow with the row) the whole batch is one row, without any padding, and the batch also carries
    ``cu_seq_lens_q``: where each example starts and ends in the row.
    """

    def __init__(self, pad_token_id: int, pack_length: int, segments: bool = False):
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length
        self.segments = segments

    def _rows(self, features: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        if self.segments:
            return [list(features)]
        rows: list[list[dict[str, Any]]] = []
        lengths: list[int] = []
        for feature in sorted(features, key=lambda f: -len(f["input_ids"])):  # first-fit decreasing
            size = len(feature["input_ids"])
            for i, used in enumerate(lengths):
                if used + size <= self.pack_length:
                    rows[i].append(feature)
                    lengths[i] += size
                    break
            else:
                rows.append([feature])
                lengths.append(size)
        return rows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._rows(features)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        ends = [0]
        for r, row in enumerate(rows):
            start = 0
            for feature in row:
                n = len(feature["input_ids"])
                input_ids[r, start : start + n] = torch.tensor(feature["input_ids"])
                labels[r, start + 1 : start + n] = torch.tensor(feature["labels"][1:])
                position_ids[r, start : start + n] = torch.arange(n)
                start += n
                ends.append(r * width + start)
            # trailing padding continues the positions so it forms its own (fully masked) sequence
            position_ids[r, start:] = torch.arange(width - start)
            if start < width:
                ends.append((r + 1) * width)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.segments:
            batch["cu_seq_lens_q"] = torch.tensor(ends, dtype=torch.int32)
        return batch
