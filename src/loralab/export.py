"""Export: merge a run's adapter into its base model and save a standalone safetensors model folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from loralab.errors import LoralabError
from loralab.runs import write_json_atomic, written_into_place

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MARKER = "loralab_export.json"  # written into every export: the proof that --overwrite may replace the folder


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


def write_export(model: Any, tokenizer: Any, output: Path, *, run_dir: str | Path, checkpoint: str, dtype: str) -> Path:
    """Save a merged model + tokenizer + marker in a staging folder, then move it into place atomically."""
    with written_into_place(output) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / MARKER, {"run": str(run_dir), "checkpoint": checkpoint, "dtype": dtype,
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                             "files": sorted(p.name for p in staging.iterdir())})
    return output


def export_merged(run_dir: str | Path, output: str | Path, checkpoint: str = "best", dtype: str = "float32",
                  overwrite: bool = False) -> Path:
    """Merge the adapter (``best``, ``latest`` or a step) into a full-precision base and save model + tokenizer.

    A QLoRA run is merged into a base loaded without 4-bit quantization, so the merged weights are exact.
    The folder loads with plain ``AutoModelFor...from_pretrained`` and needs neither peft nor loralab.
    ``overwrite`` replaces only an earlier loralab export (a folder holding ``loralab_export.json``).
    """
    from loralab.classification import export_classifier, run_task_type
    from loralab.generation import load_run_model

    if dtype not in DTYPES:
        raise LoralabError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = Path(output)
    check_export_target(output, overwrite)
    if run_task_type(run_dir) == "SEQ_CLS":  # the trained head and the run's label names go with it
        return export_classifier(run_dir, output, checkpoint, dtype, overwrite)
    run = load_run_model(run_dir, checkpoint, full_precision=True)
    merged = run.model.merge_and_unload()
    merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    return write_export(merged, run.tokenizer, output, run_dir=run_dir, checkpoint=checkpoint, dtype=dtype)
