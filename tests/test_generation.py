"""Generation: batched answers equal one-by-one answers, base answers equal the plain base model's, prompts as in training."""

import json
import logging

import pytest
import torch

from loralab.config import build_config
from loralab.data import Example, tokenize_causal
from loralab.errors import LoralabError
from loralab.generation import (
    GenerationSettings,
    decode_answer,
    generate_answers,
    load_run_model,
    prompt_token_ids,
)
from loralab.training import train
from conftest import opposite_records, tiny_overrides

SETTINGS = GenerationSettings(max_new_tokens=12, batch_size=8)
PROMPTS = ["Give the opposite of hot.", "Give the opposite of inside.", "hot", "Translate 水 猫 東京 こんにちは to English, please, now."]


def _train(model_dir, tmp, name, **extra):
    data = tmp / "opposites.json"
    data.write_text(json.dumps(opposite_records()))
    train(build_config(overrides=tiny_overrides(model_dir, data, tmp / "runs", name=name, **extra)), progress=False)
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, tmp_path_factory):
    # dropout on: answers only stay deterministic because generation runs in eval mode
    return _train(tiny_llama_dir, tmp_path_factory.mktemp("gen-llama"), "llama", **{"lora.dropout": 0.3})


@pytest.fixture(scope="module")
def loaded(llama_run):
    return load_run_model(llama_run)


@pytest.fixture(scope="module")
def t5_run(tiny_t5_dir, tmp_path_factory):
    return _train(tiny_t5_dir, tmp_path_factory.mktemp("gen-t5"), "t5", **{"train.max_steps": 4})


def _plain_greedy(model, prompt_ids, eos_id, pad_id, max_new_tokens):
    """One prompt, no padding, straight transformers generate: the reference answer."""
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=pad_id)
    new = out[0, 1:] if model.config.is_encoder_decoder else out[0, len(prompt_ids):]
    return new.tolist()


def test_settings_validate_and_warn_about_ignored_sampling_parameters(caplog):
    kwargs, warnings = GenerationSettings().generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["num_beams"] == 1 and kwargs["max_new_tokens"] == 64 and not warnings
    with caplog.at_level(logging.WARNING, logger="loralab"):
        settings = GenerationSettings(temperature=0.7, top_k=5)
    assert "temperature=0.7, top_k=5 ignored: decoding is greedy" in caplog.text and "--do-sample" in caplog.text
    kwargs, warnings = settings.generate_kwargs()
    assert kwargs["temperature"] is None and kwargs["top_k"] is None and len(warnings) == 1
    kwargs, warnings = GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9).generate_kwargs()
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9 and not warnings
    for bad, fragment in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 0.0}, "temperature"),
                          ({"top_p": 1.5}, "top_p"), ({"num_beams": 0}, "num_beams")]:
        with pytest.raises(LoralabError, match=fragment):
            GenerationSettings(**bad)


def test_prompts_are_formatted_exactly_as_in_training(loaded):
    example = Example(prompt="Give the opposite of hot.", response="The opposite of hot is cold.", row=1)
    trained = tokenize_causal(loaded.tokenizer, example, loaded.config.data)
    assert prompt_token_ids(loaded, example) == trained.input_ids[: trained.prompt_length]
    assert prompt_token_ids(loaded, "Give the opposite of hot.") == trained.input_ids[: trained.prompt_length]
    assert loaded.tokenizer.decode(prompt_token_ids(loaded, "x")).endswith("<|im_start|>assistant\n")


def test_answers_are_cut_at_eos(loaded):
    tok = loaded.tokenizer
    ids = tok("cold", add_special_tokens=False)["input_ids"]
    more = tok(" hot", add_special_tokens=False)["input_ids"]
    assert decode_answer(tok, ids + [tok.eos_token_id] + more, [tok.eos_token_id]) == "cold"
    assert decode_answer(tok, [tok.eos_token_id] + more, [tok.eos_token_id]) == ""


def test_batched_and_one_by_one_greedy_answers_are_identical(loaded):
    for use_adapter in (True, False):
        batched = generate_answers(loaded, PROMPTS, SETTINGS, use_adapter=use_adapter)
        single = [generate_answers(loaded, [p], GenerationSettings(max_new_tokens=12, batch_size=1), use_adapter=use_adapter)[0]
                  for p in PROMPTS]
        assert batched == single
        assert any(batched)


def test_base_answers_equal_the_plain_base_model_and_adapter_answers_equal_plain_peft(loaded, llama_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = loaded.tokenizer
    base_answers = generate_answers(loaded, PROMPTS, SETTINGS, use_adapter=False)
    adapter_answers = generate_answers(loaded, PROMPTS, SETTINGS)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    expected_base = [decode_answer(tok, _plain_greedy(plain, prompt_token_ids(loaded, p), tok.eos_token_id, tok.pad_token_id, 12),
                                   [tok.eos_token_id]) for p in PROMPTS]
    assert base_answers == expected_base
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llama_run / "adapter").eval()
    expected_adapter = [decode_answer(tok, _plain_greedy(peft, prompt_token_ids(loaded, p), tok.eos_token_id, tok.pad_token_id, 12),
                                      [tok.eos_token_id]) for p in PROMPTS]
    assert adapter_answers == expected_adapter
    assert adapter_answers != base_answers  # the adapter changed the model


def test_generation_runs_in_eval_mode_and_restores_train_mode(loaded):
    expected = generate_answers(loaded, PROMPTS, SETTINGS)
    loaded.model.train()  # LoRA dropout 0.3 would change the answers if it stayed on
    try:
        assert generate_answers(loaded, PROMPTS, SETTINGS) == expected
        assert generate_answers(loaded, PROMPTS, SETTINGS) == expected
        assert loaded.model.training
    finally:
        loaded.model.eval()
    assert not loaded.model.training


def test_adapter_learned_the_task(loaded):
    answers = generate_answers(loaded, ["Give the opposite of big.", "Give the opposite of wet."], SETTINGS)
    assert all(a.startswith("The opposite of") for a in answers), answers


def test_sampling_with_a_seed_is_reproducible(loaded):
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, seed=7)
    first = generate_answers(loaded, PROMPTS, settings)
    assert generate_answers(loaded, PROMPTS, settings) == first
    beams = generate_answers(loaded, PROMPTS, GenerationSettings(max_new_tokens=12, num_beams=3))
    assert len(beams) == len(PROMPTS)


def test_seq2seq_batched_equals_one_by_one_and_base_equals_plain_t5(t5_run, tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM

    run = load_run_model(t5_run)
    assert run.task_type == "SEQ_2_SEQ_LM"
    batched = generate_answers(run, PROMPTS, SETTINGS, use_adapter=False)
    single = [generate_answers(run, [p], SETTINGS, use_adapter=False)[0] for p in PROMPTS]
    assert batched == single
    plain = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    tok = run.tokenizer
    expected = [decode_answer(tok, _plain_greedy(plain, tok(p)["input_ids"], tok.eos_token_id, tok.pad_token_id, 12),
                              [tok.eos_token_id]) for p in PROMPTS]
    assert batched == expected
    adapter = generate_answers(run, PROMPTS, SETTINGS)
    assert adapter == [generate_answers(run, [p], SETTINGS)[0] for p in PROMPTS]


def test_loading_bad_runs_and_checkpoints(llama_run, tmp_path):
    with pytest.raises(LoralabError, match="is not a loralab run folder"):
        load_run_model(tmp_path)
    with pytest.raises(LoralabError, match="no checkpoint at step 999; available steps"):
        load_run_model(llama_run, "999")
    with pytest.raises(LoralabError, match="best, latest or a step number"):
        load_run_model(llama_run, "newest")
    latest = load_run_model(llama_run, "latest")
    assert latest.adapter_path.name.startswith("checkpoint-")
    assert generate_answers(latest, PROMPTS[:1], SETTINGS)


def test_a_classification_run_cannot_generate(tmp_path):
    run = tmp_path / "cls"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    config = build_config(overrides=["model.name_or_path=some/bert", "model.task_type=SEQ_CLS"])
    (run / "config.yaml").write_text(config.to_yaml())
    with pytest.raises(LoralabError, match="is a SEQ_CLS run; eval, compare and generate need a text-generation run"):
        load_run_model(run)


def test_base_answers_are_made_once_for_runs_of_the_same_base(loaded, llama_run, monkeypatch):
    from loralab import generation

    generation._BASE_ANSWERS.clear()
    calls = []
    real = type(loaded.model).generate
    monkeypatch.setattr(type(loaded.model), "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = generate_answers(loaded, PROMPTS, SETTINGS, use_adapter=False)
    made = len(calls)
    again = load_run_model(llama_run)
    assert generate_answers(again, PROMPTS, SETTINGS, use_adapter=False) == first and len(calls) == made
    generate_answers(again, PROMPTS, SETTINGS)  # adapter answers are never reused
    assert len(calls) == 2 * made
    frozen = next(p for n, p in again.model.named_parameters() if "q_proj.base_layer.weight" in n)
    with torch.no_grad():
        frozen[0, 0] += 1.0  # another base (an init that rewrote a weight): answered anew
    generate_answers(again, PROMPTS, SETTINGS, use_adapter=False)
    assert len(calls) == 3 * made


def test_a_batch_that_runs_out_of_memory_is_answered_in_halves(loaded, monkeypatch, caplog):
    real = type(loaded.model).generate
    sizes = []

    def generate(self, *args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        sizes.append(rows)
        if rows > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    expected = generate_answers(loaded, PROMPTS, SETTINGS)
    monkeypatch.setattr(type(loaded.model), "generate", generate)
    with caplog.at_level(logging.WARNING, logger="loralab.generation"):
        assert generate_answers(loaded, PROMPTS, SETTINGS) == expected  # same answers, same order
    assert sizes[0] == len(PROMPTS) and sizes.count(1) == len(PROMPTS)
    assert "ran out of memory; trying 2 at a time" in caplog.text
    monkeypatch.setattr(type(loaded.model), "generate",
                        lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):  # one prompt that does not fit is the user's to see
        generate_answers(loaded, PROMPTS[:1], SETTINGS)


def test_training_generation_fits_new_tokens_to_the_references_and_batches_widely(loaded):
    from loralab.generation import TRAINING_GENERATE_BATCH, answer_token_budget, training_generation_settings

    tok = loaded.tokenizer
    long_answer = " ".join(["word"] * 300)
    assert answer_token_budget(tok, ["cold"]) == 16  # at least 16
    ten = "one two three four five six seven eight nine ten"
    n = len(tok(ten, add_special_tokens=False)["input_ids"])
    assert answer_token_budget(tok, ["cold", ten]) == max(16, n + n // 2 + 8)
    assert answer_token_budget(tok, [long_answer]) == 256
    settings = training_generation_settings(loaded.config, tok, ["cold"])
    assert settings.batch_size == max(loaded.config.train.batch_size, TRAINING_GENERATE_BATCH) and not settings.do_sample
    own = loaded.config.model_copy(update={"train": loaded.config.train.model_copy(update={"eval_batch_size": 3})})
    assert training_generation_settings(own, tok, ["cold"]).batch_size == 3  # the user's eval batch size wins
