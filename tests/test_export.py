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


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = root / "d.json"
    data.write_text(json.dumps(opposite_records()))
    train(build_config(overrides=tiny_overrides(tiny_llama_dir, data, root / "runs", name="x",
                                                **{"train.epochs": 2})), progress=False)
    return root / "runs" / "x"


def test_export_checks_the_merge_and_reports_it(trained, tmp_path):
    from conftest import run_cli

    code, out = run_cli("export", trained, "--output", tmp_path / "merged", "--dtype", "bfloat16")
    assert code == 0 and "merge" in out and "pass" in out and "model.safetensors" in out
    report = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    merge = report["checks"][0]
    assert merge["name"] == "merge" and merge["candidate"] == "merged model (bfloat16)" and merge["passed"] is True
    assert 0 < merge["max_abs_logit_diff"] <= merge["tolerance"] == pytest.approx(0.06 * merge["logit_scale"])
    assert report["prompts"]["source"].startswith("eval split") and merge["n"] == 4
    effect = next(c for c in report["checks"] if c["name"] == "adapter effect")
    assert effect["max_abs_logit_diff"] > 10 * merge["max_abs_logit_diff"]  # the adapter matters; the merge does not
    assert report["files"]["model.safetensors"] == (tmp_path / "merged" / "model.safetensors").stat().st_size


def test_a_corrupted_merge_is_caught_and_nothing_written(trained, tmp_path, monkeypatch):
    import loralab.export.merge as merge

    real = merge.merge_adapter

    def merge_twice_the_delta(model):  # a merge with the wrong LoRA scaling
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                module.scaling = {name: 2 * value for name, value in module.scaling.items()}
        return real(model)

    monkeypatch.setattr(merge, "merge_adapter", merge_twice_the_delta)
    with pytest.raises(LoralabError, match=r"merged model \(float32\) differs from adapter \(float32\) by up to .*"
                                           r"\(tolerance .*nothing was written"):
        export_merged(trained, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_qlora_export_says_which_base_and_measures_the_drift(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import run_cli

    data = tmp_path / "d.json"
    data.write_text(json.dumps(opposite_records()))
    train(build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path / "runs", name="q",
                                                **{"model.load_in_4bit": True, "train.max_steps": 3})), progress=False)
    code, out = run_cli("export", tmp_path / "runs" / "q", "--output", tmp_path / "merged")
    assert code == 0 and "QLoRA drift" in out
    report = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    assert report["quantized_training_base"] is True and "without quantization" in report["merged_into"]
    assert "4-bit NF4" in report["merged_into"]
    drift = next(c for c in report["checks"] if c["name"] == "QLoRA drift")
    assert drift["reference"] == "adapter on the quantized base" and drift["passed"] is None  # reported, not refused
    assert drift["max_abs_logit_diff"] > 10 * report["checks"][0]["max_abs_logit_diff"]  # 4 bits move the logits


def _plain_peft_adapter(base_dir, folder):
    """An adapter made with peft alone (no loralab run folder), with non-zero LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    return folder


def test_an_adapter_made_with_plain_peft_is_evaluated_compared_and_exported(tiny_llama_dir, opposites_file, tmp_path):
    from conftest import run_cli

    adapter = _plain_peft_adapter(tiny_llama_dir, tmp_path / "their-adapter")
    code, out = run_cli("eval", "--adapter", adapter, "--model", tiny_llama_dir, "--data", opposites_file,
                        "--limit", "4", "--max-new-tokens", "8", "--output", tmp_path / "scores")
    assert code == 0, out
    scores = json.loads((tmp_path / "scores" / "eval.json").read_text())
    assert scores["n"] == 4 and set(scores["base"]) >= {"chrf", "rouge_l"} and scores["checkpoint"].endswith("their-adapter")
    predictions = [json.loads(line) for line in (tmp_path / "scores" / "predictions.jsonl").read_text().splitlines()]
    assert any(p["base"] != p["adapter"] for p in predictions)  # the adapter's weights are really on
    code, out = run_cli("compare", "--adapter", adapter, "--model", tiny_llama_dir, "--prompt", "Give the opposite of hot.",
                        "--max-new-tokens", "4", "--json")
    assert code == 0 and json.loads(out)[0]["prompt"] == "Give the opposite of hot."
    code, out = run_cli("generate", "--adapter", adapter, "--prompt", "Give the opposite of hot.", "--max-new-tokens", "4")
    assert code == 0  # the base model named in the adapter's own adapter_config.json
    code, out = run_cli("export", "--adapter", adapter, "--model", tiny_llama_dir, "--output", tmp_path / "merged")
    assert code == 0 and json.loads((tmp_path / "merged" / "export_report.json").read_text())["source"] == str(adapter)
    code, out = run_cli("eval", "--adapter", adapter, "--model", tiny_llama_dir)
    assert code == 1 and "pass --data FILE" in out
    code, out = run_cli("eval", "--adapter", tmp_path, "--model", tiny_llama_dir, "--data", opposites_file)
    assert code == 1 and "is not a PEFT adapter folder: it has no adapter_config.json" in out
