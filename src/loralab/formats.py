"""Row formats: pairs, alpaca, messages (OpenAI style), ShareGPT and raw text, detected per file, validated into Examples.

Every error names the file, the row (1-based; a line number for JSONL and CSV files) and, for conversations, the field
and the turn at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralab.config import DataConfig
from loralab.errors import DataError

FORMATS = ("pairs", "alpaca", "messages", "sharegpt", "text")
ROLES = ("user", "assistant", "system", "tool")  # the roles of a conversation; only assistant turns are supervised
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool"}  # ShareGPT's ``from`` values (LLaMA-Factory's names too)


@dataclass
class Example:
    """One validated row: the conversation before the answer, the answer, and where it came from.

    A conversation's earlier assistant turns are in ``messages`` (supervised too unless ``data.train_on: last_turn``);
    ``prompt`` / ``response`` are its last user turn and last answer (what generation uses; eval scores each
    assistant turn given the history before it: ``loralab.turns.answer_turns``).
    """

    prompt: str  # the last user turn (what a person would call the question)
    response: str  # the reference answer (or the label, for classification; the document, for raw text)
    row: int
    messages: list[dict[str, str]] = field(default_factory=list)  # chat context before the answer
    raw_text: bool = False  # data.format text: a document, every token supervised
    source: int | None = None  # the index of its source in data.sources (None: one data file)
    turn: int | None = None  # eval: which assistant turn of its conversation this answer is (1-based)


def where(path: str) -> str:
    """How errors name a source: ``data file PATH``, or ``dataset hub:ID (split ...)`` for a Hub dataset."""
    return f"dataset {path}" if path.startswith("hub:") else f"data file {path}"


def _row_error(path: str, row: int, message: str) -> DataError:
    return DataError(f"{where(path)}, row {row}: {message}" if path else f"row {row}: {message}")


def _is_missing(value: Any) -> bool:
    """None (JSON null, Parquet null, a missing CSV cell) or NaN (pandas' empty cell)."""
    return value is None or (isinstance(value, float) and value != value)


# ---------------------------------------------------------------- which format


def row_format(record: Any, cfg: DataConfig, path: str = "", row: int = 0) -> str | None:
    """The format a row's fields show (None: none of them); a row with both conversation fields is an error."""
    if not isinstance(record, dict):
        return None
    if cfg.messages_field in record and cfg.conversations_field in record:
        raise _row_error(path, row, f"ambiguous format: the row has both {cfg.messages_field!r} (messages) and "
                                    f"{cfg.conversations_field!r} (ShareGPT); set data.format to messages or sharegpt")
    if cfg.messages_field in record:
        return "messages"
    if cfg.conversations_field in record:
        return "sharegpt"
    if cfg.prompt_field in record and cfg.response_field in record:
        return "pairs"
    if cfg.prompt_field in record and "output" in record:
        return "alpaca"
    if cfg.text_field in record:
        return "text"
    return None


def detect_format(rows: list[tuple[int, Any]], cfg: DataConfig, path: str = "") -> str:
    """``data.format``, or the one format every row shows (pairs when none shows one: the errors then name the
    missing fields). Rows of two formats in one file are an error naming the first row of the second one."""
    return FormatStream(cfg, path).update(rows)


class FormatStream:
    """``detect_format`` over rows read chunk by chunk: the format the rows so far show, and the mixed-formats error
    at the first row of a second format, in whichever chunk it comes."""

    def __init__(self, cfg: DataConfig, path: str = ""):
        self.cfg, self.path = cfg, path
        self.found: dict[str, int] = {}

    def update(self, rows: list[tuple[int, Any]]) -> str:
        if self.cfg.format != "auto":
            return self.cfg.format
        for row, record in rows:
            fmt = row_format(record, self.cfg, self.path, row)
            if fmt is not None and fmt not in self.found:
                self.found[fmt] = row
                if len(self.found) > 1:
                    (first, first_row), (second, _) = self.found.items()
                    raise _row_error(self.path, row, f"mixed formats: this row is {second} but row {first_row} is "
                                                     f"{first}; use one format per file (or set data.format)")
        return next(iter(self.found), "pairs")


# ---------------------------------------------------------------- validating rows


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


def parse_rows(rows: list[tuple[int, Any]], cfg: DataConfig, path: str, task_type: str,
               fmt: str | None = None) -> list[Example]:
    """Validate raw rows into Examples according to the data format (``fmt``: already detected)."""
    if task_type == "QUESTION_ANSWERING":  # question / context / answers rows: loralab.tasks.qa
        from loralab.tasks.qa import parse_qa_rows

        return parse_qa_rows(rows, cfg, path)
    if task_type == "TOKEN_CLS":  # word list / tag list rows: loralab.tasks.token_cls
        from loralab.tasks.token_cls import parse_token_rows

        return parse_token_rows(rows, cfg, path)
    fmt = "pairs" if task_type in ("SEQ_CLS", "FEATURE_EXTRACTION") else fmt or detect_format(rows, cfg, path)
    if fmt == "text" and task_type != "CAUSAL_LM":
        raise DataError(f"{where(path)}: raw text (data.format text) trains causal LMs only, not {task_type}")
    examples = []
    for row, record in rows:
        if not isinstance(record, dict):
            raise _row_error(path, row, f"expected an object with fields, got {type(record).__name__}")
        if task_type == "FEATURE_EXTRACTION":  # (anchor, positive) pairs: loralab.tasks.embeddings
            from loralab.tasks.embeddings import parse_pair

            examples.append(parse_pair(record, cfg, path, row))
        elif task_type == "SEQ_CLS":
            text = _text_field(record, cfg.prompt_field, path, row, [cfg.prompt_field, cfg.label_field])
            if cfg.label_field not in record:
                raise _row_error(path, row, f"missing label field {cfg.label_field!r}; found {list(record)} (set data.label_field)")
            if _is_missing(record[cfg.label_field]):
                raise _row_error(path, row, f"label field {cfg.label_field!r} is empty (null, NaN or a missing CSV cell)")
            examples.append(Example(prompt=text, response=str(record[cfg.label_field]), row=row))
        elif fmt in ("messages", "sharegpt"):
            examples.append(_parse_conversation(record, cfg, path, row, fmt))
        elif fmt == "text":
            text = _text_field(record, cfg.text_field, path, row, [cfg.text_field])
            if not text.strip():
                raise _row_error(path, row, f"field {cfg.text_field!r} is empty")
            examples.append(Example(prompt="", response=text, row=row, raw_text=True))
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


def _parse_conversation(record: dict, cfg: DataConfig, path: str, row: int, fmt: str) -> Example:
    """A messages (``role`` / ``content``) or ShareGPT (``from`` / ``value``) conversation ending with an answer.

    Roles are user, assistant, system and tool (ShareGPT: human, gpt, system, observation too); every turn has text;
    there is a user turn before the last answer. Only the last answer may be empty (a prompt to answer; training
    refuses it in ``load_examples``).
    """
    sharegpt = fmt == "sharegpt"
    name = cfg.conversations_field if sharegpt else cfg.messages_field
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    turns = record.get(name)
    if not isinstance(turns, list) or not turns:
        raise _row_error(path, row, f"field {name!r} should be a non-empty list of {{{role_key}, {content_key}}} "
                                    f"{'turns' if sharegpt else 'messages'}")
    what = "turn" if sharegpt else "message"
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or _is_missing(turn.get(role_key)) or _is_missing(turn.get(content_key)):
            raise _row_error(path, row, f"{what} {i} should have {role_key!r} and {content_key!r}, got {turn!r}")
        role = roles.get(str(turn[role_key]))
        if role is None:
            raise _row_error(path, row, f"field {name!r}, {what} {i}: unknown role {turn[role_key]!r}; expected one of "
                                        f"{', '.join(roles)}")
        content = turn[content_key]
        if not isinstance(content, (str, int, float)) or isinstance(content, bool):
            raise _row_error(path, row, f"field {name!r}, {what} {i} ({role}): {content_key!r} should be text, "
                                        f"got {type(content).__name__}")
        messages.append({"role": role, "content": str(content)})
    system = record.get("system") if sharegpt else None  # ShareGPT's optional top-level system prompt
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    offset = len(messages) - len(turns)
    if messages[-1]["role"] != "assistant":
        none = "" if any(m["role"] == "assistant" for m in messages) else " (the conversation has no assistant turn)"
        raise _row_error(path, row, f"the last message should be the assistant's answer, got role "
                                    f"{turns[-1][role_key]!r} in field {name!r}{none}")
    for i, message in enumerate(messages[:-1]):
        if not message["content"].strip():
            raise _row_error(path, row, f"field {name!r}, {what} {i + 1 - offset} ({message['role']}) is empty")
    context = messages[:-1]
    users = [m["content"] for m in context if m["role"] == "user"]
    if not users:
        raise _row_error(path, row, f"no user message before the assistant's answer in field {name!r}")
    return Example(prompt=users[-1], response=messages[-1]["content"], row=row, messages=context)


def empty_answer_error(example: Example, cfg: DataConfig, path: str, fmt: str) -> DataError | None:
    """The error for a conversation whose last answer is empty (None when it has text or is not a conversation)."""
    if not example.messages or example.response.strip() or fmt not in ("messages", "sharegpt"):
        return None
    name = cfg.conversations_field if fmt == "sharegpt" else cfg.messages_field
    return _row_error(path, example.row, f"field {name!r}: the last {'turn' if fmt == 'sharegpt' else 'message'} "
                                         "(the assistant's answer) is empty")
