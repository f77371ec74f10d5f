"""QUESTION_ANSWERING runs: extractive QA (SQuAD style) with LoRA on an encoder and a ``qa_outputs`` span head.

- Data: rows with ``data.question_field`` / ``data.context_field`` (``question`` / ``context``) and the answer as
  SQuAD's ``answers: {"text": [...], "answer_start": [...]}`` (``data.answer_field``) or a flat ``answer`` string
  (+ optional ``answer_start``; when absent, the answer's first occurrence in the context). An example keeps the
  question as ``prompt`` and ``{"context", "answers", "starts"}`` as JSON in ``response`` (so the cached example
  tables and the train / eval / test splits of :mod:`loralab.data` hold QA rows unchanged).
- Features: the Hugging Face QA recipe: ``tokenizer(question, context, truncation="only_second",
  max_length=data.max_length, stride=data.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)``;
  a long context becomes several windows; ``start_positions`` / ``end_positions`` are the answer's first and last
  token in a window, the CLS index in a window that does not hold the whole answer.
- Model: ``AutoModelForQuestionAnswering`` (a new, seeded ``qa_outputs`` head on a bare encoder), PEFT
  ``TaskType.QUESTION_ANS`` (the head trains and is saved in ``modules_to_save``).
Evaluation (n-best span decoding, SQuAD exact match / F1, base vs adapter) lives in :mod:`loralab.tasks.qa_eval`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loralab.errors import DataError, LoralabError
from loralab.formats import Example, _row_error

TASK = "QUESTION_ANSWERING"
PEFT_TASK = "QUESTION_ANS"  # peft.TaskType.QUESTION_ANS


# ---------------------------------------------------------------- rows


def _text(record: dict, name: str, path: str, row: int, what: str) -> str:
    if name not in record:
        raise _row_error(path, row, f"missing {what} field {name!r}; found {list(record)} (set data.{what}_field)")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise _row_error(path, row, f"field {name!r}: the {what} must be non-empty text, got {value!r}")
    return value


def _answers(record: dict, cfg: Any, path: str, row: int) -> tuple[str, list[str], list[Any]]:
    """(field name, answer texts, their starts: an int or None when not given)."""
    name = cfg.answer_field if cfg.answer_field in record else "answer" if "answer" in record else None
    if name is None:
        raise _row_error(path, row, f"missing answer field {cfg.answer_field!r} (SQuAD's {{text, answer_start}}) or "
                                    f"'answer'; found {list(record)} (set data.answer_field)")
    value = record[name]
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        texts = [texts] if isinstance(texts, str) else texts
        starts = [starts] if isinstance(starts, int) else starts
        if not isinstance(texts, list) or not texts:
            raise _row_error(path, row, f"field {name!r}: expected {{\"text\": [...], \"answer_start\": [...]}} with at "
                                        "least one answer (unanswerable questions, SQuAD v2, are not supported)")
        if starts is None:
            starts = [None] * len(texts)
        if not isinstance(starts, list) or len(starts) != len(texts):
            raise _row_error(path, row, f"field {name!r}: answer_start must list one start per answer text "
                                        f"({len(texts)}), got {starts!r}")
        return f"{name}", texts, starts
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return name, value, [None] * len(value)
    start = record.get("answer_start")
    return name, [value], [start]


def parse_qa_record(record: Any, cfg: Any, path: str, row: int, need_answer: bool = True) -> Example:
    """One row as an Example (question as prompt; context, answers and their character starts in ``response``)."""
    if not isinstance(record, dict):
        raise _row_error(path, row, f"expected an object with fields, got {type(record).__name__}")
    question = _text(record, cfg.question_field, path, row, "question")
    context = _text(record, cfg.context_field, path, row, "context")
    texts: list[str] = []
    starts: list[int] = []
    if need_answer or cfg.answer_field in record or "answer" in record:
        name, found, given = _answers(record, cfg, path, row)
        for text, start in zip(found, given):
            if not isinstance(text, str) or not text.strip():
                raise _row_error(path, row, f"field {name!r}: an answer must be non-empty text, got {text!r}")
            if start is None:
                start = context.find(text)
                if start < 0:
                    raise _row_error(path, row, f"field {name!r}: the answer {text!r} does not occur in the context "
                                                f"(field {cfg.context_field!r}); extractive QA answers are spans of it")
            elif isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(context):
                raise _row_error(path, row, f"field {name!r}: answer_start {start!r} is not a character position "
                                            f"in the context (0..{len(context) - 1})")
            elif context[start : start + len(text)] != text:
                raise _row_error(path, row, f"field {name!r}: answer_start {start} points at "
                                            f"{context[start : start + len(text)]!r}, not at the answer {text!r}"
                                            + (f" (it occurs at {context.find(text)})" if text in context else ""))
            texts.append(text)
            starts.append(start)
    payload = json.dumps({"context": context, "answers": texts, "starts": starts}, ensure_ascii=False)
    return Example(prompt=question, response=payload, row=row)


def parse_qa_rows(rows: Sequence[tuple[int, Any]], cfg: Any, path: str, need_answer: bool = True) -> list[Example]:
    return [parse_qa_record(record, cfg, path, row, need_answer) for row, record in rows]


@dataclass
class QAItem:
    question: str
    context: str
    answers: list[str]
    starts: list[int]
    row: int = 0


def qa_item(example: Example | QAItem) -> QAItem:
    if isinstance(example, QAItem):
        return example
    try:
        fields = json.loads(example.response)
        return QAItem(example.prompt, fields["context"], list(fields["answers"]), list(fields["starts"]), example.row)
    except (ValueError, KeyError, TypeError):
        raise LoralabError(f"row {example.row} is not a QUESTION_ANSWERING example (no context)") from None


def is_qa_record(record: Any, cfg: Any) -> bool:
    return isinstance(record, dict) and cfg.question_field in record and cfg.context_field in record


def detect_qa(config: Any, found: str) -> str | None:
    """QUESTION_ANSWERING when ``model.task_type`` is unset, the first row of ``data.path`` has question and context
    fields and the model is an encoder (``found`` SEQ_CLS); a clear error for such rows on another model."""
    from loralab.tasks import encoder_task_for_rows

    cfg = config.data
    return encoder_task_for_rows(config, found, TASK, lambda record: (
        f"{cfg.question_field!r} / {cfg.context_field!r} rows (extractive QA)"
        if is_qa_record(record, cfg) and cfg.prompt_field not in record else None))


# ---------------------------------------------------------------- windows and span positions


def check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise LoralabError("QUESTION_ANSWERING needs a fast tokenizer (character offsets of each token); "
                           f"{type(tokenizer).__name__} is not one")


def check_question(tokenizer: Any, question: str, cfg: Any, where: str, context: str = "") -> int:
    """A question must leave room for the context in a window, and a context cut into windows more room than
    ``data.doc_stride``; the context tokens a window holds."""
    q_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    room = cfg.max_length - q_len - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= 0:
        raise DataError(f"{where}: the question is {q_len} tokens, longer than data.max_length ({cfg.max_length}) "
                        f"leaves room for; shorten it or raise data.max_length")
    fits = len(tokenizer(context, add_special_tokens=False)["input_ids"]) <= room if context else False
    if cfg.doc_stride >= room and not fits:  # a context that fits one window is tokenized without overlap
        raise DataError(f"{where}: data.doc_stride ({cfg.doc_stride}) must be smaller than the context tokens a "
                        f"window holds after the {q_len}-token question ({room} of data.max_length {cfg.max_length}); "
                        "lower data.doc_stride or raise data.max_length")
    return fits


class Windows(dict):
    """The windows of several (question, context) pairs: ``input_ids``, ``attention_mask``, (``token_type_ids``),
    ``offset_mapping``, ``overflow_to_sample_mapping`` lists, and :meth:`sequence_ids` as a BatchEncoding has."""

    def __init__(self) -> None:
        super().__init__()
        self.sequences: list[list[int | None]] = []

    def sequence_ids(self, index: int) -> list[int | None]:
        return self.sequences[index]


def encode_windows(tokenizer: Any, items: Sequence[QAItem], cfg: Any, label: str = "") -> Any:
    """The windows of every (question, context): a BatchEncoding with ``overflow_to_sample_mapping`` and offsets."""
    check_tokenizer(tokenizer)
    fits = []
    for item in items:
        where = f"{label}, row {item.row}" if label else f"row {item.row}"
        fits.append(check_question(tokenizer, item.question, cfg, f"{where}, field {cfg.question_field!r}", item.context))
    if tokenizer.padding_side != "right":
        raise LoralabError("QUESTION_ANSWERING windows need the tokenizer to pad on the right (question first)")
    found: list[tuple[int, dict[str, Any], list[int | None]]] = []
    for stride, chosen in ((cfg.doc_stride, [i for i, f in enumerate(fits) if not f]), (0, [i for i, f in enumerate(fits) if f])):
        if not chosen:
            continue
        encoded = tokenizer([items[i].question for i in chosen], [items[i].context for i in chosen],
                            truncation="only_second", max_length=cfg.max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
        for w, sample in enumerate(encoded["overflow_to_sample_mapping"]):
            found.append((chosen[sample], {k: encoded[k][w] for k in encoded if k != "overflow_to_sample_mapping"},
                          encoded.sequence_ids(w)))
    found.sort(key=lambda f: f[0])  # stable: each example's windows in order
    windows = Windows()
    for sample, window, sequence in found:
        windows.setdefault("overflow_to_sample_mapping", []).append(sample)
        for k, v in window.items():
            windows.setdefault(k, []).append(v)
        windows.sequences.append(sequence)
    return windows


def span_positions(encoded: Any, index: int, start_char: int, end_char: int, cls_index: int) -> tuple[int, int]:
    """The first and last token of window ``index`` covering characters [start_char, end_char) of the context; the
    CLS index twice when the window does not hold the whole answer (as the Hugging Face QA recipe)."""
    offsets = encoded["offset_mapping"][index]
    sequence_ids = encoded.sequence_ids(index)
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def qa_features(tokenizer: Any, items: Sequence[QAItem], cfg: Any, label: str = "") -> list[dict[str, Any]]:
    """Model inputs with ``start_positions`` / ``end_positions`` (first answer), one per window, and ``example``
    (the index of its item)."""
    encoded = encode_windows(tokenizer, items, cfg, label)
    features = []
    for index, ids in enumerate(encoded["input_ids"]):
        item = items[encoded["overflow_to_sample_mapping"][index]]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        start_char = item.starts[0]
        start, end = span_positions(encoded, index, start_char, start_char + len(item.answers[0]), cls)
        feature = {"input_ids": ids, "attention_mask": encoded["attention_mask"][index],
                   "start_positions": start, "end_positions": end,
                   "example": encoded["overflow_to_sample_mapping"][index]}
        if "token_type_ids" in encoded:
            feature["token_type_ids"] = encoded["token_type_ids"][index]
        features.append(feature)
    return features


# ---------------------------------------------------------------- datasets for the Trainer


class QADataset(torch.utils.data.Dataset):
    """The windows of a split; ``tokenized`` has one ``TokenizedExample`` per window (for loralab's counts)."""

    def __init__(self, features: list[dict[str, Any]], n_examples: int):
        from loralab.data.tokenize import TokenizedExample

        self.features = features
        self.n_examples = n_examples
        self.task_type = TASK
        self.tokenized = [TokenizedExample(input_ids=f["input_ids"], labels=[f["start_positions"], f["end_positions"]],
                                           prompt_length=0, response_length=0, truncated=False,
                                           response_truncated=False) for f in features]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.features[index].items() if k != "example"}

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def prepare_qa(cfg: Any, tokenizer: Any) -> Any:
    """Train / eval windows of the configured QA data (validated rows; tokenized in memory)."""
    from loralab.data.prepare import PreparedData
    from loralab.data.splits import load_all_splits

    train_part, eval_part, test_part = load_all_splits(cfg, TASK)
    label = f"data file {cfg.path}" if cfg.path else "data"

    def dataset(examples: Sequence[Example], name: str) -> QADataset | None:
        if not len(examples):
            return None
        items = [qa_item(e) for e in examples]
        where = f"data file {cfg.eval_path}" if name == "eval" and cfg.eval_path else label
        return QADataset(qa_features(tokenizer, items, cfg, where), len(items))

    train = dataset(train_part, "train")
    if train is None:
        raise DataError("the training split is empty")
    return PreparedData(train_part, eval_part, train, dataset(eval_part, "eval"), None, test_part)


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def load_qa_base(model_cfg: Any, seed: int) -> Any:
    """The base QA model of a run: a head the checkpoint lacks is initialised from ``train.seed`` as training did."""
    from loralab.models import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_model(model_cfg, TASK)


# ---------------------------------------------------------------- preflight checks


def check_windows(session: Any) -> Any:
    """How many windows the examples became and how many of the train windows hold their answer (not CLS)."""
    from loralab.checks.report import verdict

    train = session.data.train
    holding = sum(1 for f in train.features if f["start_positions"] or f["end_positions"])
    details = {"train_examples": train.n_examples, "train_windows": len(train), "windows_with_answer": holding,
               "max_length": session.config.data.max_length, "doc_stride": session.config.data.doc_stride}
    problems = []
    train_cfg = session.config.train
    if train_cfg.eval_generate or train_cfg.metric_for_best_model != "eval_loss":
        problems.append(("fail", "train.eval_generate and generation metrics for train.metric_for_best_model need a "
                                 "text-generation run; a QUESTION_ANSWERING run keeps the best eval_loss and is scored "
                                 "by `loralab eval` (exact match / F1)"))
    if not holding:
        problems.append(("fail", "no train window holds its answer: every target is the CLS token"))
    return verdict("qa_windows", problems, f"{train.n_examples} train examples in {len(train)} windows, "
                                           f"{holding} holding their answer", details)


def check_qa_loss(session: Any, fast: bool = False) -> Any:
    """The span loss on the first train batch: finite, with a gradient on the LoRA weights and the head."""
    from torch.utils.data import DataLoader

    from loralab.checks.model import device_of, to_device, untouched
    from loralab.checks.report import CheckResult

    model = session.model
    size = min(session.config.train.batch_size, len(session.data.train))
    batch = next(iter(DataLoader(session.data.train, batch_size=size, collate_fn=session.collator)))
    with untouched(model):
        model.train()
        loss = model(**to_device(dict(batch), device_of(model))).loss
        if not torch.isfinite(loss):
            return CheckResult("loss", "fail", f"the span loss on the first batch is {loss.item()}", {"loss": loss.item()})
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
        flowing = sum(1 for g in grads if g is not None and g.abs().sum() > 0)
    details = {"loss": round(loss.item(), 4), "batch_size": size, "tensors_with_gradient": flowing,
               "trainable_tensors": len(grads)}
    if not flowing:
        return CheckResult("loss", "fail", "no trainable weight gets a gradient from the span loss", details)
    return CheckResult("loss", "pass", f"span loss {loss.item():.4f} on a batch of {size}; gradients reach {flowing} "
                                       f"of {len(grads)} trainable tensors", details)


def session_checks() -> tuple[list[Any], list[Any]]:
    """The data checks and model checks of a QUESTION_ANSWERING session (the generation-oriented ones do not apply)."""
    from loralab.checks.data import check_hyperparameters
    from loralab.checks.model import check_targets

    return [check_windows, check_hyperparameters], [check_targets, check_qa_loss]
