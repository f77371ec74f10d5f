"""``lora``: the PEFT ``LoraConfig`` fields users set, PEFT's key aliases and the supported initialisations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from loralab.config.base import TaskType, _Section

LORA_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}  # PEFT's names, accepted as aliases
KEY_ALIASES = {f"lora.{alias}": f"lora.{key}" for alias, key in LORA_ALIASES.items()}
RETIRED_KEYS = {"lora.merge_weights": "an option of the original loralib that loralab does not use: training keeps "
                                      "the adapter separate from the base model (runs/<name>/adapter); for one merged "
                                      "model run `loralab export RUN_DIR --output DIR` after training; allowed: omit it"}
INIT_SUPPORTED = ("true, false, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_N', 'olora', 'corda', 'eva' or "
                  "'loftq'")
# Initialisations that replace the base weights by a residual (W minus the initial adapter, which is not zero):
# loralab keeps the initial adapter in the run folder and converts the saved adapter into a plain LoRA delta on the
# original base (PEFT's documented conversion), so eval, compare, export and plain peft all see the original base.
RESIDUAL_INITS = ("pissa", "olora", "corda")
INIT_NOT_SUPPORTED = {  # PEFT initialisations loralab does not implement, and why
    "lora_ga": "needs a gradient pass over the training data (peft's preprocess_loraga), which loralab does not run",
}


def init_family(value: Any) -> str | None:
    """``pissa`` for ``pissa_niter_4``, the name itself for the other string inits, None for true / false."""
    if not isinstance(value, str):
        return None
    return "pissa" if value.startswith("pissa") else value


def canonical_lora_keys(data: Any, where: str = "lora.") -> Any:
    """A ``lora`` mapping with PEFT's key names (``lora_alpha``, ``lora_dropout``) renamed to loralab's."""
    if not isinstance(data, dict):
        return data
    for key, hint in RETIRED_KEYS.items():
        if key.removeprefix("lora.") in data:
            raise ValueError(f"{where}{key.removeprefix('lora.')} ({data[key.removeprefix('lora.')]!r}) is {hint}")
    if not any(alias in data for alias in LORA_ALIASES):
        return data
    data = dict(data)
    for alias, key in LORA_ALIASES.items():
        if alias not in data:
            continue
        value = data.pop(alias)
        if key in data and data[key] != value:
            raise ValueError(f"{where}{alias} ({value!r}) and {where}{key} ({data[key]!r}) disagree: {alias} is PEFT's "
                             f"name for {where}{key}; give one of them")
        data[key] = value
    return data


class EvaSettings(_Section):
    """``lora.eva``: peft's ``EvaConfig`` for ``init_lora_weights: eva`` (A from the SVD of the layers' inputs on the
    training data, ranks redistributed by explained variance)."""

    rho: float = Field(2.0, ge=1.0)  # a layer's rank may grow up to r * rho (1: no redistribution)
    tau: float = Field(0.99, ge=0.0, le=1.0)  # the data pass stops when the components' cosine similarity passes it
    use_label_mask: bool = True  # only supervised positions (labels != -100) feed the SVD
    whiten: bool = False
    adjust_scaling_factors: bool = True  # alpha follows a redistributed rank (same scale at every rank)


class CordaSettings(_Section):
    """``lora.corda``: peft's ``CordaConfig`` for ``init_lora_weights: corda`` (covariance of the layers' inputs)."""

    method: Literal["ipm", "kpm"] = "ipm"  # ipm: adapt to the task data; kpm: keep the knowledge the data shows
    examples: int = Field(256, gt=0)  # training examples run through the model to build the covariance


def _names(value: Any, what: str) -> Any:
    if isinstance(value, list) and (not value or any(not str(v).strip() for v in value)):
        raise ValueError(f"must list at least one {what}, each a non-empty name (or be omitted)")
    return value


class LoraSettings(_Section):
    """The fields of ``peft.LoraConfig`` that users set (``alpha`` is ``lora_alpha``, ``dropout`` ``lora_dropout``;
    PEFT's names are accepted as aliases). Fields that depend on the model (layers, patterns, exclusions, parameters)
    are matched against it before training (:mod:`loralab.lora_fields`)."""

    task_type: TaskType | None = None  # follows model.task_type when omitted
    target_modules: list[str] | str | None = None  # None: the per-architecture preset ([] with target_parameters only)
    exclude_modules: list[str] | str | None = None  # modules never wrapped (names by their end, or a full regex)
    layers_to_transform: list[int] | None = None  # LoRA only in these layer numbers (0-based)
    layers_pattern: list[str] | str | None = None  # the name of the layer list (layers, h, block, ...); default: found
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)  # alias lora_alpha
    rank_pattern: dict[str, int] = Field(default_factory=dict)  # module name (its end, or a regex) -> its own r
    alpha_pattern: dict[str, float] = Field(default_factory=dict)  # module name -> its own alpha
    dropout: float = Field(0.05, ge=0.0, lt=1.0)  # alias lora_dropout
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False  # a trained bias on each LoRA B (lora_B.bias)
    fan_in_fan_out: bool | None = None  # None: set from the wrapped layers (true for GPT-2's Conv1D)
    target_parameters: list[str] | None = None  # nn.Parameters wrapped (MoE experts, e.g. mlp.experts.gate_up_proj)
    modules_to_save: list[str] | None = None  # whole modules trained and saved (lm_head, embed_tokens, ...); each
    # entry must match a module of the model (PEFT matches a name by its end)
    init_lora_weights: bool | str = True  # see INIT_SUPPORTED; pissa / olora / corda converted at save (RESIDUAL_INITS)
    eva: EvaSettings = Field(default_factory=EvaSettings)
    corda: CordaSettings = Field(default_factory=CordaSettings)
    init_from: str | None = None  # a PEFT adapter folder whose weights training continues from (r and targets must match)
    inference_mode: bool = False  # must stay false: loralab trains with these settings (and loads adapters frozen)
    use_rslora: bool = False
    use_dora: bool = False

    @model_validator(mode="before")
    @classmethod
    def _peft_key_names(cls, data: Any) -> Any:
        return canonical_lora_keys(data)

    @field_validator("task_type", mode="before")
    @classmethod
    def _upper_task(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _supported_init(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name = value.strip().lower()
        if name in ("true", "false"):
            return name == "true"
        if name in ("gaussian", "orthogonal", "pissa", "olora", "corda", "eva", "loftq"):
            return name
        if name.startswith("pissa_niter_"):
            if not name.removeprefix("pissa_niter_").isdigit() or int(name.removeprefix("pissa_niter_")) < 1:
                raise ValueError(f"{value!r}: pissa_niter_N takes a whole number of subspace iterations N >= 1 "
                                 "(e.g. pissa_niter_4: fast randomized SVD)")
            return name
        family = next((key for key in INIT_NOT_SUPPORTED if name.startswith(key)), None)
        if family:
            raise ValueError(f"{value!r} is not supported by loralab: {family} {INIT_NOT_SUPPORTED[family]}; "
                             f"supported: {INIT_SUPPORTED}")
        raise ValueError(f"must be {INIT_SUPPORTED}")

    @field_validator("init_lora_weights")
    @classmethod
    def _orthogonal_even_rank(cls, value: Any, info: ValidationInfo) -> Any:
        r = info.data.get("r")
        if value == "orthogonal" and isinstance(r, int) and r % 2:
            raise ValueError(f"'orthogonal' needs an even lora.r (got r={r}); supported: {INIT_SUPPORTED}")
        return value

    @field_validator("inference_mode")
    @classmethod
    def _trains_something(cls, value: bool) -> bool:
        if value:
            raise ValueError("true freezes the adapter, so training would train nothing; it is PEFT's switch for using "
                             "a trained adapter, which loralab sets itself when it loads one (eval, compare, generate, "
                             "export); allowed: false (or omit it)")
        return value

    @field_validator("modules_to_save")
    @classmethod
    def _named_modules(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not str(v).strip() for v in value):
            raise ValueError("every entry must name a module (an empty name would match every module)")
        return value

    @field_validator("exclude_modules", "target_parameters", "layers_pattern")
    @classmethod
    def _named_entries(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty (omit it instead)")
        return _names(value, {"target_parameters": "parameter", "layers_pattern": "layer list name"}.get(
            info.field_name, "module"))

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _layer_numbers(cls, value: Any) -> Any:
        numbers = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(numbers, list) and (not numbers or any(not isinstance(n, int) or isinstance(n, bool) or n < 0
                                                             for n in numbers)):
            raise ValueError("must be a layer number or a list of them, each 0 or more (the model's first layer is 0)")
        return numbers

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _patterns(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return {}
        if isinstance(value, dict):
            what = "r" if info.field_name == "rank_pattern" else "alpha"
            for key, number in value.items():
                if not str(key).strip():
                    raise ValueError("a key must name modules (the end of their names, or a regex)")
                if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0 or (
                        what == "r" and number != int(number)):
                    raise ValueError(f"{key!r}: {number!r} is not a valid {what} (a {'whole ' * (what == 'r')}number "
                                     "above 0)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not str(v).strip() for v in value):
            raise ValueError("every entry must name a module (an empty name would match every module)")
        return value

    @model_validator(mode="after")
    def _fields_that_fit_together(self) -> "LoraSettings":
        init, family = self.init_lora_weights, init_family(self.init_lora_weights)
        if self.target_modules == [] and not self.target_parameters:
            raise ValueError("lora.target_modules is empty: it must name at least one module, be a regex, "
                             "'all-linear', or be omitted for the preset ([] only together with lora.target_parameters)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"lora.layers_pattern ({self.layers_pattern!r}) names the layer list that "
                             "lora.layers_to_transform picks layers from; set lora.layers_to_transform too")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":
            raise ValueError(f"lora.layers_to_transform applies to a list of target modules, not to the regex "
                             f"lora.target_modules={self.target_modules!r}; put the layer numbers in the regex "
                             r"(e.g. .*layers\.(0|1)\.self_attn\.(q|v)_proj) or list the module names")
        if self.lora_bias and (self.use_dora or init not in (True, False)):
            raise ValueError("lora.lora_bias works with plain LoRA initialised by true / false only (PEFT); got "
                             f"{'lora.use_dora: true' if self.use_dora else f'lora.init_lora_weights: {init}'}")
        if self.use_dora and family in (*RESIDUAL_INITS, "loftq"):
            raise ValueError(f"lora.init_lora_weights={init} with lora.use_dora: DoRA's magnitudes are taken from the "
                             "base weights, which this initialisation changes, so the adapter cannot be converted to "
                             "one for the original base; use one of them")
        if self.init_from and init is not True:
            raise ValueError(f"lora.init_from ({self.init_from}) starts from that adapter's weights, so "
                             f"lora.init_lora_weights={init} would not be used; omit it")
        if self.init_from and self.target_parameters:
            raise ValueError("lora.init_from with lora.target_parameters is not supported; start without init_from")
        if family in (*RESIDUAL_INITS, "eva") and self.target_parameters:
            raise ValueError(f"lora.init_lora_weights={init} initialises LoRA on modules, not on "
                             "lora.target_parameters; use true / false with target_parameters")
        return self
