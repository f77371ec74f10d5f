"""Datasets: read files, validate rows, split, format prompts, tokenize with -100 label masks, collate.

Every error names the file and the row (1-based; a line number for JSONL and CSV files).
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from loralab.config import DataConfig
from loralab.errors import DataError
from loralab.readers import read_rows

IGNORE_INDEX = -100
PLAIN_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def demo_dataset_path() -> Path:
    """The bundled demo dataset (instruction/response pairs written for loralab)."""
    return Path(str(resources.files("loralab") / "resources" / "demo_dataset.json"))


@dataclass
class Example:
    """One validated row: the conversation before the answer, the answer, and where it came from."""

    prompt: str  # the last user turn (what a person would call the question)
    response: str  # the reference answer (or the label, for classification)
    row: int
    messages: list[dict[str, str]] = field(default_factory=list)  # chat context before the answer


# ---------------------------------------------------------------- validating rows


def detect_format(rows: list[tuple[int, Any]], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    first = rows[0][1] if rows and isinstance(rows[0][1], dict) else {}
    if cfg.messages_field in first:
        return "messages"
    if "output" in first and cfg.prompt_field in first and cfg.response_field not in first:
        return "alpaca"
    return "pairs"


def _row_error(path: str, row: int, message: str) -> DataError:
    return DataError(f"data file {path}, row {row}: {message}")


def _is_missing(value: Any) -> bool:
    """None (JSON null, Parquet null, a missing CSV cell) or NaN (pandas' empty cell)."""
    return value is None or (isinstance(value, float) and value != value)


def _text_field(record: dict, name: str, path: str, row: int, expected: list[str]) -> str:
    if name not in record:
        found = ", ".join(repr(k) for k in record) or "none"
        raise _row_error(path, row, f"missing field {name!r}; expected fields {expected}, found {found} "
                         "(set data.prompt_field / data.response_field to use other names)")
    value = record[name]
    if _is_missing(value):
        raise _row_error(path, row, f"field {name!r} is empty (null, NaN or a missing CSV cell)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _row_error(path, row, f"field {name!r} should be text, got {type(value).__name__}")
    return value


def parse_rows(rows: list[tuple[int, Any]], cfg: DataConfig, path: str, task_type: str) -> list[Example]:
    """Validate raw rows into Examples according to the data format."""
    fmt = detect_format(rows, cfg)
    examples = []
    for row, record in rows:
        if not isinstance(record, dict):
            raise _row_error(path, row, f"expected an object with fields, got {type(record).__name__}")
        if task_type == "SEQ_CLS":
            text = _text_field(record, cfg.prompt_field, path, row, [cfg.prompt_field, cfg.label_field])
            if cfg.label_field not in record:
                raise _row_error(path, row, f"missing label field {cfg.label_field!r}; found {list(record)} (set data.label_field)")
            if _is_missing(record[cfg.label_field]):
                raise _row_error(path, row, f"label field {cfg.label_field!r} is empty (null, NaN or a missing CSV cell)")
            examples.append(Example(prompt=text, response=str(record[cfg.label_field]), row=row))
        elif fmt == "messages":
            examples.append(_parse_messages(record, cfg, path, row))
        elif fmt == "alpaca":
            fields = [cfg.prompt_field, cfg.input_field, "output"]
            instruction = _text_field(record, cfg.prompt_field, path, row, fields)
            context = record.get(cfg.input_field) or ""
            context = "" if _is_missing(context) else context  # NaN: pandas' empty cell
            prompt = f"{instruction}\n\n{context}" if str(context).strip() else instruction
            examples.append(Example(prompt=prompt, response=_text_field(record, "output", path, row, fields), row=row))
        else:
            fields = [cfg.prompt_field, cfg.response_field]
            prompt = _text_field(record, cfg.prompt_field, path, row, fields)
            examples.append(Example(prompt=prompt, response=_text_field(record, cfg.response_field, path, row, fields), row=row))
    return examples


def _parse_messages(record: dict, cfg: DataConfig, path: str, row: int) -> Example:
    messages = record.get(cfg.messages_field)
    if not isinstance(messages, list) or not messages:
        raise _row_error(path, row, f"field {cfg.messages_field!r} should be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or _is_missing(message.get("role")) or _is_missing(message.get("content")):
            raise _row_error(path, row, f"message {i + 1} should have 'role' and 'content', got {message!r}")
    if messages[-1]["role"] != "assistant":
        raise _row_error(path, row, f"the last message should be the assistant's answer, got role {messages[-1]['role']!r}")
    context = [{"role": m["role"], "content": str(m["content"])} for m in messages[:-1]]
    users = [m["content"] for m in context if m["role"] == "user"]
    if not users:
        raise _row_error(path, row, "no user message before the assistant's answer")
    return Example(prompt=users[-1], response=str(messages[-1]["content"]), row=row, messages=context)


def load_examples(cfg: DataConfig, task_type: str, path: str | None = None) -> list[Example]:
    """Read and validate a data file (the bundled demo when no path is configured)."""
    source = path or cfg.path or str(demo_dataset_path())
    rows = read_rows(source)
    if not rows:
        raise DataError(f"data file {source}: no examples found (the dataset is empty)")
    return parse_rows(rows, cfg, source, task_type)


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


def uses_chat_template(tokenizer: Any, cfg: DataConfig) -> bool:
    return bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))


def prompt_messages(example: Example, cfg: DataConfig) -> list[dict[str, str]]:
    messages = list(example.messages) or [{"role": "user", "content": example.prompt}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def format_prompt(tokenizer: Any, example: Example, cfg: DataConfig, task_type: str = "CAUSAL_LM") -> str:
    """The exact text placed before the answer, in training and in generation."""
    if task_type != "CAUSAL_LM":
        return example.prompt
    if uses_chat_template(tokenizer, cfg):
        return tokenizer.apply_chat_template(prompt_messages(example, cfg), tokenize=False, add_generation_prompt=True)
    if example.messages:
        turns = "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages(example, cfg))
        return PLAIN_PROMPT_TEMPLATE.format(prompt=turns)
    system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
    return system + PLAIN_PROMPT_TEMPLATE.format(prompt=example.prompt)


def encode_prompt(tokenizer: Any, prompt_text: str, cfg: DataConfig) -> list[int]:
    """Token ids of a formatted prompt: the chat template carries its own special tokens, plain text gets BOS."""
    if uses_chat_template(tokenizer, cfg):
        return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]  # tokenizers that append EOS to every text
    return ids


# Marks the place of a message's content when a template is rendered to find where things are (private-use
# characters: never in real text, untouched by the ``trim`` filters templates apply to contents).
_MARK = "\ue000loralab{}\ue001"
_chat_end_cache: "weakref.WeakKeyDictionary[Any, dict[Any, list[int]]]" = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: bos/eos/pad/... and every added token flagged special (``<|eot_id|>``)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return ids


def _read_chat_end(tokenizer: Any) -> list[int]:
    answer = _MARK.format("answer")
    user = {"role": "user", "content": "Hi"}
    for messages in ([user, {"role": "assistant", "content": answer}],
                     [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": answer}]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - templates raise anything (raise_exception, missing variables)
            continue
        if isinstance(text, str) and answer in text:
            break
    else:
        return []
    after = text[text.rindex(answer) + len(answer) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = _special_ids(tokenizer)
    end = next((i for i, token_id in enumerate(ids) if token_id in special), None)
    return [] if end is None else list(ids[: end + 1])


def chat_end_ids(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer's chat template writes right after an assistant message, up to and including the first
    special token: ChatML ``<|im_end|>``, Gemma ``<end_of_turn>``, Llama 3 ``<|eot_id|>`` (``[]`` when there is no
    template or no special token ends the turn).

    Read off by rendering a user message and an assistant message with a marker as its content. What the template
    writes after that special token (the newline after ``<end_of_turn>`` / ``<|im_end|>``, or a closing EOS) is left
    out: generation stops at the special token, so the model never has to produce what follows it.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    key = (repr(template), getattr(tokenizer, "eos_token_id", None))
    try:
        cache = _chat_end_cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    if key not in cache:
        cache[key] = _read_chat_end(tokenizer)
    return list(cache[key])


def target_end_ids(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """What every causal target ends with, supervised: the chat template's end of an assistant turn when the data is
    formatted with the template (``<end_of_turn>`` for Gemma, ``<|im_end|>`` for Qwen2.5 whose EOS is ``<|endoftext|>``),
    otherwise EOS."""
    if uses_chat_template(tokenizer, cfg):
        ids = chat_end_ids(tokenizer)
        if ids:
            return ids
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def target_end_id(tokenizer: Any, cfg: DataConfig) -> int | None:
    """The token a complete causal target ends with (the last of ``target_end_ids``), or None."""
    ids = target_end_ids(tokenizer, cfg)
    return ids[-1] if ids else None


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
    """The prompt cut to ``keep`` tokens: the special prefix (BOS, system turn, user-turn header) and the prompt's end
    (the last part of the user text and the generation prompt / ``### Response:`` header) stay, the middle of the
    user text goes, half of what is kept of it from its start and half from its end. When the user text cannot be
    located, the first and the last ``keep // 2`` tokens (about) are kept."""
    if keep >= len(prompt_ids):
        return list(prompt_ids)
    text = format_prompt(tokenizer, example, cfg) if prompt_text is None else prompt_text
    span = _user_text_span(tokenizer, example, cfg, text, prompt_ids)
    if span is None:
        return _cut_middle(prompt_ids, keep, keep // 2, len(prompt_ids) - (keep - keep // 2))
    return _cut_middle(prompt_ids, keep, *span)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    response_length: int  # before truncation, the end token (EOS / end of turn) included
    truncated: bool
    response_truncated: bool
    decoder_length: int = 0


def _budget(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """Token budget (prompt, response) under max_length: the response keeps at least half when it needs it."""
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    response_keep = min(response_len, max(max_length - prompt_len, max_length // 2))
    return max_length - response_keep, response_keep


def tokenize_causal(tokenizer: Any, example: Example, cfg: DataConfig) -> TokenizedExample:
    """Prompt + response + end token; prompt positions are -100 unless train_on_prompt; the end token stays supervised.

    The end token is the chat template's end of an assistant turn when the data uses the template, else EOS
    (``target_end_ids``). A long prompt loses the middle of its user text (``fit_prompt``), never BOS, the system
    turn or the generation prompt.
    """
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

    return PreparedData(train_examples, eval_examples, features(train_examples),
                        features(eval_examples) if eval_examples else None, label_ids)


def make_collator(tokenizer: Any, task_type: str, model: Any = None) -> Any:
    """Dynamic padding per batch: pad ids and attention 0 for inputs, -100 for labels."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task_type == "SEQ_CLS":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, model=model if task_type == "SEQ_2_SEQ_LM" else None,
                                  label_pad_token_id=IGNORE_INDEX, padding=True)
