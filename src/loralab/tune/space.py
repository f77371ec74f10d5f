"""The search space of a tune: what each trial varies, parsed from ``--space key=...`` and checked before anything runs.

A parameter is a config key (``lora.r``, ``train.learning_rate``, ...) or one of two derived keys:
``lora.alpha_ratio`` (``lora.alpha`` = ratio x ``lora.r``) and ``lora.coverage`` (which modules get LoRA:
``attention``, ``all-linear`` or ``preset``). ``key=a,b,c`` is a choice among values (each read as YAML, as
``sweep --grid`` reads them; one value fixes the key), ``key=lo..hi`` a range (integers if both ends are), with
``:log`` for a log scale (``train.learning_rate=1e-5..1e-3:log``).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from loralab.config import KEY_ALIASES, RunConfig, build_config, config_keys, parse_override, set_dotted
from loralab.errors import ConfigError

DERIVED_KEYS: dict[str, str] = {
    "lora.alpha_ratio": "lora.alpha as a multiple of lora.r (alpha = ratio x r)",
    "lora.coverage": "which modules get LoRA: attention (q/k/v/o only), all-linear, or preset (loralab's per-architecture list)",
}
COVERAGES: tuple[str, ...] = ("attention", "all-linear", "preset")
# keys every trial gets from tune itself
TUNE_SETS: tuple[str, ...] = ("name", "output_dir", "train.eval_steps", "train.save_steps", "train.metric_for_best_model",
                              "train.eval_generate", "train.resume")
FIDELITY_KEYS: tuple[str, ...] = ("train.epochs", "train.max_steps", "train.batch_size", "train.gradient_accumulation")
# the default space and why (README "Tune"): r 4-32 covers the guidance (1-8 general tasks, 8-32 large domain shifts)
DEFAULT_R: tuple[int, ...] = (4, 8, 16, 32)
DEFAULT_ALPHA_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # r 8-32 x 2 gives the usual alpha 16-64
DEFAULT_DROPOUT: tuple[float, float] = (0.0, 0.1)
DEFAULT_EPOCHS: tuple[int, ...] = (1, 2, 3)
TRIAL_PATIENCE = 4  # a trial stops after 4 evaluations without a better metric (its best checkpoint is kept anyway)
ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "q", "k", "v", "o", "query", "key", "value", "c_attn",
                   "out_proj", "qkv_proj", "Wqkv", "W_pack", "query_key_value"}


@dataclass
class Param:
    """One searched key: a choice among ``choices``, or a ``low`` .. ``high`` range (``int``: integers; ``log``)."""

    name: str
    kind: str  # "categorical", "float" or "int"
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    source: str = "default"  # default, --space, range test

    # Optuna's categorical choices must be None / bool / int / float / str: lists travel as JSON text
    def encoded_choices(self) -> list[Any]:
        return [json.dumps(c) if isinstance(c, (list, dict)) else c for c in self.choices or []]

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if isinstance(value, (list, dict)) else value

    def decode(self, value: Any) -> Any:
        if self.kind == "categorical" and isinstance(value, str):
            for choice in self.choices or []:
                if isinstance(choice, (list, dict)) and json.dumps(choice) == value:
                    return copy.deepcopy(choice)
        return value

    def holds(self, value: Any) -> Any:
        """``value`` as this parameter's own value (the equal choice, a number in the range), or None outside it."""
        if value is None:
            return None
        if self.kind == "categorical":  # True is not the choice 1, nor 1.0 the choice True
            return next((copy.deepcopy(c) for c in self.choices or []
                         if c == value and isinstance(c, bool) == isinstance(value, bool)), None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not float(self.low) <= float(value) <= float(self.high):
            return None
        if self.kind == "int":
            return int(value) if float(value).is_integer() else None
        return float(value)

    @property
    def fixed(self) -> bool:
        return self.kind == "categorical" and len(self.choices or []) == 1

    def suggest(self, trial: Any) -> Any:
        """The value a trial takes (decoded: lists as lists)."""
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.name, self.encoded_choices()))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        from loralab.sweeps import display_value

        if self.kind == "categorical":
            return ", ".join(display_value(c) for c in self.choices or [])
        return f"{display_value(self.low)} .. {display_value(self.high)}{' (log scale)' if self.log else ''}"

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None and key != "name"}

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> "Param":
        return cls(name=name, **data)


# ---------------------------------------------------------------- parsing --space


def _split_range(raw: str) -> tuple[str, str] | None:
    """``lo..hi`` outside brackets and quotes, else None (a list of choices)."""
    if raw.lstrip().startswith(("[", "{", "'", '"')) or ".." not in raw:
        return None
    low, _, high = raw.partition("..")
    return (low.strip(), high.strip()) if low.strip() and high.strip() else None


def parse_space_arg(item: str) -> Param:
    """``key=a,b,c`` (choices) or ``key=lo..hi[:log]`` (a range) as a :class:`Param` (checked by :func:`check_space`)."""
    from loralab.sweeps import parse_grid_arg

    if "=" not in item:
        raise ConfigError(f"--space {item!r} is not key=v1,v2,... or key=lo..hi (e.g. --space lora.r=4,8,16 or "
                          "--space train.learning_rate=1e-5..1e-3:log)")
    key, raw = item.split("=", 1)
    key = KEY_ALIASES.get(key.strip(), key.strip())
    raw = raw.strip()
    if not raw:
        raise ConfigError(f"--space {item!r}: no values (give key=v1,v2,... or key=lo..hi)")
    log = False
    scale = raw.rsplit(":", 1)
    if len(scale) == 2 and scale[1].strip().lower() in ("log", "linear"):
        raw, log = scale[0].strip(), scale[1].strip().lower() == "log"
    bounds = _split_range(raw)
    if bounds is None:
        if log:
            raise ConfigError(f"--space {item!r}: ':log' applies to a range lo..hi, not to a list of values")
        return Param(key, "categorical", choices=parse_grid_arg(f"{key}={raw}")[1], source="--space")
    values = [parse_override(f"{key}={part}")[1] for part in bounds]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"--space {item!r}: a range needs two numbers (lo..hi), got {bounds[0]!r} and {bounds[1]!r}")
    kind = "int" if all(isinstance(v, int) for v in values) else "float"
    return Param(key, kind, low=values[0], high=values[1], log=log, source="--space")


def parse_space(items: Iterable[str] = (), mapping: dict[str, Any] | None = None) -> dict[str, Param]:
    """``--space`` arguments and/or a mapping (key -> list of choices, ``"lo..hi[:log]"``, or a Param) as Params."""
    params: dict[str, Param] = {}
    for key, value in (mapping or {}).items():
        if isinstance(value, Param):
            param = value
        elif isinstance(value, dict):
            param = Param.from_dict(KEY_ALIASES.get(key, key), value)
        elif isinstance(value, (list, tuple)):
            param = Param(KEY_ALIASES.get(key, key), "categorical", choices=list(value), source="--space")
        else:
            param = parse_space_arg(f"{key}={value}")
        params[param.name] = param
    for item in items:
        param = parse_space_arg(item)
        params[param.name] = param
    return params


# ---------------------------------------------------------------- checking


def _with(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    if key == "lora.alpha_ratio":
        out.setdefault("lora", {})["alpha"] = float(value) * out.get("lora", {}).get("r", 16)
    elif key == "lora.coverage":
        out.setdefault("lora", {})["target_modules"] = None
    else:
        set_dotted(out, key, copy.deepcopy(value))
    return out


def check_space(params: dict[str, Param], base: RunConfig) -> None:
    """Refuse a key that is not a config key (nor a derived one), a key tune sets itself, an empty range, duplicate
    or invalid values, and two keys that set the same thing; each message names the key."""
    known = config_keys()
    valid = [k for k in known if k not in TUNE_SETS] + list(DERIVED_KEYS)
    data = base.model_dump(mode="json")
    for name, param in params.items():
        if name in TUNE_SETS:
            raise ConfigError(f"--space key {name!r} cannot be searched: tune sets it for every trial "
                              f"({', '.join(TUNE_SETS)})")
        if name not in known and name not in DERIVED_KEYS:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--space key {name!r} is not a config key{hint}; valid keys: {', '.join(valid)}")
        if param.kind == "categorical":
            choices = param.choices or []
            if not choices:
                raise ConfigError(f"--space key {name!r} has no values")
            seen = [json.dumps(c, sort_keys=True, default=str) for c in choices]
            if len(set(seen)) != len(seen):
                raise ConfigError(f"--space key {name!r} lists a value twice: {choices!r}")
            if name == "lora.coverage" and any(c not in COVERAGES for c in choices):
                raise ConfigError(f"--space lora.coverage: {choices!r}; allowed values: {', '.join(COVERAGES)}")
            probes = choices
        elif param.kind in ("int", "float"):
            low, high = param.low, param.high
            if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
                raise ConfigError(f"--space key {name!r}: a range needs two finite numbers, got {low!r} .. {high!r}")
            if not low < high:
                raise ConfigError(f"--space key {name!r}: the range {low} .. {high} is empty (write lo..hi with lo < hi; "
                                  f"one value fixes the key: {name}={low})")
            if param.log and low <= 0:
                raise ConfigError(f"--space key {name!r}: a log-scale range must be above 0, got {low} .. {high}")
            probes = [int(low), int(high)] if param.kind == "int" else [low, high]
        else:
            raise ConfigError(f"--space key {name!r}: unknown kind {param.kind!r}")
        if name == "lora.alpha_ratio" and any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0
                                              for v in probes):
            raise ConfigError(f"--space lora.alpha_ratio values must be positive numbers, got {probes!r}")
        for value in probes:
            build_config(_with(data, name, value), source=f"--space {name}={value!r}")
    for derived, key in (("lora.alpha_ratio", "lora.alpha"), ("lora.coverage", "lora.target_modules")):
        if derived in params and key in params:
            raise ConfigError(f"--space gives both {derived} and {key}, which set the same thing; give one")


# ---------------------------------------------------------------- the resolved space


def coverage_targets(config: RunConfig) -> dict[str, list[str] | str | None]:
    """``lora.target_modules`` for each coverage on this model, without duplicates (on Llama-like models
    ``all-linear`` is the preset): ``attention`` -> [q_proj, k_proj, v_proj, o_proj], ``preset`` -> None, ...

    The model's module names come from an empty (meta-device) copy built from its config: no weights are loaded."""
    import torch

    from loralab.models import (default_target_modules, linear_module_names, load_model_config, match_targets,
                                resolve_task_type)

    hf_config = load_model_config(config.model)
    preset = default_target_modules(hf_config)
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    auto = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
            "SEQ_CLS": AutoModelForSequenceClassification, "FEATURE_EXTRACTION": AutoModel,
            "QUESTION_ANSWERING": AutoModelForQuestionAnswering, "TOKEN_CLS": AutoModelForTokenClassification}[resolve_task_type(config)]
    try:
        with torch.device("meta"):
            model = auto.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - an exotic architecture: the coverages without de-duplication
        model = None
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)}) if model is not None else []
    source = preset if isinstance(preset, list) else leaves
    attention = [name for name in source if name in ATTENTION_NAMES]
    options: dict[str, list[str] | str | None] = {}
    if attention:
        options["attention"] = attention
    options["preset"] = None
    options["all-linear"] = "all-linear"
    if model is None:
        return options
    seen: dict[tuple[str, ...], str] = {}
    resolved: dict[str, list[str] | str | None] = {}
    for name in ("attention", "preset", "all-linear"):
        if name not in options:
            continue
        targets = options[name] if options[name] is not None else preset
        matched = tuple(sorted(set(match_targets(model, targets).matched)))
        if matched and matched not in seen:
            seen[matched] = name
            resolved[name] = options[name]
    return resolved


def default_space(base: RunConfig, lr_range: tuple[float, float], coverages: Iterable[str]) -> dict[str, Param]:
    """The search space when ``--space`` names nothing: learning rate (log, inside the range test's range), r,
    alpha as a multiple of r, dropout, coverage and epochs (not when the base config sets train.max_steps)."""
    space = {
        "train.learning_rate": Param("train.learning_rate", "float", low=lr_range[0], high=lr_range[1], log=True,
                                     source="range test"),
        "lora.r": Param("lora.r", "categorical", choices=list(DEFAULT_R)),
        "lora.alpha_ratio": Param("lora.alpha_ratio", "categorical", choices=list(DEFAULT_ALPHA_RATIOS)),
        "lora.dropout": Param("lora.dropout", "float", low=DEFAULT_DROPOUT[0], high=DEFAULT_DROPOUT[1]),
    }
    coverages = list(coverages)
    if len(coverages) > 1:
        space["lora.coverage"] = Param("lora.coverage", "categorical", choices=coverages)
    if not base.train.max_steps:
        space["train.epochs"] = Param("train.epochs", "categorical", choices=list(DEFAULT_EPOCHS))
    return space


def resolve_space(base: RunConfig, user: dict[str, Param], lr_range: tuple[float, float],
                  coverages: Iterable[str]) -> dict[str, Param]:
    """The default space with the user's keys on top (a user key replaces the default key that sets the same thing)."""
    space = default_space(base, lr_range, coverages)
    replaces = {"lora.alpha": "lora.alpha_ratio", "lora.target_modules": "lora.coverage", "train.max_steps": "train.epochs"}
    for name, param in user.items():
        if name in replaces:
            space.pop(replaces[name], None)
        if name == "lora.coverage" and param.kind == "categorical":
            param = Param(name, "categorical", choices=[c for c in param.choices or [] if c in coverages] or
                          list(param.choices or []), source=param.source)
        space[name] = param
    return space


# ---------------------------------------------------------------- trial configs and lengths


def _round_value(name: str, value: Any) -> Any:
    if isinstance(value, float) and not isinstance(value, bool):
        return float(f"{value:.3g}")
    return value


def trial_config(base: RunConfig, values: dict[str, Any], *, name: str, output_dir: str, metric: str, eval_steps: int,
                 eval_limit: int | None, coverages: dict[str, Any]) -> RunConfig:
    """The full run config of one trial: the base with the trial's values, evaluated (and checkpointed) every
    ``eval_steps`` steps, its best checkpoint chosen by ``metric``, stopped early after TRIAL_PATIENCE evaluations
    without a better one (unless the base or the space sets ``train.early_stopping_patience``)."""
    data = base.model_dump(mode="json")
    data["name"], data["output_dir"] = name, output_dir
    data["train"]["resume"] = False
    ratio = None
    for key, value in values.items():
        value = _round_value(key, value)
        if key == "lora.alpha_ratio":
            ratio = float(value)
        elif key == "lora.coverage":
            data["lora"]["target_modules"] = copy.deepcopy(coverages.get(value, None if value == "preset" else value))
        else:
            set_dotted(data, key, copy.deepcopy(value))
    if ratio is not None:
        data["lora"]["alpha"] = _round_value("lora.alpha", ratio * data["lora"]["r"])
    if "train.epochs" in values and "train.max_steps" not in values:
        data["train"]["max_steps"] = None
    train = data["train"]
    train["eval_steps"] = train["save_steps"] = eval_steps
    train["metric_for_best_model"] = metric
    if train.get("early_stopping_patience") is None and "train.early_stopping_patience" not in values:
        train["early_stopping_patience"] = TRIAL_PATIENCE  # the budget goes to trials still improving
    if metric != "eval_loss":
        train["eval_generate"] = True
        if eval_limit:
            train["eval_generate_limit"] = eval_limit
    return build_config(data, source=f"tune trial {name}")


def base_point(base: RunConfig, params: dict[str, Param], coverages: dict[str, Any]) -> dict[str, Any]:
    """The base config as a point of the space: each searched key's value in the base config where the space holds it
    (Optuna's encoding; a key whose base value lies outside is left to the sampler). The first trial of a new study
    trains it, so the search starts from the user's own config (loralab's defaults if none) and what it returns
    scores at least as well on the eval split as that config trained as a trial."""
    data = base.model_dump(mode="json")
    point = {}
    for name, param in params.items():
        if name == "lora.alpha_ratio":
            value = data["lora"]["alpha"] / data["lora"]["r"]
        elif name == "lora.coverage":
            value = next((c for c, targets in coverages.items() if targets == data["lora"]["target_modules"]), None)
        else:
            section, _, key = KEY_ALIASES.get(name, name).partition(".")
            value = data.get(section, {}).get(key) if key else data.get(section)
        held = param.holds(value)
        if held is not None:
            point[name] = param.encode(held)
    return point


def planned_steps(train: dict[str, Any] | Any, n_train: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else epochs x ceil(batches per epoch / gradient accumulation)."""
    get = train.get if isinstance(train, dict) else lambda key: getattr(train, key)
    if get("max_steps"):
        return int(get("max_steps"))
    batches = math.ceil(n_train / max(1, int(get("batch_size"))))
    per_epoch = max(1, math.ceil(batches / max(1, int(get("gradient_accumulation")))))
    return max(1, math.ceil(per_epoch * float(get("epochs"))))


def evaluations(steps: int, eval_steps: int) -> int:
    """Evaluations of a trial: the base model at step 0, then every ``eval_steps`` steps."""
    return 1 + steps // max(1, eval_steps)


def step_bounds(base: RunConfig, space: dict[str, Param], n_train: int) -> tuple[int, int]:
    """The fewest and the most optimizer steps a trial of this space can have."""
    options: dict[str, list[Any]] = {}
    for key in FIDELITY_KEYS:
        param = space.get(key)
        if param is None:
            options[key] = [getattr(base.train, key.split(".")[1])]
        elif param.kind == "categorical":
            options[key] = list(param.choices or [])
        else:
            options[key] = [param.low, param.high]
    if "train.epochs" in space and "train.max_steps" not in space:
        options["train.max_steps"] = [None]
    counts = []
    for combination in itertools.product(*options.values()):
        train = {key.split(".")[1]: value for key, value in zip(options, combination)}
        counts.append(planned_steps(train, n_train))
    return min(counts), max(counts)


@dataclass
class SpaceSummary:
    """The resolved space and the schedule every trial shares."""

    params: dict[str, Param]
    coverages: dict[str, Any]
    eval_steps: int
    min_steps: int
    max_steps: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"params": {name: p.to_dict() for name, p in self.params.items()}, "coverages": self.coverages,
                "eval_steps": self.eval_steps, "min_steps": self.min_steps, "max_steps": self.max_steps,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpaceSummary":
        return cls({name: Param.from_dict(name, p) for name, p in data["params"].items()}, data["coverages"],
                   data["eval_steps"], data["min_steps"], data["max_steps"], data.get("notes", []))
