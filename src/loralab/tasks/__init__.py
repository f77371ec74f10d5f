"""Task types beyond text generation and sequence classification, one module each."""

from __future__ import annotations

from typing import Any, Callable


def encoder_task_for_rows(config: Any, found: str, task: str, describe: Callable[[Any], str | None]) -> str | None:
    """``task`` when the first row of ``data.path`` has the task's fields (``describe(record)``: how its rows are
    named, e.g. "'question' / 'context' rows (extractive QA)", else None) and the model is an encoder (``found``
    SEQ_CLS); None when the rows are not the task's; a clear error for such rows on another model."""
    from loralab.data.sources import first_local_record
    from loralab.errors import LoralabError

    record = first_local_record(config.data)
    rows = None if record is None else describe(record)
    if rows is None:
        return None
    if found == "SEQ_CLS":  # an encoder
        return task
    path = config.data.path or config.data.sources[0].path
    raise LoralabError(f"data file {path} has {rows} but {config.model.name_or_path!r} is a {found} model: set "
                       f"model.task_type: {task} (best with an encoder such as BERT), or give "
                       f"{config.data.prompt_field!r} / {config.data.response_field!r} rows to train a generative model")
