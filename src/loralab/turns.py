"""Every assistant turn of a conversation, located token by token in the sequence the chat template renders.

The sequence is what inference sees for the last answer: the template rendered for the history before it with the
generation prompt, then the answer and the end-of-turn token (exactly ``format_prompt`` + answer, as for one turn).
Each earlier assistant turn is found in it the same way:

1. incrementally: the template rendered for the history before turn k (generation prompt included) must be a prefix
   of the one before turn k+1, as text and as tokens; turn k is what lies between, up to and including the end-of-turn
   token (the newline after it stays masked). Templates that rewrite an earlier answer in the history (Qwen3 drops its
   ``<think>`` block) are supervised as the history renders it, which is the sequence trained on.
2. else by markers: each answer's content replaced by a marker, the template's own text around the markers located
   in the real rendering of the whole conversation; kept only when the tokens before the last answer are exactly the
   inference prompt.
3. else ``None``: the caller supervises only the last answer and says so (never a guessed mask).
"""

from __future__ import annotations

from typing import Any, Sequence

from loralab.config import DataConfig
from loralab.formats import Example
from loralab.templates import _MARK, chat_end_ids, encode_prompt, format_prompt, prompt_messages, target_end_ids

Turns = tuple[list[int], list[tuple[int, int]]]  # token ids up to the last answer's end token, [start, end) per answer


def has_history(example: Example) -> bool:
    """Whether the conversation has assistant turns before its last answer."""
    return any(m["role"] == "assistant" for m in example.messages)


def conversation(example: Example, cfg: DataConfig) -> list[dict[str, str]]:
    """The whole conversation as rendered: system prompt, history and the last answer."""
    return [*prompt_messages(example, cfg), {"role": "assistant", "content": example.response}]


def answer_ids(tokenizer: Any, example: Example, cfg: DataConfig) -> list[int]:
    """The last answer's tokens and the end token (the template's end of turn, or EOS)."""
    return tokenizer(example.response, add_special_tokens=False)["input_ids"] + target_end_ids(tokenizer, cfg)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # noqa: BLE001 - templates raise anything (raise_exception, an empty history)
        return None
    return text if isinstance(text, str) else None


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _end_text(tokenizer: Any) -> tuple[list[int], str]:
    end = chat_end_ids(tokenizer)
    return end, tokenizer.decode(end, skip_special_tokens=False, clean_up_tokenization_spaces=False) if end else ""


def _rendered_answer(rest: str, content: str, end_text: str) -> str | None:
    """The answer as the template wrote it at the start of ``rest``: up to the end-of-turn text, or (a template without
    an end token) the content itself, maybe trimmed."""
    if end_text:
        cut = rest.find(end_text)
        return rest[:cut] if cut > 0 else None
    for text in (content, content.strip()):
        if text and rest.startswith(text):
            return text
    return None


def incremental_turns(tokenizer: Any, example: Example, cfg: DataConfig) -> Turns | None:
    messages = conversation(example, cfg)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prefixes = [_render(tokenizer, messages[:a], True) for a in answers]
    if any(p is None for p in prefixes):
        return None
    end, end_text = _end_text(tokenizer)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for n, a in enumerate(answers):
        prefix = encode_prompt(tokenizer, prefixes[n], cfg)
        if len(prefix) < len(ids) or prefix[: len(ids)] != ids:
            return None  # the template rendered the history differently than it did one turn before
        ids = list(prefix)
        if n == len(answers) - 1:
            turn = answer_ids(tokenizer, example, cfg)
        else:
            if not prefixes[n + 1].startswith(prefixes[n]):
                return None
            text = _rendered_answer(prefixes[n + 1][len(prefixes[n]) :], messages[a]["content"], end_text)
            if text is None:
                return None
            turn = _tokens(tokenizer, text) + end
        spans.append((len(ids), len(ids) + len(turn)))
        ids += turn
    return ids, spans


def marker_turns(tokenizer: Any, example: Example, cfg: DataConfig) -> Turns | None:
    messages = conversation(example, cfg)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    marks = [_MARK.format(f"turn{n}") for n in range(len(answers))]
    marked = [dict(m) for m in messages]
    for a, mark in zip(answers, marks):
        marked[a]["content"] = mark
    template_text, full = _render(tokenizer, marked, False), _render(tokenizer, messages, False)
    if template_text is None or full is None or any(template_text.count(mark) != 1 for mark in marks):
        return None
    pieces, start = [], 0  # the template's text between the answers
    for mark in marks:
        at = template_text.find(mark, start)
        if at < 0:
            return None
        pieces.append(template_text[start:at])
        start = at + len(mark)
    pieces.append(template_text[start:])
    if not full.startswith(pieces[0]):
        return None
    contents, start = [], len(pieces[0])  # each answer as rendered in the real conversation
    for piece in pieces[1:-1]:
        at = full.find(piece, start)
        if at <= start:
            return None
        contents.append(full[start:at])
        start = at + len(piece)
    end, end_text = _end_text(tokenizer)
    ids = encode_prompt(tokenizer, pieces[0], cfg)
    spans: list[tuple[int, int]] = []
    for n, content in enumerate(contents):
        between = pieces[n + 1]
        if end_text and not between.startswith(end_text):
            return None
        turn = _tokens(tokenizer, content) + end
        spans.append((len(ids), len(ids) + len(turn)))
        ids += turn + _tokens(tokenizer, between[len(end_text) :])
    if ids != encode_prompt(tokenizer, format_prompt(tokenizer, example, cfg), cfg):
        return None  # the last answer would follow another prompt than at inference
    turn = answer_ids(tokenizer, example, cfg)
    spans.append((len(ids), len(ids) + len(turn)))
    return ids + turn, spans


def conversation_turns(tokenizer: Any, example: Example, cfg: DataConfig) -> Turns | None:
    """Token ids of the conversation and the span of each assistant turn, or None when they cannot be located exactly.

    Only for examples rendered with a chat template (``uses_chat_template``)."""
    return incremental_turns(tokenizer, example, cfg) or marker_turns(tokenizer, example, cfg)


def answer_turns(example: Example) -> list[Example]:
    """Each assistant answer of a conversation as an example of its own: the history before it as context, the
    answer as reference, ``turn`` its place among the conversation's answers (1-based); an example without earlier
    answers as it is. An answer that no user turn precedes is left out (nothing asked it)."""
    if not has_history(example):
        return [example]
    messages = [*example.messages, {"role": "assistant", "content": example.response}]
    found, answers = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        answers += 1
        users = [m["content"] for m in messages[:i] if m["role"] == "user"]
        if users:
            found.append(Example(prompt=users[-1], response=message["content"], row=example.row,
                                 messages=[dict(m) for m in messages[:i]], source=example.source, turn=answers))
    return found


def each_answer(examples: Sequence[Example]) -> tuple[list[Example], int]:
    """Every assistant answer of the examples (``answer_turns``) and how many conversations gave several."""
    answers, several = [], 0
    for example in examples:
        turns = answer_turns(example)
        several += len(turns) > 1
        answers.extend(turns)
    return answers, several


def first_answers(examples: Sequence[Example], limit: int) -> list[Example]:
    """The first ``limit`` answers of ``each_answer``: what generation metrics during training (and tune's range
    test, which prices them) answer."""
    return each_answer(examples)[0][:limit]
