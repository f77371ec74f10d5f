"""What every config section shares: the strict pydantic base class and the task types."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

TaskType = Literal["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANSWERING", "FEATURE_EXTRACTION"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
