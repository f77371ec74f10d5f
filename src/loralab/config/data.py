"""``data``: where the examples come from (a path or a mix of sources) and how they become token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from loralab.config.base import _Section

class SourceConfig(_Section):
    """One entry of ``data.sources``: a file, folder or ``hub:ID`` dataset and how much of it goes into the mix."""

    path: str  # a data file, a save_to_disk folder, or hub:ID (datasets.load_dataset: a Hub id or a local dataset dir)
    split: str | None = None  # hub:ID only: the split to read (default train; slices such as train[:1000] work)
    subset: str | None = None  # hub:ID only: the dataset's configuration (load_dataset's name)
    weight: float | None = Field(None, gt=0)  # this source's share among the weighted sources of the mix
    count: int | None = Field(None, gt=0)  # exactly this many rows, sampled by data.seed

    @model_validator(mode="after")
    def _weight_or_count(self) -> "SourceConfig":
        if self.weight is not None and self.count is not None:
            raise ValueError(f"data.sources entry {self.path!r} sets both weight and count; give one of them")
        if not self.path.startswith("hub:") and (self.split or self.subset):
            raise ValueError(f"data.sources entry {self.path!r}: split and subset apply to hub:ID datasets only")
        return self


class DataConfig(_Section):
    """Where the examples come from and how they become token ids."""

    path: str | None = None  # None: the bundled demo dataset. A file, a save_to_disk folder, or hub:ID (a Hub dataset
    # id or local dataset dir, read with datasets.load_dataset; hub:ID?split=test&subset=en for another split / subset)
    sources: list[SourceConfig] | None = None  # instead of path: several sources mixed (weight / count per source)
    format: Literal["auto", "pairs", "alpaca", "messages", "sharegpt", "text"] = "auto"  # auto: from the rows' fields
    prompt_field: str = "instruction"
    response_field: str = "response"
    input_field: str = "input"  # alpaca: optional context appended to the instruction
    messages_field: str = "messages"  # OpenAI style: [{role, content}], roles user / assistant / system / tool
    conversations_field: str = "conversations"  # ShareGPT: [{from, value}], from human / gpt / system / observation
    text_field: str = "text"  # raw text (continued pre-training): every token supervised, EOS appended
    label_field: str = "label"  # SEQ_CLS
    anchor_field: str = "anchor"  # FEATURE_EXTRACTION: the query / first text of a pair
    positive_field: str = "positive"  # FEATURE_EXTRACTION: the text that should embed close to the anchor
    question_field: str = "question"  # QUESTION_ANSWERING: the question
    context_field: str = "context"  # QUESTION_ANSWERING: the passage the answer is a span of
    answer_field: str = "answers"  # QUESTION_ANSWERING: SQuAD's {text: [...], answer_start: [...]}; or flat 'answer'
    doc_stride: int = Field(128, gt=0)  # QUESTION_ANSWERING: tokens shared by consecutive windows of a long context
    tokens_field: str = "tokens"  # TOKEN_CLS: a sentence's words (a list)
    tags_field: str = "tags"  # TOKEN_CLS: one tag per word (B-PER / I-LOC / O, or integers); HF's ner_tags when absent
    tag_names: list[str] | None = None  # TOKEN_CLS: the names of integer tags (tag i is tag_names[i])
    eval_path: str | None = None  # a separate eval file instead of splitting
    eval_split: float = Field(0.2, ge=0.0, lt=1.0)  # share of the data file held out for eval (loss, checkpoints)
    test_path: str | None = None  # a held-out test file: no training, checkpoint choice or search sees it
    test_split: float = Field(0.0, ge=0.0, lt=1.0)  # or this share of the data file held out as the test split, taken
    # out before the eval split (also with data.eval_path); scored only by `loralab eval RUN --split test`
    seed: int = 42
    max_length: int = Field(512, gt=8)
    train_on_prompt: bool = False
    train_on: Literal["all_turns", "last_turn"] = "all_turns"  # conversations: supervise every assistant turn (as
    # LLaMA-Factory, axolotl, TRL's assistant_only_loss) or only the last; system, user and tool turns never
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    template: Literal["auto", "chatml", "llama3", "gemma", "alpaca", "plain"] = "auto"  # auto: the tokenizer's own chat
    # template, else plain (### Instruction / ### Response); a named one is set as the tokenizer's chat template
    system_prompt: str | None = None
    pack_text: bool = True  # raw text: documents joined (EOS between) and cut into full rows of max_length tokens;
    # false: one document per row, cut at max_length
    num_proc: int | None = Field(None, gt=0)  # tokenizing processes (default: 1 under 5,000 rows, else up to 4)
    add_special_tokens: list[str] | None = None  # new special tokens added to the tokenizer: the embeddings grow and
    # only their new rows train (PEFT's trainable_token_indices), saved with the adapter

    @field_validator("add_special_tokens")
    @classmethod
    def _new_token_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not t.strip() for t in value) or len(set(value)) != len(value)):
            raise ValueError("must list distinct, non-empty tokens (e.g. [<tool_call>, </tool_call>]), or be omitted")
        return value

    @model_validator(mode="after")
    def _one_template(self) -> "DataConfig":
        if not self.chat_template and self.template not in ("auto", "plain"):
            raise ValueError(f"data.chat_template is false but data.template is {self.template!r}; "
                             "to format without a chat template set data.template: plain")
        if self.path and self.sources:
            raise ValueError("data.path and data.sources are both set; list every source in data.sources")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources is empty; list at least one source (or set data.path)")
        if self.test_path and self.test_split:
            raise ValueError(f"data.test_path and data.test_split ({self.test_split:g}) are both set; the test split "
                             "is either a separate file or a share of data.path, not both")
        held_out = self.test_split + (0 if self.eval_path else self.eval_split)
        if held_out >= 1:
            raise ValueError(f"data.test_split ({self.test_split:g}) + data.eval_split ({self.eval_split:g}) hold out "
                             "all the data; together they must stay below 1")
        return self

    def label(self) -> str:
        """The data's short name in run folder names: the file's stem, the Hub dataset's name, ``mix`` or ``demo``."""
        if self.sources:
            return f"{_short_name(self.sources[0].path)}-mix" if len(self.sources) > 1 else _short_name(self.sources[0].path)
        return _short_name(self.path) if self.path else "demo"


def _short_name(path: str) -> str:
    if path.startswith("hub:"):
        return path[4:].split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "hub"
    return Path(path).stem
