"""Merge an adapter into its base, check the merged model against the adapter, save a safetensors model folder.

A QLoRA adapter was trained against a 4-bit base; it is merged into the base loaded *without* quantization (exact
merged weights), and the difference between "adapter on the 4-bit base" (what training and ``loralab eval`` saw) and
the merged model is measured and reported.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from loralab.errors import LoralabError
from loralab.export.verify import MAX_NEW_TOKENS, TOLERANCE, Comparison, HFModel, Outputs, Probe, check_passed, compare, measure, \
    probe_prompts
from loralab.runs import write_json_atomic, written_into_place

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MARKER = "loralab_export.json"  # written into every export: the proof that --overwrite may replace the folder
REPORT = "export_report.json"


def check_export_target(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty export folder, and with ``overwrite`` any folder that does not hold a loralab export."""
    if not output.exists():
        return
    if not output.is_dir():
        raise LoralabError(f"export output {output} is a file, not a folder; choose another --output")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise LoralabError(f"export folder {output} is not empty; choose another --output or pass --overwrite")
    if not (output / MARKER).is_file():
        raise LoralabError(f"export folder {output} holds files that are not a loralab export (no {MARKER}); "
                           "nothing was changed. --overwrite only replaces an earlier export: choose another --output")
    try:
        written = set(json.loads((output / MARKER).read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        written = set()
    added = sorted(p.name for p in output.iterdir() if p.name not in written | {MARKER})
    if added:
        raise LoralabError(f"export folder {output} holds files loralab did not export ({', '.join(added[:5])}); "
                           "nothing was changed. Move them away or choose another --output")


def write_export(model: Any, tokenizer: Any, output: Path, *, run_dir: str | Path, checkpoint: str, dtype: str,
                 report: dict[str, Any] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Save a merged model + tokenizer (+ what ``extra`` writes into the folder) (+ ``export_report.json``) + marker
    in a staging folder, then move it into place atomically."""
    with written_into_place(output) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)
        if report is not None:
            files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
            write_json_atomic(staging / REPORT, {**report, "files": files})
        write_json_atomic(staging / MARKER, {"run": str(run_dir), "checkpoint": checkpoint, "dtype": dtype,
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                             "files": sorted(p.name for p in staging.iterdir())})
    return output


@dataclass
class Merged:
    """A merged model in memory, what it was measured against, and the report so far."""

    run: Any  # the LoadedRun; run.model is the merged model after merging
    probes: list[Probe]
    reference: Outputs  # the adapter model (full precision, before merging)
    merged: Outputs  # the merged model, as saved
    report: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)


def merge_adapter(model: Any) -> Any:
    """PEFT's merge: the LoRA deltas added into the base weights, the PEFT wrappers removed."""
    return model.merge_and_unload()


def _decode(tokenizer: Any) -> Any:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()


def _quantized_base_outputs(source: Any, checkpoint: str, adapter: Any, base_model: Any, probes: list[Probe],
                            reference: Outputs) -> Outputs:
    """The adapter on the 4-bit base, as training and ``loralab eval`` saw it, teacher-forced on the reference."""
    from loralab.adapters import load_model_with_adapter

    quantized = load_model_with_adapter(source, checkpoint, adapter=adapter, base_model=base_model)
    try:
        return measure(HFModel(quantized.model, quantized.tokenizer, quantized.task_type), probes, reference)
    finally:
        del quantized
        gc.collect()


def describe_base(config: Any) -> str:
    """Which base the adapter is merged into, in words."""
    model = config.model
    if model.quantized:
        bits = "4-bit" if model.load_in_4bit else "8-bit"
        kind = f" {model.bnb_4bit_quant_type.upper()}" if model.load_in_4bit else ""
        return (f"{model.name_or_path} loaded without quantization (float32 weights); the adapter was trained on its "
                f"{bits}{kind} quantization")
    return f"{model.name_or_path} (float32 weights)"


def merged_model(source: str | Path | None, checkpoint: str = "best", dtype: str = "float32", *,
                 adapter: str | Path | None = None, base_model: str | None = None) -> Merged:
    """Load the adapter on a full-precision base, measure it, merge, cast to ``dtype``, measure again and compare.

    A QLoRA run is also measured on its 4-bit base (the drift is reported, never refused). Fails when the merged
    model differs from the adapter by more than the tolerance of ``dtype``.
    """
    from loralab.adapters import load_model_with_adapter

    if dtype not in DTYPES:
        raise LoralabError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    log.info("loading the adapter on a full-precision base")
    run = load_model_with_adapter(source, checkpoint, adapter=adapter, base_model=base_model, full_precision=True)
    probes, prompt_source = probe_prompts(run)
    decode = _decode(run.tokenizer)
    candidate = HFModel(run.model, run.tokenizer, run.task_type)
    log.info("measuring the adapter on %d prompts (%s)", len(probes), prompt_source)
    reference = measure(candidate, probes)
    comparisons = []
    with run.model.disable_adapter():
        base_outputs = measure(candidate, probes, reference)
    comparisons.append(compare("adapter effect", reference, base_outputs, reference_label="adapter",
                               candidate_label="base model", tolerance=None))
    drift = None
    if run.config.model.quantized:
        log.info("measuring the adapter on the quantized base training used")
        drift = _quantized_base_outputs(source, checkpoint, adapter, base_model, probes, reference)
    merged = merge_adapter(run.model)
    merged.to(DTYPES[dtype])
    merged.eval()
    merged.config.use_cache = True
    run.model = merged
    log.info("measuring the merged model (%s)", dtype)
    merged_outputs = measure(HFModel(merged, run.tokenizer, run.task_type), probes, reference)
    comparisons.insert(0, compare("merge", reference, merged_outputs, reference_label="adapter (float32)",
                                  candidate_label=f"merged model ({dtype})", tolerance=TOLERANCE[dtype],
                                  decode=decode, probes=probes))
    if drift is not None:
        comparisons.append(compare("QLoRA drift", drift, merged_outputs, reference_label="adapter on the quantized base",
                                   candidate_label=f"merged model ({dtype})", tolerance=None, decode=decode,
                                   probes=probes))
    check_passed(comparisons, f"merging {adapter or source}",
                 "This model does not survive 16-bit rounding: export with --dtype float32" if dtype != "float32" else
                 "The merge went wrong: please report it with the base model's name and this message")
    report = {"loralab_export": 1, "source": str(adapter or source),
              "adapter": str(run.adapter_path), "checkpoint": None if adapter else checkpoint,
              "base_model": run.config.model.name_or_path, "merged_into": describe_base(run.config),
              "quantized_training_base": run.config.model.quantized,
              "prompts": {"source": prompt_source, "n": len(probes), "max_new_tokens": MAX_NEW_TOKENS},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return Merged(run, probes, reference, merged_outputs, report, comparisons)


def export_merged(run_dir: str | Path | None, output: str | Path, checkpoint: str = "best", dtype: str = "float32",
                  overwrite: bool = False, *, adapter: str | Path | None = None, base_model: str | None = None) -> Path:
    """Merge the adapter (``best``, ``latest`` or a step) into a full-precision base, check it, save model + tokenizer.

    The merged model (in ``dtype``) is checked against the adapter on the run's first eval prompts (max |logit
    difference| within the dtype's tolerance, greedy answers compared); ``export_report.json`` in the folder says what
    was measured. The folder loads with plain ``AutoModelFor...from_pretrained`` and needs neither peft nor loralab.
    ``overwrite`` replaces only an earlier loralab export (a folder holding ``loralab_export.json``).
    ``adapter`` / ``base_model``: any PEFT adapter folder and its base instead of a run.
    """
    from loralab.classification import run_task_type
    from loralab.export.heads import HEAD_TASKS, export_head_model

    if dtype not in DTYPES:
        raise LoralabError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = Path(output)
    check_export_target(output, overwrite)
    if adapter is None and run_task_type(run_dir) in HEAD_TASKS:  # the trained head (and label names) go with it
        return export_head_model(run_dir, output, checkpoint, dtype, overwrite)
    merged = merged_model(run_dir, checkpoint, dtype, adapter=adapter, base_model=base_model)
    report = {**merged.report, "format": "hf", "dtype": dtype, "output": str(output),
              "checks": [c.to_dict() for c in merged.comparisons]}
    apply_run_template(merged.run)
    log.info("writing %s", output)
    return write_export(merged.run.model, merged.run.tokenizer, output, run_dir=adapter or run_dir,
                        checkpoint=checkpoint, dtype=dtype, report=report)


def apply_run_template(run: Any) -> None:
    """Give the tokenizer the chat template training formatted with (a named ``data.template`` is set on it), so
    the exported tokenizer's ``apply_chat_template`` formats as training did."""
    from loralab.templates import uses_chat_template

    uses_chat_template(run.tokenizer, run.config.data)


def read_report(path: str | Path) -> dict[str, Any]:
    """``export_report.json`` of an export folder (or the report file itself)."""
    path = Path(path)
    path = path / REPORT if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8"))
