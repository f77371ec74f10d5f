"""Export: the merged model gives the same logits as base + adapter, and loads without peft."""

import json

import pytest
import torch

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.export import export_merged
from loralab.training import train
from conftest import opposite_records, tiny_overrides


def test_merged_model_matches_adapter_and_reloads(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "d.json"
    data.write_text(json.dumps(opposite_records()))
    train(build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path / "runs", name="x",
                                                **{"train.epochs": 2})), progress=False)
    out = export_merged(tmp_path / "runs" / "x", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                          tmp_path / "runs" / "x" / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(out)("Give the opposite of hot.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    with pytest.raises(LoralabError, match="not empty"):
        export_merged(tmp_path / "runs" / "x", tmp_path / "merged")


def test_export_overwrite_replaces_only_an_earlier_export(tiny_llama_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(opposite_records()))
    train(build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path / "runs", name="x",
                                                **{"train.max_steps": 2})), progress=False)
    models = tmp_path / "models"  # someone's folder of models: --overwrite must not wipe it
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "weights.bin").write_bytes(b"precious")
    with pytest.raises(LoralabError, match="not a loralab export .*nothing was changed"):
        export_merged(tmp_path / "runs" / "x", models, overwrite=True)
    assert (models / "llama" / "weights.bin").read_bytes() == b"precious"
    out = export_merged(tmp_path / "runs" / "x", tmp_path / "merged")
    marker = json.loads((out / "loralab_export.json").read_text())
    assert marker["checkpoint"] == "best" and marker["dtype"] == "float32"
    export_merged(tmp_path / "runs" / "x", out, overwrite=True, dtype="bfloat16")  # an earlier export: replaced
    assert json.loads((out / "loralab_export.json").read_text())["dtype"] == "bfloat16"
