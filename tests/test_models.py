"""Task detection, per-architecture target presets, and target modules that match nothing."""

import pytest

from loralab.config import LoraSettings, ModelConfig
from loralab.errors import LoralabError
from loralab.models import apply_lora, default_target_modules, detect_task_type, load_model, match_targets, parameter_counts


def test_task_types_are_detected(tiny_llama_dir, tiny_t5_dir, tiny_bert_dir):
    from transformers import AutoConfig

    assert detect_task_type(AutoConfig.from_pretrained(tiny_llama_dir)) == "CAUSAL_LM"
    assert detect_task_type(AutoConfig.from_pretrained(tiny_t5_dir)) == "SEQ_2_SEQ_LM"
    assert detect_task_type(AutoConfig.from_pretrained(tiny_bert_dir)) == "SEQ_CLS"


def test_presets_per_architecture(tiny_llama_dir, tiny_t5_dir, tiny_mt5_dir):
    from transformers import AutoConfig

    assert default_target_modules(AutoConfig.from_pretrained(tiny_llama_dir)) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert default_target_modules(AutoConfig.from_pretrained(tiny_t5_dir)) == ["q", "k", "v", "o", "wi", "wo"]
    assert default_target_modules(AutoConfig.from_pretrained(tiny_mt5_dir)) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def test_gated_mt5_preset_covers_every_feed_forward_layer(tiny_mt5_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_mt5_dir)), "SEQ_2_SEQ_LM")
    peft_model, report = apply_lora(model, LoraSettings(), "SEQ_2_SEQ_LM")
    wrapped = {n.rsplit(".", 1)[-1] for n in report.matched}
    assert {"wi_0", "wi_1", "wo", "q", "k", "v", "o"} <= wrapped
    assert report.unmatched_names == []
    counts = parameter_counts(peft_model)
    assert 0 < counts["trainable_params"] < counts["total_params"]


def test_wi_on_gated_mt5_is_reported_with_suggestion(tiny_mt5_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_mt5_dir)), "SEQ_2_SEQ_LM")
    report = match_targets(model, ["q", "v", "wi"])
    assert report.unmatched_names == ["wi"] and report.suggestions["wi"] == ["wi_0", "wi_1"]


def test_targets_matching_nothing_list_module_names_and_preset(tiny_llama_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "CAUSAL_LM")
    with pytest.raises(LoralabError) as info:
        apply_lora(model, LoraSettings(target_modules=["query", "value"]), "CAUSAL_LM")
    message = str(info.value)
    assert "['query', 'value'] matched no module" in message
    assert "q_proj" in message and "down_proj" in message and "preset" in message


def test_all_linear_and_regex_targets(tiny_llama_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "CAUSAL_LM")
    report = match_targets(model, "all-linear")
    assert len(report.matched) == 14 and not any("lm_head" in n for n in report.matched)
    assert len(match_targets(model, r".*\.(q_proj|v_proj)").matched) == 4
