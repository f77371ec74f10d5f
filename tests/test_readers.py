"""Readers: files as users have them (Excel CSV, JSON Lines with odd line breaks, Parquet) read back exactly, and
anything malformed is a one-line DataError naming the file and the line or row at fault."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loralab.config import DataConfig
from loralab.data import load_examples, read_rows
from loralab.errors import DataError

# characters that str.splitlines() treats as line breaks, plus what CSV must quote, plus a stray BOM
AWKWARD = "\n\r\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c,\"\t\ufeff\x00 "
texts = st.text(st.characters(codec="utf-8") | st.sampled_from(AWKWARD), max_size=30)
records_strategy = st.lists(st.fixed_dictionaries({"instruction": texts, "response": texts}), min_size=1, max_size=5)
FIELDS = ["instruction", "response"]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_csv(path: Path, records: list[dict], delimiter: str = ",", encoding: str = "utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, FIELDS, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)


def write_as(path: Path, records: list) -> None:
    """Write records in the format that the suffix names."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        write_csv(path, records, "\t" if suffix == ".tsv" else ",")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)


def load(path: Path) -> list:
    return load_examples(DataConfig(path=str(path)), "CAUSAL_LM")


def assert_data_error(path: Path, row: int | None = None) -> str:
    """load_examples raises a DataError (nothing else) whose one-line message names the file and the row/line."""
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    if row is not None:
        assert re.search(rf"\b(row|line) {row}\b", message), message
    return message


# ---------------------------------------------------------------- files as users have them


def test_csv_quoted_multiline_fields_keep_line_breaks_commas_and_quotes(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b'instruction,response\r\n"Write a poem, please","Roses are ""red"",\nviolets\r\nare blue"\r\n'
                     b'plain,"one, two"\r\n')
    rows = read_rows(path)
    assert rows == [(2, {"instruction": "Write a poem, please", "response": 'Roses are "red",\nviolets\r\nare blue'}),
                    (5, {"instruction": "plain", "response": "one, two"})]  # numbers are the lines where rows start


def test_csv_and_json_with_bom_read_correctly(tmp_path):
    records = [{"instruction": "Größe?", "response": "groß"}]
    write_csv(tmp_path / "bom.csv", records, encoding="utf-8-sig")
    (tmp_path / "bom.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8-sig")
    (tmp_path / "bom.jsonl").write_text(json.dumps(records[0]) + "\r\n", encoding="utf-8-sig")
    for name in ("bom.csv", "bom.json", "bom.jsonl"):
        assert [r for _, r in read_rows(tmp_path / name)] == records, name
        assert [(e.prompt, e.response) for e in load(tmp_path / name)] == [("Größe?", "groß")], name


def test_jsonl_with_unicode_line_separators_round_trips(tmp_path):
    records = [{"instruction": "a\u2028b\u2029c", "response": "d\x85e\x1cf\x1dg\x1eh\x0bi\x0cj"},
               {"instruction": "windows", "response": "line endings"}]
    path = tmp_path / "odd.jsonl"
    path.write_bytes((json.dumps(records[0], ensure_ascii=False) + "\n\n" + json.dumps(records[1]) + "\r\n").encode())
    assert read_rows(path) == [(1, records[0]), (3, records[1])]


def test_parquet_tsv_and_json_lines_saved_as_json(tmp_path):
    records = [{"instruction": f"q{i}\tx", "response": f"a{i}\n"} for i in range(3)]
    for name in ("a.parquet", "a.tsv"):
        write_as(tmp_path / name, records)
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    assert read_rows(tmp_path / "a.parquet") == [(i + 1, r) for i, r in enumerate(records)]
    for name in ("a.tsv", "lines.json"):
        assert [r for _, r in read_rows(tmp_path / name)] == records, name


def test_parquet_chat_messages(tmp_path):
    path = tmp_path / "chat.parquet"
    write_as(path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    (example,) = load(path)
    assert (example.prompt, example.response, example.row) == ("hi", "hello", 1)


# ---------------------------------------------------------------- malformed files


def truncated_parquet(path: Path) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"instruction": "q", "response": "a"}] * 10), buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


MALFORMED = [  # file name, content, expected words, line/row at fault
    ("empty.csv", b"", "empty", None),
    ("blank.csv", b"\r\n\r\n", "empty", None),
    ("extra.csv", b"instruction,response\nq,a\nq,a,surplus\n", "3 fields but the header has 2", 3),
    ("dup.csv", b"instruction,response,response\nq,a,b\n", "twice", 1),
    ("unnamed.csv", b"instruction,,response\nq,x,a\n", "column 2 has no name", 1),
    ("short.csv", b"instruction,response\nq,a\nq\n", "field 'response' is empty", 3),
    ("quote.csv", b'instruction,response\nq,"a"b\n', "malformed CSV", 2),
    ("open.csv", b'instruction,response\nq,"never closed\n', "malformed CSV", 2),
    ("latin1.csv", "instruction,response\nq,a\nq,caf\u00e9\n".encode("latin-1"), "not UTF-8", 3),
    ("latin1.jsonl", b'{"instruction": "q", "response": "a"}\n{"instruction": "caf\xe9"}\n', "not UTF-8", 2),
    ("scalar.json", b"42", "expected a JSON array", None),
    ("object.json", b'{"instruction": "q", "response": "a", "x": 1}', "expected a JSON array", None),
    ("empty.json", b"  \n", "empty", None),
    ("deep.json", b"[" * 100_000, "invalid JSON", None),
    ("notrow.json", b'[{"instruction": "q", "response": "a"}, "just text"]', "expected an object", 2),
    ("notrow.jsonl", b'{"instruction": "q", "response": "a"}\n[1, 2]\n', "expected an object", 2),
    ("null.jsonl", b'{"instruction": "q", "response": "a"}\n{"instruction": "q", "response": null}\n', "is empty", 2),
    ("nan.json", b'[{"instruction": NaN, "response": "a"}]', "field 'instruction' is empty", 1),
    ("list.json", b'[{"instruction": ["q"], "response": "a"}]', "should be text", 1),
    ("garbage.parquet", b"PAR1 not really parquet PAR1", "not a readable Parquet file", None),
    ("notes.txt", b"hello", "unsupported extension", None),
]


@pytest.mark.parametrize("name, content, words, row", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_one_line_data_error(tmp_path, name, content, words, row):
    path = tmp_path / name
    path.write_bytes(content)
    assert words in assert_data_error(path, row)


def test_truncated_parquet_and_null_or_nan_cells(tmp_path):
    truncated_parquet(tmp_path / "cut.parquet")
    assert "not a readable Parquet file" in assert_data_error(tmp_path / "cut.parquet")
    write_as(tmp_path / "null.parquet", [{"instruction": "q", "response": "a"}, {"instruction": "q", "response": None}])
    assert "field 'response' is empty" in assert_data_error(tmp_path / "null.parquet", 2)
    write_as(tmp_path / "nan.parquet", [{"instruction": "q", "response": math.nan}])
    assert "field 'response' is empty" in assert_data_error(tmp_path / "nan.parquet", 1)
    write_as(tmp_path / "chat.parquet", [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}])
    assert "message 1 should have 'role' and 'content'" in assert_data_error(tmp_path / "chat.parquet", 1)


# ---------------------------------------------------------------- properties


@PROPERTY
@given(records=records_strategy, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]))
def test_text_records_round_trip_exactly(records, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        write_as(path, records)
        rows = read_rows(path)
        assert [r for _, r in rows] == records
        numbers = [n for n, _ in rows]
        assert numbers == sorted(set(numbers)) and numbers[0] == (2 if suffix in (".csv", ".tsv") else 1)
        assert [(e.prompt, e.response, e.row) for e in load(path)] == [(r["instruction"], r["response"], n)
                                                                        for n, r in rows]


@PROPERTY
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]))
def test_random_bytes_give_data_error(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"random{suffix}"
        path.write_bytes(content)
        assert_data_error(path)


not_text = st.one_of(st.none(), st.just(math.nan), st.booleans(), st.lists(texts, max_size=2),
                     st.dictionaries(texts, texts, max_size=2))
not_object = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), texts, st.lists(st.integers(), max_size=2))


@PROPERTY
@given(records=records_strategy, data=st.data(), suffix=st.sampled_from([".jsonl", ".json"]),
       fault=st.sampled_from(["wrong type", "not an object", "missing field"]))
def test_bad_row_is_named(records, data, suffix, fault):
    i = data.draw(st.integers(0, len(records) - 1), label="bad row")
    field_name = data.draw(st.sampled_from(FIELDS), label="field")
    if fault == "wrong type":
        records[i][field_name] = data.draw(not_text, label="value")
    elif fault == "not an object":
        records[i] = data.draw(not_object, label="row")
    else:
        del records[i][field_name]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"bad{suffix}"
        write_as(path, records)
        assert_data_error(path, i + 1)


@PROPERTY
@given(records=records_strategy, data=st.data(), delimiter=st.sampled_from([",", "\t"]))
def test_csv_row_with_extra_or_missing_cells_is_named_by_line(records, data, delimiter):
    i = data.draw(st.integers(0, len(records) - 1), label="bad row")
    extra = data.draw(st.lists(texts, min_size=1, max_size=3), label="extra cells")
    cells = [[r["instruction"], r["response"]] for r in records]
    short = data.draw(st.booleans(), label="short")
    cells[i] = cells[i][:1] if short else cells[i] + extra
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(FIELDS)
    writer.writerows(cells[:i])
    line = len(io.StringIO(buffer.getvalue(), newline="").readlines()) + 1  # where the bad row starts
    writer.writerows(cells[i:])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("bad.tsv" if delimiter == "\t" else "bad.csv")
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        assert_data_error(path, line)


@PROPERTY
@given(records=records_strategy, data=st.data())
def test_truncated_json_and_jsonl_and_stray_bytes(records, data):
    text = json.dumps(records, ensure_ascii=False)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    with tempfile.TemporaryDirectory() as folder:
        cut = Path(folder) / "cut.json"
        cut.write_text(text[: data.draw(st.integers(0, len(text) - 1), label="json cut")], encoding="utf-8")
        assert_data_error(cut)
        last = lines[-1]
        cut_lines = Path(folder) / "cut.jsonl"
        cut_lines.write_text("\n".join(lines[:-1] + [last[: data.draw(st.integers(1, len(last) - 1))]]), encoding="utf-8")
        assert_data_error(cut_lines, len(lines))
        i = data.draw(st.integers(0, len(lines) - 1), label="line with a stray byte")
        stray = Path(folder) / "stray.jsonl"
        encoded = [line.encode() for line in lines]
        encoded[i] = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"])) + encoded[i]
        stray.write_bytes(b"\n".join(encoded))
        assert "not UTF-8" in assert_data_error(stray, i + 1)


# ---------------------------------------------------------------- streaming


@PROPERTY
@given(records=st.lists(st.one_of(st.fixed_dictionaries({"instruction": texts, "response": texts}),
                                  st.integers(), st.floats(allow_nan=False), texts, st.none()), max_size=6),
       chunk=st.integers(1, 9), indent=st.sampled_from([None, 0, 2]))
def test_json_array_read_a_chunk_at_a_time_equals_json_loads(records, chunk, indent):
    """Every split of the text into chunks (numbers, strings and escapes cut anywhere) reads the array json reads."""
    import loralab.readers as readers

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=indent), encoding="utf-8")
        old, readers.JSON_CHUNK_CHARS = readers.JSON_CHUNK_CHARS, chunk
        try:
            assert [r for _, r in readers.iter_rows(path)] == records
        finally:
            readers.JSON_CHUNK_CHARS = old


@PROPERTY
@given(records=records_strategy, data=st.data(), chunk=st.integers(1, 9))
def test_json_error_line_and_column_match_json_loads_whatever_the_chunks(records, data, chunk):
    import loralab.readers as readers

    text = json.dumps(records, ensure_ascii=False, indent=1)
    cut = data.draw(st.integers(1, len(text) - 1), label="where the damage is")
    broken = text[:cut] + data.draw(st.sampled_from(["}", "]", ",,", "x", '"']), label="damage") + text[cut:]
    try:
        json.loads(broken)
        return  # the damage happens to be valid JSON
    except json.JSONDecodeError as exc:
        expected = f"line {exc.lineno}, column {exc.colno}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "broken.json"
        path.write_text(broken, encoding="utf-8")
        old, readers.JSON_CHUNK_CHARS = readers.JSON_CHUNK_CHARS, chunk
        try:
            with pytest.raises(DataError) as info:
                list(readers.iter_rows(path))
        finally:
            readers.JSON_CHUNK_CHARS = old
    if "Extra data" not in str(info.value):  # json stops at the first value; so do we, with the same place
        assert expected in str(info.value), (str(info.value), expected)


@pytest.mark.parametrize("name, good, bad", [
    ("big.json", "[" + ",".join(['{"instruction": "q", "response": "a"}'] * 3000), ', {"instruction": oops}]'),
    ("big.csv", "instruction,response\n" + "q,a\n" * 3000, 'q,"a"b\n'),
    ("big.tsv", "instruction\tresponse\n" + "q\ta\n" * 3000, 'q\t"a"b\n'),
    ("lines.json", "\n".join(['{"instruction": "q", "response": "a"}'] * 3000), '\n{"instruction": oops}\n'),
])
def test_big_text_files_stream_rows_before_the_end_is_read(tmp_path, name, good, bad):
    """Rows come out before the rest of the file is read: a break near the end is met only after 3000 good rows."""
    import loralab.readers as readers

    path = tmp_path / name
    path.write_text(good + bad, encoding="utf-8")
    rows = readers.iter_rows(path)
    first = [next(rows) for _ in range(3000)]
    assert all(record == {"instruction": "q", "response": "a"} for _, record in first)
    with pytest.raises(DataError, match=r"line 3002|invalid JSON|line 3001"):
        list(rows)


def test_one_key_wrapper_and_json_lines_saved_as_json_still_read(tmp_path):
    rows = [{"instruction": f"q{i}", "response": "a"} for i in range(3)]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    assert [r for _, r in read_rows(tmp_path / "wrapped.json")] == rows
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": str(i)}]} for i in range(3)]
    (tmp_path / "chat.json").write_text("\n".join(json.dumps(r) for r in chat) + "\n", encoding="utf-8")
    assert read_rows(tmp_path / "chat.json") == [(i + 1, r) for i, r in enumerate(chat)]
    (tmp_path / "one.json").write_text(json.dumps({**rows[0], "id": 1}), encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array of objects, got a dict"):
        read_rows(tmp_path / "one.json")


@pytest.mark.parametrize("text", ["[" + "1" * 5000 + "e-4990]", '[{"a": "' + "x" * 50_000 + '"}]', "[0.5, -1E+2, -Infinity]"])
def test_values_longer_than_a_chunk_and_a_failing_disk(tmp_path, text, monkeypatch):
    """A number with more digits than int() takes before its exponent, a string of many chunks: read as json reads
    them; a read that fails part way is one DataError, not an OSError."""
    import loralab.readers as readers

    path = tmp_path / "long.json"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(readers, "JSON_CHUNK_CHARS", 16)
    assert [r for _, r in readers.iter_rows(path)] == json.loads(text)

    real_open = Path.open

    class Failing:
        def __init__(self, handle):
            self.handle, self.reads = handle, 0

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, *args):
            self.reads += 1
            if self.reads > 1:
                raise OSError(5, "Input/output error")
            return self.handle.read(*args)

        readline = read

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Failing(real_open(self, *a, **k)))
    with pytest.raises(DataError, match=r"long.json: cannot read \(Input/output error\)"):
        list(readers.iter_rows(path))
