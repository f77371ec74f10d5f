"""Training: load everything a run needs, train with the Hugging Face Trainer, write the run folder."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback

from loralab.config import RunConfig
from loralab.data import PreparedData, make_collator, prepare_data
from loralab.errors import LoralabError
from loralab.metrics import HIGHER_IS_BETTER
from loralab.models import (
    TargetReport,
    apply_lora,
    load_model,
    load_tokenizer,
    parameter_counts,
    quantization_summary,
    resolve_task_type,
    trainable_to_fp32,
)
from loralab.checkpoints import checkpoint_step, complete_checkpoints, resume_point
from loralab.distributed import barrier, init_process_group, is_main_process
from loralab.fingerprints import data_record, verify_data
from loralab.guards import (DivergenceGuard, GracefulInterrupt, GuardedTraining, ShareableCheckpoints, TrainingDiverged,
                            TrainingInterrupted, non_finite_parameter)
from loralab.runs import RunFolder, RunPaths, replace_dir_atomic, staging_dir, trim_metrics, write_json_atomic
from loralab.speed import PackingCollator, cast_frozen_weights, supervised_lm_loss, supports_packing, use_fast_dropout

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- hardware


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


FP16_OVERFLOW_TYPES = ("t5", "mt5", "umt5")  # T5 / mT5 / mt0 / flan-T5: activations overflow fp16 (NaN losses)


def gpu_precision() -> str | None:
    """The reduced precision the CUDA GPU runs natively: bf16, fp16 (older GPUs such as a T4), or None without one."""
    if not torch.cuda.is_available():
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def model_type_of(model: Any) -> str | None:
    """A (PEFT-wrapped) model's ``config.model_type``, for :func:`resolve_precision`."""
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_precision(precision: str, model_type: str | None = None) -> str:
    """``auto`` becomes bf16 where the hardware runs it natively, else fp16 (older GPUs) or fp32.

    On a GPU without bf16, T5-family models (``model_type`` t5, mt5, umt5) get fp32: they overflow in fp16."""
    if precision != "auto":
        return precision
    gpu = gpu_precision()
    if gpu == "fp16" and model_type in FP16_OVERFLOW_TYPES:
        return "fp32"
    if gpu:
        return gpu
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device, model_type: str | None = None) -> Any:
    """The mixed-precision context of training for a ``train.precision`` (resolved for this hardware and model)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, model_type))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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


def load_tokenizer_and_data(config: RunConfig) -> tuple[str, Any, PreparedData]:
    """The cheap half of setup (no model weights): task type, tokenizer, tokenized data."""
    task_type = resolve_task_type(config)
    tokenizer = load_tokenizer(config.model, task_type)
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    data = prepare_data(config.data, tokenizer, task_type)
    return task_type, tokenizer, data


def setup(config: RunConfig, prepared: tuple[str, Any, PreparedData] | None = None) -> Session:
    """Load tokenizer and data first (fast failures), then the model, then apply LoRA."""
    task_type, tokenizer, data = prepared or load_tokenizer_and_data(config)
    num_labels = len(data.label_ids) if data.label_ids else None  # ids are 0..n-1 (data.label_vocabulary)
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
    peft_model, targets = apply_lora(model, config.lora, task_type)
    precision = resolve_precision(config.train.precision, model_type_of(model))
    if precision == "bf16" and not config.model.quantized:
        cast_frozen_weights(peft_model, torch.bfloat16)
    if precision in ("bf16", "fp16"):
        trainable_to_fp32(peft_model)  # LoRA weights and modules_to_save copies in fp32, also from a bf16 base
    use_fast_dropout(peft_model)
    return Session(config, task_type, tokenizer, data, peft_model, targets, build_collator(config, task_type, tokenizer, peft_model))


def uses_gradient_checkpointing(config: RunConfig) -> bool:
    """``train.gradient_checkpointing``; unset: on for a quantized base (QLoRA's memory budget), off otherwise."""
    setting = config.train.gradient_checkpointing
    return config.model.quantized if setting is None else setting


def check_optimizer(optim: str) -> str:
    """``train.optim`` if the installed libraries and this device offer it, else a clear error."""
    needs_bnb = "8bit" in optim or optim.startswith("paged_")
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise LoralabError(f"train.optim={optim} needs bitsandbytes: pip install 'loralab[qlora]'")
    if optim.startswith("paged_") and not torch.cuda.is_available():
        raise LoralabError(f"train.optim={optim} pages optimizer state between GPU and CPU memory and needs a CUDA GPU; "
                           "on CPU use adamw_torch (or adamw_8bit)")
    return optim


def sharding_arguments(train: Any) -> dict[str, Any]:
    """The Trainer's FSDP2 / DeepSpeed arguments for ``train.fsdp`` / ``train.deepspeed`` (none when both are off)."""
    if train.fsdp != "off" and train.deepspeed:
        raise LoralabError("train.fsdp and train.deepspeed are both set; choose one sharding engine")
    if train.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise LoralabError(f"train.deepspeed={train.deepspeed} needs DeepSpeed: pip install deepspeed")
        if not Path(train.deepspeed).is_file():
            raise LoralabError(f"train.deepspeed: config file not found: {train.deepspeed}")
        return {"deepspeed": train.deepspeed}
    if train.fsdp == "off":
        return {}
    # the decoder layers are wrapped (transformers reads them from the model's _no_split_modules)
    return {"fsdp": [train.fsdp, "auto_wrap"], "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}


def build_collator(config: RunConfig, task_type: str, tokenizer: Any, model: Any) -> Any:
    """Packing for causal LMs when enabled (architectures known to honour packed position ids), else dynamic padding."""
    if task_type == "CAUSAL_LM" and config.train.packing and supports_packing(model):
        return PackingCollator(tokenizer.pad_token_id, config.train.pack_length or config.data.max_length)
    return make_collator(tokenizer, task_type, model)


# ---------------------------------------------------------------- the Trainer


class MetricsFileCallback(TrainerCallback):
    """Appends every log (train loss, eval loss, ...) as one JSON line to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:  # one process writes the file
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3), **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")


def checkpoint_interval(train: Any, n_train: int, has_eval: bool) -> dict[str, Any]:
    """When to evaluate and save: ``train.save_steps`` / ``train.eval_steps`` (each following the other when only one
    is set, so every checkpoint has an eval loss to rank it by), else once per epoch (or per ``max_steps``)."""
    save, every = train.save_steps or train.eval_steps, train.eval_steps or train.save_steps
    if not save and train.max_steps:
        steps_per_epoch = max(1, math.ceil(n_train / (train.batch_size * train.gradient_accumulation)))
        save = every = min(steps_per_epoch, train.max_steps)
    if not save:
        return {"eval_strategy": "epoch" if has_eval else "no", "save_strategy": "epoch"}
    interval: dict[str, Any] = {"eval_strategy": "steps" if has_eval else "no", "save_strategy": "steps", "save_steps": save}
    if has_eval:
        interval["eval_steps"] = every
    return interval


def training_arguments(config: RunConfig, paths: RunPaths, n_train: int, has_eval: bool, task_type: str, progress: bool,
                       resuming: bool = False, model_type: str | None = None) -> Any:
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    train = config.train
    precision = resolve_precision(train.precision, model_type)
    interval = checkpoint_interval(train, n_train, has_eval)
    cls = Seq2SeqTrainingArguments if task_type == "SEQ_2_SEQ_LM" else TrainingArguments
    return cls(
        output_dir=str(paths.checkpoints),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size or train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup if train.warmup < 1 else int(train.warmup),
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_on_start=has_eval and not resuming,  # the base model's eval loss, for comparison (logged once)
        logging_nan_inf_filter=False,  # a NaN loss must be seen (the guards stop the run on it), not averaged away
        load_best_model_at_end=has_eval,
        metric_for_best_model=train.metric_for_best_model if has_eval else None,  # eval_loss or a generation metric
        greater_is_better=HIGHER_IS_BETTER[train.metric_for_best_model] if has_eval else None,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        optim=check_optimizer(train.optim),
        **sharding_arguments(train),
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step: no extra graph traversal
        **interval,
    )


def uses_supervised_logits(session: Session) -> bool:
    """Whether training computes the causal-LM loss only at supervised positions (``supervised_lm_loss``)."""
    from loralab.speed import supervised_logits_exact

    return (session.task_type == "CAUSAL_LM" and session.config.train.supervised_logits_only
            and supervised_logits_exact(session.model))


class SupervisedLogitsTrainer(Trainer):
    """A Trainer whose causal-LM loss projects to the vocabulary only at supervised positions.

    Same loss as the Trainer's own (token-averaged cross-entropy, gradient-accumulation and multi-process aware):
    ``supervised_lm_loss`` calls the model as given (DDP/FSDP wrappers, accelerate's autocast and the model's own
    logit processing all run). Where that is not exact (label smoothing, a custom loss, tensor/context/sequence
    parallelism, ``DataParallel`` over several GPUs) the Trainer's own loss is used.
    """

    def _supervised_logits_apply(self, model: Any, inputs: dict[str, Any]) -> bool:
        from loralab.speed import supervised_logits_exact

        return ("labels" in inputs and self.label_smoother is None and self.compute_loss_func is None
                and self.get_tp_size() * self.get_cp_size() * self.get_sp_size() == 1
                and supervised_logits_exact(model))

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not self._supervised_logits_apply(model, inputs):
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_sum, count = supervised_lm_loss(model, inputs)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None  # normalised over the accumulated batch
        loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # as the Trainer's own loss: num_items_in_batch counts every process's tokens, DDP averages gradients
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


def build_trainer(session: Session, paths: RunPaths, progress: bool = True, callbacks: list | None = None,
                  resuming: bool = False) -> Any:
    """A Trainer (Seq2SeqTrainer for seq2seq) wired with loralab's data, collator, metrics log and guards."""
    from transformers import Seq2SeqTrainer

    has_eval = session.data.eval is not None and len(session.data.eval) > 0
    args = training_arguments(session.config, paths, len(session.data.train), has_eval, session.task_type, progress,
                              resuming, model_type=model_type_of(session.model))
    cls: type = Trainer
    if session.task_type == "SEQ_2_SEQ_LM":
        cls = Seq2SeqTrainer
    elif uses_supervised_logits(session):
        cls = SupervisedLogitsTrainer
    guarded = type(f"Guarded{cls.__name__}", (GuardedTraining, cls), {})
    stopping: list[Any] = []
    if session.config.train.early_stopping_patience:
        if not has_eval:
            raise LoralabError("train.early_stopping_patience needs an eval split to watch (data.eval_split > 0 or "
                               "data.eval_path); set it to null or give eval data")
        from transformers import EarlyStoppingCallback

        # last, so that it sees the generation metrics of train.eval_generate (added to the eval metrics before it)
        stopping.append(EarlyStoppingCallback(early_stopping_patience=session.config.train.early_stopping_patience))
    return guarded(
        model=session.model,
        args=args,
        train_dataset=session.data.train,
        eval_dataset=session.data.eval if has_eval else None,
        data_collator=session.collator,
        processing_class=session.tokenizer,
        callbacks=[MetricsFileCallback(paths.metrics), DivergenceGuard(), ShareableCheckpoints(), *(callbacks or []),
                   *stopping],
    )


# ---------------------------------------------------------------- a whole run


def save_adapter(model: Any, tokenizer: Any, target: Path, label_ids: dict[str, int] | None = None,
                 state_dict: dict[str, Any] | None = None) -> None:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors, + labels.json for a
    classifier) into a staging folder, then move it into place atomically."""
    staging = staging_dir(target)
    try:
        model.save_pretrained(staging, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(staging)
        if label_ids:
            from loralab.classification import save_labels

            save_labels(staging, label_ids)
        replace_dir_atomic(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
    session = setup(config, prepared)
    counts = parameter_counts(session.model)
    log.info("%s: %s, %d train / %d eval examples, %d trainable of %d parameters (%.3f%%)",
             paths.root, session.task_type, len(session.data.train), len(session.data.eval or []),
             counts["trainable_params"], counts["total_params"], counts["trainable_percent"])
    if preflight is not None:
        preflight(session)

    if main:
        folder.open()  # only now is an overwritten run set aside
    try:
        summary = _train_session(session, folder, counts, progress, callbacks or [])
    except BaseException as exc:
        note = folder.failed() if main else None
        if note and isinstance(exc, LoralabError):
            exc.args = (f"{exc} ({note})",)
        raise
    if main:
        folder.finished()
    barrier()
    return summary


def _train_session(session: Session, folder: RunFolder, counts: dict[str, Any], progress: bool,
                   extra_callbacks: list[Any]) -> dict[str, Any]:
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
                                                                  session.data.eval_examples))
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
    interrupt = GracefulInterrupt()
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
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if config.train.fsdp != "off" or config.train.deepspeed \
        else None
    if main:  # SEQ_CLS: the class names (in id order) go with the adapter as adapter/labels.json
        save_adapter(session.model, session.tokenizer, paths.adapter, label_ids=session.data.label_ids,
                     state_dict=state_dict)
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
    return summary
