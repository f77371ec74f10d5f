"""Sequence classification (SEQ_CLS) end to end: label names, eval (accuracy / macro-F1), compare, export."""

import json
import shutil

import pytest
import torch

from loralab.classification import classification_scores, load_classifier, macro_f1, predict_labels
from loralab.config import build_config
from loralab.data import Example, label_vocabulary
from loralab.errors import LoralabError
from loralab.evaluation import compare_prompts, evaluate_run
from loralab.export import export_merged
from loralab.training import setup, train
from conftest import read_jsonl, run_cli, WORDS, tiny_overrides



_cli, _lines = run_cli, read_jsonl


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _mood_rows(labels):
    """A learnable task: the label follows the mood word, whatever the other word (48 rows)."""
    return [{"text": f"{a} and {mood}", "label": label} for a, _ in WORDS for mood, label in zip(("happy", "sad"), labels)]


CLS = {"data.prompt_field": "text", "train.epochs": 6, "data.eval_split": 0.25, "train.learning_rate": 1e-2}


@pytest.fixture(scope="module")
def signed_run(tiny_bert_dir, tmp_path_factory):
    """A BERT run whose labels are the integers 1 (happy) and -1 (sad): ids must become 0..1, names stay -1 / 1."""
    tmp = tmp_path_factory.mktemp("cls")
    data = _write_jsonl(tmp / "signed.jsonl", _mood_rows([1, -1]))
    train(build_config(overrides=tiny_overrides(tiny_bert_dir, data, tmp / "runs", name="signed", **CLS)), progress=False)
    return tmp / "runs" / "signed"


@pytest.fixture(scope="module")
def signed(signed_run):
    return load_classifier(signed_run)


@pytest.fixture(scope="module")
def llama_cls_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny causal Llama without a pad token id in its config (as many decoder-only checkpoints ship)."""
    folder = tmp_path_factory.mktemp("llama-nopad")
    for item in tiny_llama_dir.iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def text_run(llama_cls_dir, tmp_path_factory):
    """LlamaForSequenceClassification (a new, random head) on three text labels, batch size 4."""
    tmp = tmp_path_factory.mktemp("cls-text")
    rows = _mood_rows(["pos", "neg"]) + [{"text": f"{a} and {b}", "label": "neutral"} for a, b in WORDS]
    data = _write_jsonl(tmp / "moods.jsonl", rows)
    overrides = tiny_overrides(llama_cls_dir, data, tmp / "runs", name="moods", **{**CLS, "model.task_type": "SEQ_CLS", "train.epochs": 4})
    train(build_config(overrides=overrides), progress=False)
    return tmp / "runs" / "moods"


def test_any_label_values_become_ids_0_to_n_minus_1():
    def vocab(*labels):
        return label_vocabulary([Example(prompt="x", response=label, row=i) for i, label in enumerate(labels)])

    assert vocab("1", "-1", "1") == {"-1": 0, "1": 1}
    assert vocab("7", "3") == {"3": 0, "7": 1}
    assert vocab("10", "9", "-2") == {"-2": 0, "9": 1, "10": 2}  # numeric, not text order
    assert vocab("positive", "negative", "neutral") == {"negative": 0, "neutral": 1, "positive": 2}
    assert vocab("1", "x") == {"1": 0, "x": 1}  # not all integers: text order


def test_macro_f1_is_the_mean_of_per_class_f1():
    references = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "c", "c"]
    # a: P 1, R 2/3 -> 0.8; b: P 1/2, R 1/2 -> 0.5; c: P 1/2, R 1 -> 2/3
    assert macro_f1(predicted, references) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert classification_scores(predicted, references) == {"accuracy": pytest.approx(4 / 6),
                                                            "macro_f1": pytest.approx(0.65556, abs=1e-4), "n": 6}
    assert classification_scores(["x", "x"], ["a", "b"])["macro_f1"] == 0.0  # never right: 0, not an error


def test_the_run_saves_its_label_names(signed_run, signed):
    saved = json.loads((signed_run / "adapter" / "labels.json").read_text())
    assert saved == {"id2label": {"0": "-1", "1": "1"}, "label2id": {"-1": 0, "1": 1}}
    assert json.loads((signed_run / "summary.json").read_text())["labels"] == ["-1", "1"]
    assert signed.task_type == "SEQ_CLS"
    assert signed.model.config.id2label == {0: "-1", 1: "1"} and signed.model.config.label2id == {"-1": 0, "1": 1}
    labels, probabilities = predict_labels(signed, ["hot and happy", "cold and sad"])
    assert set(labels) <= {"-1", "1"} and all(0.5 <= p <= 1 for p in probabilities)


def test_eval_scores_the_trained_head_against_the_base_head(signed_run, signed, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    report = evaluate_run(signed_run, progress=False)
    saved = json.loads((signed_run / "eval.json").read_text())
    assert saved == {k: v for k, v in report.items() if k not in ("references", "predictions")}
    assert saved["task_type"] == "SEQ_CLS" and saved["labels"] == ["-1", "1"] and saved["data"] == "eval split"
    assert saved["checkpoint"] == "adapter" and saved["n"] == 12
    for side in ("base", "adapter"):
        assert set(saved[side]) == {"accuracy", "macro_f1", "n"} and saved[side]["n"] == 12
        assert 0 <= saved[side]["accuracy"] <= 1 and 0 <= saved[side]["macro_f1"] <= 1
    assert saved["adapter"]["accuracy"] >= 0.75 and saved["adapter"]["accuracy"] > saved["base"]["accuracy"] + 0.25  # learned

    rows = _lines(signed_run / "predictions.jsonl")
    assert len(rows) == 12 and rows == report["predictions"]
    assert {r["reference"] for r in rows} <= {"-1", "1"} and {r["base"] for r in rows} | {r["adapter"] for r in rows} <= {"-1", "1"}
    assert all(r["reference"] == ("1" if r["text"].endswith("happy") else "-1") for r in rows)
    for side in ("base", "adapter"):  # eval.json agrees with the lines it was computed from
        assert saved[side] == classification_scores([r[side] for r in rows], [r["reference"] for r in rows])

    # the base head is the base model's own head, untouched by training
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = signed.tokenizer
    with torch.no_grad():
        expected = [int(plain(**tok(r["text"], return_tensors="pt")).logits.argmax()) for r in rows]
    assert [r["base"] for r in rows] == [signed.model.config.id2label[i] for i in expected]


def test_eval_on_a_file_with_limit_and_without_labels(signed_run, tmp_path):
    labelled = _write_jsonl(tmp_path / "more.jsonl", [{"text": "hot and happy", "label": 1}, {"text": "dry and sad", "label": -1},
                                                      {"text": "wet and sad", "label": -1}])
    report = evaluate_run(signed_run, data_path=labelled, limit=2, progress=False)
    assert report["n"] == 2 and report["adapter"]["n"] == 2 and report["data"] == str(labelled)
    assert [r["reference"] for r in report["predictions"]] == ["1", "-1"]
    before = (signed_run / "eval.json").read_text()
    unlabelled = _write_jsonl(tmp_path / "texts.jsonl", [{"text": "hot and happy"}, {"text": "cold and sad"}])
    report = evaluate_run(signed_run, data_path=unlabelled, progress=False)
    assert report["base"] is None and not report["references"] and (signed_run / "eval.json").read_text() == before
    rows = _lines(signed_run / "predictions.jsonl")
    assert [r["reference"] for r in rows] == [None, None] and {r["adapter"] for r in rows} <= {"-1", "1"}
    with pytest.raises(LoralabError, match="--limit must be at least 1"):
        evaluate_run(signed_run, limit=0, progress=False)
    # a Trainer checkpoint holds no labels.json: the run's label names still apply
    latest = evaluate_run(signed_run, data_path=labelled, checkpoint="latest", progress=False)
    assert latest["checkpoint"].startswith("checkpoints/checkpoint-") and latest["labels"] == ["-1", "1"]
    assert {r["adapter"] for r in latest["predictions"]} <= {"-1", "1"}


def test_eval_and_compare_cli(signed_run, signed):
    code, out = _cli("eval", signed_run, "--show", "2")
    assert code == 0, out
    for fragment in ("accuracy (0-1)", "macro-F1 (0-1)", "base head", "trained head", "labels: -1, 1",
                     "first 2 predictions", "wrote eval.json and predictions.jsonl"):
        assert fragment in out, out
    saved = json.loads((signed_run / "eval.json").read_text())
    assert f"{saved['adapter']['accuracy']:.3f}" in out and f"{saved['base']['macro_f1']:.3f}" in out

    prompts = ["warm and happy", "tall and sad"]
    expected = compare_prompts(signed_run, prompts, loaded=signed)
    assert [r["adapter"] for r in expected] == predict_labels(signed, prompts)[0]
    assert [r["base"] for r in expected] == predict_labels(signed, prompts, use_adapter=False)[0]
    code, out = _cli("compare", signed_run, "--prompt", prompts[0], "--prompt", prompts[1], "--json")
    assert code == 0, out
    assert json.loads(out) == expected
    code, out = _cli("compare", signed_run, "--prompt", prompts[0])
    assert code == 0 and "trained head" in out and f"{expected[0]['adapter']} (" in out and "warm and happy" in out, out
    code, out = _cli("generate", signed_run, "--prompt", "x")
    assert code == 1 and "is a SEQ_CLS run" in out and "loralab eval" in out and "Traceback" not in out, out


def test_export_merges_the_classifier_with_its_label_names(signed_run, signed, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = export_merged(signed_run, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "-1", 1: "1"} and merged.config.label2id == {"-1": 0, "1": 1}
    batch = AutoTokenizer.from_pretrained(out)(["hot and happy", "a longer text: cold and sad"], padding=True,
                                               return_tensors="pt")
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = signed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert [merged.config.id2label[int(i)] for i in got.argmax(-1)] == predict_labels(signed, ["hot and happy", "a longer text: cold and sad"])[0]
    code, text = _cli("export", signed_run, "--output", tmp_path / "merged")
    assert code == 1 and "not empty" in text


def test_decoder_only_classifier_with_text_labels(text_run, llama_cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert json.loads((text_run / "summary.json").read_text())["labels"] == ["neg", "neutral", "pos"]
    assert json.loads((text_run / "adapter" / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    run = load_classifier(text_run)
    assert type(run.model.get_base_model()).__name__ == "LlamaForSequenceClassification"
    assert run.model.config.pad_token_id == run.tokenizer.pad_token_id  # else batches above one fail
    report = evaluate_run(text_run, loaded=run, progress=False)
    assert report["labels"] == ["neg", "neutral", "pos"] and report["n"] == 18
    assert {r["adapter"] for r in report["predictions"]} | {r["base"] for r in report["predictions"]} <= {"neg", "neutral", "pos"}
    assert report["adapter"]["accuracy"] > report["base"]["accuracy"] and 0 <= report["adapter"]["macro_f1"] <= 1

    # the new head is the one training started from (seeded as train() seeds it), so "base" predictions are reproducible
    from transformers import set_seed

    set_seed(run.config.train.seed)
    initial = setup(run.config).model.base_model.model.score.original_module.weight
    assert torch.equal(run.model.base_model.model.score.original_module.weight, initial)

    out = export_merged(text_run, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert merged.config.pad_token_id == run.tokenizer.pad_token_id
    texts = ["hot and happy", "a much longer text: cold and sad"]
    batch = run.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits,
                              run.model(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
