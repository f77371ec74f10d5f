"""TOKEN_CLS runs (token classification, e.g. named entities): rows, label alignment, the base model, preflight checks.

- Data: one row per sentence, a list of words (``data.tokens_field``, default ``tokens``) and one tag per word
  (``data.tags_field``, default ``tags``; HF datasets' ``ner_tags`` is taken when ``tags`` is absent). Tags are text
  (``B-PER``, ``I-LOC``, ``O``) or integers (named by ``data.tag_names`` when given, e.g. a ClassLabel's names). An
  example keeps the words as JSON in ``prompt`` and the tags as JSON in ``response`` (so the cached Arrow tables of
  ``loralab.data`` hold them); the tag vocabulary is built as SEQ_CLS builds its labels (``adapter/labels.json``).
- Tokenized with ``is_split_into_words=True``: the first sub-token of each word carries its tag id, continuation
  pieces and special tokens -100 (the transformers token-classification convention); padded by
  ``DataCollatorForTokenClassification``.
- The model is ``AutoModelForTokenClassification`` (a new head sized by the tags), PEFT ``TaskType.TOKEN_CLS``
  (the ``classifier`` head trained and saved in ``modules_to_save``).
Predictions, scores (token accuracy, entity F1) and printing live in :mod:`loralab.tasks.token_eval`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from loralab.errors import LoralabError
from loralab.formats import Example, _row_error

TASK = "TOKEN_CLS"
HF_TAGS_FIELD = "ner_tags"  # HF datasets' name (CoNLL-2003, WikiANN), taken when data.tags_field's default is absent
IGNORE_INDEX = -100


# ---------------------------------------------------------------- rows


def tags_field_of(record: dict, cfg: Any) -> str:
    """The field holding a row's tags: ``data.tags_field``, or ``ner_tags`` when the default ``tags`` is absent."""
    if cfg.tags_field not in record and cfg.tags_field == "tags" and HF_TAGS_FIELD in record:
        return HF_TAGS_FIELD
    return cfg.tags_field


def is_token_record(record: Any, cfg: Any) -> bool:
    """A row with a list of words and a list of tags of the same length."""
    if not isinstance(record, dict):
        return False
    words, tags = record.get(cfg.tokens_field), record.get(tags_field_of(record, cfg))
    return isinstance(words, list) and isinstance(tags, list) and len(words) == len(tags) and bool(words)


def _tag_name(tag: Any, cfg: Any, path: str, row: int, name: str, i: int) -> str:
    if isinstance(tag, bool) or tag is None or (isinstance(tag, float) and not tag.is_integer()):
        raise _row_error(path, row, f"field {name!r}, word {i}: tag {tag!r} should be text (B-PER, O) or an integer")
    if isinstance(tag, (int, float)):
        tag = int(tag)
        if cfg.tag_names is None:
            return str(tag)
        if not 0 <= tag < len(cfg.tag_names):
            raise _row_error(path, row, f"field {name!r}, word {i}: tag {tag} is outside data.tag_names "
                                        f"(0..{len(cfg.tag_names) - 1})")
        return cfg.tag_names[tag]
    if not isinstance(tag, str) or not tag.strip():
        raise _row_error(path, row, f"field {name!r}, word {i}: tag {tag!r} should be non-empty text or an integer")
    return tag.strip()


def parse_token_record(record: Any, cfg: Any, path: str, row: int, need_tags: bool = True) -> Example:
    """One sentence row validated into an Example (words and tags as JSON); every error names file, row and field."""
    if not isinstance(record, dict):
        raise _row_error(path, row, f"expected an object with fields, got {type(record).__name__}")
    found = ", ".join(repr(k) for k in record) or "none"
    name = cfg.tokens_field
    if name not in record:
        raise _row_error(path, row, f"missing field {name!r} (the sentence's words); found {found} "
                                    "(set data.tokens_field)")
    words = record[name]
    if not isinstance(words, list):
        raise _row_error(path, row, f"field {name!r} should be a list of words, got {type(words).__name__}")
    if not words:
        raise _row_error(path, row, f"field {name!r} is an empty sentence (no words)")
    for i, word in enumerate(words, start=1):
        if isinstance(word, bool) or not isinstance(word, (str, int, float)) or not str(word).strip():
            raise _row_error(path, row, f"field {name!r}, word {i}: {word!r} should be a non-empty word")
    words = [str(w).strip() for w in words]
    tags_name = tags_field_of(record, cfg)
    if tags_name not in record:
        if not need_tags:
            return Example(prompt=json.dumps(words, ensure_ascii=False), response="", row=row)
        raise _row_error(path, row, f"missing field {tags_name!r} (one tag per word); found {found} "
                                    "(set data.tags_field)")
    tags = record[tags_name]
    if not isinstance(tags, list):
        raise _row_error(path, row, f"field {tags_name!r} should be a list of tags, got {type(tags).__name__}")
    if len(tags) != len(words):
        raise _row_error(path, row, f"field {tags_name!r} has {len(tags)} tags but {name!r} has {len(words)} words; "
                                    "give one tag per word")
    names = [_tag_name(tag, cfg, path, row, tags_name, i) for i, tag in enumerate(tags, start=1)]
    return Example(prompt=json.dumps(words, ensure_ascii=False), response=json.dumps(names, ensure_ascii=False), row=row)


def parse_token_rows(rows: Sequence[tuple[int, Any]], cfg: Any, path: str, need_tags: bool = True) -> list[Example]:
    return [parse_token_record(record, cfg, path, row, need_tags) for row, record in rows]


def words_and_tags(example: Example) -> tuple[list[str], list[str]]:
    """The words and tags of a TOKEN_CLS example (tags empty when it has none)."""
    try:
        words = json.loads(example.prompt)
        tags = json.loads(example.response) if example.response else []
    except ValueError:
        raise LoralabError(f"row {example.row} is not a TOKEN_CLS example (no word list)") from None
    if not isinstance(words, list) or not isinstance(tags, list):
        raise LoralabError(f"row {example.row} is not a TOKEN_CLS example (no word list)")
    return [str(w) for w in words], [str(t) for t in tags]


def tag_vocabulary(responses: Iterable[str]) -> dict[str, int]:
    """Tag names to ids 0..n-1 over every sentence's tags (sorted as SEQ_CLS sorts its labels)."""
    from loralab.data.tokenize import vocabulary_of

    return vocabulary_of(tag for response in responses if response for tag in json.loads(response))


def detect_token_cls(config: Any, found: str) -> str | None:
    """TOKEN_CLS when ``model.task_type`` is unset, the first row of ``data.path`` has a word list and a tag list of
    the same length, and the model is an encoder (``found`` SEQ_CLS); a clear error for such rows on another model."""
    from loralab.tasks import encoder_task_for_rows

    cfg = config.data
    return encoder_task_for_rows(config, found, TASK, lambda record: (
        f"{cfg.tokens_field!r} / {tags_field_of(record, cfg)!r} rows (token classification)"
        if is_token_record(record, cfg) else None))


# ---------------------------------------------------------------- tokens


def encode_words(tokenizer: Any, words: Sequence[str], max_length: int) -> tuple[list[int], list[int | None]]:
    """Token ids of a sentence split into words (special tokens added, cut at ``max_length``) and each token's word
    index (None for special tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LoralabError(f"TOKEN_CLS needs a fast tokenizer (word ids of each token); {type(tokenizer).__name__} "
                           "is not one")
    encoded = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=max_length)
    return list(encoded["input_ids"]), list(encoded.word_ids())


def first_tokens(word_ids: Sequence[int | None]) -> dict[int, int]:
    """Each word's first token position (words cut off by truncation are absent)."""
    firsts: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None and word not in firsts:
            firsts[word] = position
    return firsts


def tokenize_token_cls(tokenizer: Any, example: Example, cfg: Any, label_ids: dict[str, int]) -> Any:
    """Token ids and labels: each word's first sub-token its tag id, every other position -100."""
    from loralab.data.tokenize import TokenizedExample

    words, tags = words_and_tags(example)
    ids, word_ids = encode_words(tokenizer, words, cfg.max_length)
    labels = [IGNORE_INDEX] * len(ids)
    firsts = first_tokens(word_ids)
    for word, position in firsts.items():
        labels[position] = label_ids[tags[word]]
    truncated = len(firsts) < len(words)
    return TokenizedExample(input_ids=ids, labels=labels, prompt_length=len(ids), response_length=len(words),
                            truncated=truncated, response_truncated=truncated)


def make_token_collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)


def load_token_base(run_dir: str | Path, adapter_path: Path, config: Any, model_cfg: Any) -> Any:
    """The base token classifier of a run: a head with one output per tag, named by them, initialised from
    ``train.seed`` as training initialised it."""
    from loralab.classification import read_labels, set_labels
    from loralab.models import load_model

    labels = read_labels(run_dir, adapter_path, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        base = load_model(model_cfg, TASK, num_labels=len(labels))
    set_labels(base, labels)
    return base


# ---------------------------------------------------------------- preflight checks


def check_token_labels(session: Any) -> Any:
    """Every word's first sub-token labelled, continuation pieces and special tokens -100, words lost to truncation,
    at least two tags in train, eval tags that train never shows."""
    from loralab.checks.data import row_list, splits, where
    from loralab.checks.report import verdict

    tok = session.tokenizer
    special = set(tok.all_special_ids)
    problems: list[tuple[str, str]] = []
    found: dict[str, list[str]] = {"no_word": [], "special_labelled": [], "misaligned": [], "truncated": []}
    words_total = labelled_total = 0
    tags_by_split: dict[str, Counter] = {}
    for split, examples, tokenized in splits(session):
        counts: Counter = Counter()
        for example, t in zip(examples, tokenized):
            here = where(split, example)
            words, tags = words_and_tags(example)
            counts.update(tags)
            labelled = [i for i, label in enumerate(t.labels) if label != IGNORE_INDEX]
            words_total += len(words)
            labelled_total += len(labelled)
            if not labelled:
                found["no_word"].append(here)
            if any(t.input_ids[i] in special for i in labelled):
                found["special_labelled"].append(here)
            if len(labelled) > len(words) or len(t.labels) != len(t.input_ids):
                found["misaligned"].append(here)
            elif len(labelled) < len(words):
                found["truncated"].append(here)
        tags_by_split[split] = counts
    if tok.pad_token_id is None:
        problems.append(("fail", "the tokenizer has no pad token: batches cannot be padded"))
    messages = {"no_word": "have no labelled word", "special_labelled": "have a special token labelled",
                "misaligned": "have more labelled tokens than words"}
    for key, message in messages.items():
        if found[key]:
            problems.append(("fail", f"{len(found[key])} examples {message} (rows {row_list(found[key])})"))
    if found["truncated"]:
        problems.append(("warn", f"{len(found['truncated'])} sentences lose words to data.max_length="
                                 f"{session.config.data.max_length} (rows {row_list(found['truncated'])}): those words "
                                 "are neither trained nor predicted (tagged O)"))
    train_tags = tags_by_split.get("train", Counter())
    if len(train_tags) < 2:
        problems.append(("fail", f"the train split has a single tag ({next(iter(train_tags), None)}): nothing to tell apart"))
    unseen = sorted(set(tags_by_split.get("eval", Counter())) - set(train_tags))
    if unseen:
        problems.append(("warn", f"eval tags {unseen} never occur in train: the head learns nothing for them"))
    details = {"words": words_total, "labelled_tokens": labelled_total, "tags": dict(train_tags),
               "rows": {k: v for k, v in found.items() if v}}
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(train_tags.items()))
    ok = (f"{words_total} words, each word's first sub-token labelled, continuation pieces and special tokens -100; "
          f"{len(train_tags)} tags in train ({shown})")
    return verdict("token_labels", problems, ok, details)


def session_checks() -> tuple[list[Any], list[Any]]:
    """The data checks and model checks of a TOKEN_CLS session (the generation-oriented ones do not apply)."""
    from loralab.checks.data import check_hyperparameters
    from loralab.checks.model import check_data_flow, check_loss, check_targets

    return [check_token_labels, check_hyperparameters], [check_targets, check_data_flow, check_loss]
