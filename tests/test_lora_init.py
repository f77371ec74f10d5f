"""Initialisations that need more than a flag (PiSSA, OLoRA, CorDA, EVA, LoftQ) and starting from an adapter.

Each is trained on a tiny model; the claims a user relies on are checked on what they would load: the run's adapter
on the *original* base (plain peft, and loralab's own loading for eval / compare / export) gives the logits the
trained model gave, and the base that eval and compare show is the untouched base.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import opposite_records, tiny_overrides
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.generation import load_run_model
from loralab.training import setup, train

IDS = torch.tensor([[1, 5, 9, 14, 20, 3, 40, 77]])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-init") / "opposites.json"
    path.write_text(json.dumps(opposite_records()))
    return path


class Capture(TrainerCallback):
    """The trained model's logits at the end of training (after the best checkpoint is loaded back): what the
    run's adapter must reproduce."""

    logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=IDS.to(model.device)).logits.cpu()
        model.train(was_training)


class StopAt(TrainerCallback):
    """Stops training after a step, as an interruption would (the checkpoint of that step is complete)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(next(model.parameters()).device)).logits.cpu()


def _run(model_dir, data_file, out, name, **extra):
    settings = {"train.max_steps": 4, "train.save_steps": 2, "train.learning_rate": 1e-2, **extra}
    config = build_config(overrides=tiny_overrides(model_dir, data_file, out, name=name, **settings))
    capture = Capture()
    summary = train(config, progress=False, callbacks=[capture])
    return config, summary, capture.logits, out / name


# ---------------------------------------------------------------- PiSSA / OLoRA / CorDA: converted at save


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda"])
def test_residual_init_trains_and_saves_an_adapter_for_the_original_base(init, tiny_llama_dir, data_file, tmp_path):
    from peft import PeftModel

    _, summary, trained, run_dir = _run(tiny_llama_dir, data_file, tmp_path, init, **{"lora.init_lora_weights": init})
    assert summary["status"] == "finished" and summary["best_eval_loss"] < summary["base_eval_loss"]
    assert (summary["lora_init"], summary["lora_variant"], summary["init_from"]) == (init, "lora", None)
    untouched = _logits(_base(tiny_llama_dir))
    # the initial adapter is kept; the saved adapter is a plain LoRA of twice the rank for the original base
    initial = load_file(run_dir / "adapter_init.safetensors")
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 16 and saved["lora_alpha"] == 32
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    key = next(k for k in weights if ".lora_A." in k)
    assert weights[key].shape[0] == 16 and torch.equal(weights[key][8:], initial[key])
    # plain peft on the original base reproduces the trained model
    reloaded = PeftModel.from_pretrained(_base(tiny_llama_dir), str(run_dir / "adapter")).eval()
    assert torch.allclose(_logits(reloaded), trained, atol=1e-4), (_logits(reloaded) - trained).abs().max()
    # what eval / compare / export load: the same model, and the untouched base when the adapter is off
    run = load_run_model(run_dir)
    assert torch.allclose(_logits(run.model), trained, atol=1e-4)
    with run.model.disable_adapter():
        assert torch.allclose(_logits(run.model), untouched, atol=1e-5)
    assert not torch.allclose(trained, untouched, atol=1e-2)
    # a checkpoint holds the unconverted weights a resume needs; loading it converts it on the fly
    assert json.loads((run_dir / "checkpoints" / "checkpoint-2" / "adapter_config.json").read_text())[
        "init_lora_weights"] == init
    early = load_run_model(run_dir, checkpoint=2)
    with early.model.disable_adapter():
        assert torch.allclose(_logits(early.model), untouched, atol=1e-5)
    best = int(summary["best_checkpoint"].rsplit("-", 1)[1])
    assert torch.allclose(_logits(load_run_model(run_dir, checkpoint=best).model), trained, atol=1e-4)


def test_residual_init_resumes_exactly(tiny_llama_dir, data_file, tmp_path):
    """pissa_niter_N draws a random subspace: a resume rebuilds the residual from the saved initial adapter, so the
    resumed run ends where an uninterrupted one does."""
    settings = {"lora.init_lora_weights": "pissa_niter_2", "train.logging_steps": 1}
    _, _, _, reference = _run(tiny_llama_dir, data_file, tmp_path / "a", "run", **settings)
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path / "b", name="run", **{
        "train.max_steps": 4, "train.save_steps": 2, "train.learning_rate": 1e-2, **settings}))
    train(config, progress=False, callbacks=[StopAt(2)])
    run_dir = tmp_path / "b" / "run"
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "summary.json").unlink()
    summary = train(config, resume=True, progress=False)
    assert summary["resumed_from"] == "checkpoints/checkpoint-2" and summary["steps"] == 4
    a, b = load_file(run_dir / "adapter" / "adapter_model.safetensors"), \
        load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    (run_dir / "adapter_init.safetensors").unlink()
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "summary.json").unlink()
    with pytest.raises(LoralabError, match="initial adapter that rebuilds them"):
        train(config, resume=True, progress=False)


def test_an_unconverted_pissa_adapter_from_elsewhere_is_refused(tiny_llama_dir, data_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    from loralab.adapters import load_adapter

    model = get_peft_model(_base(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "pissa")
    with pytest.raises(LoralabError, match="saved without PEFT's conversion"):
        load_adapter(tmp_path / "pissa", str(tiny_llama_dir))
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        "lora.init_from": tmp_path / "pissa", "lora.r": 4, "lora.alpha": 8, "lora.target_modules": "[q_proj]"}))
    with pytest.raises(LoralabError, match="saved without PEFT's conversion"):
        setup(config)


def test_residual_init_on_a_quantized_base_is_refused_before_loading():
    from loralab.errors import ConfigError

    with pytest.raises(ConfigError, match="residual is quantized again"):
        build_config(overrides=["lora.init_lora_weights=olora", "model.load_in_4bit=true",
                                "model.name_or_path=/nonexistent"])
    with pytest.raises(ConfigError, match="DoRA's magnitudes"):
        build_config(overrides=["lora.init_lora_weights=pissa", "lora.use_dora=true"])


# ---------------------------------------------------------------- EVA: a data pass before step 0


def test_eva_runs_a_data_pass_then_trains_and_reloads(tiny_llama_dir, data_file, tmp_path, caplog):
    from peft import PeftModel

    caplog.set_level(logging.INFO, logger="loralab")
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        "lora.init_lora_weights": "eva", "lora.eva.rho": 1.5, "lora.target_modules": "[q_proj, v_proj]"}))
    session = setup(config, progress=False)
    assert "EVA: running the training data through the model" in caplog.text
    # A from the SVD of the layers' inputs (orthonormal rows), B zero: the model starts at the base
    layer = session.model.base_model.model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4)
    assert torch.allclose(_logits(session.model.eval()), _logits(_base(tiny_llama_dir)), atol=1e-5)
    _, summary, trained, run_dir = _run(tiny_llama_dir, data_file, tmp_path, "eva", **{
        "lora.init_lora_weights": "eva", "lora.eva.rho": 1.5, "lora.target_modules": "[q_proj, v_proj]"})
    assert summary["best_eval_loss"] < summary["base_eval_loss"]
    reloaded = PeftModel.from_pretrained(_base(tiny_llama_dir), str(run_dir / "adapter")).eval()
    assert torch.allclose(_logits(reloaded), trained, atol=1e-5)
    ranks = {m.r["default"] for m in reloaded.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert ranks and max(ranks) <= 12  # at most r * rho


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_pass_inits_outside_causal_lm_are_refused(init, tiny_t5_dir, tiny_bert_dir, data_file, sentiment_file,
                                                       tmp_path):
    for model_dir, data, extra in ((tiny_t5_dir, data_file, {}), (tiny_bert_dir, sentiment_file,
                                                                  {"data.prompt_field": "text"})):
        config = build_config(overrides=tiny_overrides(model_dir, data, tmp_path,
                                                       **{"lora.init_lora_weights": init, **extra}))
        with pytest.raises(LoralabError, match="which loralab supports for CAUSAL_LM models, not"):
            setup(config)


# ---------------------------------------------------------------- LoftQ on a 4-bit base


def test_loftq_starts_lora_at_the_quantization_error(tiny_llama_dir, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    settings = {"model.load_in_4bit": True, "lora.init_lora_weights": "loftq", "lora.target_modules": "all-linear",
                "model.bnb_4bit_compute_dtype": "float32"}  # one compute path on every CPU: logits comparable to 1e-4
    plain = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        **settings, "lora.init_lora_weights": True})))
    loftq = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **settings)))
    full = _logits(_base(tiny_llama_dir))
    plain_error = (_logits(plain.model.eval()) - full).abs().mean()
    loftq_error = (_logits(loftq.model.eval()) - full).abs().mean()
    assert loftq_error < 0.8 * plain_error, (loftq_error, plain_error)
    _, summary, trained, run_dir = _run(tiny_llama_dir, data_file, tmp_path, "loftq", **settings)
    assert summary["quantization"]["bits"] == 4
    run = load_run_model(run_dir)  # the same 4-bit base, the adapter on it
    assert torch.allclose(_logits(run.model), trained, atol=1e-4)
    # merged into the dequantized 4-bit base (not the full-precision one, which would count the correction twice)
    from transformers import AutoModelForCausalLM

    from loralab.export import export_merged

    merged = AutoModelForCausalLM.from_pretrained(export_merged(run_dir, tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(_logits(merged.eval()), trained, atol=1e-4)


def test_loftq_needs_a_4bit_nf4_base():
    from loralab.errors import ConfigError

    with pytest.raises(ConfigError, match="needs model.load_in_4bit: true with model.bnb_4bit_quant_type: nf4"):
        build_config(overrides=["lora.init_lora_weights=loftq"])
    with pytest.raises(ConfigError, match="nf4"):
        build_config(overrides=["lora.init_lora_weights=loftq", "model.load_in_4bit=true",
                                "model.bnb_4bit_quant_type=fp4"])


# ---------------------------------------------------------------- lora.init_from


def test_init_from_continues_an_adapter(tiny_llama_dir, data_file, tmp_path):
    _, first, trained, first_dir = _run(tiny_llama_dir, data_file, tmp_path, "first")
    # at step 0 the new run is the first run's trained model: its base eval loss is the first run's best
    _, second, _, _ = _run(tiny_llama_dir, data_file, tmp_path, "second", **{"lora.init_from": first_dir / "adapter"})
    assert second["base_eval_loss"] == pytest.approx(first["best_eval_loss"], rel=1e-5)
    assert first["lora_init"] is True and second["init_from"] == str(first_dir / "adapter")
    assert second["best_eval_loss"] < first["best_eval_loss"]
    session = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        "lora.init_from": first_dir})))  # a run folder: its adapter/
    assert torch.allclose(_logits(session.model.eval()), trained, atol=1e-5)


def test_init_from_an_adapter_that_does_not_fit_names_the_keys(tiny_llama_dir, data_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "outside")  # made with plain peft
    ok = {"lora.init_from": tmp_path / "outside", "lora.r": 4, "lora.alpha": 8, "lora.target_modules": "[q_proj, v_proj]"}
    session = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **ok)))
    assert torch.equal(session.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight,
                       model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight)
    cases = [({"lora.r": 8}, "has r=4 but lora.r is 8; set lora.r: 4"),
             ({"lora.alpha": 16}, "has lora_alpha=8 but lora.alpha is 16.0"),
             ({"lora.target_modules": "[q_proj, k_proj, v_proj]"}, "the config trains 2 modules the adapter has no "
                                                                   "weights for"),
             ({"lora.target_modules": "[q_proj]"}, "the adapter has weights for 2 modules the config does not train"),
             ({"lora.init_from": tmp_path / "missing"}, "lora.init_from: adapter folder not found")]
    for change, message in cases:
        config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{**ok, **change}))
        with pytest.raises(LoralabError, match=message.replace("[", r"\[").replace(".", r"\.")):
            setup(config)
