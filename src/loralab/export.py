"""Export: merge a run's adapter into its base model and save a standalone safetensors model folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from loralab.errors import LoralabError
from loralab.runs import replace_dir_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_merged(run_dir: str | Path, output: str | Path, checkpoint: str = "best", dtype: str = "float32",
                  overwrite: bool = False) -> Path:
    """Merge the adapter (``best``, ``latest`` or a step) into a full-precision base and save model + tokenizer.

    A QLoRA run is merged into a base loaded without 4-bit quantization, so the merged weights are exact.
    The folder loads with plain ``AutoModelFor...from_pretrained`` and needs neither peft nor loralab.
    """
    from loralab.classification import export_classifier, run_task_type
    from loralab.generation import load_run_model

    if run_task_type(run_dir) == "SEQ_CLS":  # the trained head and the run's label names go with it
        return export_classifier(run_dir, output, checkpoint, dtype, overwrite)
    if dtype not in DTYPES:
        raise LoralabError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise LoralabError(f"export folder {output} is not empty; choose another --output or pass --overwrite")
    run = load_run_model(run_dir, checkpoint, full_precision=True)
    merged = run.model.merge_and_unload()
    merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        run.tokenizer.save_pretrained(staging)
        replace_dir_atomic(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output
