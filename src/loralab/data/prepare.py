"""Prepared data for the Trainer: each split tokenized with ``datasets.map`` (batched, ``data.num_proc`` processes)
into Arrow files cached on disk, so a second ``train`` / ``check`` of the same data and tokenizer skips tokenizing;
the datasets the Trainer reads, raw text packed into full rows; the collator.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from loralab.config import DataConfig
from loralab.data.cache import cached, default_num_proc, key_of, read_meta, tokenizer_fingerprint
from loralab.data.sources import main_sources, parse_source
from loralab.data.splits import examples_key, split_tables
from loralab.data.tables import (EXAMPLE_COLUMNS, TOKEN_COLUMNS, ExampleView, TableView, example_features, open_table,
                                 row_ids, to_example, token_features)
from loralab.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize, tokenize_text, vocabulary_of
from loralab.formats import Example
from loralab.templates import uses_chat_template

log = logging.getLogger(__name__)
SPLITS = ("train", "eval", "test")
UNLIMITED = 10**9


class TokenizedView(TableView):
    """Tokenized examples stored in an Arrow table, made into ``TokenizedExample`` on demand."""

    columns = TOKEN_COLUMNS

    def make(self, record: dict[str, Any], index: int) -> TokenizedExample:
        return TokenizedExample(
            input_ids=record["input_ids"], labels=record["labels"], prompt_length=record["prompt_length"],
            response_length=record["response_length"], truncated=record["truncated"],
            response_truncated=record["response_truncated"], decoder_length=record["decoder_length"],
            turns=list(zip(record["turn_starts"], record["turn_ends"])), last_turn_only=record["last_turn_only"])


def _total(tokenized: Sequence[TokenizedExample], column: str) -> int:
    if isinstance(tokenized, TokenizedView):
        return int(sum(tokenized.column(column)))
    if column == "supervised":
        return sum(sum(1 for x in t.labels if x != IGNORE_INDEX) for t in tokenized)
    return sum(int(getattr(t, column)) for t in tokenized)


# ---------------------------------------------------------------- datasets for the Trainer


class FeatureDataset(torch.utils.data.Dataset):
    """Model inputs read from the tokenized table (or a list of ``TokenizedExample``); the collator pads each batch."""

    def __init__(self, tokenized: Sequence[TokenizedExample], task_type: str):
        self.tokenized = tokenized
        self.task_type = task_type
        self._table = (tokenized.table.select_columns(["input_ids", "labels"])
                       if isinstance(tokenized, TokenizedView) else None)

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._table is not None:
            record = self._table[index]
            ids, labels = record["input_ids"], record["labels"]
        else:
            item = self.tokenized[index]
            ids, labels = item.input_ids, item.labels
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": labels[0] if self.task_type == "SEQ_CLS" else labels}

    def lengths(self) -> list[int]:
        if isinstance(self.tokenized, TokenizedView):
            return self.tokenized.column("length")
        return [len(t.input_ids) + t.decoder_length for t in self.tokenized]


class PackedTextDataset(FeatureDataset):
    """Raw text documents (each BOS ... EOS, as tokenized) joined one after another and cut into rows of ``length``
    tokens (the last row holds what is left), every token supervised but each row's first, which nothing precedes;
    ``tokenized`` stays one item per document."""

    def __init__(self, tokenized: Sequence[TokenizedExample], length: int):
        super().__init__(tokenized, "CAUSAL_LM")
        self.length = length
        self.ends = list(accumulate(_lengths(tokenized)))  # where each document ends in the joined stream
        self.total = self.ends[-1] if self.ends else 0

    def __len__(self) -> int:
        return -(-self.total // self.length)

    def _ids(self, doc: int) -> list[int]:
        return self._table[doc]["input_ids"] if self._table is not None else self.tokenized[doc].input_ids

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, stop = index * self.length, min((index + 1) * self.length, self.total)
        ids: list[int] = []
        doc = bisect.bisect_right(self.ends, start)
        while len(ids) < stop - start:
            begin = self.ends[doc - 1] if doc else 0
            ids += self._ids(doc)[max(0, start - begin) : stop - begin]
            doc += 1
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] + ids[1:]}

    def lengths(self) -> list[int]:
        return [min(self.length, self.total - i * self.length) for i in range(len(self))]


def _lengths(tokenized: Sequence[TokenizedExample]) -> list[int]:
    return tokenized.column("length") if isinstance(tokenized, TokenizedView) else [len(t.input_ids) for t in tokenized]


@dataclass
class PreparedData:
    """Train and eval examples, their tokenized features, and what tokenization had to cut; the test examples
    (held out, never tokenized for training)."""

    train_examples: Sequence[Example]
    eval_examples: Sequence[Example]
    train: FeatureDataset
    eval: FeatureDataset | None
    label_ids: dict[str, int] | None = None
    test_examples: Sequence[Example] = field(default_factory=list)

    def _parts(self) -> list[Sequence[TokenizedExample]]:
        return [self.train.tokenized] + ([self.eval.tokenized] if self.eval is not None else [])

    def truncation_counts(self) -> dict[str, int]:
        return {"truncated_examples": sum(_total(t, "truncated") for t in self._parts()),
                "truncated_responses": sum(_total(t, "response_truncated") for t in self._parts())}

    def supervised_tokens(self) -> int:
        return _total(self.train.tokenized, "supervised")


# ---------------------------------------------------------------- tokenizing whole splits


def _tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer: Any, cfg: DataConfig, task_type: str,
                    label_ids: dict[str, int] | None, sources: list[int] | None, pack: bool) -> dict[str, list]:
    """``tokenize`` on each example of a batch (the same function, so masks are token for token what it gives)."""
    out: dict[str, list] = {name: [] for name in ("source", *TOKEN_COLUMNS)}
    unlimited = cfg.model_copy(update={"max_length": UNLIMITED}) if pack else cfg
    for n, index in enumerate(indices):
        example = to_example({name: batch[name][n] for name in EXAMPLE_COLUMNS})
        item = tokenize_text(tokenizer, example, unlimited) if pack else tokenize(tokenizer, example, cfg, task_type, label_ids)
        out["source"].append(batch["source"][n] if sources is None else sources[index])
        out["input_ids"].append(item.input_ids)
        out["labels"].append(item.labels)
        for name in ("prompt_length", "response_length", "truncated", "response_truncated", "decoder_length",
                     "last_turn_only"):
            out[name].append(getattr(item, name))
        out["turn_starts"].append([start for start, _ in item.turns])
        out["turn_ends"].append([end for _, end in item.turns])
        out["length"].append(len(item.input_ids) + item.decoder_length)
        out["supervised"].append(sum(1 for x in item.labels if x != IGNORE_INDEX))
    return out


def _with_sources(batch: dict[str, list], indices: list[int], sources: list[int] | None) -> dict[str, list]:
    return {"source": batch["source"] if sources is None else [sources[i] for i in indices]}


@contextlib.contextmanager
def _progress(shown: bool) -> Iterator[None]:
    """``datasets``' progress bars only for data worth watching."""
    from datasets.utils import logging as datasets_logging

    was = datasets_logging.is_progress_bar_enabled()
    (datasets_logging.enable_progress_bar if shown and was else datasets_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (datasets_logging.enable_progress_bar if was else datasets_logging.disable_progress_bar)()


def prepared_key(cfg: DataConfig, tokenizer: Any, task_type: str) -> str:
    """Everything a prepared entry depends on: the sources' examples, the data config, the tokenizer, the task."""
    sources = [examples_key(s, cfg, task_type) for s in main_sources(cfg)]
    files = {role: examples_key(parse_source(path), cfg, task_type)
             for role, path in (("eval", cfg.eval_path), ("test", cfg.test_path)) if path}
    settings = cfg.model_dump(mode="json", exclude={"path", "eval_path", "test_path", "num_proc"})
    for entry in settings.get("sources") or []:
        entry.pop("path", None)
    return key_of("prepared", sources, files, settings, tokenizer_fingerprint(tokenizer), task_type)


def _build(staging: Path, cfg: DataConfig, tokenizer: Any, task_type: str, key: str) -> dict[str, Any]:
    parts = split_tables(cfg, task_type)
    label_ids = None
    if task_type == "SEQ_CLS":
        label_ids = vocabulary_of(r for name in ("train", "eval") for r in ExampleView(parts[name][0]).column("response"))
    if task_type == "TOKEN_CLS":  # the tags of every word, as SEQ_CLS labels
        from loralab.tasks.token_cls import tag_vocabulary

        label_ids = tag_vocabulary(r for name in ("train", "eval") for r in ExampleView(parts[name][0]).column("response"))
    meta: dict[str, Any] = {"label_ids": label_ids, "files": {}, "packed": {}}
    for name in SPLITS:
        table, sources = parts[name]
        if not len(table):
            meta["files"][name] = []
            continue
        raw = ExampleView(table).column("raw_text")
        pack = name != "test" and task_type == "CAUSAL_LM" and cfg.pack_text and all(raw)
        with _progress(len(table) >= 5000):
            if name == "test":  # held out: its examples only
                done = table.map(_with_sources, batched=True, with_indices=True, fn_kwargs={"sources": sources},
                                 features=example_features(), cache_file_name=str(staging / "test.arrow"),
                                 new_fingerprint=f"{key}-test", load_from_cache_file=False)
            else:
                processes = default_num_proc(len(table), cfg.num_proc)
                if processes > 1:  # forked tokenizing processes: no Rust threads in the parent before the fork
                    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                done = table.map(_tokenize_batch, batched=True, with_indices=True, features=token_features(),
                                 fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "task_type": task_type,
                                            "label_ids": label_ids, "sources": sources, "pack": pack},
                                 num_proc=processes, desc=f"tokenizing {name}",
                                 cache_file_name=str(staging / f"{name}.arrow"), new_fingerprint=f"{key}-{name}",
                                 load_from_cache_file=False)
        meta["files"][name] = [Path(f["filename"]).name for f in done.cache_files]
        meta["packed"][name] = pack
    return meta


def prepare_data(cfg: DataConfig, tokenizer: Any, task_type: str) -> PreparedData:
    """Load, validate, split and tokenize the configured data, or read it back from the cache when the same data was
    prepared with the same settings and tokenizer before."""
    if task_type == "QUESTION_ANSWERING":  # windows of (question, context), start / end positions: loralab.tasks.qa
        from loralab.tasks.qa import prepare_qa

        return prepare_qa(cfg, tokenizer)
    uses_chat_template(tokenizer, cfg)  # a named data.template is set on the tokenizer before it is fingerprinted
    key = prepared_key(cfg, tokenizer, task_type)
    folder = cached(f"prepared-{key}", lambda staging: _build(staging, cfg, tokenizer, task_type, key))
    meta = read_meta(folder)
    tables = {name: open_table([folder / f for f in files]) if files else None for name, files in meta["files"].items()}

    def features(name: str) -> FeatureDataset | None:
        if tables[name] is None:
            return None
        view = TokenizedView(tables[name])
        return PackedTextDataset(view, cfg.max_length) if meta["packed"][name] else FeatureDataset(view, task_type)

    def examples(name: str) -> Sequence[Example]:
        return ExampleView(tables[name]) if tables[name] is not None else []

    train = features("train")
    if train is None:
        raise ValueError(f"prepared data {folder} has no train split")  # hold_out refuses an empty train split
    prepared = PreparedData(examples("train"), examples("eval"), train, features("eval"), meta["label_ids"],
                            examples("test"))
    _warn_last_turn_only(prepared, cfg)
    return prepared


def _warn_last_turn_only(prepared: PreparedData, cfg: DataConfig) -> None:
    """One warning per reason when data.train_on is all_turns but conversations had only their last answer supervised."""
    if cfg.train_on != "all_turns":
        return
    rows: dict[str, list[Any]] = {}
    parts = [(prepared.train_examples, prepared.train.tokenized)]
    if prepared.eval is not None:
        parts.append((prepared.eval_examples, prepared.eval.tokenized))
    for examples, tokenized in parts:
        reasons = tokenized.column("last_turn_only") if isinstance(tokenized, TokenizedView) else \
            [t.last_turn_only for t in tokenized]
        for row, why in zip(row_ids(examples), reasons):
            if why:
                rows.setdefault(why, []).append(row)
    for why, found in rows.items():
        found = sorted(found, key=lambda r: r if isinstance(r, list) else [-1, r])
        shown = ", ".join(map(str, found[:5])) + (f", ... (+{len(found) - 5} more)" if len(found) > 5 else "")
        log.warning("data.train_on all_turns: only the last answer is supervised in %d conversations (rows %s): %s",
                    len(found), shown, why)


def make_collator(tokenizer: Any, task_type: str, model: Any = None) -> Any:
    """Dynamic padding per batch: pad ids and attention 0 for inputs, -100 for labels."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task_type in ("SEQ_CLS", "QUESTION_ANSWERING"):  # QA: start / end positions are one number per window
        return DataCollatorWithPadding(tokenizer)
    if task_type == "FEATURE_EXTRACTION":  # anchors and positives padded apart
        from loralab.tasks.embeddings import PairCollator

        return PairCollator(tokenizer)
    if task_type == "TOKEN_CLS":  # labels padded with -100
        from loralab.tasks.token_cls import make_token_collator

        return make_token_collator(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, model=model if task_type == "SEQ_2_SEQ_LM" else None,
                                  label_pad_token_id=IGNORE_INDEX, padding=True)
