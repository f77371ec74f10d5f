"""``lora.init_from``: training starts from an existing PEFT adapter (loralab's or any tool's, or a loralab run's
``adapter/``), as LLaMA-Factory's ``adapter_name_or_path``. The configured LoRA is built as usual, the adapter's
rank, alpha and variants and the modules it has weights for are checked against it, then its weights are loaded."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loralab.adapters import ADAPTER_CONFIG, read_adapter_config
from loralab.config import RESIDUAL_INITS, RunConfig, init_family
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"


def init_from_folder(path: str | Path) -> Path:
    """The adapter folder ``lora.init_from`` names: a PEFT adapter folder, or a loralab run (its ``adapter/``)."""
    path = Path(path).expanduser()
    if (path / "config.yaml").is_file() and (path / "adapter" / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    return path


def continue_from(peft_model: nn.Module, source: str | Path, config: RunConfig) -> None:
    """Load an existing adapter's weights into the configured LoRA, after checking that they fit: the same rank,
    alpha and variants, and LoRA weights for exactly the modules the config targets."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = init_from_folder(source)
    try:
        theirs = read_adapter_config(folder)
    except LoralabError as exc:
        raise LoralabError(f"lora.init_from: {exc}") from None
    where = f"lora.init_from ({source})"
    if theirs.get("peft_type", "LORA") != "LORA":
        raise LoralabError(f"{where} is a {theirs.get('peft_type')} adapter; loralab continues LoRA adapters only")
    family = init_family(theirs.get("init_lora_weights"))
    if family in RESIDUAL_INITS:
        raise LoralabError(f"{where} is a {family} adapter saved without PEFT's conversion: its weights go with a "
                           "residual of the base weights, not with the base; convert it first (peft's "
                           "path_initial_model_for_weight_conversion) or start from the loralab run's adapter/")
    lora = config.lora
    wanted = {"r": (lora.r, "lora.r"), "lora_alpha": (lora.alpha, "lora.alpha"),
              "use_rslora": (lora.use_rslora, "lora.use_rslora"), "use_dora": (lora.use_dora, "lora.use_dora"),
              "rank_pattern": (lora.rank_pattern, "lora.rank_pattern"),
              "alpha_pattern": (lora.alpha_pattern, "lora.alpha_pattern")}
    defaults = {"use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    for key, (ours, name) in wanted.items():
        value = theirs.get(key) if theirs.get(key) is not None else defaults.get(key)
        if value != ours and not (isinstance(ours, float) and isinstance(value, (int, float)) and ours == float(value)):
            raise LoralabError(f"{where} has {key}={value!r} but {name} is {ours!r}; set {name}: {value!r} to "
                               "continue that adapter")
    base = theirs.get("base_model_name_or_path")
    if base and Path(str(base)).name != Path(config.model.name_or_path.rstrip("/")).name:
        log.warning("%s was trained on %s; model.name_or_path is %s", where, base, config.model.name_or_path)
    weights = load_file(str(folder / WEIGHTS))
    ours = get_peft_model_state_dict(peft_model)
    _check_same_modules(where, ours, weights)
    set_peft_model_state_dict(peft_model, weights)
    log.info("%s: continuing from its %d tensors", where, len(weights))


def _module_of(key: str) -> str:
    name = key.removeprefix("base_model.model.")
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B"):
        if marker in name:
            return name.split(marker)[0]
    return name.rsplit(".", 1)[0]


def _check_same_modules(where: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    missing = sorted({_module_of(k) for k in ours if k not in theirs})
    extra = sorted({_module_of(k) for k in theirs if k not in ours})
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the config trains {len(missing)} modules the adapter has no weights for "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if extra:
            parts.append(f"the adapter has weights for {len(extra)} modules the config does not train "
                         f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})")
        raise LoralabError(f"{where} does not fit lora.target_modules / lora.modules_to_save: {'; '.join(parts)}; set "
                           "them to what the adapter was trained with")
    shapes = [k for k in ours if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if shapes:
        key = shapes[0]
        raise LoralabError(f"{where}: {key} has shape {tuple(theirs[key].shape)} in the adapter, "
                           f"{tuple(ours[key].shape)} in the configured LoRA (another rank or base model)")
