"""Reading rows from data files: JSON, JSONL, CSV, TSV, Parquet and datasets saved with ``save_to_disk``.

``read_rows`` gives (number, record) pairs: the line where the record starts for JSONL, CSV and TSV, the 1-based row
for the others. ``iter_rows`` gives the same pairs one at a time and streams (memory does not grow with the file):
JSONL, CSV and TSV a record at a time, a JSON array an element at a time, Parquet and saved datasets a batch at a
time; a JSON object such as ``{"data": [...]}`` and UTF-16 files are parsed whole. Text files are UTF-8 (a BOM is
dropped; UTF-16 with a BOM is accepted too). Anything that cannot be read is a one-line ``DataError`` naming the file
and, where one is at fault, the line or row.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from loralab.errors import DataError

Rows = list[tuple[int, Any]]
SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
_CSV_FIELD_LIMIT = 2**31 - 1  # long documents in one cell are data, not an attack


def read_rows(path: str | Path) -> Rows:
    """Rows of a JSON array, JSONL, CSV/TSV, Parquet file or saved HF dataset folder, each with its line/row number."""
    return list(iter_rows(path))


def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``read_rows`` one row at a time; JSONL, Parquet and saved dataset folders are read as they are consumed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _iter_hf_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(path)
    if suffix not in SUFFIXES:
        raise DataError(f"data file {path}: unsupported extension {suffix!r}; "
                        "expected .json, .jsonl, .csv, .tsv, .parquet or a saved dataset folder")
    if _starts_with_utf16_bom(path):
        return iter(_read_whole(path, suffix))
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path)
    return _iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")


def _read_whole(path: Path, suffix: str) -> Rows:
    text = _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    return _read_csv(path, text, delimiter="\t" if suffix == ".tsv" else ",")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _read_error(path: Path, exc: OSError) -> DataError:
    return DataError(f"data file {path}: cannot read ({_one_line(exc.strerror or exc)})")


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading BOM dropped), or UTF-16 when it starts with a UTF-16 BOM."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _read_error(path, exc) from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DataError(f"data file {path}: not UTF-16 text ({exc.reason} at byte {exc.start})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"data file {path}, line {line}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save the file as UTF-8") from None


def _json_error(path: Path, exc: Exception, line: int | None = None) -> DataError:
    """A JSON parse error naming the line (``line`` for one JSONL line, else the line inside the parsed text)."""
    if isinstance(exc, json.JSONDecodeError):
        return DataError(f"data file {path}: invalid JSON at line {line or exc.lineno}, column {exc.colno}: {exc.msg}")
    place = f" at line {line}" if line else ""  # e.g. integers over Python's digit limit, absurd nesting
    return DataError(f"data file {path}: invalid JSON{place}: {_one_line(exc) or type(exc).__name__}")


def _read_json(path: Path, text: str) -> Rows:
    if not text.strip():
        raise DataError(f"data file {path}: the file is empty; expected a JSON array of objects")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON Lines saved as .json (pandas, HF exports)
        raise _json_error(path, exc) from None
    except (ValueError, RecursionError) as exc:
        raise _json_error(path, exc) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"data file {path}: expected a JSON array of objects, got a {type(data).__name__}")
    return [(i + 1, row) for i, row in enumerate(data)]


def _starts_with_utf16_bom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    except OSError as exc:
        raise _read_error(path, exc) from None


def _lines(path: Path, handle: Any) -> Iterator[bytes]:
    """The lines of a binary handle; a read failing part way is a ``DataError``."""
    while True:
        try:
            raw = handle.readline()
        except OSError as exc:
            raise _read_error(path, exc) from None
        if not raw:
            return
        yield raw


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``_read_jsonl`` line by line from the file (UTF-8, a leading BOM dropped), with the same errors."""
    offset = 0
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _read_error(path, exc) from None
    with handle:
        for line_number, raw in enumerate(_lines(path, handle), start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"data file {path}, line {line_number}: not UTF-8 text ({exc.reason} at byte "
                                f"{offset + exc.start}); save the file as UTF-8") from None
            offset += len(raw)
            line = line.removesuffix("\n").removesuffix("\r")
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise _json_error(path, exc, line_number) from None


JSON_CHUNK_CHARS = 1 << 20  # characters of a .json file read at a time
_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()


class _JsonStream:
    """A .json file's text read a chunk at a time, with the line and column of any position for error messages."""

    def __init__(self, path: Path, handle: Any):
        self.path, self.handle = path, handle
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in the text already dropped from ``buf``
        self.column_base = 0  # characters on the current line already dropped

    def more(self, grow: bool = False) -> bool:
        """Read another chunk (dropping what has been consumed); False at the end of the file. ``grow``: at least as
        much as is still unconsumed, so a value longer than a chunk is decoded a number of times that grows only
        with the log of its size."""
        if self.eof:
            return False
        size = max(JSON_CHUNK_CHARS, len(self.buf) - self.pos) if grow else JSON_CHUNK_CHARS
        try:
            chunk = self.handle.read(size)
        except UnicodeDecodeError:
            _read_text(self.path)  # raises the message naming the line
            raise
        except OSError as exc:
            raise _read_error(self.path, exc) from None
        dropped = self.buf[: self.pos]
        newlines = dropped.count("\n")
        self.lines_before += newlines
        self.column_base = len(dropped) - dropped.rfind("\n") - 1 if newlines else self.column_base + len(dropped)
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        self.eof = not chunk
        return bool(chunk)

    def skip_space(self) -> str:
        """The next character that is not whitespace ('' at the end of the file), not consumed."""
        while True:
            self.pos = _JSON_SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def place(self, pos: int) -> tuple[int, int]:
        """(line, column), 1-based, of position ``pos`` in ``buf``."""
        newlines = self.buf.count("\n", 0, pos)
        column = pos - self.buf.rfind("\n", 0, pos) if newlines else self.column_base + pos + 1
        return self.lines_before + newlines + 1, column

    def error(self, message: str, pos: int | None = None) -> DataError:
        line, column = self.place(self.pos if pos is None else pos)
        return DataError(f"data file {self.path}: invalid JSON at line {line}, column {column}: {message}")

    def cut_short(self, exc: ValueError) -> bool:
        """Whether a decoding error may come from the chunk ending inside the value (then read on and decode again):
        an error in the last few characters, a string still open, or digits running to the end."""
        if self.eof:
            return False
        if isinstance(exc, json.JSONDecodeError):
            return exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated string")
        return self.buf[-1:].isdigit()  # e.g. more digits than int() takes, which a following "e5" makes a float

    def value(self) -> Any:
        """Decode the JSON value that starts here, reading more of the file until it is complete."""
        while True:
            try:
                found, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.cut_short(exc):  # more() moves positions: decode again
                    self.more(grow=True)
                    continue
                raise self.error(exc.msg, exc.pos) from None
            except (ValueError, RecursionError) as exc:
                if isinstance(exc, ValueError) and self.cut_short(exc):
                    self.more(grow=True)
                    continue
                line, _ = self.place(self.pos)
                raise _json_error(self.path, exc, line) from None
            if not self.eof and len(self.buf) - end < 64 and not self.buf[end:].strip("0123456789.eE+-"):
                # the chunk may end inside a number (raw_decode read "12" of "12.5"): read on and decode again
                self.more(grow=True)
                continue
            self.pos = end
            return found


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON array an element at a time, JSON Lines saved as .json a line at a time; anything else (an object such
    as ``{"data": [...]}``, a scalar, an empty file) is read whole."""
    try:
        handle = path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise _read_error(path, exc) from None
    with handle:
        stream = _JsonStream(path, handle)
        first = stream.skip_space()
        if first == "[":
            stream.pos += 1
            yield from _json_elements(stream)
            if stream.skip_space():
                raise stream.error("Extra data")
            return
        lines = first == "{" and _first_line_is_an_object(stream)
    yield from _iter_jsonl(path) if lines else _read_json(path, _read_text(path))


def _first_line_is_an_object(stream: _JsonStream) -> bool:
    """Whether the file's first line is a whole JSON object with more text after it: JSON Lines saved as .json."""
    searched = 0  # characters after stream.pos already searched for the line's end (more() keeps stream.pos's text)
    while stream.buf.find("\n", stream.pos + searched) == -1:
        searched = len(stream.buf) - stream.pos
        if not stream.more(grow=True):
            break
    line, _, rest = stream.buf[stream.pos :].partition("\n")
    try:
        if not isinstance(json.loads(line), dict):
            return False
    except (ValueError, RecursionError):
        return False
    while not rest.strip() and stream.more():
        rest = stream.buf[stream.pos :].partition("\n")[2]
    return bool(rest.strip())


def _json_elements(stream: _JsonStream) -> Iterator[tuple[int, Any]]:
    """The elements of an array whose ``[`` was just consumed, up to and including its ``]``."""
    if stream.skip_space() == "]":
        stream.pos += 1
        return
    row = 0
    while True:
        if not stream.skip_space():
            raise stream.error("Expecting value")
        row += 1
        yield row, stream.value()
        after = stream.skip_space()
        stream.pos += 1
        if after == "]":
            return
        if after != ",":
            raise stream.error("Expecting ',' delimiter", stream.pos - 1)


def _read_jsonl(path: Path, text: str) -> Rows:
    """One JSON value per line; lines end at "\\n" only (U+2028, U+0085 ... are text inside strings)."""
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except (ValueError, RecursionError) as exc:
            raise _json_error(path, exc, line_number) from None
    return rows


def _read_csv(path: Path, text: str, delimiter: str) -> Rows:
    """Rows as {header: cell}; quoted cells keep their commas, quotes and line breaks; short rows get None cells."""
    return list(_csv_rows(path, io.StringIO(text, newline=""), delimiter))


def _iter_csv(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    """``_read_csv`` a record at a time from the file (UTF-8, a leading BOM dropped), with the same errors."""
    try:
        handle = path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise _read_error(path, exc) from None
    with handle:
        try:
            yield from _csv_rows(path, handle, delimiter)
        except UnicodeDecodeError:
            _read_text(path)  # raises the message naming the line
            raise
        except OSError as exc:  # a read failing part way (a network or removable disk)
            raise _read_error(path, exc) from None


def _csv_rows(path: Path, handle: Any, delimiter: str) -> Iterator[tuple[int, Any]]:
    header: list[str] | None = None
    for line, cells in _csv_records(path, handle, delimiter):
        if header is None:
            header = _csv_header(path, line, cells)
            continue
        if len(cells) > len(header):
            raise DataError(f"data file {path}, line {line}: {len(cells)} fields but the header has {len(header)} "
                            "(quote cells that contain the delimiter)")
        yield line, dict(zip(header, cells + [None] * (len(header) - len(cells))))
    if header is None:
        raise DataError(f"data file {path}: the file is empty; expected a header line with the field names")


def _csv_records(path: Path, handle: Any, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank records of a text handle (opened with newline=""), each with the line where it starts."""
    reader = csv.reader(handle, delimiter=delimiter, strict=True)
    start = 1
    while True:
        old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)  # set only while reading: the caller's code may use csv
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise DataError(f"data file {path}, line {start}: malformed {kind} ({_one_line(exc)})") from None
        finally:
            csv.field_size_limit(old_limit)
        if cells is None:
            return
        if cells:
            yield start, cells
        start = reader.line_num + 1


def _csv_header(path: Path, line: int, names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        if not name.strip():
            raise DataError(f"data file {path}, line {line}: column {i + 1} has no name in the header")
        if name in names[:i]:
            raise DataError(f"data file {path}, line {line}: the header names field {name!r} twice")
    return names


BATCH_ROWS = 1000  # rows decoded at a time from Parquet files and datasets


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fail(exc: Exception) -> DataError:
        return DataError(f"data file {path}: not a readable Parquet file ({_one_line(exc)})")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise fail(exc) from None
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise fail(exc) from None
        if batch is None:
            return
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _iter_hf_folder(path: Path) -> Iterator[tuple[int, Any]]:
    return iter_dataset(load_saved_dataset(path))


def load_saved_dataset(path: Path) -> Any:
    """A dataset folder written by ``save_to_disk`` (its ``train`` split for a DatasetDict), memory-mapped."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # missing or broken files (Arrow errors derive from these)
        raise DataError(f"data folder {path}: not a dataset saved with save_to_disk ({_one_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"data folder {path}: dataset dict has splits {list(loaded)}, expected a 'train' split")
        loaded = loaded["train"]
    return loaded


def iter_dataset(dataset: Any) -> Iterator[tuple[int, Any]]:
    """The rows of a ``datasets.Dataset`` as (1-based row, record), decoded a batch at a time."""
    row = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            row += 1
            yield row, dict(zip(names, values))
