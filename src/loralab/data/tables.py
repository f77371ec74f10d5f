"""Examples and their token ids as Arrow tables on disk (memory-mapped ``datasets.Dataset``), and list-like views.

``write_examples`` validates rows chunk by chunk into an Arrow file (memory stays flat however large the source);
``ExampleView`` / ``TokenizedView`` read them back as ``Example`` / ``TokenizedExample`` on demand, so code written
for lists (``len``, indexing, slicing, iteration) works on hundreds of thousands of rows without holding them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterable, Iterator

from loralab.config import DataConfig
from loralab.errors import DataError
from loralab.formats import Example, FormatStream, empty_answer_error, parse_rows, where

CHUNK_ROWS = 2000  # rows validated and written at a time
EXAMPLE_COLUMNS = ("source", "row", "prompt", "response", "messages", "raw_text")
TOKEN_COLUMNS = ("input_ids", "labels", "prompt_length", "response_length", "truncated", "response_truncated",
                 "decoder_length", "turn_starts", "turn_ends", "last_turn_only", "length", "supervised")


@functools.lru_cache(maxsize=1)
def example_features() -> Any:
    from datasets import Features, List, Value

    return Features({"source": Value("int32"), "row": Value("int64"), "prompt": Value("string"),
                     "response": Value("string"), "messages": List({"role": Value("string"), "content": Value("string")}),
                     "raw_text": Value("bool")})


@functools.lru_cache(maxsize=1)
def token_features() -> Any:
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features({**example_features(), "input_ids": ints, "labels": ints, "prompt_length": Value("int32"),
                     "response_length": Value("int32"), "truncated": Value("bool"), "response_truncated": Value("bool"),
                     "decoder_length": Value("int32"), "turn_starts": ints, "turn_ends": ints,
                     "last_turn_only": Value("string"), "length": Value("int32"), "supervised": Value("int32")})


def _chunks(rows: Iterable[tuple[int, Any]], size: int) -> Iterator[list[tuple[int, Any]]]:
    chunk: list[tuple[int, Any]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def example_columns(examples: Sequence[Example]) -> dict[str, list]:
    return {"source": [-1 if e.source is None else e.source for e in examples], "row": [e.row for e in examples],
            "prompt": [e.prompt for e in examples], "response": [e.response for e in examples],
            "messages": [e.messages for e in examples], "raw_text": [e.raw_text for e in examples]}


def write_examples(rows: Iterable[tuple[int, Any]], cfg: DataConfig, label: str, task_type: str, target: Path) -> int:
    """Validate rows (errors name ``label`` and the row) into the Arrow file ``target``; the number of examples."""
    from datasets.arrow_writer import ArrowWriter

    stream = FormatStream(cfg, label)
    writer = ArrowWriter(features=example_features(), path=str(target), writer_batch_size=CHUNK_ROWS)
    try:
        for chunk in _chunks(rows, CHUNK_ROWS):
            fmt = "pairs" if task_type in ("SEQ_CLS", "FEATURE_EXTRACTION", "QUESTION_ANSWERING", "TOKEN_CLS") \
                else stream.update(chunk)
            examples = parse_rows(chunk, cfg, label, task_type, fmt)
            for example in examples:  # a conversation's answer to train on must have text
                error = empty_answer_error(example, cfg, label, fmt)
                if error:
                    raise error
            writer.write_batch(example_columns(examples))
        count, _ = writer.finalize()
    finally:
        writer.close()
    if not count:
        raise DataError(f"{where(label)}: no examples found (the dataset is empty)")
    return count


def open_table(files: Sequence[Path | str]) -> Any:
    """The Arrow files of one table (several when written by several processes), memory-mapped, as one Dataset."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(f)) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def to_example(record: dict[str, Any], source: int | None = None) -> Example:
    found = record.get("source", -1) if source is None else source
    return Example(prompt=record["prompt"], response=record["response"], row=record["row"],
                   messages=[dict(m) for m in record["messages"] or []], raw_text=bool(record["raw_text"]),
                   source=None if found is None or found < 0 else int(found))


def _records(batch: dict[str, list]) -> Iterator[dict[str, Any]]:
    names = list(batch)
    for values in zip(*(batch[name] for name in names)):
        yield dict(zip(names, values))


class TableView(Sequence):
    """A list-like view of some columns of a ``datasets.Dataset``, each row made into an object on demand."""

    columns: tuple[str, ...] = ()
    batch = 1000

    def __init__(self, table: Any):
        self.table = table.select_columns([c for c in self.columns if c in table.column_names])

    def make(self, record: dict[str, Any], index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.make(self.table[index], index)

    def __iter__(self) -> Iterator[Any]:
        index = 0
        for batch in self.table.iter(batch_size=self.batch):
            for record in _records(batch):
                yield self.make(record, index)
                index += 1

    def __add__(self, other: Iterable[Any]) -> list[Any]:
        return list(self) + list(other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def column(self, name: str) -> list[Any]:
        """One column's values for every row, read from Arrow (no objects made per row; a selection of rows is taken
        from the memory-mapped column alone, where datasets' own slicing would gather whole rows)."""
        values = self.table.data.column(name)
        indices = self.table._indices  # the rows of a select(); None for a table of its own
        return (values if indices is None else values.take(indices.column(0))).to_pylist()


class ExampleView(TableView):
    """Examples stored in an Arrow table; ``sources`` (one per row) overrides the table's ``source`` column."""

    columns = EXAMPLE_COLUMNS

    def __init__(self, table: Any, sources: Sequence[int] | None = None):
        super().__init__(table)
        self.sources = sources

    def make(self, record: dict[str, Any], index: int) -> Example:
        return to_example(record, None if self.sources is None else int(self.sources[index]))

    def row_ids(self) -> list[Any]:
        """Each example's row (``[source, row]`` for a mixture of sources), without making the examples."""
        sources = list(self.sources) if self.sources is not None else self.column("source")
        return [row if source is None or source < 0 else [int(source), row]
                for source, row in zip(sources, self.column("row"))]


def row_ids(examples: Sequence[Example]) -> list[Any]:
    """Each example's row (``[source, row]`` for a mixture of sources): what data.json records per split."""
    if isinstance(examples, ExampleView):
        return examples.row_ids()
    return [e.row if e.source is None else [e.source, e.row] for e in examples]
