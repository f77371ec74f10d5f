"""Token classification (TOKEN_CLS) end to end: entity spans, label alignment, training, reload, eval, compare, errors."""

import json
from pathlib import Path

import pytest
import torch

from loralab.config import build_config
from loralab.errors import DataError, LoralabError
from loralab.evaluation import compare_prompts, evaluate_run
from loralab.formats import Example
from loralab.models import resolve_task_type
from loralab.tasks.token_cls import parse_token_rows, tokenize_token_cls
from loralab.tasks.token_eval import load_token_classifier, predict_tags, word_logits
from loralab.tasks.token_metrics import entity_spans, token_scores
from loralab.training import load_tokenizer_and_data, train
from conftest import read_jsonl, run_cli, tiny_overrides

DEMO = Path(__file__).resolve().parents[1] / "src/loralab/resources/ner_demo.jsonl"
TOKEN = {"model.task_type": "TOKEN_CLS", "train.epochs": 8, "train.batch_size": 8, "train.learning_rate": 3e-2,
         "data.eval_split": 0.2}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- entity spans and scores (seqeval's default mode)


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O"], [("PER", 0, 1)]),
    (["I-PER", "I-PER", "O", "I-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),  # I- without B- starts an entity
    (["B-PER", "B-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),  # adjacent entities of different types
    (["B-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),  # a type change ends the entity and starts another
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),  # B- after B-: two entities of one type
    (["O", "O", "B-ORG", "I-ORG"], [("ORG", 2, 3)]),  # entity at sentence end
    (["O", "O"], []),
    (["S-LOC", "B-PER", "E-PER"], [("LOC", 0, 0), ("PER", 1, 2)]),  # IOBES
])
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


def test_token_scores_hand_made():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    scores = token_scores(predicted, references)
    # entities: PER(0-1) right, LOC missed, ORG right, a spurious LOC; 2 of 3 found, 2 of 3 predicted right
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["token_accuracy"] == pytest.approx(4 / 6)
    assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["per_type"]["PER"]["f1"] == 1.0 and scores["entities"] == 3 and scores["words"] == 6
    # a prediction cut short (truncated words): the missing words count as O
    assert token_scores([["B-PER"]], [["B-PER", "O"]])["token_accuracy"] == 1.0


# ---------------------------------------------------------------- rows and label alignment


def test_label_alignment_token_by_token(tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    cfg = build_config(overrides=[f"model.name_or_path={tiny_bert_dir}"]).data
    words, tags = ["zebrafish", "opposite", "Kyoto-xq", "is"], ["B-PER", "O", "B-LOC", "O"]
    label_ids = {"B-LOC": 0, "B-PER": 1, "O": 2}
    item = tokenize_token_cls(tok, Example(prompt=json.dumps(words), response=json.dumps(tags), row=1), cfg, label_ids)
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    assert any(len(p) > 1 for p in pieces)  # some words are several sub-tokens
    expected_ids = [tok.cls_token_id] + [i for p in pieces for i in p] + [tok.sep_token_id]
    expected_labels = [-100] + [x for p, t in zip(pieces, tags) for x in [label_ids[t]] + [-100] * (len(p) - 1)] + [-100]
    assert item.input_ids == expected_ids
    assert item.labels == expected_labels
    assert not item.truncated and item.response_length == 4


def test_integer_tags_and_hf_field_names(tiny_bert_dir):
    cfg = build_config(overrides=[f"model.name_or_path={tiny_bert_dir}", "data.tag_names=[O, B-PER, I-PER]"]).data
    [example] = parse_token_rows([(1, {"tokens": ["Anna", "Smith", "sings"], "ner_tags": [1, 2, 0]})], cfg, "f.jsonl")
    assert json.loads(example.response) == ["B-PER", "I-PER", "O"]
    plain = build_config(overrides=[f"model.name_or_path={tiny_bert_dir}"]).data
    [example] = parse_token_rows([(1, {"tokens": ["Anna"], "tags": [3]})], plain, "f.jsonl")
    assert json.loads(example.response) == ["3"]


@pytest.mark.parametrize("row, message", [
    ({"tokens": ["Anna", "sings"], "tags": ["B-PER"]}, "row 2: field 'tags' has 1 tags but 'tokens' has 2 words"),
    ({"words": ["Anna"], "tags": ["B-PER"]}, "row 2: missing field 'tokens' (the sentence's words); found 'words', 'tags'"),
    ({"tokens": ["Anna"]}, "row 2: missing field 'tags' (one tag per word)"),
    ({"tokens": [], "tags": []}, "row 2: field 'tokens' is an empty sentence"),
    ({"tokens": ["Anna", " "], "tags": ["B-PER", "O"]}, "row 2: field 'tokens', word 2: ' ' should be a non-empty word"),
])
def test_bad_rows_fail_before_training(tiny_bert_dir, tmp_path, row, message):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["Tom", "runs"], "tags": ["B-PER", "O"]}, row])
    config = build_config(overrides=tiny_overrides(tiny_bert_dir, data, tmp_path / "runs", **{"model.task_type": "TOKEN_CLS"}))
    with pytest.raises(DataError) as info:
        load_tokenizer_and_data(config)
    assert f"data file {data}, {message}" in str(info.value)
    code, out = run_cli("train", "--set", f"model.name_or_path={tiny_bert_dir}", "--set", f"data.path={data}",
                        "--set", "model.task_type=TOKEN_CLS", "--set", f"output_dir={tmp_path / 'runs'}")
    assert code != 0 and message.split(": ", 1)[1][:30] in " ".join(out.split()), out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_detected_for_an_encoder_else_a_clear_message(tiny_bert_dir, tiny_llama_dir, tmp_path):
    data = _write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Tom", "runs"], "tags": ["B-PER", "O"]}])
    assert resolve_task_type(build_config(overrides=tiny_overrides(tiny_bert_dir, data, tmp_path))) == "TOKEN_CLS"
    with pytest.raises(LoralabError, match="set model.task_type: TOKEN_CLS"):
        resolve_task_type(build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path)))


# ---------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def ner_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner")
    from loralab.checks import fast_preflight

    train(build_config(overrides=tiny_overrides(tiny_bert_dir, DEMO, tmp / "runs", name="ner", **TOKEN)), progress=False,
          preflight=fast_preflight)
    return tmp / "runs" / "ner"


@pytest.fixture(scope="module")
def ner(ner_run):
    return load_token_classifier(ner_run)


def test_training_loss_falls_and_labels_saved(ner_run):
    losses = [m["loss"] for m in read_jsonl(ner_run / "metrics.jsonl") if "loss" in m]
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.7, losses
    labels = json.loads((ner_run / "adapter" / "labels.json").read_text())
    assert labels["label2id"] == {n: i for i, n in enumerate(
        ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"])}
    summary = json.loads((ner_run / "summary.json").read_text())
    assert summary["task_type"] == "TOKEN_CLS" and summary["labels"][-1] == "O"
    checks = json.loads((ner_run / "checks.json").read_text())
    assert checks["ok"] and not checks["failed"], checks
    assert {c["name"] for c in checks["checks"]} >= {"token_labels", "target_modules", "data_flow", "loss"}


def test_adapter_reloads_with_plain_peft(ner_run, ner, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    labels = json.loads((ner_run / "adapter" / "labels.json").read_text())
    base = AutoModelForTokenClassification.from_pretrained(tiny_bert_dir, num_labels=len(labels["id2label"]),
                                                            ignore_mismatched_sizes=True)  # the fixture's 2-class head
    model = PeftModel.from_pretrained(base, str(ner_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(ner_run / "adapter")
    words = ["Anna", "Schmidt", "lives", "in", "Oslo", "."]
    encoded = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    firsts = sorted({w: i for i, w in reversed(list(enumerate(encoded.word_ids()))) if w is not None}.items())
    expected = word_logits(ner, [words])[0]
    assert torch.allclose(logits[[i for _, i in firsts]], expected, atol=1e-5)


def test_eval_json_and_predictions(ner_run, ner):
    report = evaluate_run(ner_run, loaded=ner, progress=False)
    saved = json.loads((ner_run / "eval.json").read_text())
    assert saved["task_type"] == "TOKEN_CLS" and saved["n"] == 36 and saved["split"] == "eval"
    for side in ("base", "adapter"):
        for key in ("token_accuracy", "precision", "recall", "f1", "per_type", "entities", "words"):
            assert key in saved[side], (side, key)
    rows = read_jsonl(ner_run / "predictions.jsonl")
    assert len(rows) == 36 and set(rows[0]) == {"row", "words", "reference", "base", "adapter"}
    assert all(len(r["words"]) == len(r["reference"]) == len(r["base"]) == len(r["adapter"]) for r in rows)
    # the scores are those of the written predictions
    assert saved["adapter"] == token_scores([r["adapter"] for r in rows], [r["reference"] for r in rows])
    assert saved["base"] == token_scores([r["base"] for r in rows], [r["reference"] for r in rows])
    assert report["adapter"]["token_accuracy"] > report["base"]["token_accuracy"]  # (a tiny random BERT: little F1)
    assert [r["adapter"] for r in rows[:3]] == predict_tags(ner, [r["words"] for r in rows[:3]])


def test_eval_and_compare_cli(ner_run, ner):
    code, out = run_cli("eval", ner_run, "--show", "2")
    assert code == 0, out
    for fragment in ("entity F1 (0-1)", "token accuracy (0-1)", "base head", "trained head", "first 2 sentences",
                     "wrote eval.json and predictions.jsonl"):
        assert fragment in out, out
    text = "Maria Lopez visited Berlin last week ."
    code, out = run_cli("compare", ner_run, "--prompt", text)
    assert code == 0 and "Berlin" in out and "trained head" in out, out
    code, out = run_cli("compare", ner_run, "--prompt", text, "--json")
    assert code == 0, out
    [row] = json.loads(out)
    assert row["words"] == text.split() and len(row["base"]) == len(row["adapter"]) == 7
    assert row == compare_prompts(ner_run, [text], loaded=ner)[0]
    code, out = run_cli("generate", ner_run, "--prompt", "x")
    assert code != 0 and "TOKEN_CLS" in out


def test_export_merges(ner_run, ner, tmp_path):
    from transformers import AutoModelForTokenClassification

    code, out = run_cli("export", ner_run, "--output", tmp_path / "merged")
    assert code == 0, out
    merged = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label[0] == "B-LOC"
    words = ["Tom", "works", "for", "Acme", "Corp", "."]
    ner.model, original = merged, ner.model
    try:
        got = word_logits(ner, [words])[0]
    finally:
        ner.model = original
    assert torch.allclose(got, word_logits(ner, [words])[0], atol=1e-4)
