"""NEFTune (``train.neftune_noise_alpha``): uniform noise on the input embeddings while training, against memorising
the training phrasings (Jain et al. 2023, https://arxiv.org/abs/2310.05914; the Trainer's ``neftune_noise_alpha``).

The noise of a token is uniform in +-alpha / sqrt(L x d), d the embedding width and L the length of *its own
example*. The Trainer's hook takes L as the batch's width, which for packed rows (several examples in one row) is the
row's length: the noise would shrink with the packing. Here L comes from the batch: the example's segment of a packed
row (``position_ids`` restarting at 0), or the row's non-padding tokens (``attention_mask``); the paper's padded
batches of one example a row give its own numbers. The hook is on only inside ``Trainer.train()`` and adds noise only
in train mode (the evaluations during training and the generation after it see clean embeddings).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from loralab.data import IGNORE_INDEX
from loralab.speed import unwrap_model


def example_lengths(input_shape: torch.Size, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, width, 1] float: for every token the length of the example it belongs to."""
    batch, width = input_shape[0], input_shape[1]
    if position_ids is not None and tuple(position_ids.shape) == (batch, width):
        starts = (position_ids == 0).long()
        starts[:, 0] = 1  # a row always starts a segment
        segment = starts.cumsum(dim=1) - 1 + torch.arange(batch, device=starts.device).unsqueeze(1) * width
        counts = torch.bincount(segment.flatten(), minlength=batch * width)
        lengths = counts[segment]
    elif attention_mask is not None and tuple(attention_mask.shape) == (batch, width):
        lengths = attention_mask.sum(dim=1, keepdim=True).clamp(min=1).expand(batch, width)
    else:
        lengths = torch.full((batch, width), width, device=position_ids.device if position_ids is not None else None)
    return lengths.unsqueeze(-1).float()


def noisy_embeddings(embeddings: torch.Tensor, alpha: float, lengths: torch.Tensor) -> torch.Tensor:
    """``embeddings`` plus NEFTune's noise: uniform in +-alpha / sqrt(length x width), per token."""
    scale = alpha / torch.sqrt(lengths.to(embeddings.device) * embeddings.shape[-1])
    noise = torch.empty_like(embeddings).uniform_(-1.0, 1.0) * scale.to(embeddings.dtype)
    return embeddings + noise


# the batch tensors an embedding call can read, with the positions and mask that give its examples' lengths
SOURCES = (("input_ids", "position_ids", "attention_mask"),
           ("positive_input_ids", None, "positive_attention_mask"))  # the embeddings task's second forward


def _same(source: Any, ids: torch.Tensor) -> bool:
    return isinstance(source, torch.Tensor) and (source is ids or (source.shape == ids.shape and torch.equal(
        source.to(ids.device), ids)))


def call_lengths(ids: torch.Tensor | None, shape: torch.Size, side: str, batch: dict[str, Any]) -> torch.Tensor:
    """``example_lengths`` for one call of an embedding layer with token ids ``ids`` (output ``[batch, width, d]``):
    the mask (or positions) of the batch tensor the ids are; else, on the decoder side of an encoder-decoder model
    (the labels shifted right, by the collator or inside the model), ``decoder_attention_mask`` or the labels'
    supervised tokens; else the batch's own positions or mask where their shape fits, else the width."""
    if ids is not None:
        for ids_key, positions_key, mask_key in SOURCES:
            if _same(batch.get(ids_key), ids):
                return example_lengths(shape, batch.get(positions_key) if positions_key else None, batch.get(mask_key))
    if side == "decoder" or (ids is not None and _same(batch.get("decoder_input_ids"), ids)):
        mask, labels = batch.get("decoder_attention_mask"), batch.get("labels")
        if mask is None and isinstance(labels, torch.Tensor) and labels.dim() == 2:
            mask = (labels != IGNORE_INDEX).long()  # the decoder reads one token per label: the start, then labels
        return example_lengths(shape, attention_mask=mask)
    return example_lengths(shape, batch.get("position_ids"), batch.get("attention_mask"))


def _embedding_hook(state: dict[str, Any], side: str, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if not module.training:
        return output
    ids = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    lengths = call_lengths(ids, output.shape[:2], side, state.get("batch") or {})
    return noisy_embeddings(output, state["alpha"], lengths)


def input_embeddings(model: Any) -> Any:
    """The input embedding layer under any wrapper (DDP, FSDP, DeepSpeed, PEFT)."""
    return unwrap_model(model).get_input_embeddings()


def embedding_layers(model: Any) -> list[tuple[Any, str]]:
    """The input embedding layers the model's forward runs, each with its side (``input`` or ``decoder``).

    A decoder-only model: its input embeddings. An encoder-decoder model (T5, mT5, BART): the encoder's and the
    decoder's own layers. In transformers 5 they are modules of their own that share the weight of
    ``get_input_embeddings()``, which the forward never calls: a hook there (the Trainer's own NEFTune) adds nothing.
    """
    base = unwrap_model(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False) and hasattr(base, "get_encoder") \
            and hasattr(base, "get_decoder"):
        encoder, decoder = base.get_encoder().get_input_embeddings(), base.get_decoder().get_input_embeddings()
        if encoder is decoder:  # one module for both: encoder calls are found by their ids, the rest are the decoder's
            return [(encoder, "decoder")]
        return [(encoder, "input"), (decoder, "decoder")]
    return [(base.get_input_embeddings(), "input")]


class NEFTuneTraining:
    """A Trainer mixin: NEFTune with each example's own length, while ``train()`` runs."""

    neftune_alpha: float | None = None
    _neftune_state: dict[str, Any] | None = None  # the alpha and the batch of the step, read by the hooks

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if not self.neftune_alpha:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        self._neftune_state = {"alpha": self.neftune_alpha, "batch": None}
        handles = [layer.register_forward_hook(functools.partial(_embedding_hook, self._neftune_state, side))
                   for layer, side in embedding_layers(self.model)]  # type: ignore[attr-defined]
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            for handle in handles:
                handle.remove()
            self._neftune_state = None

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._neftune_state is not None:
            self._neftune_state["batch"] = inputs
        return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]
