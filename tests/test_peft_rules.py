"""Settings loralab used to accept and then do wrong: refused at config time, or done right."""

from __future__ import annotations

import json
import types

import pytest
import torch

from loralab.checks.data import check_hyperparameters
from loralab.config import LoraSettings, RunConfig, build_config, load_config
from loralab.errors import ConfigError, LoralabError
from loralab import precision, training
from conftest import opposite_records, tiny_overrides


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft-rules") / "opposites.json"
    path.write_text(json.dumps(opposite_records()))
    return path


def _refused(match: str, data: dict | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build_config(data, overrides)
    return str(info.value)


def _load_tiny(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


# ---------------------------------------------------------------- init_lora_weights


@pytest.mark.parametrize("value", ["lora_ga"])
def test_unimplemented_inits_are_refused_at_config_time(value):
    # the model does not exist: the refusal comes before anything is loaded
    message = _refused("lora.init_lora_weights", overrides=[f"lora.init_lora_weights={value}",
                                                            "model.name_or_path=/nonexistent/model"])
    assert f"'{value}' is not supported" in message and "gradient pass" in message
    assert "supported: true, false, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_N'" in message


def test_supported_inits_pass():
    for value, expected in [("true", True), ("false", False), ("gaussian", "gaussian"), ("orthogonal", "orthogonal"),
                            ("PiSSA", "pissa"), ("pissa_niter_4", "pissa_niter_4"), ("olora", "olora"),
                            ("eva", "eva"), ("corda", "corda")]:
        assert build_config(overrides=[f"lora.init_lora_weights={value}", "lora.r=8"]).lora.init_lora_weights == expected
    _refused("'orthogonal' needs an even lora.r", overrides=["lora.init_lora_weights=orthogonal", "lora.r=7"])
    _refused("must be true, false, 'gaussian', 'orthogonal'", overrides=["lora.init_lora_weights=kaiming"])
    _refused("pissa_niter_N takes a whole number", overrides=["lora.init_lora_weights=pissa_niter_x"])


def test_orthogonal_init_leaves_the_base_and_saves_exactly(tiny_llama_dir, tmp_path):
    """The claim behind allowing 'orthogonal': the base weights stay untouched and B·A = 0 at init, so the saved
    adapter on the original base is the trained model, and the adapter turned off is the original base."""
    from peft import PeftModel

    from loralab.models import apply_lora

    torch.manual_seed(0)
    base = _load_tiny(tiny_llama_dir)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 14, 20, 3]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    settings = LoraSettings(r=8, alpha=16, dropout=0.0, init_lora_weights="orthogonal",
                            target_modules=["q_proj", "v_proj"])
    model, _ = apply_lora(base, settings, "CAUSAL_LM")
    for key, value in model.base_model.model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, original[key.replace(".base_layer", "")]), key
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-5)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))  # "training"
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_load_tiny(tiny_llama_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, trained, atol=1e-6)
        with reloaded.disable_adapter():
            assert torch.allclose(reloaded(input_ids=ids).logits, base_logits, atol=1e-6)


# ---------------------------------------------------------------- modules_to_save


def test_modules_to_save_that_match_nothing_are_an_error(tiny_llama_dir):
    from loralab.models import apply_lora

    settings = LoraSettings(modules_to_save=["classifier"], target_modules=["q_proj"])
    with pytest.raises(LoralabError) as info:
        apply_lora(_load_tiny(tiny_llama_dir), settings, "CAUSAL_LM")
    message = str(info.value)
    assert "lora.modules_to_save ['classifier'] matched no module of the model" in message
    assert "lm_head" in message and "embed_tokens" in message and "SEQ_CLS" in message
    # what exists is saved and trained
    model, _ = apply_lora(_load_tiny(tiny_llama_dir), LoraSettings(modules_to_save=["lm_head"], target_modules=["q_proj"]),
                          "CAUSAL_LM")
    assert any("modules_to_save" in n and "lm_head" in n and p.requires_grad for n, p in model.named_parameters())


def test_unmatched_modules_to_save_fail_setup(tiny_llama_dir, data_file, tmp_path):
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path,
                                                   **{"lora.modules_to_save": "[lm_head, heads_that_are_not_here]"}))
    with pytest.raises(LoralabError, match=r"\['heads_that_are_not_here'\] matched no module"):
        training.setup(config)


# ---------------------------------------------------------------- inference_mode, aliases, retired keys


def test_inference_mode_is_refused_for_training(tmp_path):
    message = _refused("lora.inference_mode", overrides=["lora.inference_mode=true"])
    assert "train nothing" in message and "allowed: false" in message and "(got True)" in message
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  inference_mode: true\n")
    with pytest.raises(ConfigError, match="lora.inference_mode"):
        load_config(path)
    assert build_config(overrides=["lora.inference_mode=false"]).lora.inference_mode is False


def test_peft_key_names_are_aliases(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\n  lora_alpha: 64\n  lora_dropout: 0.1\n")
    config = load_config(path)
    assert (config.lora.alpha, config.lora.dropout) == (64, 0.1)
    shown = config.to_yaml()
    assert "lora_alpha" not in shown and "lora_dropout" not in shown and "alpha: 64" in shown
    assert load_config(path, overrides=["lora.lora_alpha=32"]).lora.alpha == 32
    assert load_config(path, overrides=["lora.alpha=16"]).lora.alpha == 16  # an override replaces either name
    assert build_config(overrides=["lora.lora_dropout=0.2"]).lora.dropout == 0.2
    assert LoraSettings(lora_alpha=8).alpha == 8
    # the same value under both names is fine, different values are an error
    assert build_config({"lora": {"alpha": 8, "lora_alpha": 8}}).lora.alpha == 8
    message = _refused("disagree", {"lora": {"alpha": 16, "lora_alpha": 32}})
    assert "lora.lora_alpha (32) and lora.alpha (16)" in message
    _refused(r"lora.lora_alpha=32 and lora.alpha=16 disagree", overrides=["lora.lora_alpha=32", "lora.alpha=16"])


def test_merge_weights_points_to_export():
    for message in (_refused("lora.merge_weights", {"lora": {"merge_weights": True}}),
                    _refused("lora.merge_weights", overrides=["lora.merge_weights=true"])):
        assert "loralab export" in message and "(True)" in message


# ---------------------------------------------------------------- the scaling warning


def _hyper(**lora):
    config = build_config(overrides=["train.learning_rate=2e-4", "train.epochs=2", "train.precision=fp32"]
                          + [f"lora.{k}={v}" for k, v in lora.items()])
    session = types.SimpleNamespace(config=config, data=types.SimpleNamespace(train=[None] * 400), model=None)
    return check_hyperparameters(session)


def test_scaling_warning_follows_users_guidance():
    for lora in ({"r": 4, "alpha": 32}, {"r": 16, "alpha": 32}, {"r": 16, "alpha": 16}, {"r": 64, "alpha": 32},
                 {"r": 16, "alpha": 32, "use_rslora": "true"}, {"r": 256, "alpha": 16, "use_rslora": "true"}):
        result = _hyper(**lora)
        assert result.status == "pass", (lora, result.reason)
    low = _hyper(r=64, alpha=8)
    assert low.status == "warn" and "alpha/r = 0.125" in low.reason and "alpha from r/2 to 32·r" in low.reason
    assert _hyper(r=4, alpha=64, use_rslora="true").status == "pass"  # 64/sqrt(4) = 32 is inside
    high = _hyper(r=4, alpha=128, use_rslora="true")
    assert high.status == "warn" and "alpha/sqrt(r) = 64" in high.reason and "rsLoRA rule" in high.reason


# ---------------------------------------------------------------- precision and dtype


def test_auto_precision_keeps_t5_out_of_fp16(monkeypatch):
    monkeypatch.setattr(precision, "gpu_precision", lambda: "fp16")  # a T4
    for model_type in ("t5", "mt5", "umt5"):
        assert training.resolve_precision("auto", model_type) == "fp32"
        assert training.resolve_precision("fp16", model_type) == "fp16"  # explicit stays explicit
    for model_type in ("llama", "bart", None):
        assert training.resolve_precision("auto", model_type) == "fp16"
    assert training.resolve_precision("auto") == "fp16"  # callers without a model type
    monkeypatch.setattr(precision, "gpu_precision", lambda: "bf16")
    assert training.resolve_precision("auto", "t5") == "bf16"
    monkeypatch.setattr(precision, "gpu_precision", lambda: None)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert training.resolve_precision("auto", "t5") == "fp32"


def test_fp16_on_t5_warns(monkeypatch):
    monkeypatch.setattr(precision, "gpu_precision", lambda: "fp16")
    config = build_config(overrides=["train.learning_rate=2e-4", "train.precision=fp16"])
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mt5"))
    result = check_hyperparameters(types.SimpleNamespace(config=config, data=types.SimpleNamespace(train=[None] * 400),
                                                         model=model))
    assert "T5 family overflows in fp16" in result.reason
    auto = build_config(overrides=["train.learning_rate=2e-4"])
    result = check_hyperparameters(types.SimpleNamespace(config=auto, data=types.SimpleNamespace(train=[None] * 400),
                                                         model=model))
    assert result.details["precision"] == "fp32"


def test_model_dtype_auto_follows_the_training_precision(monkeypatch):
    from loralab.models import load_dtype

    assert RunConfig().model.dtype == "auto"
    cfg = RunConfig().model
    monkeypatch.setattr(precision, "gpu_precision", lambda: None)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert load_dtype(cfg, "auto") == torch.bfloat16
    assert load_dtype(cfg, "bf16") == torch.bfloat16
    assert load_dtype(cfg, "fp32") == torch.float32
    assert load_dtype(cfg, None) == torch.float32  # eval / export loads
    assert load_dtype(cfg.model_copy(update={"load_in_4bit": True}), "auto") == torch.float32
    assert load_dtype(cfg.model_copy(update={"dtype": "checkpoint"}), "auto") == "auto"  # transformers: as saved
    assert load_dtype(cfg.model_copy(update={"dtype": "float16"}), "fp32") == torch.float16
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert load_dtype(cfg, "auto") == torch.float32


def test_bf16_base_trains_fp32_lora(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    from loralab.checks.model import check_loss
    from loralab.models import load_model

    monkeypatch.setattr(precision, "gpu_precision", lambda: None)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)  # as on an AMX / AVX512-BF16 CPU
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        "train.precision": "auto", "lora.modules_to_save": "[lm_head]", "lora.init_lora_weights": "gaussian"}))
    assert next(load_model(config.model, "CAUSAL_LM", precision="auto").parameters()).dtype == torch.bfloat16
    session = training.setup(config)
    dtypes = {(p.requires_grad, p.dtype) for p in session.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}, dtypes
    assert any("modules_to_save" in n and p.requires_grad for n, p in session.model.named_parameters())
    result = check_loss(session)
    assert result.status != "fail", result.reason
    # tiny-model tests train in fp32: everything loads and stays fp32
    fp32 = training.setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path)))
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
