"""Token ids and -100 label masks of one example: every assistant turn of a conversation supervised (or only the last:
``data.train_on``), raw text wholly supervised, seq2seq targets and class labels.

Each function takes one ``Example``; ``loralab.data.prepare`` runs them over whole splits (batched, in several
processes, cached on disk), so a mask is the same token for token however the data is prepared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from loralab.config import DataConfig
from loralab.data.prompts import _first_fitting, fit_prompt, later_starts
from loralab.formats import Example
from loralab.templates import encode_prompt, format_prompt, target_end_ids, uses_chat_template
from loralab.turns import conversation_turns, has_history

IGNORE_INDEX = -100


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


def label_vocabulary(examples: Iterable[Example]) -> dict[str, int]:
    """Class names to ids 0..n-1 (what a classifier head needs): integer-looking labels such as -1 / 1 or 3 / 7 in
    numeric order, any other labels in sorted text order. The names stay the user's own (``"-1"``, ``"positive"``)."""
    return vocabulary_of(e.response for e in examples)


def vocabulary_of(labels: Iterable[str]) -> dict[str, int]:
    """``label_vocabulary`` of the label values themselves."""
    def integer_like(name: str) -> bool:
        text = name.strip()
        digits = text[1:] if text[:1] in ("+", "-") else text
        return digits.isascii() and digits.isdigit()

    names = set(labels)
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
    if task_type == "FEATURE_EXTRACTION":  # anchor ids as input_ids, positive ids as labels
        from loralab.tasks.embeddings import tokenize_pair

        return tokenize_pair(tokenizer, example, cfg)
    if task_type == "TOKEN_CLS":  # each word's first sub-token labelled, the rest -100
        from loralab.tasks.token_cls import tokenize_token_cls

        return tokenize_token_cls(tokenizer, example, cfg, label_ids or {})
    return tokenize_classification(tokenizer, example, cfg, label_ids or {})

