"""LoRA initialisations that need more than a flag, and training that starts from an existing adapter.

- PiSSA / OLoRA / CorDA (``RESIDUAL_INITS``) start LoRA at principal components of the base weights and replace
  those weights by the residual ``W - scale * B0 A0``. The initial adapter (A0, B0) is kept in the run folder
  (``adapter_init.safetensors``); the run's ``adapter/`` is converted at save (PEFT's documented PiSSA-to-LoRA
  conversion: ``[A | A0]``, ``[B | -B0]``, twice the rank) so that it applies to the *original* base, which is what
  eval, compare, generate, export and plain peft load. Checkpoints hold the unconverted weights a resume continues
  from (the residual is rebuilt from the saved initial adapter, exactly); loading a checkpoint converts it on the fly.
- EVA and CorDA run the training data through the model before step 0 (peft's ``initialize_lora_eva_weights`` /
  ``preprocess_corda``).
- LoftQ (4-bit NF4 base): peft's ``replace_lora_weights_loftq`` starts LoRA at the quantization error, the base stays
  the 4-bit base loralab loads everywhere.

``lora.init_from`` (starting from an existing adapter) is :mod:`loralab.init_from`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from loralab.config import RESIDUAL_INITS, RunConfig, init_family
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

INITIAL_ADAPTER = "adapter_init.safetensors"  # in the run folder: A0 / B0 of a residual initialisation
WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- building the adapter


def build_adapter(model: nn.Module, config: RunConfig, task_type: str, *, calibration: Callable[[int], Any],
                  token_ids: list[int] | None = None, resume_from: Path | None = None,
                  progress: bool = True) -> tuple[nn.Module, Any, dict[str, torch.Tensor] | None]:
    """Wrap ``model`` with LoRA and initialise it as ``lora.init_lora_weights`` says.

    ``calibration(batch_size)`` returns a DataLoader over the training data in order (EVA: batches of
    ``train.batch_size``; CorDA: one example at a time, as its covariance hooks expect); ``resume_from``: the checkpoint a
    resume continues from (the data passes are skipped, a residual is rebuilt from the run's initial adapter).
    Returns the model, its target report and, for a residual initialisation, the initial adapter's weights."""
    from peft import get_peft_model

    from loralab.lora_fields import plan_lora
    from loralab.models import default_target_modules
    from loralab.new_tokens import trainable_token_indices

    settings = config.lora
    family = init_family(settings.init_lora_weights)
    tokens = trainable_token_indices(model, token_ids or [])
    if resume_from is not None and family in ("eva", *RESIDUAL_INITS):
        return _resume_skeleton(model, config, task_type, tokens, resume_from)
    if family in ("eva", "corda") and task_type != "CAUSAL_LM":
        raise LoralabError(f"lora.init_lora_weights={family} collects every wrapped layer's inputs token by token on "
                           f"the training data, which loralab supports for CAUSAL_LM models, not {task_type} (an "
                           "encoder-decoder's layers see other sequences than its inputs, a classifier's pooler and "
                           "head see one vector per example)")
    lora_cfg, report = plan_lora(model, settings, task_type, default_target_modules(model.config),
                                 trainable_token_indices=tokens)
    if family in RESIDUAL_INITS and settings.dropout > 0:
        log.warning("lora.dropout=%g with lora.init_lora_weights=%s: the adapter now carries the base's principal "
                    "components, so dropout on it perturbs the model itself while training (measured on the built-in "
                    "model, OLoRA: loss 5.18 in training mode at step 0 against the base's 3.35); lora.dropout=0 "
                    "trains from the base exactly", settings.dropout, settings.init_lora_weights)
    if family == "olora" and lora_cfg.fan_in_fan_out:
        raise LoralabError("lora.init_lora_weights=olora: peft's OLoRA takes weights stored out x in (nn.Linear); "
                           "this model's layers are GPT-2-style Conv1D (in x out); use pissa or corda here")
    if family == "corda":
        _corda_pass(model, lora_cfg, calibration, settings.corda.examples, progress)
    # EVA fills the LoRA weights from its data pass: they start empty (on the meta device), as peft advises
    peft_model = get_peft_model(model, lora_cfg, low_cpu_mem_usage=family == "eva")
    if family == "eva":
        _eva_pass(peft_model, calibration, config.train.batch_size, progress)
        report.matched = [n.removeprefix("base_model.model.") for n in lora_module_names(peft_model)]
    if family == "loftq" and resume_from is None:
        _loftq(peft_model, config)
    initial = initial_adapter_state(peft_model) if family in RESIDUAL_INITS else None
    return peft_model, report, initial


def lora_module_names(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _on_accelerator(model: nn.Module) -> None:
    """The data passes run where training will: on the GPU when there is one (the Trainer would move it anyway)."""
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu" \
            and not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))  # this process's GPU


def _eva_pass(peft_model: nn.Module, calibration: Callable[[int], Any], batch_size: int, progress: bool) -> None:
    from peft import initialize_lora_eva_weights

    loader = calibration(batch_size)
    log.info("EVA: running the training data through the model before step 0 (%d batches, again from the start "
             "until every layer's components converge)", len(loader))
    _on_accelerator(peft_model)
    started = len(lora_module_names(peft_model))
    initialize_lora_eva_weights(peft_model, loader, gather_distributed_inputs=False, show_progress_bar=progress)
    ranks = sorted({m.r["default"] for m in _lora_layers(peft_model)})
    log.info("EVA: %d of %d modules keep LoRA, ranks %s", len(lora_module_names(peft_model)), started, ranks)


def _corda_pass(model: nn.Module, lora_cfg: Any, calibration: Callable[[int], Any], examples: int,
                progress: bool) -> None:
    from peft.tuners.lora.corda import preprocess_corda

    loader = calibration(1)  # unpadded, one example at a time

    def run_model() -> None:
        seen = 0
        batches = loader if not progress else _progress(loader, "CorDA covariance")
        for batch in batches:
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items() if k != "labels"}
            model(**batch)
            seen += len(batch["input_ids"])
            if seen >= examples:
                break

    log.info("CorDA (%s): running up to %d training examples through the model before step 0",
             lora_cfg.corda_config.corda_method, examples)
    _on_accelerator(model)
    model.eval()
    with torch.no_grad():
        preprocess_corda(model, lora_cfg, run_model=run_model)


def _progress(iterable: Any, what: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=what, leave=False)


@torch.no_grad()
def _loftq(peft_model: nn.Module, config: RunConfig) -> None:
    """LoftQ on the 4-bit base, as peft's ``replace_lora_weights_loftq`` (one LoftQ step: each layer's LoRA set to
    the best rank-r approximation of its quantization error ``W - dequant(Q)``), with two differences: it computes
    where the weights are (peft's needs a CUDA / XPU device) and divides by LoRA's scale (alpha / r; peft's assumes
    1), so that at step 0 ``dequant(Q) + scale * B A`` is as close to the full-precision ``W`` as rank r allows."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    from loralab.models import resolve_model_path

    files = _safetensors_files(Path(resolve_model_path(config.model.name_or_path)), config.model.name_or_path)
    log.info("LoftQ: LoRA initialised to make up for the 4-bit quantization error of each layer")
    handles = {path: safe_open(str(path), framework="pt") for path in set(files.values())}
    for name, module in peft_model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "r", {}) \
                or type(base).__name__ != "Linear4bit":
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in files:
            raise LoralabError(f"LoftQ: {key} is not in the base model's safetensors files")
        weight = handles[files[key]].get_tensor(key).to(base.weight.device, torch.float32)
        residual = weight - bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r = module.r["default"]
        root = torch.sqrt(s[:r])
        module.lora_A["default"].weight.data = (root[:, None] * vh[:r]).contiguous()
        module.lora_B["default"].weight.data = (u[:, :r] * root / module.scaling["default"]).contiguous()


def _safetensors_files(folder: Path, name: str) -> dict[str, Path]:
    """Which local safetensors file holds each of the base model's tensors (one file, or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {key: folder / file for key, file in mapping.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise LoralabError(f"lora.init_lora_weights=loftq reads the base's full-precision weights from its local "
                           f"safetensors files; {name} has no model.safetensors here ({folder})")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in getattr(m, "r", {})]


# ---------------------------------------------------------------- residual initialisations: keep A0/B0, rebuild, convert


def initial_adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """A0 / B0 right after initialisation, named as in a saved adapter."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def write_initial_adapter(run_root: Path, initial: dict[str, torch.Tensor], init: str) -> Path:
    """Keep the initial adapter in the run folder (written whole, then moved into place)."""
    from safetensors.torch import save_file

    target = run_root / INITIAL_ADAPTER
    staging = target.with_name(f".{target.name}.partial")
    save_file(initial, str(staging), metadata={"format": "pt", "init_lora_weights": str(init)})
    os.replace(staging, target)
    return target


def _resume_skeleton(model: nn.Module, config: RunConfig, task_type: str, tokens: Any,
                     checkpoint: Path) -> tuple[nn.Module, Any, dict[str, torch.Tensor] | None]:
    """For a resume: the adapter's shapes without the data passes; a residual base rebuilt from the initial adapter
    (bit for bit the residual the run started with). The Trainer then loads the checkpoint's weights."""
    from peft import PeftModel, get_peft_model

    from loralab.lora_fields import TargetReport, plan_lora
    from loralab.models import default_target_modules

    settings = config.lora
    if init_family(settings.init_lora_weights) == "eva":  # ranks redistributed: the checkpoint's config has them
        peft_model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
        wrapped = [n.removeprefix("base_model.model.") for n in lora_module_names(peft_model)]
        return peft_model, TargetReport(requested=settings.target_modules or "preset", matched=wrapped), None
    initial_file = checkpoint.parent.parent / INITIAL_ADAPTER
    if not initial_file.is_file():
        raise LoralabError(f"cannot resume {checkpoint.parent.parent}: lora.init_lora_weights="
                           f"{settings.init_lora_weights} changed the base weights, and the initial adapter that "
                           f"rebuilds them ({initial_file.name}) is missing; start the run again (--overwrite)")
    from safetensors.torch import load_file

    plain = settings.model_copy(update={"init_lora_weights": True})
    lora_cfg, report = plan_lora(model, plain, task_type, default_target_modules(model.config),
                                 trainable_token_indices=tokens)
    peft_model = get_peft_model(model, lora_cfg)
    initial = load_file(str(initial_file))
    rebuild_residual(peft_model, initial)
    peft_model.peft_config["default"].init_lora_weights = settings.init_lora_weights  # as the checkpoints say
    return peft_model, report, initial


@torch.no_grad()
def rebuild_residual(peft_model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Set A0 / B0 and replace each wrapped base weight W by ``W - scale * B0 A0`` as PEFT's initialisation does."""
    from peft import set_peft_model_state_dict
    from peft.utils.other import transpose

    set_peft_model_state_dict(peft_model, initial)
    for module in _lora_layers(peft_model):
        base = module.get_base_layer()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        weight = transpose(base.weight.to(torch.float32), module.fan_in_fan_out)
        weight = weight - module.scaling["default"] * b @ a
        base.weight.data = transpose(weight.to(base.weight.dtype), module.fan_in_fan_out)


def convert_to_plain_lora(folder: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a saved residual-initialised adapter in ``folder`` as a plain LoRA for the original base: the update
    ``B A - B0 A0`` as rank-2r factors ``[B | -B0] [A ; A0]`` at the same scale (PEFT's ``subtract_mutated_init``;
    done here on the files so that modules_to_save, trained biases and new token rows are kept, and rsLoRA with
    rank/alpha patterns keeps its scale)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / WEIGHTS))
    missing = [k for k in weights if (".lora_A." in k or ".lora_B." in k) and k not in initial]
    if missing:
        raise LoralabError(f"the initial adapter has no {missing[0]}: it belongs to another run")
    for key, value in weights.items():
        if ".lora_A." in key:
            weights[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
        elif ".lora_B." in key:
            weights[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    path = folder / ADAPTER_CONFIG
    settings = json.loads(path.read_text(encoding="utf-8"))
    grow = math.sqrt(2) if settings.get("use_rslora") else 2.0  # rsLoRA scales by alpha / sqrt(r)
    settings.update(init_lora_weights=True, r=2 * settings["r"], lora_alpha=settings["lora_alpha"] * grow,
                    rank_pattern={k: 2 * v for k, v in (settings.get("rank_pattern") or {}).items()},
                    alpha_pattern={k: v * grow for k, v in (settings.get("alpha_pattern") or {}).items()},
                    corda_config=None)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")


@contextlib.contextmanager
def loadable_adapter(adapter: Path, run_dir: Path | None) -> Iterator[Path]:
    """The adapter folder to give ``PeftModel.from_pretrained`` on the original base: as it is, or, for a checkpoint
    of a residual-initialised run, converted (with the run's initial adapter) in a temporary folder."""
    settings_file = Path(adapter) / ADAPTER_CONFIG
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    family = init_family(settings.get("init_lora_weights"))
    if family not in RESIDUAL_INITS:
        yield Path(adapter)
        return
    initial_file = Path(run_dir) / INITIAL_ADAPTER if run_dir is not None else None
    if initial_file is None or not initial_file.is_file():
        raise LoralabError(f"{adapter} is a {family} adapter saved without PEFT's conversion: its weights go with a "
                           f"residual of the base weights, so loaded on the base its 'base model' answers would be that "
                           f"residual's; convert it first (peft: save_pretrained(..., "
                           f"path_initial_model_for_weight_conversion=...)), or give the loralab run it came from")
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix=".converted-adapter-") as tmp:
        for name in (ADAPTER_CONFIG, WEIGHTS):
            shutil.copy2(Path(adapter) / name, Path(tmp) / name)
        convert_to_plain_lora(Path(tmp), load_file(str(initial_file)))
        yield Path(tmp)
