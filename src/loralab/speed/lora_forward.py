"""A leaner forward for PEFT's LoRA ``Linear`` layers: fewer casts and elementwise passes, the same function.

PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling`` after casting ``x`` to the LoRA weights' dtype. In
bf16 training (frozen bf16 base, fp32 LoRA weights under autocast) that is a bf16 -> fp32 copy of ``x`` that autocast
casts straight back to bf16, dropout on the fp32 copy, then a separate scaling pass and a separate add over the
layer's whole output, each with its own backward pass. ``FusedLoraLinear`` keeps ``x`` in its dtype and folds the
scaling and the add into one ``addmm`` (``result + scaling * h @ B^T``), which autocast runs in bf16 and whose
backward passes the output gradient through unchanged. Anything else (DoRA and other variants, several active
adapters, mixed-adapter batches, a LoRA bias, merged or disabled adapters, mixed dtypes without autocast) runs
PEFT's own forward. ``SiblingLora`` lets layers that read the same input (q/k/v, gate/up) share one dropout mask and
one A matmul.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from loralab.speed import FastDropout


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` with ``forward`` computed as one ``addmm`` where that is the same function."""

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The single active vanilla-LoRA adapter this call can fuse, or None (PEFT's forward then)."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if has_hooks(self.lora_B[name]):  # hooks on lora_B (users', DeepSpeed's) expect its own call
            return None
        weight = self.lora_A[name].weight
        if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == weight.dtype == self.lora_B[name].weight.dtype):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        group = getattr(self, "_lora_siblings", None)
        hidden = group.hidden(self, x, name) if group is not None else None
        if hidden is None:
            masked, scale = dropout_input(self.lora_dropout[name], x)
            hidden = scaled(self.lora_A[name](masked), scale)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return out.view(result.shape)


class SiblingLora:
    """LoRA layers of one block that read the same input (q/k/v; gate/up): one dropout mask and one A matmul.

    The first sibling called with an input computes ``dropout(x) @ [A_1; A_2; ...]^T`` for all of them and keeps each
    one's slice for its own call with the same tensor; a call with any other input computes its own. The dropout
    mask is then shared by the siblings (each still sees inverted dropout with probability p, as PEFT's; only the
    masks of siblings are no longer independent). Layers are held by name, not as submodules.
    """

    def __init__(self, members: list[FusedLoraLinear]):
        self.members = members
        self._input: tuple[torch.Tensor, int, str] | None = None  # the input served: tensor, version, adapter
        self._parts: dict[int, torch.Tensor] = {}

    def hidden(self, member: FusedLoraLinear, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """``member``'s ``lora_A(dropout(x))``, or None where the siblings cannot share this call."""
        index = next(i for i, m in enumerate(self.members) if m is member)
        cached = self._input
        if cached is not None and cached[0] is x and cached[1:] == (x._version, name) and index in self._parts:
            part = self._parts.pop(index)
            if not self._parts:
                self._input = None  # every sibling served: nothing of this step is kept
            return part
        if any(m is not member and m._fused_adapter(x, (), {}) != name for m in self.members):
            return None
        dropouts = {dropout_p(m.lora_dropout[name]) for m in self.members}
        if len(dropouts) != 1 or -1.0 in dropouts:
            return None  # different (or unknown) dropouts: each its own
        weights = [m.lora_A[name].weight for m in self.members]
        masked, scale = dropout_input(member.lora_dropout[name], x)
        hidden = scaled(F.linear(masked, torch.cat(weights)), scale)
        parts = hidden.split([w.shape[0] for w in weights], dim=-1)
        self._input, self._parts = (x, x._version, name), {i: part for i, part in enumerate(parts) if i != index}
        return parts[index]


def dropout_input(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The input of the A matmul, ``dropout(x)``, and a factor its output still needs. For ``FastDropout`` that is
    the masked ``x`` and ``1 / (1 - p)``: ``A (s x) = s (A x)``, and the A output is r features wide, not the
    thousands of ``x``, so the scaling pass over ``x`` and its backward pass are saved."""
    if isinstance(dropout, FastDropout) and dropout.masks(x):
        return dropout.zero_dropped(x), dropout.scale
    return dropout(x), 1.0


def scaled(hidden: torch.Tensor, scale: float) -> torch.Tensor:
    return hidden if scale == 1.0 else hidden * scale


def dropout_p(module: nn.Module) -> float:
    """The drop probability of a LoRA dropout module (PEFT's ``nn.Identity`` for 0), -1 for an unknown module."""
    return float(getattr(module, "p", 0.0 if isinstance(module, nn.Identity) else -1.0))


SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_sibling_lora(model: nn.Module) -> int:
    """Group the fused LoRA layers named in ``SIBLING_NAMES`` under one parent (decoder-only models, whose q/k/v and
    gate/up read the same hidden states) into ``SiblingLora``; returns the number of groups."""
    groups = 0
    for parent in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, FusedLoraLinear) for m in members):
                group = SiblingLora(members)
                for member in members:
                    object.__setattr__(member, "_lora_siblings", group)  # not a submodule: state dicts unchanged
                groups += 1
    return groups


def has_hooks(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) would see this module's call."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def use_fused_lora(model: nn.Module) -> int:
    """Give every PEFT LoRA ``Linear`` (exactly that class: not bitsandbytes' or other backends') the fused forward."""
    swapped = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            swapped += 1
    return swapped
