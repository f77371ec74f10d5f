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

from typing import Any

import torch

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


def _embedding_hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if not module.training:
        return output
    batch = getattr(module, "_loralab_neftune_batch", None) or {}
    lengths = example_lengths(output.shape[:2], batch.get("position_ids"), batch.get("attention_mask"))
    return noisy_embeddings(output, module._loralab_neftune_alpha, lengths)


def input_embeddings(model: Any) -> Any:
    """The input embedding layer under any wrapper (DDP, FSDP, DeepSpeed, PEFT)."""
    return unwrap_model(model).get_input_embeddings()


class NEFTuneTraining:
    """A Trainer mixin: NEFTune with each example's own length, while ``train()`` runs."""

    neftune_alpha: float | None = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if not self.neftune_alpha:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        layer = input_embeddings(self.model)  # type: ignore[attr-defined]
        layer._loralab_neftune_alpha = self.neftune_alpha
        handle = layer.register_forward_hook(_embedding_hook)
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            handle.remove()
            for name in ("_loralab_neftune_alpha", "_loralab_neftune_batch"):
                if hasattr(layer, name):
                    delattr(layer, name)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.neftune_alpha:
            input_embeddings(model)._loralab_neftune_batch = {key: inputs.get(key) for key in
                                                              ("position_ids", "attention_mask")}
        return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]
