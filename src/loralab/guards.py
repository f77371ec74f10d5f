"""Guards around a training run: stop on divergence, stop cleanly on Ctrl-C, keep checkpoints shareable.

- ``GuardedTraining`` (a Trainer mixin) checks every step's loss; ``DivergenceGuard`` checks the LoRA weights after
  every optimizer step and the eval loss after every evaluation. A non-finite value stops the run before a
  checkpoint with it is written (the Trainer saves after these hooks), with a message naming the step.
- ``GracefulInterrupt``: the first Ctrl-C finishes the current step, saves a checkpoint and stops; a second one
  stops at once. Either way the run resumes with ``loralab train --resume RUN_DIR``.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from loralab.distributed import any_rank
from loralab.errors import LoralabError
from loralab.runs import make_shareable

log = logging.getLogger(__name__)


class TrainingDiverged(LoralabError):
    """A non-finite loss or weight: the run stopped and its adapter was not written."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(LoralabError):
    """Ctrl-C: the run stopped after saving a checkpoint (or at once, on a second Ctrl-C)."""


def likely_causes(args: Any) -> str:
    causes = [f"train.learning_rate={args.learning_rate:g} is too high (LoRA usually trains at 1e-5 .. 1e-3)"]
    if args.fp16:
        causes.append("fp16 overflows for this model (T5-family models in particular): use train.precision=bf16 or fp32")
    if args.max_grad_norm and args.max_grad_norm > 10:
        causes.append(f"train.max_grad_norm={args.max_grad_norm:g} does not limit the updates (1.0 is usual)")
    return "; ".join(causes)


def diverged(what: str, step: int, args: Any) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged at step {step}: {what}. Likely causes: {likely_causes(args)}. "
                            "No adapter was written for this run; checkpoints saved before this step are kept. "
                            "Fix the config and train again (--overwrite; in a sweep, --retry-failed)", step)


def trainable_parameters(model: Any) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def non_finite_parameter(model: Any, named: list[tuple[str, torch.Tensor]] | None = None) -> str | None:
    """The name of a trainable parameter holding NaN or inf, or None (one host sync for all of them); ``named``:
    ``trainable_parameters(model)``, if the caller keeps it."""
    named = trainable_parameters(model) if named is None else named
    if not named:
        return None
    # fast path (a tenth of the time of isfinite on every element): a finite sum of all weights means no NaN or inf
    # in any of them; a non-finite one (a NaN, an inf, or an overflow of huge weights) takes the exact check below
    device = named[0][1].device
    if bool(torch.stack([p.detach().sum().float().to(device) for _, p in named]).sum().isfinite()):
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all().to(device) for _, p in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class GuardedTraining:
    """Trainer mixin: a non-finite training loss stops the run at the step it appears.

    The Trainer's own ``logging_nan_inf_filter`` would replace it by the running average and go on.
    """

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        if any_rank(~torch.isfinite(loss).all(), loss.device):  # every process stops at the same step
            step = self.state.global_step + 1  # type: ignore[attr-defined]
            raise diverged(f"the training loss is {loss.item()}", step, self.args)  # type: ignore[attr-defined]
        return loss


def exploded(loss: float, reference: float) -> bool:
    """A loss far above where the run started: more than twice the starting loss plus one nat. Fine-tuning never
    gets there by noise; a model pushed to a uniform (or saturated) output by too large a step does."""
    return loss > 2 * reference + 1


class DivergenceGuard(TrainerCallback):
    """Stops when a LoRA weight becomes non-finite after an optimizer step, when an evaluation's loss is non-finite
    or exploded above the base model's, or when two logged training losses in a row exploded above the first one.

    A model can collapse without a NaN: a huge step saturates it into a uniform output (loss = ln(vocabulary)) with
    zero gradients, and training would go on for hours on a dead model; a logged gradient norm of exactly 0 at a
    non-zero loss stops it too (its loss need not rise when the model before training was worse than uniform).
    """

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if logs.get("grad_norm") == 0.0 and logs.get("loss", 0.0) > 1e-3 and state.global_step > 1:
            raise diverged(f"the gradients vanished (norm 0 at a loss of {logs['loss']:.4g}): the model saturated",
                           state.global_step, args)
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        if len(losses) >= 3 and all(exploded(loss, losses[0]) for loss in losses[-2:]):
            raise diverged(f"the training loss rose from {losses[0]:.4g} to {losses[-1]:.4g}", state.global_step, args)

    _watched: tuple[Any, list[tuple[str, torch.Tensor]]] | None = None  # the model and its trainable weights

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and (self._watched is None or self._watched[0] is not model):
            self._watched = (model, trainable_parameters(model))  # the same weights every step: listed once
        name = non_finite_parameter(model, self._watched[1]) if model is not None else None
        if any_rank(name is not None):  # sharded weights (FSDP) may differ between processes
            raise diverged(f"the weight {name or '(on another process)'} became non-finite", state.global_step + 1, args)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            what = "the base model's eval loss is already " if state.global_step == 0 else "the eval loss is "
            raise diverged(f"{what}{loss}", state.global_step, args)
        base = next((h["eval_loss"] for h in state.log_history if "eval_loss" in h), None)
        if base is not None and exploded(loss, base):
            raise diverged(f"the eval loss rose from {base:.4g} (the model before training) to {loss:.4g}",
                           state.global_step, args)


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: save a checkpoint after the current step and stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if any_rank(self.requested):  # Ctrl-C reaches every process, maybe not in the same step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class ShareableCheckpoints(TrainerCallback):
    """Checkpoints get the permissions the umask gives, like every other file of the run."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            make_shareable(folder)
