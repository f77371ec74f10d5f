"""QLoRA on CPU (bitsandbytes): a 4-bit / 8-bit frozen base, fp32 LoRA, recorded in summary.json, merged exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import opposite_records, tiny_overrides
from loralab.config import build_config
from loralab.errors import ConfigError, LoralabError
from loralab.training import setup, train

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora") / "d.json"
    path.write_text(json.dumps(opposite_records()))
    return path


def test_4bit_base_trains_fp32_lora_and_records_the_quantization(tiny_llama_dir, data_file, tmp_path):
    import bitsandbytes as bnb

    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="q4",
                                                   **{"model.load_in_4bit": True, "model.bnb_4bit_quant_type": "fp4"}))
    session = setup(config)
    layer = session.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.quant_type == "fp4"
    assert all(p.dtype == torch.float32 for p in session.model.parameters() if p.requires_grad)
    summary = train(config, progress=False)
    from loralab.precision import resolve_precision

    compute = "bfloat16" if resolve_precision("auto") == "bf16" else "float32"  # bnb_4bit_compute_dtype: auto
    assert summary["quantization"] == {"bits": 4, "quant_type": "fp4", "double_quant": True, "compute_dtype": compute}
    assert summary["gradient_checkpointing"] is True  # on by default for a quantized base
    assert summary["final_eval_loss"] < summary["base_eval_loss"] * 0.8
    assert 0 < summary["base_memory_bytes"]

    from loralab.export import export_merged
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export_merged(tmp_path / "q4", tmp_path / "merged"))
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())  # merged into a full-precision base


def test_8bit_base_and_8bit_optimizer_train(tiny_llama_dir, data_file, tmp_path):
    summary = train(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="q8", **{
        "model.load_in_8bit": True, "train.optim": "adamw_8bit", "train.max_steps": 3})), progress=False)
    assert summary["quantization"] == {"bits": 8} and summary["optimizer"] == "adamw_8bit"
    assert summary["final_eval_loss"] < summary["base_eval_loss"]


def test_quantization_settings_that_cannot_work_are_refused(tiny_llama_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="load_in_4bit and model.load_in_8bit are both true"):
        build_config(overrides=["model.load_in_4bit=true", "model.load_in_8bit=true"])
    with pytest.raises(ConfigError, match="bnb_4bit_quant_type"):
        build_config(overrides=["model.bnb_4bit_quant_type=int3"])
    if not torch.cuda.is_available():
        config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="paged",
                                                       **{"train.optim": "paged_adamw_8bit"}))
        with pytest.raises(LoralabError, match="needs a CUDA GPU; on CPU use adamw_torch"):
            train(config, progress=False)


def test_supervised_logits_loss_is_exact_on_a_4bit_base(tiny_llama_dir, data_file, tmp_path):
    """The fast loss path (model forward, vocabulary projection at supervised positions only) on a quantized base."""
    from loralab.data import make_collator
    from loralab.speed import supervised_lm_loss, supervised_logits_exact

    session = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="q",
                                                          **{"model.load_in_4bit": True,
                                                             "lora.init_lora_weights": "gaussian"})))
    model = session.model.train()
    assert supervised_logits_exact(model)
    batch = make_collator(session.tokenizer, "CAUSAL_LM")([session.data.train[i] for i in range(4)])
    reference = model(**batch).loss
    reference.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss_sum, count = supervised_lm_loss(model, batch)
    (loss_sum / count).backward()
    assert torch.allclose(loss_sum / count, reference, rtol=1e-4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, plain[name], rtol=1e-3, atol=1e-6), name


def test_4bit_layers_too_small_for_the_cpu_kernel_keep_the_plain_layout(tiny_llama_dir, data_file, tmp_path):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first inference forward and fails
    on layers narrower than a quantization block (the tiny model's 32-wide projections): those keep the plain layout."""
    pytest.importorskip("bitsandbytes")
    from loralab.models import keep_cpu_4bit_layout

    session = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="small",
                                                          **{"model.load_in_4bit": True})))
    layers = [m for m in session.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    small = [m for m in layers if m.in_features % 64 or m.out_features % 32]
    assert small and not any(m.support_avx512bf16_for_cpu for m in small)
    from bitsandbytes.functional import has_avx512bf16

    fitting = [m for m in layers if m not in small]  # down_proj (64 -> 32) fits the kernel: bitsandbytes' choice kept
    assert fitting and all(bool(m.support_avx512bf16_for_cpu) == bool(has_avx512bf16()) for m in fitting)
    assert keep_cpu_4bit_layout(session.model) == 0  # already switched when the model loaded
    session.model.eval()
    with torch.no_grad():  # the forward that failed on AVX512-BF16 CPUs
        session.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
