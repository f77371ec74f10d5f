"""Cutting a prompt that is too long: a conversation drops its oldest exchanges whole, a single turn the middle of its
user text; the special prefix (BOS, system turn, user-turn header) and the generation prompt always stay."""

from __future__ import annotations

from typing import Any

from loralab.config import DataConfig
from loralab.formats import Example
from loralab.templates import _MARK, encode_prompt, format_prompt, uses_chat_template


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

