"""LoRA's fields that depend on the model: layers, per-module ranks and alphas, exclusions, GPT-2's Conv1D layout,
expert parameters. Each is matched against the model as PEFT matches it, before any weight changes; a field that
matches nothing is one message naming the key, what it matched and what the model has."""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from loralab.config import LoraSettings
from loralab.errors import LoralabError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- target modules and modules_to_save


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the modules LoRA can wrap (Linear, GPT-2 Conv1D, bitsandbytes 4/8-bit Linear)."""
    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.append(name)
    return names


@dataclass
class TargetReport:
    """Which requested target modules matched which modules of the model."""

    requested: list[str] | str
    matched: list[str] = field(default_factory=list)
    unmatched_names: list[str] = field(default_factory=list)
    suggestions: dict[str, list[str]] = field(default_factory=dict)


def match_targets(model: nn.Module, targets: list[str] | str) -> TargetReport:
    """Match targets as PEFT does: a list matches module-name suffixes, a string is a full regex."""
    linear = linear_module_names(model)
    report = TargetReport(requested=targets)
    if targets == "all-linear":
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        report.matched = [n for n in linear if output_layer is None or model.get_submodule(n) is not output_layer]
        report.matched = [n for n in report.matched if not n.endswith(("lm_head", "classifier", "score"))]
        return report
    if isinstance(targets, str):
        report.matched = [n for n in linear if re.fullmatch(targets, n)]
        if not report.matched:
            report.unmatched_names = [targets]
        return report
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear})
    for target in targets:
        hits = [n for n in linear if n == target or n.endswith("." + target)]
        report.matched.extend(hits)
        if not hits:
            report.unmatched_names.append(target)
            close = [leaf for leaf in leaf_names if leaf.startswith(target) or target in leaf]
            if close:
                report.suggestions[target] = close
    report.matched = sorted(set(report.matched))
    return report


def describe_unmatched(report: TargetReport, model: nn.Module, preset: list[str] | str) -> str:
    """A message naming the unmatched targets, close names, the model's linear modules and the preset."""
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
    parts = [f"lora.target_modules {report.unmatched_names} matched no module of the model"]
    for target, close in report.suggestions.items():
        parts.append(f"'{target}' may mean {close}")
    parts.append(f"the model's linear modules are named: {', '.join(leaf_names)}")
    parts.append(f"the preset for this architecture is {preset}")
    return "; ".join(parts)


CLASSIFIER_HEADS = ("classifier", "score")  # PEFT adds both to modules_to_save itself for SEQ_CLS


def saveable_module_names(model: nn.Module) -> list[str]:
    """Modules worth saving whole: those with their own weights outside the repeated layers (embeddings, final norms,
    heads), each named by the shortest suffix that PEFT's modules_to_save matching takes to it alone."""
    every = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or any(p.isdigit() for p in parts) or not any(True for _ in module.parameters(recurse=False)):
            continue
        suffixes = (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
        names.append(next((s for s in suffixes if [n for n in every if n.endswith(s)] == [name]), name))
    return names


def unmatched_modules_to_save(model: nn.Module, entries: list[str], task_type: str) -> list[str]:
    """The ``lora.modules_to_save`` entries that match no module as PEFT matches them (a module name ending with the
    entry); for SEQ_CLS the head names are exempt (PEFT saves the head under whichever of them exists)."""
    every = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    exempt = CLASSIFIER_HEADS if task_type in ("SEQ_CLS", "TOKEN_CLS") else ()
    return [e for e in entries if e not in exempt and not any(n.endswith(e) for n in every)]


def describe_unmatched_modules_to_save(unmatched: list[str], model: nn.Module, task_type: str) -> str:
    """A message naming the entries that matched nothing and the modules that can be saved."""
    parts = [f"lora.modules_to_save {unmatched} matched no module of the model (PEFT matches a module whose name ends "
             "with the entry)"]
    heads = [e for e in unmatched if e in CLASSIFIER_HEADS]
    if heads and task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        parts.append(f"{heads} is a classification head, which a {task_type} model does not have (set "
                     "model.task_type: SEQ_CLS to train a classifier: PEFT then trains and saves the head itself)")
    parts.append(f"modules that can be saved whole: {', '.join(saveable_module_names(model))}")
    return "; ".join(parts)


# ---------------------------------------------------------------- the LoraConfig, checked against the model


def plan_lora(model: nn.Module, settings: LoraSettings, task_type: str, preset: list[str] | str,
              trainable_token_indices: dict[str, list[int]] | None = None) -> tuple[Any, TargetReport]:
    """The ``peft.LoraConfig`` for this model and the modules it wraps (``report.matched``, after exclusions and
    layers); every model-dependent field is checked first, so a mistake stops before any weight is touched."""
    targets = settings.target_modules if settings.target_modules is not None else preset
    report = match_targets(model, targets) if targets != [] else TargetReport(requested=[])
    if not report.matched and not settings.target_parameters:
        raise LoralabError(describe_unmatched(report, model, preset))
    if report.unmatched_names:
        log.warning(describe_unmatched(report, model, preset))
    task = settings.task_type or task_type
    unsaved = unmatched_modules_to_save(model, settings.modules_to_save or [], task)
    if unsaved:
        raise LoralabError(describe_unmatched_modules_to_save(unsaved, model, task))
    check_model_fields(model, settings, report.matched, linear_module_names(model))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in report.matched})
    # PEFT applies layers_to_transform to a list of names only: all-linear becomes the names it stands for
    peft_targets = leaves if targets == "all-linear" and settings.layers_to_transform is not None else targets
    config = lora_config(settings, task_type, peft_targets, trainable_token_indices=trainable_token_indices)
    probe = copy.copy(config)
    if targets == "all-linear":
        probe.target_modules = set(leaves)
    wrapped = wrapped_modules(probe, report.matched)
    if report.matched and not wrapped and not settings.target_parameters:
        chosen = [f"lora.{key}={getattr(settings, key)}" for key in ("exclude_modules", "layers_to_transform")
                  if getattr(settings, key) is not None]
        raise LoralabError(f"{' and '.join(chosen)} leave none of the {len(report.matched)} targeted modules to wrap "
                           "with LoRA: nothing would be trained")
    check_patterns(settings, wrapped)
    config.fan_in_fan_out = conv1d_layout(model, settings, wrapped) if wrapped else False
    report.matched = wrapped
    return config, report
def lora_config(settings: LoraSettings, task_type: str, targets: list[str] | str, *,
                trainable_token_indices: Any = None) -> Any:
    """A ``peft.LoraConfig`` from loralab's settings (``targets``: the resolved target modules; ``fan_in_fan_out``
    is set by :func:`plan_lora` from the layers it wraps)."""
    from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraConfig

    eva = EvaConfig(**settings.eva.model_dump()) if settings.init_lora_weights == "eva" else None
    corda = CordaConfig(corda_method=settings.corda.method) if settings.init_lora_weights == "corda" else None
    try:
        return LoraConfig(
            task_type={"QUESTION_ANSWERING": "QUESTION_ANS"}.get(settings.task_type or task_type,  # peft's name
                                                                  settings.task_type or task_type),
            target_modules=targets if targets != [] else None,
            exclude_modules=settings.exclude_modules,
            layers_to_transform=settings.layers_to_transform,
            layers_pattern=settings.layers_pattern,
            r=settings.r,
            lora_alpha=settings.alpha,
            rank_pattern=dict(settings.rank_pattern),
            alpha_pattern=dict(settings.alpha_pattern),
            lora_dropout=settings.dropout,
            bias=settings.bias,
            lora_bias=settings.lora_bias,
            fan_in_fan_out=bool(settings.fan_in_fan_out),
            target_parameters=settings.target_parameters,
            modules_to_save=settings.modules_to_save,
            # loftq: plain LoRA first, then replace_lora_weights_loftq on the 4-bit base (loralab.lora_init)
            init_lora_weights=True if settings.init_lora_weights == "loftq" else settings.init_lora_weights,
            eva_config=eva,
            corda_config=corda,
            trainable_token_indices=trainable_token_indices,
            inference_mode=settings.inference_mode,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
        )
    except (ValueError, TypeError) as exc:
        raise LoralabError(f"lora settings refused by peft: {exc}") from None


def layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    """The layer number PEFT reads from a module name for ``layers_to_transform`` (the first numbered segment, or the
    one after a ``layers_pattern`` name), or None."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def layer_lists(names: list[str]) -> list[str]:
    """The names of the model's numbered module lists (``layers``, ``h``, ``block``...) as they appear in module names."""
    found = [m.group(1) for n in names if (m := re.match(r"(?:^|.*?\.)([^.]+)\.\d+\.", n))]
    return sorted(set(found))


def pattern_matches(key: str, names: list[str], where: str = "lora.rank_pattern") -> list[str]:
    """The module names a ``rank_pattern`` / ``alpha_pattern`` key selects (PEFT: the key as a regex on a name's end)."""
    try:
        return [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
    except re.error as exc:
        raise LoralabError(f"{where} key {key!r} is not a valid regular expression: {exc}") from None


def number_ranges(numbers: list[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    numbers, parts, start = sorted(set(numbers)), [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def wrapped_modules(config: Any, names: list[str]) -> list[str]:
    """The module names PEFT's matching wraps with LoRA under ``config`` (exclusions and layers applied)."""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    wrapped = []
    for name in names:
        found = check_target_module_exists(config, name)
        if found and not isinstance(found, _ExcludedModule):
            wrapped.append(name)
    return wrapped


def check_model_fields(model: nn.Module, settings: LoraSettings, targeted: list[str], linear: list[str]) -> None:
    """Refuse, before training, the fields that select nothing on this model. ``targeted``: the modules the target
    modules match before exclusions and layers; ``linear``: every module LoRA can wrap."""
    every = [n for n, _ in model.named_modules() if n]
    if settings.exclude_modules:
        excluded = settings.exclude_modules
        if isinstance(excluded, str):
            if not any(re.fullmatch(excluded, n) for n in every):
                raise LoralabError(f"lora.exclude_modules regex {excluded!r} matches no module of the model (a regex "
                                   f"matches whole names such as {targeted[0] if targeted else every[0]!r})")
        else:
            unused = [e for e in excluded if not any(n == e or n.endswith("." + e) for n in every)]
            if unused:
                raise LoralabError(f"lora.exclude_modules {unused} matched no module of the model (PEFT matches a "
                                   "module whose name ends with the entry); the targeted modules are named: "
                                   f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in targeted}))}")
    if settings.layers_to_transform is not None:
        lists = layer_lists(targeted)
        if settings.layers_pattern:
            patterns = [settings.layers_pattern] if isinstance(settings.layers_pattern, str) else settings.layers_pattern
            if not any(layer_index(n, settings.layers_pattern) is not None for n in targeted):
                raise LoralabError(f"lora.layers_pattern {patterns} matches no layer list of the targeted modules; "
                                   f"the model's layer lists are named: {', '.join(lists) or 'none (no numbered layers)'}")
        indexes = {i for n in targeted if (i := layer_index(n, settings.layers_pattern)) is not None}
        missing = sorted(set(settings.layers_to_transform) - indexes)
        if missing:
            have = f"layers {number_ranges(sorted(indexes))}" if indexes else "no numbered layers"
            raise LoralabError(f"lora.layers_to_transform {missing}: the targeted modules are in {have} "
                               f"(counted from 0{', in ' + ', '.join(lists) if lists else ''})")
    if settings.target_parameters:
        params = [n for n, _ in model.named_parameters()]
        unused = [t for t in settings.target_parameters if not any(p == t or p.endswith("." + t) for p in params)]
        if unused:
            owners = set(linear)
            loose = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n, p in model.named_parameters()
                            if p.dim() >= 2 and n.rsplit(".", 1)[0] not in owners and "embed" not in n})
            raise LoralabError(f"lora.target_parameters {unused} matched no parameter of the model (PEFT matches a "
                               "parameter whose full name ends with the entry); parameters outside linear layers: "
                               f"{', '.join(loose[:12]) or 'none'}")


def check_patterns(settings: LoraSettings, wrapped: list[str]) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key must select a module that gets LoRA."""
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(settings, key):
            if not pattern_matches(pattern, wrapped, f"lora.{key}"):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
                raise LoralabError(f"lora.{key} key {pattern!r} matches no module that gets LoRA (PEFT matches the end "
                                   f"of a module name, as a regex, e.g. 'q_proj' or 'layers\\.0\\.self_attn\\.q_proj'); "
                                   f"the modules with LoRA are named: {', '.join(leaves)}")


def conv1d_layout(model: nn.Module, settings: LoraSettings, wrapped: list[str]) -> bool:
    """``fan_in_fan_out`` for the wrapped modules: true when they are GPT-2-style Conv1D (weights stored
    in x out); a user's value that contradicts the layers is corrected with a warning."""
    kinds = {type(model.get_submodule(n)).__name__ == "Conv1D" for n in wrapped}
    if len(kinds) != 1:
        return bool(settings.fan_in_fan_out)  # a mix: PEFT sets it for each layer
    conv1d = kinds.pop()
    if settings.fan_in_fan_out is not None and settings.fan_in_fan_out != conv1d:
        log.warning("lora.fan_in_fan_out is %s but the wrapped layers are %s; using %s",
                    str(settings.fan_in_fan_out).lower(), "Conv1D (GPT-2 style, weights stored in x out)" if conv1d
                    else "nn.Linear (weights stored out x in)", str(conv1d).lower())
    return conv1d
