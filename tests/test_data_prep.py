"""Preparing data at scale: Arrow-backed splits, the on-disk cache (hit, and misses on any change), several
tokenizing processes giving the same masks, errors still naming the row, raw text packed into full rows."""

import json
from pathlib import Path

import pytest

from loralab.config import DataConfig
from loralab.data import (IGNORE_INDEX, ExampleView, PackedTextDataset, TokenizedView, load_examples, prepare_data,
                          tokenize)
from loralab.errors import DataError, LoralabError
from conftest import CHAT_TEMPLATE, opposite_records
from test_conversations import chatml_tokenizer, gemma_tokenizer, llama3_tokenizer


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LORALAB_DATA_CACHE", str(folder))
    return folder


def entries(cache: Path, kind: str) -> list[str]:
    return sorted(p.name for p in cache.glob(f"{kind}-*") if p.is_dir())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def conversations(n: int) -> list[dict]:
    """Conversations of one to three exchanges, some with a system prompt."""
    rows = []
    for i in range(n):
        a, b = opposite_records()[i % 24]["instruction"], opposite_records()[i % 24]["response"]
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for turn in range(1 + i % 3):
            messages += [{"role": "user", "content": f"{a} ({i}.{turn})"}, {"role": "assistant", "content": f"{b} {turn}"}]
        rows.append({"messages": messages})
    return rows


def test_splits_live_in_arrow_files_of_the_cache_and_a_second_prepare_skips_tokenizing(cache, tmp_path, monkeypatch):
    tok = chatml_tokenizer()
    data = write_jsonl(tmp_path / "chats.jsonl", conversations(30))
    cfg = DataConfig(path=str(data), max_length=64)
    first = prepare_data(cfg, tok, "CAUSAL_LM")
    assert isinstance(first.train.tokenized, TokenizedView) and isinstance(first.train_examples, ExampleView)
    files = [Path(f["filename"]) for f in first.train.tokenized.table.cache_files]  # memory-mapped from the cache
    assert files and all(cache in f.parents for f in files)
    assert len(entries(cache, "prepared")) == 1 and len(entries(cache, "examples")) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("loralab.data.prepare.tokenize", no_tokenizing)
    monkeypatch.setattr("loralab.data.prepare.tokenize_text", no_tokenizing)
    again = prepare_data(cfg, tok, "CAUSAL_LM")  # read back from the cache
    assert [t.labels for t in again.train.tokenized] == [t.labels for t in first.train.tokenized]
    assert list(again.train_examples) == list(first.train_examples) and again.eval_examples == first.eval_examples
    with pytest.raises(AssertionError, match="tokenized again"):  # a changed setting misses the cache
        prepare_data(cfg.model_copy(update={"max_length": 48}), tok, "CAUSAL_LM")
    other = chatml_tokenizer(CHAT_TEMPLATE.replace("'\n'", "'\n\n'"))
    with pytest.raises(AssertionError, match="tokenized again"):  # so does another tokenizer (its chat template)
        prepare_data(cfg, other, "CAUSAL_LM")
    data.write_text(data.read_text() + json.dumps(conversations(31)[-1]) + "\n")
    with pytest.raises(AssertionError, match="tokenized again"):  # and a changed data file
        prepare_data(cfg, tok, "CAUSAL_LM")
    monkeypatch.undo()
    monkeypatch.setenv("LORALAB_DATA_CACHE", str(cache))
    changed = prepare_data(cfg, tok, "CAUSAL_LM")
    assert len(changed.train) + len(changed.eval) == 31 and len(entries(cache, "prepared")) == 2
    assert not list(cache.glob(".prepared-*")) and not list(cache.glob(".examples-*"))  # no staging folder left


def test_masks_are_token_for_token_those_of_tokenize_with_two_processes(cache, tmp_path):
    tok = llama3_tokenizer()
    data = write_jsonl(tmp_path / "chats.jsonl", conversations(90))
    cfg = DataConfig(path=str(data), max_length=100, num_proc=2, eval_split=0.1)
    prepared = prepare_data(cfg, tok, "CAUSAL_LM")
    assert len(prepared.train.tokenized.table.cache_files) == 2  # written by two processes
    for examples, features in ((prepared.train_examples, prepared.train), (prepared.eval_examples, prepared.eval)):
        for example, item, feature in zip(examples, features.tokenized, (features[i] for i in range(len(features)))):
            expected = tokenize(tok, example, cfg, "CAUSAL_LM")
            assert (item.input_ids, item.labels, item.turns, item.truncated) == \
                (expected.input_ids, expected.labels, expected.turns, expected.truncated), example.row
            assert (feature["input_ids"], feature["labels"]) == (expected.input_ids, expected.labels)
    assert any(len(t.turns) >= 2 for t in prepared.train.tokenized) and prepared.truncation_counts()["truncated_examples"]
    supervised = sum(sum(1 for x in t.labels if x != IGNORE_INDEX) for t in prepared.train.tokenized)
    assert prepared.supervised_tokens() == supervised > 0


def test_errors_name_the_row_in_any_chunk_and_leave_no_cache_entry(cache, tmp_path):
    rows = opposite_records() * 250  # 6000 rows: read and validated in several chunks
    bad = rows[:4500] + [{"instruction": "no answer"}] + rows[4500:]
    with pytest.raises(DataError, match=r"big.jsonl, row 4501: missing field 'response'"):
        load_examples(DataConfig(path=str(write_jsonl(tmp_path / "big.jsonl", bad))), "CAUSAL_LM")
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    mixed = rows[:5000] + [chat] + rows[5000:]
    with pytest.raises(DataError, match=r"mixed.jsonl, row 5001: mixed formats: this row is messages but row 1 is pairs"):
        load_examples(DataConfig(path=str(write_jsonl(tmp_path / "mixed.jsonl", mixed))), "CAUSAL_LM")
    assert not cache.exists() or [p.name for p in cache.iterdir()] == [".locks"]


def test_raw_text_is_packed_into_full_rows_and_long_documents_keep_every_token(cache, tmp_path):
    tok = gemma_tokenizer()
    words = "the opposite of hot is cold and the opposite of big is small".split()
    docs = [" ".join(words[: 2 + i % 12]) for i in range(20)] + [" ".join(words * 6)]  # the last: 70+ tokens
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    cfg = DataConfig(path=str(data), max_length=16, eval_split=0.0)
    prepared = prepare_data(cfg, tok, "CAUSAL_LM")
    assert isinstance(prepared.train, PackedTextDataset)
    stream = [i for t in prepared.train.tokenized for i in t.input_ids]  # each document: BOS ... EOS, uncut
    longest = max(prepared.train.tokenized, key=lambda t: len(t.input_ids))
    assert len(longest.input_ids) > 64 and longest.input_ids[-1] == tok.eos_token_id
    rows = [prepared.train[i] for i in range(len(prepared.train))]
    assert len(rows) == -(-len(stream) // 16) and all(len(r["input_ids"]) == 16 for r in rows[:-1])
    assert [i for r in rows for i in r["input_ids"]] == stream  # nothing lost, nothing repeated
    assert all(r["labels"] == [IGNORE_INDEX] + r["input_ids"][1:] for r in rows)
    assert prepared.train.lengths() == [len(r["input_ids"]) for r in rows]
    one_each = prepare_data(cfg.model_copy(update={"pack_text": False}), tok, "CAUSAL_LM")
    assert len(one_each.train) == len(docs) and max(len(one_each.train[i]["input_ids"]) for i in range(len(docs))) == 16


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, opposites_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LORALAB_DATA_CACHE", str(blocker / "cache"))
    with pytest.raises(LoralabError, match=r"cannot write the data cache in .*a-file/cache .*set LORALAB_DATA_CACHE"):
        load_examples(DataConfig(path=str(opposites_file)), "CAUSAL_LM")


def test_the_same_bytes_read_by_another_reader_are_not_served_from_the_cache(cache, tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("instruction\tresponse\nGive the opposite of hot.\tcold, of course\n", encoding="utf-8")
    (example,) = load_examples(DataConfig(path=str(tsv)), "CAUSAL_LM")
    assert example.response == "cold, of course"
    csv = tmp_path / "pairs.csv"
    csv.write_bytes(tsv.read_bytes())  # as CSV its one column is "instruction<TAB>response"
    with pytest.raises(DataError, match=r"pairs.csv, line 2: 2 fields but the header has 1"):
        load_examples(DataConfig(path=str(csv)), "CAUSAL_LM")
    moved = tmp_path / "moved.tsv"
    moved.write_bytes(tsv.read_bytes())
    assert load_examples(DataConfig(path=str(moved)), "CAUSAL_LM") == [example]  # same bytes and reader: one entry
    assert len(entries(cache, "examples")) == 1  # the failed CSV left none


def test_real_conversations_from_chitchat_dataset(cache, tmp_path, monkeypatch):
    """Real multi-turn chat no one here wrote (pip install 'loralab[bench]'): every assistant turn supervised, masks
    as tokenize gives them, in two processes."""
    chitchat = pytest.importorskip("chitchat_dataset")
    rows = []
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from data_prep import chitchat_messages  # the benchmark's reading of the dataset

    for conversation in list(chitchat.Dataset().values())[:400]:
        messages = chitchat_messages(conversation)
        messages = messages[:6] if len(messages) >= 6 else messages[: len(messages) // 2 * 2]
        if len(messages) >= 2:
            rows.append({"messages": messages})
    tok = chatml_tokenizer()
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "chitchat.jsonl", rows)), max_length=256, num_proc=2)
    prepared = prepare_data(cfg, tok, "CAUSAL_LM")
    assert len(prepared.train) + len(prepared.eval) == len(rows) > 100
    items = list(prepared.train.tokenized)
    assert sum(len(t.turns) == 3 for t in items) > 50  # three answers supervised in one conversation
    for example, item in list(zip(prepared.train_examples, items))[:60]:
        expected = tokenize(tok, example, cfg, "CAUSAL_LM")
        assert (item.input_ids, item.labels) == (expected.input_ids, expected.labels)
