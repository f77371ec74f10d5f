"""What an adapter cost elsewhere: the perplexity change on general text, base model vs adapter."""

import json
import math

import pytest
import torch

from conftest import opposite_records, read_jsonl, run_cli, tiny_overrides
from loralab import forgetting
from loralab.config import build_config
from loralab.errors import DataError
from loralab.forgetting import general_text_change, halves, read_general_text
from loralab.generation import LoadedRun, inference
from loralab.training import setup, train
from test_speed import _nonzero_lora


@pytest.fixture(scope="module")
def session(tiny_llama_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("forget") / "d.json"
    data.write_text(json.dumps(opposite_records()))
    return setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path_factory.mktemp("out"))))


def _loaded(session, model):
    return LoadedRun(session.config, session.task_type, session.tokenizer, model.eval())


def _by_hand(model, tokenizer, texts, max_length, use_adapter):
    """exp(mean NLL) of each language's texts, one text at a time through the model's own loss."""
    sums = {}
    with inference(model, use_adapter):
        for text in texts:
            ids = torch.tensor([tokenizer(text.text)["input_ids"][:max_length]])
            nll, tokens = sums.get(text.lang, (0.0, 0))
            sums[text.lang] = (nll + model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1),
                               tokens + ids.shape[1] - 1)
    return {lang: (math.exp(nll / tokens), tokens) for lang, (nll, tokens) in sums.items()}


def test_bundled_sample_has_chinese_and_english_paragraphs():
    texts = read_general_text()
    assert {t.lang for t in texts} == {"zh", "en"}
    assert sum(t.lang == "zh" for t in texts) == sum(t.lang == "en" for t in texts) == 14
    assert all(len(t.text) > 60 for t in texts) and len({t.text for t in texts}) == len(texts)


def test_a_fresh_adapter_costs_nothing_and_a_trained_one_is_measured_exactly(session, monkeypatch):
    fresh = _loaded(session, session.model)  # B = 0: the adapter is the base model
    change = general_text_change(fresh)
    assert change["change_percent"] == 0 and change["base_perplexity"] == change["adapter_perplexity"]
    assert set(change["languages"]) == {"zh", "en"} and change["texts"] == 28
    moved = _loaded(session, _nonzero_lora(session.model))
    calls = []
    real = forgetting.text_losses
    monkeypatch.setattr(forgetting, "text_losses", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    after = general_text_change(moved)
    assert calls == [True]  # the same base: its numbers are reused, only the adapter is measured
    assert after["base_perplexity"] == change["base_perplexity"] and after["change_percent"] != 0
    texts, max_length = read_general_text(), session.config.data.max_length
    for use_adapter, key in ((False, "base_perplexity"), (True, "adapter_perplexity")):
        expected = _by_hand(moved.model, session.tokenizer, texts, max_length, use_adapter)
        for lang, (perplexity, tokens) in expected.items():
            assert after["languages"][lang][key] == pytest.approx(perplexity, rel=1e-4)
            assert after["languages"][lang]["tokens"] == tokens
    base, adapter = after["languages"]["zh"]["base_perplexity"], after["languages"]["zh"]["adapter_perplexity"]
    assert after["languages"]["zh"]["change_percent"] == pytest.approx(100 * (adapter / base - 1), abs=1e-2)
    assert general_text_change(moved) == after and calls == [True]  # a run in memory is measured once


def test_seq2seq_continues_the_second_half_from_the_first(tiny_mt5_dir, tmp_path):
    assert halves("第一句话很短。第二句话也不长。第三句。") == ("第一句话很短。", "第二句话也不长。第三句。")
    assert halves("Short one. A much longer second sentence. End.") == ("Short one.", "A much longer second sentence. End.")
    assert halves("no sentence end here") == ("no sentenc", "e end here")
    data = tmp_path / "d.json"
    data.write_text(json.dumps(opposite_records()))
    session = setup(build_config(overrides=tiny_overrides(tiny_mt5_dir, data, tmp_path / "out")))
    change = general_text_change(_loaded(session, _nonzero_lora(session.model)))
    assert change["tokens"] > 0 and math.isfinite(change["base_nll"]) and change["change_percent"] != 0


def test_a_bad_general_text_file_names_its_row(tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"text": "A fine paragraph.", "lang": "en"}\n{"lang": "en"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"general-text file .*general.jsonl, row 2: 'text' must be a non-empty string"):
        read_general_text(bad)


def test_loralab_eval_reports_the_change_next_to_the_task_metrics(tiny_llama_dir, opposites_file, tmp_path):
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, opposites_file, tmp_path, name="run",
                                                   **{"train.max_steps": 3, "train.learning_rate": 0.1}))
    train(config, progress=False)
    run = tmp_path / "run"
    code, out = run_cli("eval", run, "--limit", 2, "--max-new-tokens", 4, "--show", 0)
    assert code == 0, out
    assert "what the adapter cost elsewhere" in out and "zh" in out and "en" in out
    report = json.loads((run / "eval.json").read_text())
    change = report["general_text"]
    assert change["file"] == "bundled general_text.jsonl" and set(change["languages"]) == {"zh", "en"}
    assert change["adapter_perplexity"] != change["base_perplexity"]  # three steps at a high rate moved it
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "The opposite of hot is cold."}\n', encoding="utf-8")
    code, out = run_cli("eval", run, "--limit", 1, "--max-new-tokens", 2, "--show", 0, "--general-text", mine)
    assert code == 0, out
    assert set(json.loads((run / "eval.json").read_text())["general_text"]["languages"]) == {"all"}
    code, out = run_cli("eval", run, "--limit", 1, "--max-new-tokens", 2, "--show", 0, "--no-general-text")
    assert code == 0 and "general_text" not in json.loads((run / "eval.json").read_text())
    assert "cost elsewhere" not in out
    (tmp_path / "bad.jsonl").write_text('{"lang": "en"}\n', encoding="utf-8")
    code, out = run_cli("eval", run, "--limit", 1, "--general-text", tmp_path / "bad.jsonl")
    assert code == 1 and "bad.jsonl, row 1" in out and "Traceback" not in out
    assert read_jsonl(run / "predictions.jsonl")  # the earlier predictions stay
