"""Evaluation: eval.json / predictions.jsonl, compare / generate / chat on the command line, metrics during training."""

import json

import pytest
from typer.testing import CliRunner

from loralab.cli import app
from loralab.config import build_config
from loralab.data import load_examples, split_examples
from loralab.errors import LoralabError
from loralab.evaluation import compare_prompts, evaluate_run, generation_metrics
from loralab.generation import GenerationSettings, generate_answers, load_run_model
from loralab.metrics import METRIC_NAMES, score_corpus
from loralab.runs import load_run_config
from loralab.training import train
from conftest import read_jsonl, run_cli, opposite_records, tiny_overrides

SETTINGS = GenerationSettings(max_new_tokens=12)
FAST = ["--max-new-tokens", "12"]
runner = CliRunner()


_cli, _lines = run_cli, read_jsonl


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    """A tiny run trained with generation metrics at each evaluation."""
    tmp = tmp_path_factory.mktemp("eval")
    data = tmp / "opposites.json"
    data.write_text(json.dumps(opposite_records()))
    overrides = tiny_overrides(tiny_llama_dir, data, tmp / "runs", name="ev", **{
        "train.epochs": 3, "train.eval_generate": True, "train.eval_generate_limit": 3})
    train(build_config(overrides=overrides), progress=False)
    return tmp / "runs" / "ev"


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run_model(run_dir)


def test_eval_generate_puts_generation_metrics_into_metrics_jsonl(run_dir):
    history = _lines(run_dir / "metrics.jsonl")
    eval_steps = [h["step"] for h in history if "eval_loss" in h]
    generated = [h for h in history if "eval_rouge_l" in h]
    assert [h["step"] for h in generated] == eval_steps and eval_steps[0] == 0 and len(eval_steps) == 4
    for h in generated:
        assert {f"eval_{m}" for m in METRIC_NAMES} <= set(h) and "epoch" in h
        assert 0 <= h["eval_rouge_l"] <= 1 and 0 <= h["eval_chrf"] <= 100
    assert generated[-1]["eval_chrf"] > generated[0]["eval_chrf"]  # the adapter learned the answers' pattern
    state = json.loads(sorted((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    assert any("eval_chrf" in h for h in state["log_history"])


def test_generation_metrics_score_the_models_answers(loaded):
    examples = load_examples(loaded.config.data, "CAUSAL_LM")[:4]
    metrics = generation_metrics(loaded.model, loaded.tokenizer, loaded.config, "CAUSAL_LM", examples, SETTINGS)
    answers = generate_answers(loaded, examples, SETTINGS)
    expected = score_corpus(answers, [e.response for e in examples])
    assert metrics == {f"eval_{m}": expected[m] for m in METRIC_NAMES}
    assert not loaded.model.training


def test_evaluate_run_writes_eval_json_and_predictions(run_dir, loaded):
    report = evaluate_run(run_dir, settings=SETTINGS, progress=False, loaded=loaded)
    saved = json.loads((run_dir / "eval.json").read_text())
    for side in ("base", "adapter"):
        assert set(saved[side]) == {*METRIC_NAMES, "n"} and saved[side]["n"] == 5
    assert saved["checkpoint"] == "adapter" and saved["data"] == "eval split"
    assert saved["generation"]["max_new_tokens"] == 12
    assert report["references"] and report["base"] == saved["base"]

    rows = _lines(run_dir / "predictions.jsonl")
    config = load_run_config(run_dir)
    split = split_examples(load_examples(config.data, "CAUSAL_LM"), config.data.eval_split, config.data.seed)[1]
    assert [r["prompt"] for r in rows] == [e.prompt for e in split]  # the same eval split as training
    assert [r["reference"] for r in rows] == [e.response for e in split]
    assert score_corpus([r["adapter"] for r in rows], [r["reference"] for r in rows]) == saved["adapter"]
    assert score_corpus([r["base"] for r in rows], [r["reference"] for r in rows]) == saved["base"]
    assert set(rows[0]["base_scores"]) == set(METRIC_NAMES) == set(rows[0]["adapter_scores"])
    assert saved["adapter"]["chrf"] > saved["base"]["chrf"]  # the adapter moved answers toward the references


def test_evaluate_run_on_another_file_with_limit_and_checkpoint(run_dir, tmp_path):
    other = tmp_path / "more.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in opposite_records()[:6]))
    report = evaluate_run(run_dir, data_path=other, limit=2, checkpoint="latest", settings=SETTINGS, progress=False)
    assert report["n"] == 2 and report["adapter"]["n"] == 2 and report["checkpoint"].startswith("checkpoints/checkpoint-")
    assert report["data"] == str(other)
    assert [r["row"] for r in _lines(run_dir / "predictions.jsonl")] == [1, 2]


def test_data_without_references_gives_answers_only(run_dir, tmp_path):
    before = (run_dir / "eval.json").read_text() if (run_dir / "eval.json").exists() else None
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "Give the opposite of hot."}) + "\n"
                       + json.dumps({"instruction": "Give the opposite of up."}) + "\n")
    code, out = _cli("eval", run_dir, "--data", prompts, *FAST)
    assert code == 0, out
    assert "no reference answers" in out and "answers only, no scores" in out
    rows = _lines(run_dir / "predictions.jsonl")
    assert len(rows) == 2 and rows[0]["reference"] is None and "base_scores" not in rows[0] and rows[0]["adapter"]
    after = (run_dir / "eval.json").read_text() if (run_dir / "eval.json").exists() else None
    assert after == before  # no scores written


def test_bad_eval_inputs(run_dir, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    with pytest.raises(LoralabError, match=r"mixed.jsonl, row 2: missing field 'response'"):
        evaluate_run(run_dir, data_path=mixed, progress=False)
    for args, fragment in [((tmp_path,), "is not a loralab run folder"),
                           ((run_dir, "--checkpoint", "999"), "has no checkpoint at step 999; available steps"),
                           ((run_dir, "--data", tmp_path / "nope.json"), "data file not found"),
                           ((run_dir, "--max-new-tokens", "0"), "max_new_tokens must be at least 1")]:
        code, out = _cli("eval", *args)
        assert code == 1 and fragment in out and "Traceback" not in out, out


def test_eval_cli_prints_base_and_adapter_side_by_side(run_dir):
    code, out = _cli("eval", run_dir, "--limit", "2", *FAST, "--temperature", "0.5")
    assert code == 0, out
    assert "temperature=0.5 ignored: decoding is greedy" in out
    for fragment in ("metric", "base", "adapter", "exact match", "ROUGE-L", "chrF", "BLEU", "wrote eval.json and predictions.jsonl"):
        assert fragment in out
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["base"]["n"] == 2 and f"{saved['adapter']['chrf']:.1f}" in out


def test_compare_cli(run_dir, loaded, tmp_path):
    prompts = ["Give the opposite of hot.", "Give the opposite of early."]
    expected = compare_prompts(run_dir, prompts, SETTINGS, loaded=loaded)
    assert [r["base"] for r in expected] == generate_answers(loaded, prompts, SETTINGS, use_adapter=False)
    assert [r["adapter"] for r in expected] == generate_answers(loaded, prompts, SETTINGS)
    code, out = _cli("compare", run_dir, "--prompt", prompts[0], "--prompt", prompts[1], *FAST, "--json")
    assert code == 0, out
    assert json.loads(out) == expected
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
    code, out = _cli("compare", run_dir, "--prompts-file", lines, *FAST)
    assert code == 0, out
    assert "prompt" in out and "base" in out and "adapter" in out and "early" in out
    code, out = _cli("compare", run_dir)
    assert code == 1 and "no prompts given" in out


def test_generate_and_chat_cli(run_dir, loaded):
    prompt = "Give the opposite of hot."
    answer = generate_answers(loaded, [prompt], SETTINGS)[0]
    code, out = _cli("generate", run_dir, "--prompt", prompt, *FAST)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == answer
    code, out = _cli("generate", run_dir, "--prompt", prompt, "--prompt", "Give the opposite of up.", *FAST, "--base")
    base = generate_answers(loaded, [prompt, "Give the opposite of up."], SETTINGS, use_adapter=False)
    assert code == 0 and f"> {prompt}\n{base[0]}\n" in out and base[1] in out
    result = runner.invoke(app, ["chat", str(run_dir), *FAST], input=f"{prompt}\nGive the opposite of up.\nexit\n")
    assert result.exit_code == 0, result.output
    assert f"bot> {answer}" in result.stdout and result.stdout.count("bot> ") == 2


def test_callback_generates_under_the_trainers_bf16_autocast(run_dir):
    """Training may keep frozen base weights in bf16 (bf16 precision): the callback still scores, and restores train mode."""
    from types import SimpleNamespace

    import torch
    from transformers import TrainerControl, TrainerState

    from loralab.evaluation import GenerationMetricsCallback

    run = load_run_model(run_dir)
    for param in run.model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    run.model.train()
    examples = load_examples(run.config.data, "CAUSAL_LM")[:2]
    callback = GenerationMetricsCallback(run.tokenizer, run.config, "CAUSAL_LM", examples, run_dir / "extra.jsonl",
                                         GenerationSettings(max_new_tokens=6))
    state, metrics = TrainerState(global_step=7, epoch=1.0), {"eval_loss": 1.0}
    callback.on_evaluate(SimpleNamespace(bf16=True, fp16=False), state, TrainerControl(), model=run.model, metrics=metrics)
    assert set(metrics) == {"eval_loss", *(f"eval_{m}" for m in METRIC_NAMES)}
    assert run.model.training  # back to training mode
    assert state.log_history[-1]["step"] == 7 and "eval_bleu" in state.log_history[-1]
    line = _lines(run_dir / "extra.jsonl")[-1]
    assert line["step"] == 7 and line["eval_chrf"] == metrics["eval_chrf"]


def test_prompt_files_without_references_keep_their_chat_context(tmp_path):
    from loralab.config import DataConfig
    from loralab.evaluation import load_prompts_file, read_prompts

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Opposite of hot?"}]}) + "\n")
    examples, with_references = load_prompts_file(chats, DataConfig(), "CAUSAL_LM")
    assert not with_references and examples[0].prompt == "Opposite of hot?" and examples[0].messages[0]["role"] == "system"
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n  second prompt \n")
    assert [e.prompt for e in read_prompts(text, DataConfig(), "CAUSAL_LM")] == ["first prompt", "second prompt"]
    with pytest.raises(LoralabError, match="prompts file not found"):
        read_prompts(tmp_path / "missing.txt", DataConfig(), "CAUSAL_LM")
