"""Attention over packed rows, one example at a time: each example's own causal attention, no dense mask.

A packed row holds several examples. transformers keeps them apart with a block-diagonal ``[T, T]`` mask, and SDPA
then computes every query-key pair of the row and masks most of them away: for 5 examples in a row of 500 tokens
that is ~10x the work of each example's own causal attention, and a masked SDPA cannot use the causal kernel's
block skipping. ``segment_attention`` runs causal attention on each example's slice instead (on CPU, examples up
to 256 tokens through ``causal_attention``'s fp32 matmuls; longer ones, and other devices, through SDPA). The
examples' boundaries come from ``cu_seq_lens_q`` (the cumulative lengths transformers' flash-attention kwargs use,
here over the row-major flattening of the batch), which ``PackingCollator(segments=True)`` emits. Calls without
them (generation, padded batches) go to transformers' own SDPA attention, so the model behaves as under ``sdpa``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SEGMENT_ATTENTION = "loralab_segments"
MATH_KERNEL_MAX_LENGTH = 256


def register() -> None:
    """Make ``SEGMENT_ATTENTION`` a transformers attention implementation (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)


def use_segment_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to ``segment_attention``; True if it now does."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", SEGMENT_ATTENTION):
        return False
    register()
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True


def segment_bounds(cu_seq_lens: torch.Tensor, width: int) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of each example from cumulative lengths over the flattened ``[rows, width]`` batch."""
    ends = cu_seq_lens.tolist()
    bounds = []
    for start, end in zip(ends[:-1], ends[1:]):
        row = start // width
        if end > start:
            if (end - 1) // width != row:
                raise ValueError(f"a packed example spans rows {row} and {(end - 1) // width} (cu_seq_lens {ends})")
            bounds.append((row, start - row * width, end - row * width))
    return bounds


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [B, H, T, D]``, ``key``/``value [B, Hkv, T, D]``;
    returns ``[B, T, H, D]``. Per-example causal SDPA where ``cu_seq_lens_q`` marks the packed examples and nothing
    else changes the pattern (no cache, causal, no dropout or soft-capping, examples inside any sliding window);
    else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    batch, heads, length, _ = query.shape
    plain = (cu_seq_lens is None or key.shape[2] != length or dropout
             or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
             or not (is_causal if is_causal is not None else getattr(module, "is_causal", True))
             or int(cu_seq_lens[-1]) != batch * length)
    bounds = [] if plain else segment_bounds(cu_seq_lens, length)
    window = kwargs.get("sliding_window")
    if window and any(end - start >= window for _, start, end in bounds):
        plain = True  # an example longer than the window: the mask has the window, per-example causal would not
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = key.shape[1] != heads
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    # short examples: a few matmuls in fp32 (``causal_attention``, as SDPA's math kernel computes them on CPU) ran
    # forward + backward 1.2-1.7x faster than the CPU flash kernel at 60-200 tokens; from ~400 tokens on they are
    # even, and flash needs less memory
    short = query.device.type == "cpu" and max(end - start for _, start, end in bounds) <= MATH_KERNEL_MAX_LENGTH
    # split, not sliced: the backward of a split is one concatenation, that of each slice a zero-filled full tensor
    tensors = [t.split(1) if batch > 1 else (t,) for t in (query, key, value)]
    for row, (q_row, k_row, v_row) in enumerate(zip(*tensors)):
        lengths = [end - start for r, start, end in bounds if r == row]  # in order: they tile the row
        for q, k, v in zip(q_row.split(lengths, 2), k_row.split(lengths, 2), v_row.split(lengths, 2)):
            rows[row].append(causal_attention(q, k, v, scaling) if short else
                             F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
    output = torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0)
    return output.transpose(1, 2).contiguous(), None


_FUTURE = torch.ones(MATH_KERNEL_MAX_LENGTH, MATH_KERNEL_MAX_LENGTH, dtype=torch.bool).triu(1)  # key after query


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scaling: float | None = None) -> torch.Tensor:
    """Causal attention of one example (``query [1, H, L, D]``, ``key``/``value [1, Hkv, L, D]``) in fp32, as SDPA's
    math kernel computes it on CPU, without what that kernel adds around it: the grouped-query heads read their
    shared key/value head in one matmul instead of copies of it (``repeat_interleave``), and the softmax skips the
    check for rows with no visible key (a causal row always has one). 12-30% faster than the math kernel forward +
    backward at 20-200 tokens. Autocast is off inside; the result has ``query``'s dtype."""
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    future = _FUTURE[:length, :length] if length <= MATH_KERNEL_MAX_LENGTH else \
        torch.ones(length, length, dtype=torch.bool).triu(1)
    with torch.autocast(query.device.type, enabled=False):  # fp32 matmuls, not autocast's bf16 ones
        q = query.float().reshape(kv_heads, group * length, dim) * scale  # a kv head's query heads, one after another
        scores = torch.bmm(q, key[0].float().transpose(1, 2)).view(kv_heads, group, length, length)
        weights = torch.softmax(scores.masked_fill(future.to(query.device), float("-inf")), dim=-1)
        out = torch.bmm(weights.view(kv_heads, group * length, length), value[0].float())
    return out.view(1, heads, length, dim).to(query.dtype)
