"""The LoraConfig fields users set (layers, per-module ranks and alphas, exclusions, Conv1D layout, expert parameters,
lora_bias), new special tokens, LoRA+: validated before training, reported by `loralab check`, trained, saved and
reloaded with plain peft."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import CHAT_TEMPLATE, _fast, opposite_records, tiny_overrides, train_tokenizer
from loralab.checks.model import check_data_flow, check_loss, check_targets
from loralab.config import LoraSettings, build_config
from loralab.errors import ConfigError, LoralabError
from loralab.generation import load_run_model
from loralab.models import apply_lora
from loralab.training import setup, train
from test_lora_init import Capture, _base, _logits


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-surface") / "opposites.json"
    path.write_text(json.dumps(opposite_records()))
    return path


def _refused(overrides: list[str], match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build_config(overrides=overrides + ["model.name_or_path=/nonexistent"])
    return str(info.value)


def _run(model_dir, data_file, out, name, **extra):
    config = build_config(overrides=tiny_overrides(model_dir, data_file, out, name=name, **{
        "train.max_steps": 4, "train.learning_rate": 1e-2, **extra}))
    capture = Capture()
    summary = train(config, progress=False, callbacks=[capture])
    return summary, capture.logits, out / name


# ---------------------------------------------------------------- config-time validation


def test_fields_that_cannot_work_together_are_refused_at_config_time():
    _refused(["lora.layers_pattern=layers"], r"lora.layers_pattern \('layers'\) names the layer list that "
                                             "lora.layers_to_transform picks")
    _refused(["lora.layers_to_transform=[0]", r"lora.target_modules=.*q_proj"],
             "applies to a list of target modules, not to the regex")
    _refused(["lora.layers_to_transform=[-1]"], "each 0 or more")
    _refused(["lora.rank_pattern={q_proj: 2.5}"], r"'q_proj': 2.5 is not a valid r")
    _refused(["lora.alpha_pattern={q_proj: -1}"], r"'q_proj': -1 is not a valid alpha")
    _refused(["lora.lora_bias=true", "lora.use_dora=true"], "lora.lora_bias works with plain LoRA")
    _refused(["lora.lora_bias=true", "lora.init_lora_weights=gaussian"], "lora.init_lora_weights: gaussian")
    _refused(["lora.target_modules=[]"], r"\[\] only together with lora.target_parameters")
    _refused(["lora.exclude_modules=['']"], "non-empty name")
    _refused(["lora.init_from=/some/adapter", "lora.init_lora_weights=olora"], "would not be used; omit it")
    _refused(["train.loraplus_lr_ratio=0.5"], "train.loraplus_lr_ratio")
    _refused(["data.add_special_tokens=[<t>, <t>]"], "distinct, non-empty tokens")
    _refused(["lora.eva.rho=0.5"], "lora.eva.rho")
    _refused(["lora.eva.unknown=1"], "unknown config key 'lora.eva.unknown'")
    ok = build_config(overrides=["lora.layers_to_transform=1", "lora.layers_pattern=layers", "lora.lora_bias=true",
                                 "lora.rank_pattern={q_proj: 4}", "lora.target_modules=all-linear",
                                 "train.loraplus_lr_ratio=16", "data.add_special_tokens=[<tool>]"])
    assert ok.lora.layers_to_transform == [1] and ok.train.loraplus_lr_ratio == 16
    assert "rank_pattern:\n    q_proj: 4" in ok.to_yaml()


# ---------------------------------------------------------------- fields checked against the model


@pytest.mark.parametrize("fields, message", [
    ({"layers_to_transform": [5]}, "lora.layers_to_transform [5]: the targeted modules are in layers 0-1"),
    ({"layers_to_transform": [0], "layers_pattern": "blocks"},
     "lora.layers_pattern ['blocks'] matches no layer list of the targeted modules; the model's layer lists are "
     "named: layers"),
    ({"rank_pattern": {"vv_proj": 4}}, "lora.rank_pattern key 'vv_proj' matches no module that gets LoRA"),
    ({"alpha_pattern": {"layers\\.7\\.self_attn\\.q_proj": 4}}, "lora.alpha_pattern key"),
    ({"exclude_modules": ["o_prj"]}, "lora.exclude_modules ['o_prj'] matched no module of the model"),
    ({"exclude_modules": r".*\.lin"}, "lora.exclude_modules regex"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "lora.target_parameters ['mlp.experts.gate_up_proj'] "
                                                          "matched no parameter"),
    ({"exclude_modules": ["q_proj", "v_proj"], "target_modules": ["q_proj", "v_proj"]},
     "leave none of the 4 targeted modules to wrap"),
])
def test_a_field_that_selects_nothing_is_one_message_before_training(fields, message, tiny_llama_dir):
    base = _base(tiny_llama_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(LoralabError) as info:
        apply_lora(base, LoraSettings(**fields), "CAUSAL_LM")
    assert message in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # nothing was touched


def test_layers_ranks_and_exclusions_shape_the_adapter_and_the_check_reports_them(tiny_llama_dir, data_file, tmp_path):
    from peft import PeftModel

    fields = {"lora.target_modules": "all-linear", "lora.layers_to_transform": "[1]",
              "lora.exclude_modules": "[o_proj]", "lora.rank_pattern": "{v_proj: 4}", "lora.alpha_pattern": "{v_proj: 8}"}
    session = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **fields)))
    result = check_targets(session)
    assert result.status == "pass", result.reason
    assert "r 4 / alpha 8: v_proj×1 in layer 1" in result.reason
    assert "r 8 / alpha 16: down_proj×1, gate_proj×1, k_proj×1, q_proj×1, up_proj×1 in layer 1" in result.reason
    assert result.details["layers_with_lora"] == [1]
    assert result.details["per_module"]["model.layers.1.self_attn.v_proj"] == {"r": 4, "alpha": 8}
    assert "model.layers.1.self_attn.o_proj" not in result.details["per_module"]
    summary, trained, run_dir = _run(tiny_llama_dir, data_file, tmp_path, "fields", **fields)
    assert summary["target_modules_matched"] == 6
    reloaded = PeftModel.from_pretrained(_base(tiny_llama_dir), str(run_dir / "adapter")).eval()
    layers = reloaded.base_model.model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "lora_A") and not hasattr(layers[1].self_attn.o_proj, "lora_A")
    assert layers[1].self_attn.v_proj.lora_A["default"].weight.shape[0] == 4
    assert layers[1].self_attn.v_proj.scaling["default"] == 2.0
    assert torch.allclose(_logits(reloaded), trained, atol=1e-5)


def test_lora_bias_is_trained_and_saved(tiny_llama_dir, data_file, tmp_path):
    from safetensors.torch import load_file

    summary, _, run_dir = _run(tiny_llama_dir, data_file, tmp_path, "bias", **{"lora.lora_bias": True,
                                                                              "lora.target_modules": "[q_proj]"})
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    biases = [k for k in weights if k.endswith("lora_B.bias")]
    assert len(biases) == 2 and all(weights[k].abs().sum() > 0 for k in biases)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["lora_bias"] is True


# ---------------------------------------------------------------- GPT-2's Conv1D and MoE experts


def _tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _fast(train_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fan_in_fan_out_follows_the_layers(tmp_path, tiny_llama_dir, caplog):
    from transformers import AutoModelForCausalLM

    from loralab.lora_fields import plan_lora

    gpt2 = AutoModelForCausalLM.from_pretrained(_tiny_gpt2(tmp_path / "gpt2"))
    config, report = plan_lora(gpt2, LoraSettings(), "CAUSAL_LM", ["c_attn", "c_proj", "c_fc"])
    assert config.fan_in_fan_out is True and len(report.matched) == 8  # c_proj: attention and MLP
    with caplog.at_level(logging.WARNING, logger="loralab"):
        config, _ = plan_lora(gpt2, LoraSettings(fan_in_fan_out=False), "CAUSAL_LM", ["c_attn"])
    assert config.fan_in_fan_out is True
    assert "lora.fan_in_fan_out is false but the wrapped layers are Conv1D (GPT-2 style" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loralab"):
        config, _ = plan_lora(_base(tiny_llama_dir), LoraSettings(fan_in_fan_out=True), "CAUSAL_LM", ["q_proj"])
    assert config.fan_in_fan_out is False and "but the wrapped layers are nn.Linear" in caplog.text


def test_gpt2_trains_and_reloads(tmp_path, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = _tiny_gpt2(tmp_path / "models" / "gpt2")
    summary, trained, run_dir = _run(folder, data_file, tmp_path, "gpt2", **{"data.template": "plain"})
    assert summary["best_eval_loss"] < summary["base_eval_loss"]
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(run_dir / "adapter"))
    assert torch.allclose(_logits(reloaded.eval()), trained, atol=1e-5)
    # PiSSA on Conv1D (weights stored in x out): converted at save like on nn.Linear; OLoRA cannot take that layout
    summary, trained, run_dir = _run(folder, data_file, tmp_path, "gpt2-pissa", **{
        "data.template": "plain", "lora.init_lora_weights": "pissa"})
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(run_dir / "adapter")).eval()
    assert torch.allclose(_logits(reloaded), trained, atol=1e-4)
    with reloaded.disable_adapter():
        assert torch.allclose(_logits(reloaded), _logits(AutoModelForCausalLM.from_pretrained(folder).eval()), atol=1e-5)
    with pytest.raises(LoralabError, match="OLoRA takes weights stored out x in"):
        setup(build_config(overrides=tiny_overrides(folder, data_file, tmp_path, **{
            "data.template": "plain", "lora.init_lora_weights": "olora"})))


def _tiny_moe(folder: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = _fast(train_tokenizer(["<|im_start|>", "<|im_end|>"]), bos_token="<|im_start|>",
                      eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_target_parameters_train_the_experts_of_a_moe_model(tmp_path, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = _tiny_moe(tmp_path / "models" / "moe")
    fields = {"lora.target_modules": "[q_proj]", "lora.target_parameters": "[mlp.experts.gate_up_proj]"}
    session = setup(build_config(overrides=tiny_overrides(folder, data_file, tmp_path, **fields)))
    result = check_targets(session)
    assert "experts.gate_up_proj×2" in result.reason and "q_proj×2" in result.reason, result.reason
    assert check_loss(session).status == "pass"
    with pytest.raises(LoralabError, match=r"lora.target_parameters \['experts.up'\] matched no parameter.*"
                                           r"mlp.experts.gate_up_proj"):
        setup(build_config(overrides=tiny_overrides(folder, data_file, tmp_path, **{
            **fields, "lora.target_parameters": "[experts.up]"})))
    summary, trained, run_dir = _run(folder, data_file, tmp_path, "moe", **fields)
    assert summary["best_eval_loss"] < summary["base_eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    assert torch.allclose(_logits(reloaded), trained, atol=1e-5)


# ---------------------------------------------------------------- LoRA+


def test_loraplus_gives_lora_b_a_higher_learning_rate(tiny_llama_dir, data_file, tmp_path):
    from loralab.runs import RunPaths
    from loralab.trainer import build_trainer

    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        "train.loraplus_lr_ratio": 16, "train.learning_rate": 1e-3, "train.weight_decay": 0.01}))
    session = setup(config)
    (tmp_path / "paths").mkdir()
    optimizer = build_trainer(session, RunPaths(tmp_path / "paths"), progress=False).create_optimizer()
    by_lr: dict[float, set[str]] = {}
    names = {id(p): n for n, p in session.model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            by_lr.setdefault(group["lr"], set()).add("lora_B" if "lora_B" in names[id(param)] else "lora_A")
    assert by_lr == {1e-3: {"lora_A"}, 1.6e-2: {"lora_B"}}
    assert {g["weight_decay"] for g in optimizer.param_groups if g["params"]} == {0.01}
    summary, _, _ = _run(tiny_llama_dir, data_file, tmp_path, "loraplus", **{"train.loraplus_lr_ratio": 16,
                                                                            "train.learning_rate": 1e-3})
    assert summary["best_eval_loss"] < summary["base_eval_loss"]


# ---------------------------------------------------------------- new special tokens


def _tiny_untied_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _fast(train_tokenizer(["<|im_start|>", "<|im_end|>", "<unk>"]), bos_token="<|im_start|>",
                      eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [True, False])
def test_new_special_tokens_train_only_their_rows_and_reload(tied, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_llama_dir if tied else _tiny_untied_llama(tmp_path / "models" / "untied")
    rows = [{"instruction": r["instruction"], "response": r["response"].replace(" is ", " is <opp> ")}
            for r in opposite_records()]
    data = tmp_path / "tokens.json"
    data.write_text(json.dumps(rows))
    fields = {"data.add_special_tokens": "[<opp>, </opp>]"}
    session = setup(build_config(overrides=tiny_overrides(model_dir, data, tmp_path, **fields)))
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    new_ids = session.tokenizer.convert_tokens_to_ids(["<opp>", "</opp>"])
    assert new_ids == [vocab, vocab + 1] and any(new_ids[0] in session.data.train[i]["input_ids"] for i in range(3))
    deltas = [(n, p.shape) for n, p in session.model.named_parameters() if "trainable_tokens_delta" in n]
    assert deltas and all(shape == (2, 32) for _, shape in deltas) and len(deltas) == (1 if tied else 2)
    assert check_loss(session).status == "pass" and check_data_flow(session).status == "pass"
    assert "the rows of 2 new tokens train (<opp>, </opp>)" in check_targets(session).reason
    summary, trained, run_dir = _run(model_dir, data, tmp_path, "tokens", **fields)
    ids = torch.tensor([[1, 5, new_ids[0], 9, new_ids[1], 3]])
    run = load_run_model(run_dir)  # what eval / compare / generate load
    assert run.tokenizer.convert_tokens_to_ids("<opp>") == new_ids[0]
    assert torch.allclose(_logits(run.model), trained, atol=1e-5)
    with torch.no_grad():
        ours = run.model(input_ids=ids).logits
    # plain peft: the base grown to the tokenizer saved with the adapter, then the adapter
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert tokenizer.convert_tokens_to_ids(["<opp>", "</opp>"]) == new_ids
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, ours, atol=1e-5)
        # the old rows are the base's: only the new tokens' rows were trained
        original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).get_input_embeddings().weight
        merged = reloaded.merge_and_unload().get_input_embeddings().weight
        assert torch.equal(merged[:vocab], original) and not torch.allclose(merged[vocab:], merged[:vocab].mean(0))
