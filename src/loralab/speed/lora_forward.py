"""A leaner forward for PEFT's LoRA ``Linear`` layers: fewer casts and elementwise passes, the same function.

PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling`` after casting ``x`` to the LoRA weights' dtype. In
bf16 training (frozen bf16 base, fp32 LoRA weights under autocast) that is a bf16 -> fp32 copy of ``x`` that autocast
casts straight back to bf16, dropout on the fp32 copy, then a separate scaling pass and a separate add over the
layer's whole output, each with its own backward pass. ``FusedLoraLinear`` keeps ``x`` in its dtype and folds the
scaling and the add into one ``addmm`` (``result + scaling * h @ B^T``), which autocast runs in bf16 and whose
backward passes the output gradient through unchanged. Anything else (DoRA and other variants, several active
adapters, mixed-adapter batches, a LoRA bias, merged or disabled adapters, mixed dtypes without autocast) runs
PEFT's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


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
        hidden = self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return out.view(result.shape)


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
