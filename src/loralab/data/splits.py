"""The examples of each split: every source read and validated once into an Arrow table (cached by its content),
mixed (``data.sources``), then split into train / eval / test by ``data.seed``.

The test split (``data.test_path``, or ``data.test_split`` of the data taken out first) is held out from training,
checkpoint choice, early stopping and searches; only ``loralab eval --split test`` reads it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from loralab.config import DataConfig
from loralab.data.cache import cached, key_of
from loralab.data.sources import Source, main_sources, mixture_counts, parse_source, pick_rows, source_fingerprint, source_rows
from loralab.data.tables import ExampleView, open_table, write_examples
from loralab.errors import DataError
from loralab.formats import Example

PARSE_FIELDS = ("format", "prompt_field", "response_field", "input_field", "messages_field", "conversations_field",
                "text_field", "label_field", "anchor_field", "positive_field", "question_field", "context_field",
                "answer_field", "tokens_field", "tags_field", "tag_names")  # the data config fields that decide how rows become examples


class Splits(NamedTuple):
    """The examples of each split: ``train`` (trained on), ``eval`` (loss, checkpoint choice, early stopping,
    searches) and ``test`` (held out from all of them; only ``loralab eval --split test`` reads it)."""

    train: Sequence[Example]
    eval: Sequence[Example]
    test: Sequence[Example]


def hold_out(examples: Sequence[Any], seed: int, eval_split: float = 0.0, test_split: float = 0.0) -> Splits:
    """Shuffle with a fixed seed; the first ``test_split`` of the shuffled examples is the test split, the next
    ``eval_split`` (both shares of all the examples, at least one each when > 0) the eval split, the rest train.
    The test split depends only on the seed, the data and ``test_split``; with ``test_split`` 0 the eval split is the
    one ``split_examples`` always made."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)

    def count(share: float) -> int:
        return 0 if share == 0 else max(1, round(len(examples) * share))

    n_test, n_eval = count(test_split), count(eval_split)
    parts = order[:n_test], order[n_test : n_test + n_eval], order[n_test + n_eval :]
    test_part, eval_part, train_part = ([examples[i] for i in part] for part in parts)
    if not train_part:
        shares = f"data.eval_split={eval_split}" + (f" and data.test_split={test_split}" if test_split else "")
        raise DataError(f"the training split is empty: {len(examples)} examples with {shares}; add data or hold out less")
    return Splits(train_part, eval_part, test_part)


def split_examples(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with a fixed seed and hold out ``eval_split`` of the examples (at least one when > 0)."""
    train_part, eval_part, _ = hold_out(examples, seed, eval_split)
    return list(train_part), list(eval_part)


# ---------------------------------------------------------------- tables of examples


def examples_key(source: Source, cfg: DataConfig, task_type: str) -> str:
    """What a source's examples depend on: its content and how it is read (a file's extension: .csv and .tsv read the
    same bytes differently), the parsing settings and the task type. A file moved or copied keeps its key."""
    found = source_fingerprint(source)
    if not source.is_hub:
        found = {"sha256": found["sha256"], "reader": "folder" if Path(source.path).is_dir() else
                 Path(source.path).suffix.lower()}
    return key_of("examples", found, {name: getattr(cfg, name) for name in PARSE_FIELDS}, task_type)


def source_table(source: Source, cfg: DataConfig, task_type: str) -> Any:
    """A source's validated examples as a memory-mapped Dataset (read and validated once per content)."""
    def build(staging: Any) -> dict[str, Any]:
        count = write_examples(source_rows(source), cfg, source.label, task_type, staging / "examples.arrow")
        return {"source": source.label, "examples": count}

    folder = cached(f"examples-{examples_key(source, cfg, task_type)}", build)
    return open_table([folder / "examples.arrow"])


def main_table(cfg: DataConfig, task_type: str) -> tuple[Any, list[int] | None]:
    """The examples of ``data.path`` or the mixture of ``data.sources``, and for a mixture each row's source index."""
    from datasets import concatenate_datasets

    sources = main_sources(cfg)
    tables = [source_table(s, cfg, task_type) for s in sources]
    counts = mixture_counts(sources, [len(t) for t in tables])
    picked = [t if c == len(t) else t.select(pick_rows(len(t), c, cfg.seed, i), keep_in_memory=True)
              for i, (t, c) in enumerate(zip(tables, counts))]
    if len(sources) == 1:
        return picked[0], None
    if not any(counts):
        raise DataError("data.sources: the mix is empty (every source gives 0 rows)")
    return concatenate_datasets([p for p in picked if len(p)]), [i for i, c in enumerate(counts) for _ in range(c)]


def file_table(path: str, cfg: DataConfig, task_type: str) -> Any:
    return source_table(parse_source(path), cfg, task_type)


def split_tables(cfg: DataConfig, task_type: str) -> dict[str, tuple[Any, list[int] | None]]:
    """``train`` / ``eval`` / ``test``: each split's table and (for a mixture) its rows' source indices."""
    main, ids = main_table(cfg, task_type)
    index = hold_out(range(len(main)), cfg.seed, 0.0 if cfg.eval_path else cfg.eval_split, cfg.test_split)

    def part(rows: list[int]) -> tuple[Any, list[int] | None]:
        return main.select(rows, keep_in_memory=True), None if ids is None else [ids[i] for i in rows]

    return {"train": part(index.train),
            "eval": (file_table(cfg.eval_path, cfg, task_type), None) if cfg.eval_path else part(index.eval),
            "test": (file_table(cfg.test_path, cfg, task_type), None) if cfg.test_path else part(index.test)}


# ---------------------------------------------------------------- the examples as lists


def load_examples(cfg: DataConfig, task_type: str, path: str | None = None) -> list[Example]:
    """Every validated example of ``path``, else of the configured data (the bundled demo when none is configured)."""
    if path is not None:
        return list(ExampleView(file_table(path, cfg, task_type)))
    return list(ExampleView(*main_table(cfg, task_type)))


def load_all_splits(cfg: DataConfig, task_type: str) -> Splits:
    """Train, eval and test examples (list-like views of Arrow tables). The test split is ``data.test_path``, or
    ``data.test_split`` of the data (taken out first); the eval split ``data.eval_path``, or ``data.eval_split`` of
    the data; train the rest."""
    parts = split_tables(cfg, task_type)
    return Splits(*(ExampleView(*parts[name]) for name in ("train", "eval", "test")))


def load_splits(cfg: DataConfig, task_type: str) -> tuple[Sequence[Example], Sequence[Example]]:
    """Train and eval examples (the test split is left out: see ``load_all_splits``)."""
    train_part, eval_part, _ = load_all_splits(cfg, task_type)
    return train_part, eval_part
