"""Preflight checks: each one passes on good input and fails on the bug it exists to catch."""

import json

import pytest
import torch
from typer.testing import CliRunner

from loralab.checks import (check_cost, check_data_flow, check_hygiene, check_hyperparameters, check_label_masking,
                            check_lengths, check_loss, check_targets, check_tokenizer, fast_preflight, render_examples,
                            run_checks)
from loralab.cli import app
from loralab.config import build_config
from loralab.data import IGNORE_INDEX
from loralab.errors import LoralabError
from loralab.training import Session, load_tokenizer_and_data, setup
from conftest import opposite_records, tiny_overrides

runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("checks") / "opposites.json"
    path.write_text(json.dumps(opposite_records()))
    return path


def _config(model_dir, data, tmp, **extra):
    return build_config(overrides=tiny_overrides(model_dir, data, tmp, **extra))


@pytest.fixture(scope="module")
def session(tiny_llama_dir, data_file, tmp_path_factory):
    """The tiny Llama with the packing collator (train.packing=true)."""
    return setup(_config(tiny_llama_dir, data_file, tmp_path_factory.mktemp("runs"), **{"train.packing": "true"}))


@pytest.fixture(scope="module")
def padded(tiny_llama_dir, data_file, tmp_path_factory):
    """The tiny Llama with the padding collator (train.packing=false)."""
    return setup(_config(tiny_llama_dir, data_file, tmp_path_factory.mktemp("runs"), **{"train.packing": "false"}))


def data_session(config):
    """A session without model weights: enough for the data checks."""
    task_type, tokenizer, data = load_tokenizer_and_data(config)
    return Session(config, task_type, tokenizer, data, model=None, targets=None, collator=None)


def _run(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.stdout + (result.stderr if result.stderr_bytes is not None else "")


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


# ---------------------------------------------------------------- the whole report


def test_every_check_passes_or_warns_on_good_data(tiny_llama_dir, data_file, tmp_path):
    report = run_checks(_config(tiny_llama_dir, data_file, tmp_path), show=2)
    assert [r.name for r in report.results] == ["data", "tokenizer", "data_hygiene", "lengths", "label_masking",
                                                "hyperparameters", "target_modules", "data_flow", "loss", "cost"]
    assert report.ok, report.to_json()
    hyper = report.get("hyperparameters")
    assert hyper.status == "warn" and "learning_rate 0.03 is outside the usual LoRA range" in hyper.reason
    cost = report.get("cost").details
    assert cost["seconds_per_step"] > 0 and cost["steps_per_epoch"] == 5 and cost["peak_memory_bytes"] > 0
    assert len(report.examples) == 2 and "[[" in report.examples[0]
    as_json = json.loads(report.to_json())
    assert as_json["ok"] is True and as_json["checks"][0]["name"] == "data" and as_json["examples"] == report.examples


def test_seq2seq_and_classification_pass(tiny_t5_dir, tiny_mt5_dir, tiny_bert_dir, data_file, sentiment_file, tmp_path):
    for model_dir in (tiny_t5_dir, tiny_mt5_dir):
        report = run_checks(_config(model_dir, data_file, tmp_path), include_cost=False, show=1)
        assert report.ok, report.to_json()
        assert "decoder_input_ids" in report.get("data_flow").reason
        assert "target: [[" in report.examples[0]
    assert "wi_0×4 wi_1×4" in report.get("target_modules").reason  # mt5's gated feed-forward preset
    report = run_checks(_config(tiny_bert_dir, sentiment_file, tmp_path, **{"data.prompt_field": "text"}), include_cost=False)
    assert report.ok, report.to_json()
    assert "2 classes" in report.get("label_masking").reason


def test_bad_rows_are_a_failing_data_check_not_a_crash(tiny_llama_dir, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "response": "b"}, {"instruction": "c", "answer": "d"}]))
    report = run_checks(_config(tiny_llama_dir, path, tmp_path))
    assert [(r.name, r.status) for r in report.results] == [("data", "fail")]
    assert "row 2: missing field 'response'" in report.results[0].reason
    with pytest.raises(LoralabError, match="row 2"):
        run_checks(_config(tiny_llama_dir, path, tmp_path), debug=True)


# ---------------------------------------------------------------- label masking


def test_label_masking_passes_with_packing_and_padding(session, padded):
    for s in (session, padded):
        result = check_label_masking(s)
        assert result.status == "pass", result.reason
        assert "prompt masked (-100), response + EOS supervised" in result.reason


def test_collator_that_forgets_minus_100_fails(padded, monkeypatch):
    from transformers import DataCollatorForSeq2Seq

    tokenizer = padded.tokenizer
    monkeypatch.setattr(padded, "collator", DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=tokenizer.pad_token_id))
    result = check_label_masking(padded)
    assert result.status == "fail" and "padding positions are supervised" in result.reason


def test_collator_that_masks_eos_fails(padded, monkeypatch):
    real = padded.collator
    pad = padded.tokenizer.pad_token_id  # == EOS for this tokenizer, as for SmolLM2

    def masks_pad_ids(features):
        batch = real(features)
        batch["labels"][batch["labels"] == pad] = IGNORE_INDEX  # the classic bug
        return batch

    monkeypatch.setattr(padded, "collator", masks_pad_ids)
    result = check_label_masking(padded)
    assert result.status == "fail" and "masked 19 of 19 target EOS tokens" in result.reason


def test_eos_masked_in_tokenized_data_fails_with_row(session, monkeypatch):
    first = session.data.train.tokenized[0]
    broken = type(first)(**{**first.__dict__, "labels": first.labels[:-1] + [IGNORE_INDEX]})
    monkeypatch.setattr(session.data.train, "tokenized", [broken, *session.data.train.tokenized[1:]])
    result = check_label_masking(session)
    row = session.data.train_examples[0].row
    assert result.status == "fail" and f"EOS is masked or missing in 1 examples (rows {row})" in result.reason


def test_supervised_prompt_fails(session, monkeypatch):
    first = session.data.train.tokenized[0]
    broken = type(first)(**{**first.__dict__, "labels": list(first.input_ids)})
    monkeypatch.setattr(session.data.train, "tokenized", [broken, *session.data.train.tokenized[1:]])
    result = check_label_masking(session)
    assert result.status == "fail" and "prompt tokens supervised in 1 examples" in result.reason


def test_packing_that_predicts_across_examples_fails(tiny_llama_dir, data_file, tmp_path):
    s = setup(_config(tiny_llama_dir, data_file, tmp_path, **{"data.train_on_prompt": "true"}))
    assert check_label_masking(s).status == "pass"

    def naive_pack(features):  # one row, positions restart, but every label kept
        ids = [t for f in features for t in f["input_ids"]]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([[t for f in features for t in f["labels"]]]),
                "position_ids": torch.tensor([[p for f in features for p in range(len(f["input_ids"]))]])}

    s.collator = naive_pack
    result = check_label_masking(s)
    assert result.status == "fail" and "first token supervised" in result.reason


# ---------------------------------------------------------------- lengths, hygiene, tokenizer, hyperparameters


def test_lengths_fail_when_most_responses_are_cut(tiny_llama_dir, data_file, tmp_path):
    good = check_lengths(data_session(_config(tiny_llama_dir, data_file, tmp_path)))
    assert good.status == "pass" and "none truncated" in good.reason
    assert good.details["prompt_tokens"]["max"] == 19 and good.details["truncated_examples"] == 0
    bad = check_lengths(data_session(_config(tiny_llama_dir, data_file, tmp_path, **{"data.max_length": 12})))
    assert bad.status == "fail" and "24 of 24 responses cut by data.max_length=12" in bad.reason
    assert bad.details["prompt_tokens"]["max"] == 19  # lengths before truncation
    assert "the longest example needs 29 tokens" in bad.reason


def test_hygiene_finds_empty_fields_duplicates_and_shared_examples(tiny_llama_dir, data_file, tmp_path):
    assert check_hygiene(data_session(_config(tiny_llama_dir, data_file, tmp_path))).status == "pass"
    records = opposite_records()
    records[3]["response"] = "   "
    records += [records[0]] * 6  # duplicates; with a 20% eval split some land in both splits
    path = tmp_path / "dirty.json"
    path.write_text(json.dumps(records))
    result = check_hygiene(data_session(_config(tiny_llama_dir, path, tmp_path)))
    assert result.status == "fail"
    assert "empty or whitespace-only response in 1 examples" in result.reason and "exact duplicates in train" in result.reason
    assert "also in train" in result.reason and result.details["train_eval_shared"]
    # a test file that repeats training rows: it would no longer measure unseen data
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(opposite_records()[:3] + [{"instruction": "Give the opposite of new.", "response": "old"}]))
    result = check_hygiene(data_session(_config(tiny_llama_dir, data_file, tmp_path, **{"data.test_path": str(test_file)})))
    assert result.status == "warn" and "test examples also in train or eval (test rows" in result.reason
    assert len(result.details["test_shared"]) == 3


def test_tokenizer_check(session, tiny_llama_dir):
    import dataclasses

    from transformers import AutoTokenizer

    result = check_tokenizer(session)
    assert result.status == "pass" and "generation pads left" in result.reason and "(= EOS" in result.reason
    # A fresh tokenizer object without a pad token (the shared session's tokenizer stays untouched).
    no_pad = AutoTokenizer.from_pretrained(tiny_llama_dir, pad_token=None)
    assert no_pad.pad_token_id is None
    result = check_tokenizer(dataclasses.replace(session, tokenizer=no_pad))
    assert result.status == "fail" and "no pad token" in result.reason


def test_hyperparameter_warnings_and_failure(session, monkeypatch):
    train, lora = session.config.train, session.config.lora
    monkeypatch.setattr(train, "learning_rate", 2e-4)
    monkeypatch.setattr(lora, "dropout", 0.05)
    monkeypatch.setattr(train, "epochs", 2)
    assert check_hyperparameters(session).status == "pass", check_hyperparameters(session).reason
    monkeypatch.setattr(train, "learning_rate", 0.5)
    monkeypatch.setattr(lora, "alpha", 512)
    result = check_hyperparameters(session)
    assert result.status == "warn" and "learning_rate 0.5" in result.reason and "scaling alpha/r = 64" in result.reason
    if not torch.cuda.is_available():
        monkeypatch.setattr(train, "precision", "fp16")
        result = check_hyperparameters(session)
        assert result.status == "fail" and "fp16 needs a CUDA GPU" in result.reason


# ---------------------------------------------------------------- model checks


def test_target_modules(session, tiny_llama_dir, data_file, tmp_path):
    result = check_targets(session)
    assert result.status == "pass" and "q_proj×2" in result.reason and "parameters trainable" in result.reason
    s = setup(_config(tiny_llama_dir, data_file, tmp_path, **{"lora.target_modules": "[q_proj, v_prj]"}))
    result = check_targets(s)
    assert result.status == "fail" and "['v_prj'] matched nothing" in result.reason and "v_proj" in result.reason
    assert result.details["per_type"] == {"q_proj": 2}
    report = run_checks(_config(tiny_llama_dir, data_file, tmp_path, **{"lora.target_modules": "[wi, wo]"}), include_cost=False)
    assert report.get("model").status == "fail" and "matched no module" in report.get("model").reason
    assert report.get("lengths").status == "pass"  # the data checks still ran


def test_data_flow(session, padded, monkeypatch):
    packed = check_data_flow(session)
    assert packed.status == "pass" and "position_ids" in packed.reason and "packed: 4 examples" in packed.reason
    result = check_data_flow(padded)
    assert result.status == "pass" and "attention_mask 4×" in result.reason
    real = padded.collator

    def short_mask(features):
        batch = real(features)
        batch["attention_mask"] = batch["attention_mask"][:, :-1]
        batch["labels"] = batch["labels"].float()
        return batch

    monkeypatch.setattr(padded, "collator", short_mask)
    result = check_data_flow(padded)
    assert result.status == "fail" and "attention_mask shape" in result.reason and "labels has dtype torch.float32" in result.reason


def test_loss_and_gradients(session, monkeypatch):
    result = check_loss(session)
    assert result.status == "pass" and "gradients reach all 28 LoRA tensors" in result.reason
    assert all(p.grad is None for p in session.model.parameters())  # no side effect
    lora_b = next(m for n, m in session.model.named_modules() if n.endswith("q_proj.lora_B.default"))
    handle = lora_b.register_forward_hook(lambda module, args, output: output.detach())
    try:
        result = check_loss(session)
    finally:
        handle.remove()
    assert result.status == "fail" and "2 of 28 LoRA tensors get no gradient" in result.reason
    base = next(p for n, p in session.model.named_parameters() if n.endswith("layers.0.self_attn.k_proj.base_layer.weight"))
    base.requires_grad_(True)
    try:
        result = check_loss(session)
    finally:
        base.requires_grad_(False)
    assert result.status == "fail" and "1 base-model weights are trainable" in result.reason
    real = session.collator

    def no_targets(features):
        batch = real(features)
        batch["labels"][:] = IGNORE_INDEX
        return batch

    monkeypatch.setattr(session, "collator", no_targets)
    assert check_loss(session).status == "fail"


def test_cost_restores_weights_and_catches_divergence(session, monkeypatch):
    before = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    result = check_cost(session)
    assert result.status == "pass" and "s/step" in result.reason and len(result.details["losses"]) == 3
    after = dict(session.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    monkeypatch.setattr(session.config.train, "learning_rate", 1e30)
    monkeypatch.setattr(session.config.train, "max_grad_norm", 1e30)
    result = check_cost(session)
    assert result.status == "fail" and "training would diverge" in result.reason
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_fast_preflight(session, monkeypatch):
    fast_preflight(session)  # passes: nothing raised
    first = session.data.train.tokenized[0]
    monkeypatch.setattr(session.data.train, "tokenized",
                        [type(first)(**{**first.__dict__, "labels": [IGNORE_INDEX] * len(first.labels)}),
                         *session.data.train.tokenized[1:]])
    with pytest.raises(LoralabError, match=r"(?s)label_masking: no supervised token.*loralab check.*--skip-checks"):
        fast_preflight(session)


# ---------------------------------------------------------------- showing examples


def test_render_marks_supervised_tokens(session, padded):
    for s in (session, padded):
        text = render_examples(s, 3)
        assert len(text) == 3
        response = s.data.train_examples[0].response
        assert f"<|im_start|>assistant\n[[{response}<|im_end|>]]" in text[0]
        assert "<|im_start|>user" in text[0] and text[0].count("[[") == 1
    colored = render_examples(session, 1, color=True)[0]
    assert any(span.style == "bold green underline" for span in colored.spans)


def test_render_shows_padding_outside_the_supervised_span(padded):
    shown = "\n".join(render_examples(padded, 4))
    assert "<pad <|im_end|> ×" in shown and "[[<pad" not in shown


# ---------------------------------------------------------------- command line


def test_cli_check_table_show_and_exit_codes(tiny_llama_dir, data_file, tmp_path):
    sets = _sets(tiny_overrides(tiny_llama_dir, data_file, tmp_path))
    code, out = _run(["check", "--fast", "--show", "2", *sets])
    assert code == 0, out
    assert "[[The opposite of" in out and "<|im_end|>]]" in out and "label_masking" in out and "nothing failed" in out
    code, out = _run(["check", "--fast", "--json", *sets, "--set", "data.max_length=12"])
    assert code == 1
    report = json.loads(out[out.index("{"):])
    assert report["ok"] is False and report["failed"] == ["lengths"]
    assert {c["name"]: c["status"] for c in report["checks"]}["lengths"] == "fail"


def test_cli_check_reports_bad_rows_without_traceback(tiny_llama_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": 3}\n')
    code, out = _run(["check", "--model", str(tiny_llama_dir), "--data", str(path)])
    flat = " ".join(out.replace("│", " ").split())
    assert code == 1 and "row 2: missing field 'response'" in flat and "Traceback" not in out


def test_train_stops_on_a_failing_check_unless_skipped(tiny_llama_dir, data_file, tmp_path):
    sets = _sets(tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="cut", **{"data.max_length": 12, "train.epochs": 1}))
    code, out = _run(["train", *sets])
    assert code == 1 and "preflight checks failed" in out and "responses cut" in out and "--skip-checks" in out
    assert not (tmp_path / "cut" / "adapter").exists()
    code, out = _run(["train", "--skip-checks", "--overwrite", *sets])
    assert code == 0, out
    assert (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").is_file()


def test_packed_rows_show_each_example_under_its_own_row_number(tiny_llama_dir, tmp_path):
    import re

    records = [opposite_records()[0]] * 12  # identical examples: each must still be shown as its own row
    path = tmp_path / "same.json"
    path.write_text(json.dumps(records))
    s = setup(_config(tiny_llama_dir, path, tmp_path, **{"train.packing": "true"}))
    shown = render_examples(s, 4)
    titled = sorted(int(re.search(r"train row (\d+):", text).group(1)) for text in shown)
    assert titled == sorted(e.row for e in s.data.train_examples[:4])
