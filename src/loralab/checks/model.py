"""Checks on the loaded model: LoRA targets, batches from the real DataLoader, loss and gradients, cost of a step.

Every check leaves the session as it found it: LoRA weights, gradients, train/eval mode and the RNG state.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import resource
import sys
import time
from collections import Counter
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from loralab.checks.data import optimizer_steps, rows_text
from loralab.checks.report import CheckResult, Status, verdict
from loralab.data import IGNORE_INDEX
from loralab.models import linear_module_names, parameter_counts

COST_STEPS = 3  # optimizer steps run by the cost estimate; the first is warm-up and not timed
INTEGER_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "decoder_input_ids", "decoder_attention_mask")
WHOLE_BATCH_KEYS = ("cu_seq_lens_q",)  # one value for the whole batch, not one row per example (PackingCollator)


# ---------------------------------------------------------------- running the model as training does


def device_of(model: Any) -> torch.device:
    """Where training runs the model: CUDA when available (moved there, as the Trainer would), else its device."""
    param = next(model.parameters())
    if param.device.type != "cpu" or not torch.cuda.is_available() or getattr(model, "is_loaded_in_4bit", False):
        return param.device
    model.to("cuda")
    return torch.device("cuda")


def autocast(session: Any, device: torch.device) -> Any:
    """The mixed-precision context training uses."""
    from loralab.precision import autocast as training_autocast, model_type_of

    return training_autocast(session.config.train.precision, device, model_type_of(session.model))


def training_loss(session: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the Trainer optimises: supervised-positions-only for causal LMs where training uses it, else the model's."""
    from loralab.speed import supervised_lm_loss
    from loralab.trainer import uses_supervised_logits

    if uses_supervised_logits(session):
        total, count = supervised_lm_loss(session.model, batch)
        return total / count.clamp(min=1)
    return session.model(**batch).loss


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def untouched(model: Any) -> Iterator[None]:
    """Run something on the model and restore its mode, gradients and the RNG state afterwards."""
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for param in model.parameters():
            param.grad = None
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def is_adapter_param(name: str, bias: str) -> bool:
    """Parameters LoRA is meant to train: lora_A/B (and DoRA magnitudes), modules_to_save copies, new token rows
    (data.add_special_tokens), biases if configured."""
    return "lora_" in name or "modules_to_save" in name or "trainable_tokens_delta" in name \
        or (bias != "none" and name.endswith(".bias"))


def first_batches(session: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` batches of the real DataLoader (sequential order, the session's collator)."""
    loader = DataLoader(session.data.train, batch_size=session.config.train.batch_size, collate_fn=session.collator)
    return list(itertools.islice(loader, n))


# ---------------------------------------------------------------- target modules


def check_targets(session: Any) -> CheckResult:
    """Which modules got LoRA (per layer type), which requested names matched nothing, trainable parameters."""
    from peft.tuners.lora import LoraLayer

    model, report = session.model, session.targets
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)
              and "default" in getattr(module, "r", {})}
    wrapped = list(layers)
    per_type = Counter(lora_module_kind(name, module) for name, module in layers.items())
    ranks = rank_report(layers)
    counts = parameter_counts(model)
    explicit = session.config.lora.target_modules is not None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linear = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(base) if "lora_" not in n and not n.endswith("base_layer")}
                    | set(per_type))
    unmatched = list(report.unmatched_names) if report is not None else []
    details = {"wrapped_modules": len(wrapped), "per_type": dict(per_type), "requested": report.requested if report else None,
               "unmatched": unmatched, "linear_module_names": linear, **counts,
               "modules_to_save": session.config.lora.modules_to_save, **ranks}
    problems: list[tuple[Status, str]] = []
    if not wrapped:
        problems.append(("fail", "no module got LoRA: nothing would be trained"))
    if unmatched:
        hints = "".join(f"; '{t}' may mean {c}" for t, c in (report.suggestions or {}).items())
        if explicit:
            problems.append(("fail", f"lora.target_modules {unmatched} matched nothing{hints}; the model's linear layers are "
                                     f"{', '.join(linear)}"))
        else:
            problems.append(("warn", f"preset target modules {unmatched} matched nothing{hints}"))
    per_type_text = " ".join(f"{k}×{v}" for k, v in sorted(per_type.items()))
    new_rows = [n for n, _ in model.named_parameters() if "trainable_tokens_delta" in n]
    tokens = session.config.data.add_special_tokens or []
    if new_rows:  # data.add_special_tokens: only their rows train
        details["new_token_rows"] = {"tokens": tokens, "layers": [n.split(".trainable_tokens_delta")[0] for n in new_rows]}
    tokens_text = f"; the rows of {len(tokens)} new tokens train ({', '.join(tokens)})" if new_rows else ""
    ok = (f"{len(wrapped)} LoRA modules ({per_type_text}); {ranks['ranks_text']}{tokens_text}; "
          f"{counts['trainable_params']:,} of {counts['total_params']:,} parameters trainable "
          f"({counts['trainable_percent']:.2f}%)")
    if session.config.model.quantized and hasattr(base, "get_memory_footprint"):
        used = base.get_memory_footprint()
        bf16 = 2 * counts["total_params"]  # the same base in bf16 (4-bit weights counted at their logical size)
        details.update(base_memory_bytes=used, base_memory_bf16_bytes=bf16)
        ok += (f"; quantized base weights {used / 2**20:.1f} MiB against {bf16 / 2**20:.1f} MiB in bf16 "
               f"({used / bf16:.0%})")
    result = verdict("target_modules", problems, ok, details)
    if problems and wrapped:
        result.reason += f" | {ok}"
    return result


def lora_module_kind(name: str, module: Any) -> str:
    """A wrapped module's kind as users name it: its last name part (``q_proj``), or ``experts.gate_up_proj`` for a
    wrapped parameter (``lora.target_parameters``)."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    parameter = getattr(module, "parameter_name", None)
    return f"{parts[-1]}.{parameter}" if parameter else parts[-1]


def rank_report(layers: dict[str, Any]) -> dict[str, Any]:
    """Each LoRA module's rank and alpha (``lora.rank_pattern`` / ``alpha_pattern``, EVA's redistribution) and the
    layers that got LoRA, as details and as one line: ``r 8 / alpha 16: q_proj×2, v_proj×2 in layers 0-1``."""
    from loralab.lora_fields import layer_index, number_ranges

    per_module = {name.removeprefix("base_model.model."): {"r": module.r["default"],
                                                            "alpha": module.lora_alpha["default"]}
                  for name, module in layers.items()}
    groups: dict[tuple[int, float], Counter] = {}
    numbers: dict[tuple[int, float], set[int]] = {}
    for name, module in layers.items():
        key = (module.r["default"], module.lora_alpha["default"])
        groups.setdefault(key, Counter())[lora_module_kind(name, module)] += 1
        index = layer_index(name.removeprefix("base_model.model."), None)
        numbers.setdefault(key, set()).update([] if index is None else [index])
    indexes = sorted({i for found in numbers.values() for i in found})
    parts = []
    for (r, alpha), kinds in sorted(groups.items()):
        where = f" in layer{'s' * (len(numbers[(r, alpha)]) != 1)} {number_ranges(sorted(numbers[(r, alpha)]))}" \
            if numbers[(r, alpha)] else ""
        parts.append(f"r {r} / alpha {alpha:g}: {', '.join(f'{k}×{v}' for k, v in sorted(kinds.items()))}{where}")
    return {"per_module": per_module, "layers_with_lora": indexes, "ranks_text": "; ".join(parts) or "no LoRA module"}


# ---------------------------------------------------------------- data flow


def _describe(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} if isinstance(v, torch.Tensor)
            else {"type": type(v).__name__} for k, v in batch.items()}


def _batch_problems(session: Any, batch: dict[str, Any], vocab: int, forward_keys: set[str] | None) -> list[tuple[Status, str]]:
    task = session.task_type
    problems: list[tuple[Status, str]] = []
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        return [("fail", f"batches lack {missing}; they have {list(batch)}")]
    not_tensors = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        return [("fail", f"batch values {not_tensors} are not tensors")]
    for key in INTEGER_KEYS:
        if key in batch and batch[key].is_floating_point():
            problems.append(("fail", f"{key} has dtype {batch[key].dtype}, expected an integer type"))
    ids, labels = batch["input_ids"], batch["labels"]
    if len({v.shape[0] for k, v in batch.items() if k not in WHOLE_BATCH_KEYS}) > 1:
        problems.append(("fail", f"batch sizes differ between tensors: {_describe(batch)}"))
    same_as_ids = ["attention_mask", "position_ids"] + (["labels"] if task == "CAUSAL_LM" else [])
    for key in same_as_ids:
        if key in batch and batch[key].shape != ids.shape:
            problems.append(("fail", f"{key} shape {list(batch[key].shape)} differs from input_ids {list(ids.shape)}"))
    if task == "SEQ_2_SEQ_LM" and "decoder_input_ids" in batch and batch["decoder_input_ids"].shape != labels.shape:
        problems.append(("fail", f"decoder_input_ids {list(batch['decoder_input_ids'].shape)} differ from labels {list(labels.shape)}"))
    if task == "SEQ_CLS" and labels.dim() != 1:
        problems.append(("fail", f"classification labels should be one per example, got shape {list(labels.shape)}"))
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        problems.append(("fail", f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: tokenizer and model do not match"))
    if task != "SEQ_CLS":
        real = labels[labels != IGNORE_INDEX]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
            problems.append(("fail", f"labels hold ids outside [0, {vocab}) other than -100"))
    if forward_keys is not None:
        unknown = [k for k in batch if k not in forward_keys]
        if unknown:
            problems.append(("fail", f"the model's forward() takes no {unknown}"))
    return problems


def check_data_flow(session: Any) -> CheckResult:
    """The first batches of the real DataLoader: names, shapes and dtypes, consistent lengths, ids in the vocabulary."""
    model = session.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    forward_keys = None if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) else set(parameters)
    embeddings = base.get_input_embeddings()
    vocab = getattr(embeddings, "original_module", embeddings).num_embeddings  # new token rows: PEFT wraps it
    batches = first_batches(session, 2)
    described = [_describe(b) for b in batches]
    problems: list[tuple[Status, str]] = []
    for batch in batches:
        problems += _batch_problems(session, batch, vocab, forward_keys)
    problems = list(dict.fromkeys(problems))
    details: dict[str, Any] = {"batches": described, "vocab_size": vocab, "batch_size": session.config.train.batch_size}
    first = batches[0]
    notes = []
    positions = first.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and "attention_mask" not in first:
        examples = min(session.config.train.batch_size, len(session.data.train))
        details["packed"] = {"rows": positions.shape[0], "examples": examples}
        rows = positions.shape[0]
        notes.append(f"packed: {examples} examples in {rows} row{'s' * (rows != 1)}, position_ids restart per example")
    if session.task_type == "SEQ_2_SEQ_LM" and "decoder_input_ids" not in first:
        notes.append("decoder inputs built by the model from labels")
    shapes = ", ".join(f"{k} {'×'.join(map(str, v['shape']))} {v['dtype']}" for k, v in described[0].items() if "shape" in v)
    ok = f"{len(batches)} batches: {shapes}" + (f"; {'; '.join(notes)}" if notes else "")
    return verdict("data_flow", problems, ok, details)


# ---------------------------------------------------------------- loss and gradients


def check_loss(session: Any, fast: bool = False) -> CheckResult:
    """One real batch in train mode: a finite loss, gradients in every LoRA parameter, no base weight trainable.

    ``fast`` (the preflight before training) uses the first two examples instead of a whole batch.
    """
    model, dataset = session.model, session.data.train
    size = min(len(dataset), 2 if fast else session.config.train.batch_size)
    features = [dataset[i] for i in range(size)]
    bias = session.config.lora.bias
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unexpected = [n for n, _ in trainable if not is_adapter_param(n, bias)]
    problems: list[tuple[Status, str]] = []
    details: dict[str, Any] = {"examples": size, "trainable_tensors": len(trainable)}
    device = device_of(model)
    batch = to_device(session.collator(features), device)
    if session.task_type != "SEQ_CLS" and not int((batch["labels"] != IGNORE_INDEX).sum()):
        return CheckResult("loss", "fail", f"the first {size} examples have no supervised label in their batch", details)
    with untouched(model):
        model.train()
        with autocast(session, device):
            loss = training_loss(session, batch)
        value = float(loss.detach().float())
        details["loss"] = value
        if not math.isfinite(value):
            return CheckResult("loss", "fail", f"the loss of the first batch is {value}", details)
        loss.backward()
        missing = [n for n, p in trainable if p.grad is None]
        nonfinite = [n for n, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for _, p in trainable if p.grad is not None))
    details.update({"grad_norm": norm, "no_gradient": missing, "nonfinite_gradient": nonfinite, "trainable_base_weights": unexpected})
    if not trainable:
        problems.append(("fail", "no parameter is trainable"))
    if missing:
        problems.append(("fail", f"{len(missing)} of {len(trainable)} LoRA tensors get no gradient ({rows_text(missing, 3)})"))
    if nonfinite:
        problems.append(("fail", f"non-finite gradients in {rows_text(nonfinite, 3)}"))
    if unexpected:
        problems.append(("fail", f"{len(unexpected)} base-model weights are trainable ({rows_text(unexpected, 3)}): "
                                 "they would change but are not saved in the adapter"))
    if trainable and not missing and norm == 0.0:
        problems.append(("fail", "every gradient is zero: the loss does not depend on the LoRA weights"))
    ok = (f"loss {value:.4f} on {size} examples; gradients reach all {len(trainable)} LoRA tensors (norm {norm:.3g}), "
          "no base weight trainable")
    return verdict("loss", problems, ok, details)


# ---------------------------------------------------------------- cost estimate


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timed_steps(session: Any, batches: list[dict[str, Any]], device: torch.device) -> tuple[list[float], list[float]]:
    """Real optimizer steps (AdamW on the LoRA weights, configured precision); LoRA weights restored afterwards."""
    from loralab.precision import model_type_of, resolve_precision

    model, train = session.model, session.config.train
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    fp16 = resolve_precision(train.precision, model_type_of(model)) == "fp16"
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and fp16 else None
    times, losses = [], []
    with untouched(model):
        model.train()
        try:
            for batch in batches:
                started = time.perf_counter()
                with autocast(session, device):
                    loss = training_loss(session, to_device(batch, device))
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                scaler.step(optimizer) if scaler else optimizer.step()
                if scaler:
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
                losses.append(float(loss.detach().float()))
                if not math.isfinite(losses[-1]):
                    break
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)
    return times, losses


def _eval_seconds(session: Any, device: torch.device) -> float:
    """Projected time of all evaluations (the base model's at step 0, then one per epoch) from one timed eval batch."""
    data, train = session.data, session.config.train
    if data.eval is None or not len(data.eval):
        return 0.0
    size = train.eval_batch_size or train.batch_size
    batch = to_device(session.collator([data.eval[i] for i in range(min(size, len(data.eval)))]), device)
    with untouched(session.model):
        session.model.eval()
        started = time.perf_counter()
        with torch.no_grad(), autocast(session, device):
            training_loss(session, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    per_epoch, total = optimizer_steps(session)
    evaluations = 1 + math.ceil(total / per_epoch)
    return elapsed * math.ceil(len(data.eval) / size) * evaluations


def check_cost(session: Any) -> CheckResult:
    """Seconds per optimizer step measured on a few real steps, projected per epoch and per run, and peak memory."""
    from loralab.precision import model_type_of, resolve_precision

    train = session.config.train
    device = device_of(session.model)
    batches = first_batches(session, COST_STEPS)
    batches = list(itertools.islice(itertools.cycle(batches), COST_STEPS))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        times, losses = _timed_steps(session, batches, device)
    except torch.cuda.OutOfMemoryError:
        return CheckResult("cost", "fail", f"out of memory at train.batch_size={train.batch_size}: lower it (raise "
                                           "train.gradient_accumulation) or set train.gradient_checkpointing=true")
    precision = resolve_precision(train.precision, model_type_of(session.model))
    details: dict[str, Any] = {"device": str(device), "precision": precision, "losses": losses,
                               "step_times_s": [round(t, 4) for t in times]}
    if not math.isfinite(losses[-1]):
        return CheckResult("cost", "fail", f"the loss became {losses[-1]} after {len(losses) - 1} optimizer steps at "
                                           f"learning rate {train.learning_rate:g}: training would diverge", details)
    timed = times[1:] or times
    step_s = sum(timed) / len(timed) * train.gradient_accumulation
    per_epoch, total = optimizer_steps(session)
    eval_s = _eval_seconds(session, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    details.update({"seconds_per_step": round(step_s, 4), "steps_per_epoch": per_epoch, "total_steps": total,
                    "seconds_per_epoch": round(step_s * per_epoch, 2), "train_seconds": round(step_s * total, 2),
                    "eval_seconds": round(eval_s, 2), "peak_memory_bytes": peak,
                    "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS high-water"})
    memory = f"{peak / 2**30:.2f} GiB {'GPU' if device.type == 'cuda' else 'RSS'}"
    reason = (f"{step_s:.2f} s/step ({details['precision']}, {device.type}) → {duration(step_s * per_epoch)}/epoch, "
              f"~{duration(step_s * total + eval_s)} for {total} steps with evaluation; peak memory {memory}")
    return CheckResult("cost", "pass", reason, details)
