"""Data: file formats, row-numbered errors, split, and label masks checked token by token."""

import json

import pytest

from loralab.config import DataConfig
from loralab.data import (IGNORE_INDEX, Example, format_prompt, load_examples, make_collator, prepare_data, read_rows,
                          split_examples, tokenize_causal, tokenize_seq2seq)
from loralab.errors import DataError
from conftest import opposite_records


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def t5_tokenizer(tiny_t5_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_t5_dir)


def test_reads_json_jsonl_csv_and_saved_dataset(tmp_path):
    records = opposite_records()[:3]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "a.csv").write_text("instruction,response\n" + "\n".join(f'"{r["instruction"]}","{r["response"]}"' for r in records))
    import datasets
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.json", "a.jsonl", "a.csv", "saved"):
        examples = load_examples(DataConfig(path=str(tmp_path / name)), "CAUSAL_LM")
        assert [e.response for e in examples] == [r["response"] for r in records], name
    assert [row for row, _ in read_rows(tmp_path / "a.csv")] == [2, 3, 4]  # CSV rows are reported by line


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "response": "b"},\n {"instruction": "c" "response": "d"}\n]')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 3"):
        load_examples(DataConfig(path=str(path)), "CAUSAL_LM")
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: invalid JSON at line 2"):
        load_examples(DataConfig(path=str(lines)), "CAUSAL_LM")


def test_missing_field_names_row_expected_and_found(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": "a", "response": "b"}, {"question": "q", "answer": "a"}]))
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(path=str(path)), "CAUSAL_LM")
    message = str(info.value)
    assert "qa.json, row 2" in message and "'instruction'" in message and "'question', 'answer'" in message
    # the same file works once the fields are named
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    (example,) = load_examples(DataConfig(path=str(renamed), prompt_field="question", response_field="answer"), "CAUSAL_LM")
    assert (example.prompt, example.response) == ("q", "a")


def test_missing_file_empty_file_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_examples(DataConfig(path=str(tmp_path / "nope.json")), "CAUSAL_LM")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_examples(DataConfig(path=str(empty)), "CAUSAL_LM")
    one = [Example(prompt="p", response="r", row=1)]
    with pytest.raises(DataError, match="training split is empty"):
        split_examples(one, 0.5, 42)


def test_split_is_deterministic_and_disjoint():
    examples = [Example(prompt=f"p{i}", response="r", row=i + 1) for i in range(10)]
    train_a, eval_a = split_examples(examples, 0.2, 42)
    train_b, eval_b = split_examples(examples, 0.2, 42)
    assert [e.row for e in eval_a] == [e.row for e in eval_b] and len(eval_a) == 2 and len(train_a) == 8
    assert not {e.row for e in train_a} & {e.row for e in eval_a}


def test_alpaca_and_messages_formats(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    (example,) = load_examples(DataConfig(path=str(alpaca)), "CAUSAL_LM")
    assert example.prompt == "Add\n\n2 and 3" and example.response == "5"
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    (example,) = load_examples(DataConfig(path=str(chat)), "CAUSAL_LM")
    assert example.prompt == "hi" and example.response == "hello" and example.messages[0]["role"] == "system"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl, row 1: the last message should be the assistant"):
        load_examples(DataConfig(path=str(bad)), "CAUSAL_LM")


def test_causal_labels_mask_prompt_and_keep_eos_when_pad_equals_eos(llama_tokenizer):
    tok = llama_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # like SmolLM2
    cfg = DataConfig()
    example = Example(prompt="Give the opposite of hot.", response="The opposite of hot is cold.", row=1)
    item = tokenize_causal(tok, example, cfg)
    prompt_ids = tok(format_prompt(tok, example, cfg), add_special_tokens=False)["input_ids"]
    response_ids = tok(example.response, add_special_tokens=False)["input_ids"]
    assert item.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    # token by token: every prompt position masked, every response token and the final EOS supervised
    assert item.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert item.labels[len(prompt_ids):] == response_ids + [tok.eos_token_id]
    assert format_prompt(tok, example, cfg).endswith("<|im_start|>assistant\n")

    # the collator pads with -100 labels, so the EOS (== pad id) stays supervised in a batch
    short = tokenize_causal(tok, Example(prompt="Hi", response="cold", row=2), cfg)
    collator = make_collator(tok, "CAUSAL_LM")
    tok.padding_side = "right"
    batch = collator([{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels} for t in (item, short)])
    n = len(short.input_ids)
    assert batch["labels"][1, n - 1].item() == tok.eos_token_id
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, n:] == 0).all()
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(item.input_ids))


def test_train_on_prompt_and_plain_template(llama_tokenizer):
    example = Example(prompt="Give the opposite of up.", response="down", row=1)
    item = tokenize_causal(llama_tokenizer, example, DataConfig(train_on_prompt=True, chat_template=False))
    assert IGNORE_INDEX not in item.labels and item.labels == item.input_ids
    assert "### Response:" in format_prompt(llama_tokenizer, example, DataConfig(chat_template=False))


def test_truncation_keeps_part_of_response_and_counts(llama_tokenizer):
    cfg = DataConfig(max_length=16)
    long = Example(prompt="Give the opposite of hot. " * 10, response="The opposite of hot is cold. " * 5, row=1)
    item = tokenize_causal(llama_tokenizer, long, cfg)
    assert len(item.input_ids) == 16 and item.truncated and item.response_truncated
    assert sum(1 for x in item.labels if x != IGNORE_INDEX) == 8  # half the budget goes to the response


def test_seq2seq_labels_end_with_eos_and_padding_is_masked(t5_tokenizer):
    tok = t5_tokenizer
    item = tokenize_seq2seq(tok, Example(prompt="Give the opposite of hot.", response="cold", row=1), DataConfig())
    assert item.labels[-1] == tok.eos_token_id and item.input_ids[-1] == tok.eos_token_id
    other = tokenize_seq2seq(tok, Example(prompt="hi", response="The opposite of hot is cold.", row=2), DataConfig())
    batch = make_collator(tok, "SEQ_2_SEQ_LM")([{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels}
                                                for t in (item, other)])
    assert (batch["labels"][0, len(item.labels):] == IGNORE_INDEX).all()
    assert batch["labels"][0, len(item.labels) - 1].item() == tok.eos_token_id


def test_prepare_data_counts_truncation(tiny_llama_dir, opposites_file, llama_tokenizer):
    prepared = prepare_data(DataConfig(path=str(opposites_file), max_length=12), llama_tokenizer, "CAUSAL_LM")
    assert len(prepared.train) == 19 and len(prepared.eval) == 5
    assert prepared.truncation_counts()["truncated_examples"] == 24
