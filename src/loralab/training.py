"""Training: load everything a run needs, train with the Hugging Face Trainer, write the run folder.

The Trainer's configuration lives in :mod:`loralab.trainer`, precision rules in :mod:`loralab.precision`; both are
re-exported here for the names users import from ``loralab.training``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from loralab.config import RunConfig
from loralab.data import PreparedData, make_collator, prepare_data
from loralab.new_tokens import add_special_tokens, grow_embeddings
from loralab.engines import check_engines
from loralab.errors import LoralabError
from loralab.init_from import continue_from
from loralab.lora_init import build_adapter, convert_to_plain_lora, write_initial_adapter
from loralab.models import (
    TargetReport,
    load_model,
    load_tokenizer,
    parameter_counts,
    quantization_summary,
    resolve_task_type,
    trainable_to_fp32,
)
from loralab.checkpoints import checkpoint_step, complete_checkpoints, resume_point
from loralab.distributed import any_rank, barrier, init_process_group, is_main_process
from loralab.fingerprints import data_record, verify_data
from loralab.guards import GracefulInterrupt, TrainingDiverged, TrainingInterrupted, non_finite_parameter
from loralab.precision import (FP16_OVERFLOW_TYPES, autocast, cpu_supports_bf16, gpu_precision,  # noqa: F401
                               model_type_of, resolve_precision)
from loralab.runs import RunFolder, trim_metrics, write_json_atomic, written_into_place
from loralab.tracking import log_summary
from loralab.speed.attention import SEGMENT_ATTENTION, use_segment_attention
from loralab.speed.lora_forward import share_sibling_lora, use_fused_lora
from loralab.speed import PackingCollator, cast_frozen_weights, supports_packing, use_fast_dropout
from loralab.trainer import (MetricsFileCallback, SupervisedLogitsTrainer, build_trainer, check_optimizer,  # noqa: F401
                             checkpoint_interval, sharding_arguments, training_arguments, uses_supervised_logits)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- setup shared by train and check


@dataclass
class Session:
    """A base model with LoRA applied, its tokenizer, and the tokenized data: everything before training."""

    config: RunConfig
    task_type: str
    tokenizer: Any
    data: PreparedData
    model: Any
    targets: TargetReport
    collator: Any
    notes: list[str] = field(default_factory=list)
    initial_adapter: dict[str, Any] | None = None  # A0 / B0 of a residual initialisation (PiSSA, OLoRA, CorDA)


def load_tokenizer_and_data(config: RunConfig) -> tuple[str, Any, PreparedData]:
    """The cheap half of setup (no model weights): task type, tokenizer, tokenized data."""
    task_type = resolve_task_type(config)
    tokenizer = load_tokenizer(config.model, task_type)
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    add_special_tokens(tokenizer, config.data.add_special_tokens)  # before tokenizing: the data may use them
    data = prepare_data(config.data, tokenizer, task_type)
    return task_type, tokenizer, data


def setup(config: RunConfig, prepared: tuple[str, Any, PreparedData] | None = None, *,
          resume_from: Path | None = None, progress: bool = True) -> Session:
    """Load tokenizer and data first (fast failures), then the model, then apply LoRA (initialised as
    ``lora.init_lora_weights`` / ``lora.init_from`` say; ``resume_from``: the checkpoint a resume continues from)."""
    task_type, tokenizer, data = prepared or load_tokenizer_and_data(config)
    num_labels = len(data.label_ids) if data.label_ids else None  # ids are 0..n-1 (data.label_vocabulary)
    check_engines(config, task_type)
    model = load_model(config.model, task_type, num_labels=num_labels, precision=config.train.precision)
    if data.label_ids:
        model.config.id2label = {i: name for name, i in data.label_ids.items()}
        model.config.label2id = dict(data.label_ids)
    if task_type == "SEQ_CLS" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder-only classifiers find the last token by it
    if task_type == "CAUSAL_LM":
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        # No KV cache in training: it is useless there, and with a cache transformers skips the packed-sequence
        # detection, letting attention leak across packed examples.
        model.config.use_cache = False
    if uses_gradient_checkpointing(config):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    token_ids = add_special_tokens(tokenizer, config.data.add_special_tokens)
    if token_ids:
        grow_embeddings(model, tokenizer)  # new tokens get rows; only theirs train (trainable_token_indices)
    collate = make_collator(tokenizer, task_type, model)
    calibration = lambda size: DataLoader(data.train, batch_size=size,  # noqa: E731 (the data passes of EVA, CorDA)
                                          collate_fn=lambda rows: dict(collate(rows)))
    peft_model, targets, initial = build_adapter(model, config, task_type, calibration=calibration,
                                                 token_ids=token_ids, resume_from=resume_from, progress=progress)
    if config.lora.init_from and resume_from is None:  # a resume loads its checkpoint's weights instead
        continue_from(peft_model, config.lora.init_from, config)
    precision = resolve_precision(config.train.precision, model_type_of(model))
    if precision == "bf16" and not config.model.quantized:
        cast_frozen_weights(peft_model, torch.bfloat16)
    if precision in ("bf16", "fp16"):
        trainable_to_fp32(peft_model)  # LoRA weights and modules_to_save copies in fp32, also from a bf16 base
    use_fast_dropout(peft_model)
    if config.train.fused_lora and not config.train.deepspeed:  # ZeRO-3 gathers weights in each module's own call
        use_fused_lora(peft_model)
        if config.train.share_sibling_dropout:
            share_sibling_lora(peft_model)
    if uses_packing(config, task_type, peft_model) and config.train.segment_attention and peft_model.device.type == "cpu":
        use_segment_attention(peft_model)  # the collator then emits one row per batch with its examples' bounds
    return Session(config, task_type, tokenizer, data, peft_model, targets,
                   build_collator(config, task_type, tokenizer, peft_model), initial_adapter=initial)


def uses_gradient_checkpointing(config: RunConfig) -> bool:
    """``train.gradient_checkpointing``; unset: on for a quantized base (QLoRA's memory budget), off otherwise."""
    setting = config.train.gradient_checkpointing
    return config.model.quantized if setting is None else setting


def uses_packing(config: RunConfig, task_type: str, model: Any) -> bool:
    """Packing for causal LMs when enabled, on architectures known to honour packed position ids."""
    return task_type == "CAUSAL_LM" and config.train.packing and supports_packing(model)


def build_collator(config: RunConfig, task_type: str, tokenizer: Any, model: Any) -> Any:
    """Packing where ``uses_packing`` (segments when the model runs ``segment_attention``), else dynamic padding."""
    if uses_packing(config, task_type, model):
        segments = getattr(model.config, "_attn_implementation", None) == SEGMENT_ATTENTION
        return PackingCollator(tokenizer.pad_token_id, config.train.pack_length or config.data.max_length, segments)
    return make_collator(tokenizer, task_type, model)


# ---------------------------------------------------------------- a whole run


def save_adapter(model: Any, tokenizer: Any, target: Path, label_ids: dict[str, int] | None = None,
                 state_dict: dict[str, Any] | None = None, initial: dict[str, Any] | None = None) -> None:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors, + labels.json for a
    classifier) into a staging folder, then move it into place atomically. ``initial``: the initial adapter of a
    residual initialisation (PiSSA, OLoRA, CorDA): the adapter is converted to a plain LoRA for the original base."""
    with written_into_place(target) as staging:
        model.save_pretrained(staging, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        if initial is not None:
            convert_to_plain_lora(Path(staging), initial)
        tokenizer.save_pretrained(staging)
        if label_ids:
            from loralab.classification import save_labels

            save_labels(staging, label_ids)


def finish_from_checkpoint(trainer: Any, model: Any, checkpoint: Path) -> Any:
    """A run killed after its last checkpoint (``max_steps`` reached): nothing is left to train. The Trainer would
    run one more step from there, so its state is read back and the best checkpoint's adapter loaded instead."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    chosen = checkpoint.parent / Path(best).name if best else checkpoint
    if not (chosen / "adapter_model.safetensors").is_file():
        chosen = checkpoint
    set_peft_model_state_dict(model, load_file(chosen / "adapter_model.safetensors"))
    return TrainOutput(trainer.state.global_step, logged_mean_loss(trainer.state.log_history) or float("nan"), {})


def logged_mean_loss(history: list[dict]) -> float | None:
    """The mean training loss over the logged steps (each logged loss weighted by the steps it averages)."""
    total = steps = 0.0
    previous = 0
    for entry in history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else None


def _last(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def train(config: RunConfig, *, run_dir: str | Path | None = None, overwrite: bool = False, resume: bool | None = None,
          progress: bool = True, preflight: Callable[[Session], None] | None = None,
          callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a LoRA adapter and write the run folder; returns the run summary.

    ``preflight`` (e.g. loralab's fast checks) runs on the loaded session before any training step; ``callbacks``
    (``transformers.TrainerCallback``) are added to the Trainer's.
    A non-finite loss or weight stops the run (``TrainingDiverged``, summary.json ``status: diverged``, no adapter);
    Ctrl-C saves a checkpoint and stops (``TrainingInterrupted``); ``resume`` continues from the newest complete
    checkpoint. With ``overwrite`` the old run is kept until the new one has loaded and passed ``preflight``, and is
    restored when the new one fails before its first checkpoint.
    """
    resume = config.train.resume if resume is None else resume
    run_path = Path(run_dir) if run_dir else config.run_dir()
    from transformers import set_seed

    init_process_group()  # under torchrun / accelerate launch: the barriers below need the group
    main = is_main_process()  # only global rank 0 writes the run folder; the others wait at barriers
    prepared = load_tokenizer_and_data(config)  # bad data fails before any folder is touched
    folder = RunFolder.plan(config, run_path, overwrite=overwrite, resume=resume)  # checks only, changes nothing
    barrier()  # every rank has seen the folder as it was before rank 0 changes it
    paths = folder.paths
    if folder.mode == "resume":
        verify_data(paths.data_fingerprint, config.data, f"resume {paths.root}")
    set_seed(config.train.seed)
    found = complete_checkpoints(paths.root) if folder.mode == "resume" else []
    session = setup(config, prepared, resume_from=found[-1] if found else None, progress=progress)
    counts = parameter_counts(session.model)
    log.info("%s: %s, %d train / %d eval examples, %d trainable of %d parameters (%.3f%%)",
             paths.root, session.task_type, len(session.data.train), len(session.data.eval or []),
             counts["trainable_params"], counts["total_params"], counts["trainable_percent"])
    checks = preflight(session) if preflight is not None else None  # loralab's checks return their report

    if main:
        folder.open()  # only now is an overwritten run set aside
        if hasattr(checks, "to_dict"):  # the preflight report, for `loralab ui` and later reading
            write_json_atomic(paths.checks_report, checks.to_dict())
    interrupt = GracefulInterrupt()
    try:
        summary = _train_session(session, folder, counts, progress, callbacks or [], interrupt)
    except BaseException as exc:
        note = folder.failed() if main else None
        if note and isinstance(exc, LoralabError):
            exc.args = (f"{exc} ({note})",)
        raise
    if main:
        folder.finished()
    barrier()
    if any_rank(interrupt.requested):  # Ctrl-C in the last step: the run is complete, but the caller must stop too
        raise TrainingInterrupted(f"training was interrupted as it finished: run {paths.root} is complete (adapter "
                                  "and summary written); nothing after training was done")
    return summary


def _train_session(session: Session, folder: RunFolder, counts: dict[str, Any], progress: bool,
                   extra_callbacks: list[Any], interrupt: GracefulInterrupt | None = None) -> dict[str, Any]:
    """Train an opened run folder's session to the end: checkpoints, guards, the best adapter, summary.json."""
    config, paths = session.config, folder.paths
    main = is_main_process()
    start = None
    if main:
        start = resume_point(paths.root) if folder.mode == "resume" else None  # torn checkpoints are set aside
        if start is not None:
            trim_metrics(paths.root, checkpoint_step(start))  # lines logged after the checkpoint are logged again
        else:
            paths.metrics.unlink(missing_ok=True)
            write_json_atomic(paths.data_fingerprint, data_record(config.data, session.data.train_examples,
                                                                  session.data.eval_examples, session.data.test_examples))
            if session.initial_adapter is not None:  # a resume and a checkpoint's conversion need it
                write_initial_adapter(paths.root, session.initial_adapter, str(config.lora.init_lora_weights))
    barrier()
    if not main and folder.mode == "resume":
        found = complete_checkpoints(paths.root)  # rank 0 has set the torn ones aside
        start = found[-1] if found else None
    resume_from = str(start) if start else None
    callbacks: list[Any] = list(extra_callbacks)
    if config.train.eval_generate:  # generation metrics (exact match, ROUGE-L, chrF, BLEU) at each evaluation
        from loralab.evaluation import generation_callback

        # first, so that the callbacks given to train() (e.g. tune's pruning) see the generation metrics too
        callbacks.insert(0, generation_callback(session, paths.metrics))
    interrupt = interrupt or GracefulInterrupt()
    trainer = build_trainer(session, paths, progress=progress, callbacks=[interrupt, *callbacks],
                            resuming=resume_from is not None)
    started = time.perf_counter()
    resume_hint = f"continue with: loralab train --resume {paths.root}"
    try:
        if start is not None and config.train.max_steps and checkpoint_step(start) >= config.train.max_steps:
            output = finish_from_checkpoint(trainer, session.model, start)  # killed after its last checkpoint
        else:
            output = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"training interrupted before its next checkpoint; {resume_hint}") from None
    except TrainingDiverged as exc:
        if main:
            write_json_atomic(paths.summary, {"run": str(paths.root), "status": "diverged", "reason": str(exc),
                                              "step": exc.step, "model": config.model.name_or_path})
        raise
    finally:
        interrupt.restore()
    elapsed = time.perf_counter() - started
    session.model.eval()  # Trainer leaves the model in train mode (dropout on)
    if interrupt.requested and trainer.state.global_step < trainer.state.max_steps:  # else: it had finished anyway
        raise TrainingInterrupted(f"training stopped at step {trainer.state.global_step} after saving a checkpoint; "
                                  f"{resume_hint}")
    bad = non_finite_parameter(session.model)
    if bad or not math.isfinite(output.training_loss):
        what = f"the weight {bad} is non-finite" if bad else f"the training loss is {output.training_loss}"
        raise TrainingDiverged(f"training diverged: {what}; lower train.learning_rate. No adapter was written",
                               trainer.state.global_step)
    # sharded weights (FSDP / ZeRO-3) are gathered by every process; then one writes them
    sharded = trainer.model_wrapped if config.train.deepspeed else trainer.model  # ZeRO-3 gathers through its engine
    state_dict = trainer.accelerator.get_state_dict(sharded) if config.train.fsdp != "off" or config.train.deepspeed \
        else None
    if main:  # SEQ_CLS: the class names (in id order) go with the adapter as adapter/labels.json
        save_adapter(session.model, session.tokenizer, paths.adapter, label_ids=session.data.label_ids,
                     state_dict=state_dict, initial=session.initial_adapter)
    history = trainer.state.log_history
    best = trainer.state.best_model_checkpoint
    metric = config.train.metric_for_best_model
    best_step = checkpoint_step(Path(best)) if best else None
    epochs_done = trainer.state.epoch or 0.0
    labels = list(sorted(session.data.label_ids, key=session.data.label_ids.get)) if session.data.label_ids else None
    summary = {
        "run": str(paths.root),
        "status": "finished",
        "task_type": session.task_type,
        "model": config.model.name_or_path,
        **counts,
        "target_modules_matched": len(session.targets.matched),
        "target_modules_unmatched": session.targets.unmatched_names,
        "n_train": len(session.data.train),
        "n_eval": len(session.data.eval or []),
        **session.data.truncation_counts(),
        "precision": resolve_precision(config.train.precision, model_type_of(session.model)),
        **quantization_summary(config.model, session.model),
        "optimizer": config.train.optim,
        "lora_init": config.lora.init_lora_weights,  # true (PEFT's default), gaussian, pissa, loftq, eva, ...
        "lora_variant": "dora" if config.lora.use_dora else "rslora" if config.lora.use_rslora else "lora",
        "init_from": config.lora.init_from,
        "gradient_checkpointing": uses_gradient_checkpointing(config),
        "epochs": round(epochs_done, 4),
        "steps": trainer.state.global_step,
        "train_time_s": round(elapsed, 2),
        # after a resume the Trainer averages only the resumed steps: the whole run's mean comes from the log
        "train_loss": logged_mean_loss(history) if resume_from else output.training_loss,
        "final_train_loss": _last(history, "loss"),
        "base_eval_loss": next((h["eval_loss"] for h in history if "eval_loss" in h and h.get("step") == 0), None),
        "first_eval_loss": next((h["eval_loss"] for h in history if "eval_loss" in h and h.get("step")), None),
        "final_eval_loss": _last(history, "eval_loss"),
        "best_eval_loss": trainer.state.best_metric if metric == "eval_loss" else next(
            (h["eval_loss"] for h in history if "eval_loss" in h and h.get("step") == best_step), None),
        "metric_for_best_model": metric,
        "best_metric": trainer.state.best_metric,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,  # early stopping (or a tune trial pruned)
        "best_checkpoint": f"checkpoints/{Path(best).name}" if best else None,  # however the path was spelled
        "supervised_tokens_per_epoch": session.data.supervised_tokens(),
        "resumed_from": f"checkpoints/{Path(resume_from).name}" if resume_from else None,
        **({"labels": labels} if labels else {}),
    }
    if main:
        write_json_atomic(paths.summary, summary)
        log_summary(trainer, summary)  # to the trackers of train.report_to, as parameters
    return summary
