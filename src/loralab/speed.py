"""Training-speed levers, each measured by benchmarks/train_throughput.py and tested to keep the loss unchanged.

- ``cast_frozen_weights``: frozen base weights stored in bf16 (no per-step autocast copies), LoRA weights stay fp32.
- ``supervised_lm_loss``: the vocabulary projection and loss only at supervised positions (causal LMs, on CPU;
  on accelerators every position is projected, which avoids a host-device sync per step).
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

# Causal LMs whose logits are exactly ``lm_head(final hidden state)``: no soft-capping or logit scaling.
PLAIN_HEAD_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "smollm3", "olmo2", "phi3", "gemma"}


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = random_int16(x.numel()).view(x.shape) >= self.threshold
        return x.mul(keep).mul_(1.0 / (1.0 - self.p))

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


def supports_supervised_logits(model: nn.Module) -> bool:
    """True for decoder-only models whose logits are a plain projection of the decoder's last hidden state."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (getattr(base.config, "model_type", "") in PLAIN_HEAD_MODEL_TYPES and hasattr(base, "get_decoder")
            and base.get_output_embeddings() is not None)


def supervised_lm_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised positions and their count.

    Runs the decoder once, then the vocabulary projection only on hidden states whose next label is supervised,
    so padding and masked prompt positions never reach the (large) output layer.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = base.get_decoder(), base.get_output_embeddings()
    labels = inputs["labels"]
    hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                  position_ids=inputs.get("position_ids"), use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if hidden.device.type != "cpu":
        # Selecting positions has a data-dependent size, i.e. a host-device sync per step on accelerators:
        # there, project every position and let ignore_index skip the masked ones (same loss, no sync).
        logits = head(hidden[:, :-1]).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"), keep.sum()
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


class PackingCollator:
    """Concatenate a batch of causal-LM examples into rows of at most ``pack_length`` tokens.

    Each example keeps its own positions (0, 1, ...) and the first label of each example is masked, so no token
    attends to or predicts across an example boundary. No padding is needed inside a row; rows are padded to the
    longest row with -100 labels and their own position ids.
    """

    def __init__(self, pad_token_id: int, pack_length: int):
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length

    def _rows(self, features: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
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
        for r, row in enumerate(rows):
            start = 0
            for feature in row:
                n = len(feature["input_ids"])
                input_ids[r, start : start + n] = torch.tensor(feature["input_ids"])
                labels[r, start + 1 : start + n] = torch.tensor(feature["labels"][1:])
                position_ids[r, start : start + n] = torch.arange(n)
                start += n
            # trailing padding continues the positions so it forms its own (fully masked) sequence
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
