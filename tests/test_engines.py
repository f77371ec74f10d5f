"""Quantization and sharding settings a model cannot go through are refused with one message, before weights load
and before torchrun starts a single process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from conftest import opposite_records, run_cli, tiny_overrides
from loralab.config import build_config
from loralab.engines import check_engines, check_quantization, quantizable_layers
from loralab.errors import LoralabError


@pytest.fixture()
def data_file(tmp_path) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(opposite_records()[:12]))
    return path


def _sets(model: Path, data: Path, out: Path, **extra) -> list[str]:
    return [a for o in tiny_overrides(model, data, out, **extra) for a in ("--set", o)]


def test_an_already_quantized_checkpoint_is_refused_for_bitsandbytes(tiny_llama_dir, data_file, tmp_path):
    model = tmp_path / "gptq-model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (model / "config.json").write_text(json.dumps(config))
    code, out = run_cli("train", *_sets(model, data_file, tmp_path / "runs", **{"model.load_in_4bit": "true"}))
    assert code == 1
    assert "already quantized (gptq" in out and "model.load_in_4bit" in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists()


def test_a_model_without_linear_layers_cannot_be_quantized():
    class EmbeddingsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10)

    assert quantizable_layers(EmbeddingsOnly()) == []
    config = build_config(overrides=["model.load_in_4bit=true"])
    hf_config = type("Cfg", (), {"model_type": "embeddings-only"})()
    with pytest.raises(LoralabError, match="'embeddings-only' has no linear layers bitsandbytes can quantize"):
        check_quantization(config, hf_config, EmbeddingsOnly())


def test_8bit_base_cannot_be_sharded(tiny_llama_dir):
    config = build_config(overrides=[f"model.name_or_path={tiny_llama_dir}", "model.load_in_8bit=true",
                                     "train.fsdp=full_shard"])
    with pytest.raises(LoralabError, match="8-bit bitsandbytes weights cannot be sharded"):
        check_engines(config, "CAUSAL_LM")


def test_llama_passes_both_checks(tiny_llama_dir):
    config = build_config(overrides=[f"model.name_or_path={tiny_llama_dir}", "model.load_in_4bit=true",
                                     "train.fsdp=full_shard"])
    check_engines(config, "CAUSAL_LM")  # decoder layers to wrap, linear layers to quantize


@pytest.fixture()
def tiny_gpt1_dir(tiny_llama_dir, tmp_path) -> Path:
    """OpenAI GPT (GPT-1): a real transformers architecture that declares no _no_split_modules."""
    from transformers import AutoTokenizer, OpenAIGPTConfig, OpenAIGPTLMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    folder = tmp_path / "gpt1"
    OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2,
                                         n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fsdp_on_a_model_without_layer_classes_fails_before_torchrun_starts(tiny_gpt1_dir, data_file, tmp_path):
    sets = _sets(tiny_gpt1_dir, data_file, tmp_path / "runs", **{"train.fsdp": "full_shard",
                                                                  "lora.target_modules": "[c_attn]"})
    result = subprocess.run([sys.executable, "-m", "loralab", "train", "--nproc", "2", *sets], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "model type 'openai-gpt' declares no layer class to wrap" in result.stderr
    assert "train.fsdp: off" in result.stderr and "Traceback" not in result.stderr
    assert "torch.distributed" not in result.stderr  # no process was started
    assert not (tmp_path / "runs").exists()
