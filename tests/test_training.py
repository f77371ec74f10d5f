"""End-to-end training runs on tiny models: loss goes down, the run folder is complete and reloads with plain peft."""

import json

import pytest
import torch

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.training import train
from conftest import tiny_overrides


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def causal_run(tiny_llama_dir, tmp_path_factory):
    from conftest import opposite_records

    tmp = tmp_path_factory.mktemp("causal")
    data = tmp / "opposites.json"
    data.write_text(json.dumps(opposite_records()))
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp / "runs", name="tiny"))
    summary = train(config, progress=False)
    return config, summary, tmp / "runs" / "tiny"


def test_causal_run_loss_goes_down_and_folder_is_complete(causal_run):
    config, summary, run_dir = causal_run
    for name in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("checkpoint-*"))
    history = _history(run_dir)
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(eval_losses) == 5  # the base model, then one per epoch
    assert eval_losses[-1] < eval_losses[0] * 0.9
    assert train_losses[-1] < train_losses[0] * 0.8
    assert min(eval_losses) < eval_losses[0]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["best_eval_loss"] == pytest.approx(min(eval_losses))
    assert saved["best_checkpoint"].startswith("checkpoints/checkpoint-")
    assert 0 < saved["trainable_percent"] < 100 and saved["n_train"] == 19 and saved["n_eval"] == 5


def test_adapter_reloads_with_plain_peft_and_gives_identical_logits(causal_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.training import setup
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config, _, run_dir = causal_run
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 8 and adapter_cfg["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    # the same weights loaded into loralab's own session model
    session = setup(config)
    set_peft_model_state_dict(session.model, load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    session.model.eval()
    ids = torch.tensor([session.data.train[0]["input_ids"]])
    with torch.no_grad():
        a = reloaded(input_ids=ids).logits
        b = session.model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter changed the model


def test_output_folder_holding_a_run_is_refused_then_resumed(causal_run):
    config, _, run_dir = causal_run
    with pytest.raises(LoralabError, match="already holds a run; pass --resume"):
        train(config, progress=False)
    other = config.model_copy(update={"lora": config.lora.model_copy(update={"r": 4})})
    with pytest.raises(LoralabError, match="holds a different run"):
        train(other, resume=True, progress=False)


def test_interrupted_run_resumes_from_checkpoint(tiny_llama_dir, opposites_file, tmp_path):
    overrides = tiny_overrides(tiny_llama_dir, opposites_file, tmp_path / "runs", name="r")
    first = train(build_config(overrides=overrides + ["train.max_steps=5"]), progress=False)
    assert first["steps"] == 5
    # the run is extended: same config apart from max_steps would differ, so resume the identical config
    # after deleting the adapter (as if it crashed after its last checkpoint)
    run_dir = tmp_path / "runs" / "r"
    import shutil

    shutil.rmtree(run_dir / "adapter")
    again = train(build_config(overrides=overrides + ["train.max_steps=5"]), resume=True, progress=False)
    assert again["resumed_from"].endswith("checkpoint-5") and again["steps"] == 5
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_seq2seq_run_loss_goes_down(tiny_t5_dir, opposites_file, tmp_path):
    config = build_config(overrides=tiny_overrides(tiny_t5_dir, opposites_file, tmp_path, name="t5"))
    summary = train(config, progress=False)
    assert summary["task_type"] == "SEQ_2_SEQ_LM"
    assert summary["best_eval_loss"] < summary["base_eval_loss"]
    losses = [h["loss"] for h in _history(tmp_path / "t5") if "loss" in h]
    assert losses[-1] < losses[0]


def test_classification_run(tiny_bert_dir, sentiment_file, tmp_path):
    config = build_config(overrides=tiny_overrides(tiny_bert_dir, sentiment_file, tmp_path, name="cls",
                                                   **{"data.prompt_field": "text", "lora.modules_to_save": "[classifier]"}))
    summary = train(config, progress=False)
    assert summary["task_type"] == "SEQ_CLS" and summary["final_eval_loss"] is not None
    adapter = json.loads((tmp_path / "cls" / "adapter" / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"]
