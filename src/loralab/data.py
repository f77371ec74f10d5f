"""Datasets: read files, validate rows, split, tokenize with -100 label masks (every assistant turn of a conversation
supervised, or only the last: ``data.train_on``), collate.

Row formats live in ``loralab.formats``, prompt templates in ``loralab.templates``; their names are importable from here.
Every error names the file and the row (1-based; a line number for JSONL and CSV files).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from loralab.config import DataConfig
from loralab.errors import DataError
from loralab.formats import (FORMATS, ROLES, Example, _is_missing, _row_error, _text_field, detect_format,  # noqa: F401
                             empty_answer_error, parse_rows)
from loralab.readers import read_rows
from loralab.turns import conversation_turns, has_history
from loralab.templates import (_MARK, PLAIN_PROMPT_TEMPLATE, TEMPLATES, _special_ids, apply_template,  # noqa: F401
                               chat_end_ids, encode_prompt, format_prompt, prompt_messages, target_end_id, target_end_ids,
                               uses_chat_template)

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def demo_dataset_path() -> Path:
    """The bundled demo dataset (instruction/response pairs written for loralab)."""
    return Path(str(resources.files("loralab") / "resources" / "demo_dataset.json"))


def load_examples(cfg: DataConfig, task_type: str, path: str | None = None) -> list[Example]:
    """Read and validate a data file (the bundled demo when no path is configured)."""
    source = path or cfg.path or str(demo_dataset_path())
    rows = read_rows(source)
    if not rows:
        raise DataError(f"data file {source}: no examples found (the dataset is empty)")
    examples = parse_rows(rows, cfg, source, task_type)
    fmt = detect_format(rows, cfg, source) if task_type != "SEQ_CLS" else "pairs"
    for example in examples:  # a conversation's answer to train on must have text (prompt files may leave it empty)
        error = empty_answer_error(example, cfg, source, fmt)
        if error:
            raise error
    return examples


def split_examples(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with a fixed seed and hold out ``eval_split`` of the examples (at least one when > 0)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_split == 0 else max(1, round(len(examples) * eval_split))
    eval_part = [examples[i] for i in order[:n_eval]]
    train_part = [examples[i] for i in order[n_eval:]]
    if not train_part:
        raise DataError(f"the training split is empty: {len(examples)} examples with data.eval_split={eval_split}; add data or lower eval_split")
    return train_part, eval_part


# ---------------------------------------------------------------- prompts and tokens


def _marked(example: Example) -> tuple[Example, str, str]:
    """The example with its user text replaced by markers: (example, first marker, last marker).

    The user text runs from the content of the first user message to that of the last one (the same for one turn).
    """
    first, last = _MARK.format("first"), _MARK.format("last")
    if not example.messages:
        return Example(prompt=first, response="", row=example.row), first, first
    users = [i for i, m in enumerate(example.messages) if m["role"] == "user"]
    if not users:
        return example, first, last
    if users[-1] == users[0]:
        last = first
    messages = [dict(m) for m in example.messages]
    messages[users[0]]["content"] = first
    messages[users[-1]]["content"] = last
    return Example(prompt=last, response="", row=example.row, messages=messages), first, last


def _user_text_span(tokenizer: Any, example: Example, cfg: DataConfig, prompt_text: str,
                    prompt_ids: list[int]) -> tuple[int, int] | None:
    """Token span [start, end) of the user's text inside ``prompt_ids``: everything before it is the special prefix
    (BOS, system turn, user-turn header), everything after it the prompt's end (the generation prompt).

    Found by rendering the prompt with markers as the user text; the token span comes from the character offsets of a
    fast tokenizer, or else from tokenizing prefix / user text / end separately, kept only when their concatenation is
    exactly ``prompt_ids``. None when neither works.
    """
    marked, first, last = _marked(example)
    try:
        text = format_prompt(tokenizer, marked, cfg)
    except Exception:  # noqa: BLE001 - a template may reject the marked conversation
        return None
    if text.count(first) != 1 or text.count(last) != 1:
        return None
    prefix, suffix = text[: text.index(first)], text[text.index(last) + len(last) :]
    if not (prompt_text.startswith(prefix) and prompt_text.endswith(suffix) and len(prefix) + len(suffix) <= len(prompt_text)):
        return None
    begin, finish = len(prefix), len(prompt_text) - len(suffix)  # the user text's characters
    chat = uses_chat_template(tokenizer, cfg)
    try:
        encoded = tokenizer(prompt_text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    except (NotImplementedError, ValueError, TypeError, KeyError):
        ids, offsets = [], []
    if ids[: len(prompt_ids)] == list(prompt_ids) and len(offsets) >= len(prompt_ids):
        inside = [i for i, (a, b) in enumerate(offsets[: len(prompt_ids)]) if b > a and a >= begin and b <= finish]
        if inside and inside[-1] - inside[0] + 1 == len(inside):
            return inside[0], inside[-1] + 1
    head = encode_prompt(tokenizer, prefix, cfg)
    middle = tokenizer(prompt_text[begin:finish], add_special_tokens=False)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if head + middle + tail == list(prompt_ids):
        return len(head), len(head) + len(middle)
    return None


def _cut_middle(ids: list[int], keep: int, start: int, end: int) -> list[int]:
    """``keep`` tokens of ``ids``: all of ``ids[:start]`` and ``ids[end:]``, and the two ends of ``ids[start:end]``
    (its middle is cut). When the two fixed parts alone are too long, the end is kept whole where it fits in half
    the budget and the start is cut at its end."""
    n = len(ids)
    if keep >= n:
        return list(ids)
    if keep <= 0:
        return []
    room = keep - start - (n - end)  # how many tokens of ids[start:end] fit
    head = start + room // 2 if room >= 0 else min(start, max(keep // 2, keep - (n - end)))
    return list(ids[:head]) + list(ids[n - (keep - head) :])


def fit_prompt(tokenizer: Any, example: Example, cfg: DataConfig, prompt_ids: list[int], keep: int,
               prompt_text: str | None = None) -> list[int]:
    """The prompt cut to ``keep`` tokens. A conversation drops its oldest exchanges (user turn and what follows it) whole,
    keeping the leading system prompt, until it fits; when even its last exchange is too long, or for one turn: the
    special prefix (BOS, system turn, user-turn header) and the prompt's end (the last part of the user text and the
    generation prompt / ``### Response:`` header) stay, the middle of the user text goes, half of what is kept of it
    from its start and half from its end. When the user text cannot be located, the first and the last ``keep // 2``
    tokens (about) are kept."""
    if keep >= len(prompt_ids):
        return list(prompt_ids)
    text = format_prompt(tokenizer, example, cfg) if prompt_text is None else prompt_text
    later = later_starts(example)
    if later:  # a conversation first loses its oldest exchanges, whole (the leading system prompt stays)
        def length(candidate: Example) -> int:
            return len(encode_prompt(tokenizer, format_prompt(tokenizer, candidate, cfg), cfg))

        example = later[_first_fitting(later, length, keep)]
        text = format_prompt(tokenizer, example, cfg)
        prompt_ids = encode_prompt(tokenizer, text, cfg)
        if keep >= len(prompt_ids):
            return list(prompt_ids)
    span = _user_text_span(tokenizer, example, cfg, text, prompt_ids)
    if span is None:
        return _cut_middle(prompt_ids, keep, keep // 2, len(prompt_ids) - (keep - keep // 2))
    return _cut_middle(prompt_ids, keep, *span)


def later_starts(example: Example) -> list[Example]:
    """The conversation without its oldest exchanges: one Example per later user turn it could start from (fewest
    dropped first), the leading system messages kept; ``[]`` for a single exchange."""
    messages = example.messages
    lead = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    starts = [i for i, m in enumerate(messages) if m["role"] == "user" and i > lead]
    return [Example(prompt=example.prompt, response=example.response, row=example.row,
                    messages=messages[:lead] + messages[i:]) for i in starts]


def _first_fitting(candidates: list[Any], length: Any, limit: int) -> int:
    """Index of the first candidate whose ``length`` is within ``limit`` (lengths fall along the list; binary search),
    else the last one."""
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if length(candidates[middle]) <= limit:
            high = middle
        else:
            low = middle + 1
    return low


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the last answer
    response_length: int  # the last answer's, before truncation, the end token (EOS / end of turn) included
    truncated: bool
    response_truncated: bool
    decoder_length: int = 0
    turns: list[tuple[int, int]] = field(default_factory=list)  # causal LM: [start, end) of each supervised answer
    last_turn_only: str = ""  # why only the last answer of a conversation with earlier ones is supervised


def _budget(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """Token budget (prompt, response) under max_length: the response keeps at least half when it needs it."""
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    response_keep = min(response_len, max(max_length - prompt_len, max_length // 2))
    return max_length - response_keep, response_keep


def tokenize_causal(tokenizer: Any, example: Example, cfg: DataConfig) -> TokenizedExample:
    """Prompt + response + end token; prompt positions are -100 unless train_on_prompt; the end token stays supervised.

    A conversation with earlier answers supervises each of them too (``data.train_on: all_turns``, with a chat
    template; ``loralab.turns`` locates them token by token), the input ids being the same as with ``last_turn``.
    The end token is the chat template's end of an assistant turn when the data uses the template, else EOS
    (``target_end_ids``). Too long: a conversation drops its oldest exchanges whole (the leading system prompt
    stays); a prompt still too long loses the middle of its user text (``fit_prompt``), never BOS, the system turn or
    the generation prompt. Raw text (``data.format: text``): every token supervised, EOS appended.
    """
    if example.raw_text:
        return tokenize_text(tokenizer, example, cfg)
    why = ""
    if has_history(example):
        if cfg.train_on == "last_turn":
            why = "data.train_on is last_turn"
        elif not uses_chat_template(tokenizer, cfg):
            why = "without a chat template earlier answers are part of the ### Instruction: prompt (set data.template)"
        else:
            item, why = _tokenize_turns(tokenizer, example, cfg)
            if item is not None:
                return item
    item = _tokenize_last_turn(tokenizer, example, cfg)
    item.last_turn_only = why
    return item


def _turns_item(ids: list[int], spans: list[tuple[int, int]], cfg: DataConfig, truncated: bool) -> TokenizedExample:
    labels = list(ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return TokenizedExample(input_ids=ids, labels=labels, prompt_length=spans[-1][0],
                            response_length=spans[-1][1] - spans[-1][0], truncated=truncated,
                            response_truncated=False, turns=list(spans))


def _tokenize_turns(tokenizer: Any, example: Example, cfg: DataConfig) -> tuple[TokenizedExample | None, str]:
    """Every answer supervised; too long, the oldest exchanges go whole. (None, why) when the turns cannot be located;
    (None, "") when even the last exchange is too long (the caller cuts it as one turn)."""
    found = conversation_turns(tokenizer, example, cfg)
    if found is None:
        return None, "the chat template's rendering could not be split into turns token by token"
    if len(found[0]) <= cfg.max_length:
        return _turns_item(*found, cfg, truncated=False), ""
    later = later_starts(example)
    if not later:
        return None, ""
    tokenized: dict[int, Any] = {}

    def length(candidate: Example) -> int:
        key = id(candidate)
        if key not in tokenized:
            tokenized[key] = conversation_turns(tokenizer, candidate, cfg)
        return len(tokenized[key][0]) if tokenized[key] else 10**9

    best = later[_first_fitting(later, length, cfg.max_length)]
    if length(best) > cfg.max_length:
        return None, ""
    return _turns_item(*tokenized[id(best)], cfg, truncated=True), ""


def tokenize_text(tokenizer: Any, example: Example, cfg: DataConfig) -> TokenizedExample:
    """A document for continued pre-training: its tokens (BOS where the tokenizer adds one) and EOS, all supervised;
    a long one keeps its first ``max_length`` tokens."""
    ids = list(tokenizer(example.response, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    kept = ids[: cfg.max_length]
    return TokenizedExample(input_ids=kept, labels=list(kept), prompt_length=0, response_length=len(ids),
                            truncated=len(kept) < len(ids), response_truncated=len(kept) < len(ids),
                            turns=[(0, len(kept))])


def _tokenize_last_turn(tokenizer: Any, example: Example, cfg: DataConfig) -> TokenizedExample:
    """The last answer supervised, everything before it prompt (-100 unless train_on_prompt)."""
    prompt_text = format_prompt(tokenizer, example, cfg)
    prompt_ids = encode_prompt(tokenizer, prompt_text, cfg)
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + target_end_ids(tokenizer, cfg)
    keep_prompt, keep_response = _budget(len(prompt_ids), len(response_ids), cfg.max_length)
    prompt_part = fit_prompt(tokenizer, example, cfg, prompt_ids, keep_prompt, prompt_text)
    response_part = response_ids[:keep_response]
    prompt_labels = list(prompt_part) if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_part)
    return TokenizedExample(
        input_ids=prompt_part + response_part,
        labels=prompt_labels + response_part,
        prompt_length=len(prompt_part),
        response_length=len(response_ids),
        truncated=keep_prompt < len(prompt_ids) or keep_response < len(response_ids),
        response_truncated=keep_response < len(response_ids),
        turns=[(len(prompt_part), len(prompt_part) + len(response_part))],
    )


def tokenize_seq2seq(tokenizer: Any, example: Example, cfg: DataConfig) -> TokenizedExample:
    """Encoder input = prompt, labels = response ending in EOS (padding is masked by the collator)."""
    input_ids = tokenizer(example.prompt)["input_ids"]
    labels = tokenizer(text_target=example.response)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not labels or labels[-1] != eos):
        labels = labels + [eos]
    truncated_input = len(input_ids) > cfg.max_length
    truncated_labels = len(labels) > cfg.max_length
    if truncated_input:
        input_ids = input_ids[: cfg.max_length - 1] + [input_ids[-1]]
    response_length = len(labels)
    if truncated_labels:
        labels = labels[: cfg.max_length - 1] + [labels[-1]]
    return TokenizedExample(input_ids=input_ids, labels=labels, prompt_length=len(input_ids), response_length=response_length,
                            truncated=truncated_input or truncated_labels, response_truncated=truncated_labels,
                            decoder_length=len(labels))


def tokenize_classification(tokenizer: Any, example: Example, cfg: DataConfig, label_ids: dict[str, int]) -> TokenizedExample:
    ids = tokenizer(example.prompt)["input_ids"]
    truncated = len(ids) > cfg.max_length
    if truncated:
        ids = ids[: cfg.max_length - 1] + [ids[-1]]
    return TokenizedExample(input_ids=ids, labels=[label_ids[example.response]], prompt_length=len(ids),
                            response_length=0, truncated=truncated, response_truncated=False)


def label_vocabulary(examples: list[Example]) -> dict[str, int]:
    """Class names to ids 0..n-1 (what a classifier head needs): integer-looking labels such as -1 / 1 or 3 / 7 in
    numeric order, any other labels in sorted text order. The names stay the user's own (``"-1"``, ``"positive"``)."""
    def integer_like(name: str) -> bool:
        text = name.strip()
        digits = text[1:] if text[:1] in ("+", "-") else text
        return digits.isascii() and digits.isdigit()

    names = {e.response for e in examples}
    if names and all(integer_like(n) for n in names):
        ordered = sorted(names, key=lambda n: (int(n), n))
    else:
        ordered = sorted(names)
    return {name: i for i, name in enumerate(ordered)}


def tokenize(tokenizer: Any, example: Example, cfg: DataConfig, task_type: str, label_ids: dict[str, int] | None = None) -> TokenizedExample:
    if task_type == "CAUSAL_LM":
        return tokenize_causal(tokenizer, example, cfg)
    if task_type == "SEQ_2_SEQ_LM":
        return tokenize_seq2seq(tokenizer, example, cfg)
    return tokenize_classification(tokenizer, example, cfg, label_ids or {})


# ---------------------------------------------------------------- datasets for the Trainer


class FeatureDataset(torch.utils.data.Dataset):
    """Model inputs as plain lists; the collator pads each batch dynamically."""

    def __init__(self, tokenized: list[TokenizedExample], task_type: str):
        self.tokenized = tokenized
        self.task_type = task_type

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.tokenized[index]
        labels: Any = item.labels[0] if self.task_type == "SEQ_CLS" else item.labels
        return {"input_ids": item.input_ids, "attention_mask": [1] * len(item.input_ids), "labels": labels}

    def lengths(self) -> list[int]:
        return [len(t.input_ids) + t.decoder_length for t in self.tokenized]


@dataclass
class PreparedData:
    """Train and eval examples, their tokenized features, and what tokenization had to cut."""

    train_examples: list[Example]
    eval_examples: list[Example]
    train: FeatureDataset
    eval: FeatureDataset | None
    label_ids: dict[str, int] | None = None

    def truncation_counts(self) -> dict[str, int]:
        items = self.train.tokenized + (self.eval.tokenized if self.eval else [])
        return {"truncated_examples": sum(t.truncated for t in items),
                "truncated_responses": sum(t.response_truncated for t in items)}

    def supervised_tokens(self) -> int:
        return sum(sum(1 for x in t.labels if x != IGNORE_INDEX) for t in self.train.tokenized)


def load_splits(cfg: DataConfig, task_type: str) -> tuple[list[Example], list[Example]]:
    """Train and eval examples: the data file and ``data.eval_path``, or a seeded split of the data file."""
    examples = load_examples(cfg, task_type)
    if cfg.eval_path:
        return examples, load_examples(cfg, task_type, cfg.eval_path)
    return split_examples(examples, cfg.eval_split, cfg.seed)


def prepare_data(cfg: DataConfig, tokenizer: Any, task_type: str) -> PreparedData:
    """Load, validate, split and tokenize the configured data."""
    train_examples, eval_examples = load_splits(cfg, task_type)
    label_ids = label_vocabulary(train_examples + eval_examples) if task_type == "SEQ_CLS" else None

    def features(part: list[Example]) -> FeatureDataset:
        return FeatureDataset([tokenize(tokenizer, e, cfg, task_type, label_ids) for e in part], task_type)

    prepared = PreparedData(train_examples, eval_examples, features(train_examples),
                            features(eval_examples) if eval_examples else None, label_ids)
    _warn_last_turn_only(prepared, cfg)
    return prepared


def _warn_last_turn_only(prepared: PreparedData, cfg: DataConfig) -> None:
    """One warning per reason when data.train_on is all_turns but conversations had only their last answer supervised."""
    if cfg.train_on != "all_turns":
        return
    rows: dict[str, list[int]] = {}
    parts = [(prepared.train_examples, prepared.train.tokenized)]
    if prepared.eval is not None:
        parts.append((prepared.eval_examples, prepared.eval.tokenized))
    for examples, tokenized in parts:
        for example, item in zip(examples, tokenized):
            if item.last_turn_only:
                rows.setdefault(item.last_turn_only, []).append(example.row)
    for why, found in rows.items():
        found = sorted(found)
        shown = ", ".join(map(str, found[:5])) + (f", ... (+{len(found) - 5} more)" if len(found) > 5 else "")
        log.warning("data.train_on all_turns: only the last answer is supervised in %d conversations (rows %s): %s",
                    len(found), shown, why)


def make_collator(tokenizer: Any, task_type: str, model: Any = None) -> Any:
    """Dynamic padding per batch: pad ids and attention 0 for inputs, -100 for labels."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task_type == "SEQ_CLS":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, model=model if task_type == "SEQ_2_SEQ_LM" else None,
                                  label_pad_token_id=IGNORE_INDEX, padding=True)
