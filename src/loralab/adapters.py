"""Adapters from anywhere: any PEFT adapter folder with its base model, not only a loralab run's adapter.

``loralab eval / compare / generate / export --adapter PATH --model BASE`` measure an adapter made with another tool
(or downloaded) against its base on the user's own data. Such an adapter has no run config: prompts are formatted with
loralab's defaults (the base tokenizer's chat template when it has one, else the plain template), which
``--set data.template=...`` / ``--set data.system_prompt=...`` can change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

ADAPTER_CONFIG = "adapter_config.json"
PEFT_TASK_TYPES = {"QUESTION_ANS": "QUESTION_ANSWERING"}  # peft.TaskType names that differ from loralab's
OUTSIDE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "QUESTION_ANSWERING", "FEATURE_EXTRACTION")


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, or a clear error naming the folder."""
    path = Path(adapter)
    if not path.exists():
        raise LoralabError(f"adapter folder not found: {path}")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = " (a loralab run folder: give it as RUN_DIR, without --adapter)" if (path / "config.yaml").is_file() else ""
        raise LoralabError(f"{path} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}{hint}")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoralabError(f"{path / ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoralabError(f"{path / ADAPTER_CONFIG} must hold a JSON object")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise LoralabError(f"{path} holds no adapter weights (adapter_model.safetensors)")
    if not (path / "adapter_model.safetensors").is_file():
        raise LoralabError(f"{path} holds its weights as adapter_model.bin (pickle, which loralab does not load from "
                           "folders it did not write); convert them to adapter_model.safetensors")
    return config


def adapter_run_config(adapter: str | Path, base_model: str | None, sets: list[str] | None = None) -> Any:
    """A run config for an outside adapter: its base model (``--model``, else the adapter's own
    ``base_model_name_or_path``) and task type, the rest loralab's defaults with ``sets`` on top."""
    from loralab.config import build_config

    settings = read_adapter_config(adapter)
    base = base_model or settings.get("base_model_name_or_path")
    if not base:
        raise LoralabError(f"adapter {adapter} does not name its base model; pass --model BASE")
    overrides = [f"model.name_or_path='{base}'" if "'" not in str(base) else f"model.name_or_path={base}"]
    task_type = PEFT_TASK_TYPES.get(settings.get("task_type"), settings.get("task_type"))
    if task_type:
        overrides.append(f"model.task_type={task_type}")
    return build_config(overrides=overrides + list(sets or []), source=f"adapter {adapter}")


def load_adapter(adapter: str | Path, base_model: str | None = None, *, full_precision: bool = False,
                 sets: list[str] | None = None, trust_remote_code: bool = False, allow_classifier: bool = False) -> Any:
    """Any PEFT adapter folder on its base model, as a :class:`loralab.generation.LoadedRun` (``run_dir`` None).

    Text generation (CAUSAL_LM, SEQ_2_SEQ_LM), extractive QA (QUESTION_ANS: the span head comes from the adapter's
    ``modules_to_save``) and embedding (FEATURE_EXTRACTION: pooled as the base folder says) adapters; a classifier
    adapter (SEQ_CLS, TOKEN_CLS) needs the label names a loralab run keeps. Without ``allow_classifier`` only text
    generation adapters load. ``full_precision`` loads a quantized base without quantization (for merging)."""
    from loralab.config import remote_code_allowed
    from loralab.generation import attach_adapter, check_generative
    from loralab.models import load_model, load_tokenizer, resolve_task_type

    config = adapter_run_config(adapter, base_model, sets)
    if trust_remote_code:
        config = config.model_copy(update={"model": config.model.model_copy(update={"trust_remote_code": True})})
    task_type = resolve_task_type(config)
    if task_type not in OUTSIDE_TASKS:
        raise LoralabError(f"adapter {adapter} is a {task_type} adapter: --adapter takes {', '.join(OUTSIDE_TASKS)} "
                           "adapters; a classifier's label names live in a loralab run folder (give RUN_DIR instead)")
    if not allow_classifier:
        check_generative(task_type, adapter)
    with remote_code_allowed(trust_remote_code):
        tokenizer = load_tokenizer(config.model, task_type)
        model_cfg = config.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False}) \
            if full_precision else config.model
        if task_type == "QUESTION_ANSWERING":  # a span head the base lacks: seeded, so "base head" answers repeat
            from loralab.tasks.qa import load_qa_base

            base = load_qa_base(model_cfg, config.train.seed)
        else:
            base = load_model(model_cfg, task_type)
    return attach_adapter(base, tokenizer, config, task_type, Path(adapter), None)


def load_model_with_adapter(source: str | Path | None, checkpoint: str = "best", *, adapter: str | Path | None = None,
                            base_model: str | None = None, full_precision: bool = False, allow_classifier: bool = False,
                            trust_remote_code: bool = False) -> Any:
    """A loralab run (``source``, its ``checkpoint``) or an outside adapter (``adapter`` with ``base_model``)."""
    from loralab.generation import load_run_model

    if adapter is not None:
        if source is not None:
            raise LoralabError(f"give a run folder ({source}) or --adapter {adapter}, not both")
        return load_adapter(adapter, base_model, full_precision=full_precision, trust_remote_code=trust_remote_code,
                            allow_classifier=allow_classifier)
    if source is None:
        raise LoralabError("give a run folder (RUN_DIR) or --adapter PATH --model BASE")
    if base_model is not None:
        raise LoralabError(f"--model is for --adapter; run {source} loads its own base model (model.name_or_path)")
    return load_run_model(source, checkpoint, full_precision=full_precision, allow_classifier=allow_classifier,
                          trust_remote_code=trust_remote_code)
