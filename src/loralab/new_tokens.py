"""New special tokens (``data.add_special_tokens``): added to the tokenizer, the embeddings grown to fit, and only
the tokens' rows trained (PEFT's ``trainable_token_indices``), saved with the adapter.

The same tokens are added again, in the same order, wherever a run's model is loaded (eval, compare, generate,
export), so they get the same ids, and the base's embeddings are grown the same way before the adapter loads.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def add_special_tokens(tokenizer: Any, tokens: list[str] | None) -> list[int]:
    """Add the tokens the tokenizer does not know as special tokens; the ids of all of them (the rows that train)."""
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab]
    if known:
        log.info("data.add_special_tokens: %s already in the tokenizer; their rows train too", known)
    tokenizer.add_tokens([t for t in tokens if t not in vocab], special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def grow_embeddings(model: nn.Module, tokenizer: Any) -> int:
    """Resize the model's embeddings (and an untied output layer) to the tokenizer's length when it outgrew them; new
    rows start at the mean of the existing rows (the same every time, so a reload rebuilds the same base). Returns
    how many rows were added."""
    embeddings = model.get_input_embeddings()
    old = embeddings.weight.shape[0]
    if len(tokenizer) <= old:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        layers = [model.get_input_embeddings(), model.get_output_embeddings()]
        for layer in {id(m): m for m in layers if m is not None}.values():
            weight = layer.weight
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
            bias = getattr(layer, "bias", None)
            if bias is not None and bias.shape[0] > old:
                bias[old:] = 0
    return len(tokenizer) - old


def trainable_token_indices(model: nn.Module, ids: list[int]) -> dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices`` for these token ids: the input embeddings (a tied output layer follows them),
    and an untied output layer too, so that the model can also produce the new tokens."""
    if not ids:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    indices = {names[id(model.get_input_embeddings())]: list(ids)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is not model.get_input_embeddings().weight and isinstance(output, nn.Linear):
        indices[names[id(output)]] = list(ids)
    return indices


def with_new_tokens(tokenizer: Any, model: nn.Module, tokens: list[str] | None) -> None:
    """For loading a run's model: the run's new tokens added to ``tokenizer`` and the base ``model`` grown to match."""
    if tokens:
        add_special_tokens(tokenizer, tokens)
        grow_embeddings(model, tokenizer)
