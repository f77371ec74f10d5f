"""QUESTION_ANSWERING: rows, windows and span positions, training, reloading, SQuAD metrics, CLI eval / compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli, tiny_overrides

CITIES = ["Oslo", "Lima", "Kyoto", "Porto", "Accra", "Hanoi", "Dublin", "Quito"]
PETS = ["Pip", "Juno", "Otis", "Mango", "Luna", "Tofu"]


def qa_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        city, pet = CITIES[i % len(CITIES)], PETS[i % len(PETS)]
        context = f"Person {i} was born in {city}. The pet of person {i} is called {pet}."
        if i % 2:
            rows.append({"question": f"Where was person {i} born?", "context": context,
                         "answers": {"text": [city], "answer_start": [context.index(city)]}})
        else:
            rows.append({"question": f"What is the pet of person {i} called?", "context": context, "answer": pet})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_qa_bert(tmp_path_factory) -> Path:
    """A tiny random BertModel (no QA head: training adds qa_outputs) with a WordPiece tokenizer and exact offsets."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-qa-bert")
    corpus = [r["question"] + " " + r["context"] for r in qa_rows(40)] + ["long filler text about nothing much"] * 4
    # a vocabulary built here, not by WordPieceTrainer: its tie order varies between processes, and with it the ids,
    # the random embeddings they get and the whole training curve (CI once drew one that plateaued)
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for text in corpus for w, _ in pre.pre_tokenize_str(text.lower())})
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *dict.fromkeys(words + chars + ["##" + c for c in chars])]
    raw = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        unk_token="[UNK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def data_cfg(**values):
    from loralab.config import DataConfig

    return DataConfig(**values)


# ---------------------------------------------------------------- metrics


def test_squad_metrics_known_cases():
    from loralab.tasks.qa_eval import exact_match, f1_score, normalize_answer, squad_scores

    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert f1_score("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert f1_score("in the year 1889", ["1889"]) == pytest.approx(0.5)  # words: in year 1889 vs 1889
    assert f1_score("Paris France", ["London", "Paris"]) == pytest.approx(2 / 3)  # best reference wins
    assert f1_score("nothing", ["else"]) == 0.0
    assert f1_score("", ["x"]) == 0.0
    assert squad_scores(["Paris", "x"], [["paris"], ["y"]]) == {"exact_match": 50.0, "f1": 50.0, "n": 2}


# ---------------------------------------------------------------- rows


def test_rows_and_bad_input_messages():
    from loralab.errors import DataError
    from loralab.tasks.qa import parse_qa_rows, qa_item

    cfg = data_cfg()
    good = parse_qa_rows(list(enumerate(qa_rows(4), start=1)), cfg, "qa.jsonl")
    item = qa_item(good[0])  # flat answer, start found
    assert item.context[item.starts[0]:].startswith(item.answers[0]) and item.answers == ["Pip"]
    assert qa_item(good[1]).answers == ["Lima"]
    bad = [({"question": "q?", "context": "abc", "answer": "zzz"}, r"row 1: field 'answer': the answer 'zzz' does not occur"),
           ({"question": "q?", "context": "abc abc", "answers": {"text": ["abc"], "answer_start": [1]}},
            r"row 1: field 'answers': answer_start 1 points at 'bc ', not at the answer 'abc'"),
           ({"context": "abc", "answer": "a"}, r"row 1: missing question field 'question'"),
           ({"question": "q?", "answer": "a"}, r"row 1: missing context field 'context'"),
           ({"question": "q?", "context": "abc"}, r"row 1: missing answer field 'answers'")]
    for record, message in bad:
        with pytest.raises(DataError, match=r"data file qa.jsonl, " + message):
            parse_qa_rows([(1, record)], cfg, "qa.jsonl")


# ---------------------------------------------------------------- windows and positions


def _load_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_positions_token_by_token_with_stride(tiny_qa_bert):
    from loralab.tasks.qa import QAItem, encode_windows, qa_features

    tok = _load_tok(tiny_qa_bert)
    words = [f"w{i}" for i in range(40)]
    context = " ".join(words[:20]) + " answer is Kyoto Oslo " + " ".join(words[20:])
    start = context.index("Kyoto Oslo")
    item = QAItem("where", context, ["Kyoto Oslo"], [start])
    cfg = data_cfg(max_length=24, doc_stride=8)
    features = qa_features(tok, [item], cfg)
    encoded = encode_windows(tok, [item], cfg)
    assert len(features) >= 3
    holding, empty = 0, 0
    for f, offsets in zip(features, encoded["offset_mapping"]):
        s, e = f["start_positions"], f["end_positions"]
        if s == e == 0:  # CLS: this window does not hold the whole answer
            empty += 1
            assert f["input_ids"][0] == tok.cls_token_id
            continue
        holding += 1
        assert tok.convert_ids_to_tokens(f["input_ids"][s : e + 1]) == ["kyoto", "oslo"]
        assert context[offsets[s][0] : offsets[e][1]] == "Kyoto Oslo"
    assert holding >= 1 and empty >= 1
    # across the stride boundary: the answer starts in one window's overlap and is held whole by the next one
    first_ctx = [i for i, s in enumerate(encoded.sequence_ids(0)) if s == 1]
    cut = encoded["offset_mapping"][0][first_ctx[-1]][1]  # where window 0's context ends
    item2 = QAItem("where", context, [context[cut - 2 : cut + 4]], [cut - 2])
    split = qa_features(tok, [item2], cfg)
    assert split[0]["start_positions"] == 0  # window 0 holds only its start: CLS
    assert any(f["start_positions"] for f in split[1:])


def test_question_longer_than_max_length_is_an_error(tiny_qa_bert):
    from loralab.errors import DataError
    from loralab.tasks.qa import QAItem, qa_features

    tok = _load_tok(tiny_qa_bert)
    long_q = " ".join(["where"] * 40)
    with pytest.raises(DataError, match=r"qa.jsonl, row 7, field 'question': the question is 40 tokens"):
        qa_features(tok, [QAItem(long_q, "a b c", ["a"], [0], row=7)], data_cfg(max_length=24, doc_stride=4), "qa.jsonl")
    long_ctx = " ".join(["filler"] * 200) + " Oslo"
    out = qa_features(tok, [QAItem("where", long_ctx, ["Oslo"], [long_ctx.index("Oslo")])], data_cfg(max_length=32, doc_stride=8))
    assert len(out) > 5 and out[-1]["start_positions"] > 0  # a long context is fine: windows


# ---------------------------------------------------------------- training, reloading, CLI


@pytest.fixture(scope="module")
def qa_run(tiny_qa_bert, tmp_path_factory):
    from loralab.config import build_config
    from loralab.training import train

    folder = tmp_path_factory.mktemp("qa-run")
    data = write_jsonl(folder / "qa.jsonl", qa_rows(24))
    config = build_config(overrides=tiny_overrides(tiny_qa_bert, data, folder / "runs", **{
        "model.task_type": "QUESTION_ANSWERING", "train.epochs": 6, "train.learning_rate": 5e-3,
        "data.doc_stride": 8}))
    summary = train(config, progress=False)
    return Path(summary["run"]), summary, config


def test_train_loss_falls(qa_run):
    run_dir, summary, _ = qa_run
    assert summary["task_type"] == "QUESTION_ANSWERING"
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    # lr 1e-2 made this tiny model's curve chaotic (it failed to learn on one CPU's kernels); 5e-3 falls smoothly
    # on every kernel path tried (ATEN_CPU_CAPABILITY default / avx2 / native, seeds 0-2: eval 3.3 -> 1.5-2.0)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert evals[-1] < evals[0] - 0.5
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "QUESTION_ANS" and "qa_outputs" in (cfg["modules_to_save"] or [])


def test_adapter_reloads_with_plain_peft(qa_run, tiny_qa_bert):
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering

    from loralab.tasks.qa_eval import load_qa_run

    run_dir, _, _ = qa_run
    run = load_qa_run(run_dir)
    tok = run.tokenizer
    batch = tok(["Where was person 3 born?"], ["Person 3 was born in Lima."], return_tensors="pt")
    with torch.no_grad():
        ours = run.model(**batch)
        plain = PeftModel.from_pretrained(AutoModelForQuestionAnswering.from_pretrained(tiny_qa_bert),
                                          str(run_dir / "adapter")).eval()
        theirs = plain(**batch)
    torch.testing.assert_close(ours.start_logits, theirs.start_logits)
    torch.testing.assert_close(ours.end_logits, theirs.end_logits)


def test_cli_eval_and_compare(qa_run):
    run_dir, _, _ = qa_run
    code, out = run_cli("eval", run_dir, "--no-general-text")
    assert code == 0, out
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["task_type"] == "QUESTION_ANSWERING" and set(report["adapter"]) == {"exact_match", "f1", "n"}
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert {"question", "reference", "base", "adapter"} <= set(rows[0]) and "F1 (0-100)" in out
    code, out = run_cli("compare", run_dir, "--prompt", "Where was person 5 born?", "--context",
                        "Person 5 was born in Porto. The pet of person 5 is called Otis.")
    assert code == 0, out
    assert "trained head" in out
    code, out = run_cli("compare", run_dir, "--prompt", "Where was person 5 born?")
    assert code != 0 and "--context TEXT" in out


def test_auto_detect_and_bad_data_before_training(tiny_qa_bert, tmp_path):
    from loralab.config import build_config
    from loralab.errors import DataError
    from loralab.models import resolve_task_type
    from loralab.training import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(6))
    config = build_config(overrides=tiny_overrides(tiny_qa_bert, data, tmp_path / "runs"))
    assert resolve_task_type(config) == "QUESTION_ANSWERING"
    from loralab.checks import run_checks

    report = run_checks(config, include_cost=False)
    assert not report.failed, [r.to_dict() for r in report.results]
    assert {"qa_windows", "loss"} <= {r.name for r in report.results}
    bad = write_jsonl(tmp_path / "bad.jsonl", qa_rows(4) + [{"question": "q?", "context": "abc", "answer": "zzz"}])
    config = build_config(overrides=tiny_overrides(tiny_qa_bert, bad, tmp_path / "runs"))
    with pytest.raises(DataError, match=r"bad.jsonl, row 5: field 'answer': the answer 'zzz' does not occur"):
        train(config, progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_export_merges_the_span_head(qa_run, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from loralab.tasks.qa_eval import load_qa_run

    run_dir, _, _ = qa_run
    code, out = run_cli("export", run_dir, "--output", tmp_path / "merged")
    assert code == 0, out
    assert "AutoModelForQuestionAnswering" in out
    merged = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()
    run = load_qa_run(run_dir)
    batch = run.tokenizer(["Where was person 3 born?"], ["Person 3 was born in Lima."], return_tensors="pt")
    with torch.no_grad():
        ours, theirs = run.model(**batch), merged(**batch)
    torch.testing.assert_close(theirs.start_logits, ours.start_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.end_logits, ours.end_logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    code, out = run_cli("export", run_dir, "--output", tmp_path / "merged")
    assert code != 0 and "not empty" in out  # never over an existing folder without --overwrite


def test_an_outside_qa_adapter_is_scored_with_adapter_and_model(qa_run, tiny_qa_bert, tmp_path):
    """A QUESTION_ANS adapter folder from anywhere (no run folder): eval on --data, compare, and generate refused."""
    import shutil

    run_dir, _, _ = qa_run
    outside = tmp_path / "their-adapter"
    shutil.copytree(run_dir / "adapter", outside)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(6))
    code, out = run_cli("eval", "--adapter", outside, "--model", tiny_qa_bert, "--data", data, "--output",
                        tmp_path / "scored", "--no-general-text")
    assert code == 0, out
    report = json.loads((tmp_path / "scored" / "eval.json").read_text())
    assert report["task_type"] == "QUESTION_ANSWERING" and report["adapter"]["n"] == 6
    rows = read_jsonl(tmp_path / "scored" / "predictions.jsonl")
    assert len(rows) == 6 and {"question", "reference", "base", "adapter"} <= set(rows[0])
    code, out = run_cli("compare", "--adapter", outside, "--model", tiny_qa_bert, "--prompt", "Where was person 5 born?",
                        "--context", "Person 5 was born in Porto.")
    assert code == 0 and "trained head" in out, out
    code, out = run_cli("generate", "--adapter", outside, "--model", tiny_qa_bert, "--prompt", "x")
    assert code != 0 and "QUESTION_ANSWERING" in out
    config_file = outside / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "task_type": "SEQ_CLS"}))
    code, out = run_cli("eval", "--adapter", outside, "--model", tiny_qa_bert, "--data", data, "--no-general-text")
    assert code != 0 and "is a SEQ_CLS adapter" in out and "label names" in out, out
