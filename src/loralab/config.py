"""Typed, validated run configuration: model, LoRA, data and training settings.

A config is a YAML file (or nothing: every field has a default) plus dotted ``key=value`` overrides.
Every error names the offending key and what was expected.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from pathlib import Path
from typing import Any, Iterator, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from loralab.errors import ConfigError

TaskType = Literal["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
DEFAULT_MODEL = "smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to fine-tune and how to load it."""

    name_or_path: str = DEFAULT_MODEL
    task_type: TaskType | None = None  # auto-detected from the model's config when omitted
    dtype: Literal["auto", "float32", "bfloat16", "float16", "checkpoint"] = "auto"
    # dtype of the base weights as loaded. "auto": bfloat16 when training runs in bf16 (train.precision bf16, or auto
    # on a GPU with bf16 or a CPU with AVX512-BF16 / AMX), else float32; loading for eval / compare / export and QLoRA's
    # non-quantized parts use float32. "checkpoint": the dtype the checkpoint was saved in (transformers' dtype="auto",
    # what "auto" meant before). float32 / bfloat16 / float16: exactly that. LoRA weights are trained in float32.
    trust_remote_code: bool = False
    # QLoRA (bitsandbytes; transformers' BitsAndBytesConfig names): a 4-bit (or 8-bit) frozen base, LoRA in fp32
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 where it runs natively

    @field_validator("task_type", mode="before")
    @classmethod
    def _upper_task(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_quantization(self) -> "ModelConfig":
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are both true; choose one")
        return self

    @property
    def quantized(self) -> bool:
        """Whether the base weights are loaded quantized (bitsandbytes 4-bit or 8-bit)."""
        return self.load_in_4bit or self.load_in_8bit


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


class SourceConfig(_Section):
    """One entry of ``data.sources``: a file, folder or ``hub:ID`` dataset and how much of it goes into the mix."""

    path: str  # a data file, a save_to_disk folder, or hub:ID (datasets.load_dataset: a Hub id or a local dataset dir)
    split: str | None = None  # hub:ID only: the split to read (default train; slices such as train[:1000] work)
    subset: str | None = None  # hub:ID only: the dataset's configuration (load_dataset's name)
    weight: float | None = Field(None, gt=0)  # this source's share among the weighted sources of the mix
    count: int | None = Field(None, gt=0)  # exactly this many rows, sampled by data.seed

    @model_validator(mode="after")
    def _weight_or_count(self) -> "SourceConfig":
        if self.weight is not None and self.count is not None:
            raise ValueError(f"data.sources entry {self.path!r} sets both weight and count; give one of them")
        if not self.path.startswith("hub:") and (self.split or self.subset):
            raise ValueError(f"data.sources entry {self.path!r}: split and subset apply to hub:ID datasets only")
        return self


class DataConfig(_Section):
    """Where the examples come from and how they become token ids."""

    path: str | None = None  # None: the bundled demo dataset. A file, a save_to_disk folder, or hub:ID (a Hub dataset
    # id or local dataset dir, read with datasets.load_dataset; hub:ID?split=test&subset=en for another split / subset)
    sources: list[SourceConfig] | None = None  # instead of path: several sources mixed (weight / count per source)
    format: Literal["auto", "pairs", "alpaca", "messages", "sharegpt", "text"] = "auto"  # auto: from the rows' fields
    prompt_field: str = "instruction"
    response_field: str = "response"
    input_field: str = "input"  # alpaca: optional context appended to the instruction
    messages_field: str = "messages"  # OpenAI style: [{role, content}], roles user / assistant / system / tool
    conversations_field: str = "conversations"  # ShareGPT: [{from, value}], from human / gpt / system / observation
    text_field: str = "text"  # raw text (continued pre-training): every token supervised, EOS appended
    label_field: str = "label"  # SEQ_CLS
    eval_path: str | None = None  # a separate eval file instead of splitting
    eval_split: float = Field(0.2, ge=0.0, lt=1.0)  # share of the data file held out for eval (loss, checkpoints)
    test_path: str | None = None  # a held-out test file: no training, checkpoint choice or search sees it
    test_split: float = Field(0.0, ge=0.0, lt=1.0)  # or this share of the data file held out as the test split, taken
    # out before the eval split (also with data.eval_path); scored only by `loralab eval RUN --split test`
    seed: int = 42
    max_length: int = Field(512, gt=8)
    train_on_prompt: bool = False
    train_on: Literal["all_turns", "last_turn"] = "all_turns"  # conversations: supervise every assistant turn (as
    # LLaMA-Factory, axolotl, TRL's assistant_only_loss) or only the last; system, user and tool turns never
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    template: Literal["auto", "chatml", "llama3", "gemma", "alpaca", "plain"] = "auto"  # auto: the tokenizer's own chat
    # template, else plain (### Instruction / ### Response); a named one is set as the tokenizer's chat template
    system_prompt: str | None = None
    pack_text: bool = True  # raw text: documents joined (EOS between) and cut into full rows of max_length tokens;
    # false: one document per row, cut at max_length
    num_proc: int | None = Field(None, gt=0)  # tokenizing processes (default: 1 under 5,000 rows, else up to 4)
    add_special_tokens: list[str] | None = None  # new special tokens added to the tokenizer: the embeddings grow and
    # only their new rows train (PEFT's trainable_token_indices), saved with the adapter

    @field_validator("add_special_tokens")
    @classmethod
    def _new_token_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not t.strip() for t in value) or len(set(value)) != len(value)):
            raise ValueError("must list distinct, non-empty tokens (e.g. [<tool_call>, </tool_call>]), or be omitted")
        return value

    @model_validator(mode="after")
    def _one_template(self) -> "DataConfig":
        if not self.chat_template and self.template not in ("auto", "plain"):
            raise ValueError(f"data.chat_template is false but data.template is {self.template!r}; "
                             "to format without a chat template set data.template: plain")
        if self.path and self.sources:
            raise ValueError("data.path and data.sources are both set; list every source in data.sources")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources is empty; list at least one source (or set data.path)")
        if self.test_path and self.test_split:
            raise ValueError(f"data.test_path and data.test_split ({self.test_split:g}) are both set; the test split "
                             "is either a separate file or a share of data.path, not both")
        held_out = self.test_split + (0 if self.eval_path else self.eval_split)
        if held_out >= 1:
            raise ValueError(f"data.test_split ({self.test_split:g}) + data.eval_split ({self.eval_split:g}) hold out "
                             "all the data; together they must stay below 1")
        return self

    def label(self) -> str:
        """The data's short name in run folder names: the file's stem, the Hub dataset's name, ``mix`` or ``demo``."""
        if self.sources:
            return f"{_short_name(self.sources[0].path)}-mix" if len(self.sources) > 1 else _short_name(self.sources[0].path)
        return _short_name(self.path) if self.path else "demo"


def _short_name(path: str) -> str:
    if path.startswith("hub:"):
        return path[4:].split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "hub"
    return Path(path).stem


class TrainConfig(_Section):
    """Optimisation and bookkeeping settings passed to the Hugging Face Trainer."""

    learning_rate: float = Field(3e-4, gt=0)
    epochs: float = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.05, ge=0)  # < 1: fraction of steps; >= 1: number of steps
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    save_total_limit: int = Field(2, gt=0)
    save_steps: int | None = Field(None, gt=0)  # a checkpoint every N optimizer steps (default: each epoch); bounds
    # what an interruption can lose. Evaluation follows (a checkpoint is ranked by its eval loss).
    eval_steps: int | None = Field(None, gt=0)  # evaluate every N steps (default: with each checkpoint)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool | None = None  # default: on for a quantized base (QLoRA), off otherwise
    resume: bool = False
    fsdp: Literal["off", "full_shard", "shard_grad_op", "hybrid_shard"] = "off"  # FSDP2 through accelerate (several
    # processes: torchrun / --nproc), decoder layers wrapped; "off": DDP when there are several processes
    deepspeed: str | None = None  # a DeepSpeed config JSON (ZeRO-2/3), passed to the Trainer; needs `pip install deepspeed`
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                   "adafactor", "sgd"] = "adamw_torch"  # the Trainer's optimizer names (8-bit / paged: bitsandbytes)
    logging_steps: int = Field(5, gt=0)
    group_by_length: bool = False  # length-grouped batches: less padding but all-short / all-long batches, which
    # measured a worse loss after an epoch than random order (benchmarks/train_throughput.py)
    packing: bool = True  # causal LM: pack each batch's examples into rows, attention kept inside each example, so
    # random-order batches carry no padding (18% faster than padding them, same loss)
    pack_length: int | None = Field(None, gt=8)  # tokens per packed row (default: data.max_length)
    supervised_logits_only: bool = True  # causal LM: vocabulary projection only where labels are supervised
    eval_generate: bool = False  # generation metrics on the eval split after each epoch
    eval_generate_limit: int = Field(32, gt=0)
    metric_for_best_model: Literal["eval_loss", "exact_match", "chrf", "rouge_l", "bleu"] = "eval_loss"  # picks the
    # checkpoint kept as the adapter (and what early stopping watches); a generation metric needs train.eval_generate
    early_stopping_patience: int | None = Field(None, gt=0)  # stop after N evaluations in a row without a better
    # train.metric_for_best_model (None: off); needs an eval split
    report_to: list[str] = Field(default_factory=list)  # experiment trackers (the Trainer's integrations), e.g.
    # [tensorboard, mlflow, wandb]; each also gets the run's config and summary.json as parameters (loralab.tracking)
    loraplus_lr_ratio: float | None = Field(None, ge=1)  # LoRA+: LoRA's B matrices learn at learning_rate times this
    # (peft's create_loraplus_optimizer; the paper suggests 16 with a learning rate about half plain LoRA's)

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value
        unknown = [n for n in names if n not in TRACKERS]
        if "all" in unknown:
            raise ValueError("'all' would report to whichever trackers happen to be installed; name them, e.g. "
                             f"[tensorboard, mlflow]; known: {', '.join(TRACKERS)}")
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}; known: {', '.join(TRACKERS)} (or [] for none)")
        return list(dict.fromkeys(names))


# The Trainer's reporting integrations (transformers.integrations.INTEGRATION_TO_CALLBACK), by the names it takes.
TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "neptune", "clearml", "dvclive",
                             "swanlab", "codecarbon", "azure_ml", "dagshub", "flyte", "kubeflow")


class RunConfig(_Section):
    """A whole run: what to train, on what, how, and where its folder goes."""

    name: str | None = None  # default: derived from model and data; a folder name inside output_dir
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0")
                                  or value.startswith("~")):
            raise ValueError("must be a plain folder name inside output_dir (no '/', '\\', '..' or '~'); "
                             "use output_dir (or --output) to put the run elsewhere")
        return value

    @model_validator(mode="before")
    @classmethod
    def _lora_key_names(cls, data: Any) -> Any:
        # here rather than only in LoraSettings, so that a refusal reads as one sentence naming the dotted keys
        if isinstance(data, dict) and isinstance(data.get("lora"), dict):
            data = {**data, "lora": canonical_lora_keys(data["lora"])}
        return data

    @model_validator(mode="after")
    def _checkpoints_can_be_ranked(self) -> "RunConfig":
        save, every = self.train.save_steps, self.train.eval_steps
        if save and every and save % every:
            raise ValueError(f"train.save_steps ({save}) must be a multiple of train.eval_steps ({every}): "
                             "the best checkpoint is chosen by the eval loss measured when it is saved")
        return self

    @model_validator(mode="after")
    def _init_fits_the_base(self) -> "RunConfig":
        init, family = self.lora.init_lora_weights, init_family(self.lora.init_lora_weights)
        if family in RESIDUAL_INITS and self.model.quantized:
            raise ValueError(f"lora.init_lora_weights={init} subtracts the initial adapter from the base weights; with "
                             f"a quantized base (model.load_in_{'4' if self.model.load_in_4bit else '8'}bit) that "
                             "residual is quantized again, so the adapter cannot be converted into one for the base "
                             "loralab loads; use a full-precision base, or init_lora_weights: loftq for a 4-bit base")
        if family == "loftq" and not (self.model.load_in_4bit and self.model.bnb_4bit_quant_type == "nf4"):
            raise ValueError("lora.init_lora_weights=loftq initialises LoRA to make up for the 4-bit NF4 quantization "
                             "error of the base weights (peft's replace_lora_weights_loftq); it needs "
                             "model.load_in_4bit: true with model.bnb_4bit_quant_type: nf4")
        return self

    @model_validator(mode="after")
    def _best_model_metric_is_measured(self) -> "RunConfig":
        metric = self.train.metric_for_best_model
        if metric != "eval_loss" and not self.train.eval_generate:
            raise ValueError(f"train.metric_for_best_model={metric} is a generation metric, measured only with "
                             "train.eval_generate: true (greedy answers to up to train.eval_generate_limit eval examples "
                             "at each evaluation); set train.eval_generate=true, or use eval_loss")
        return self

    def run_name(self) -> str:
        """The run's folder name: ``name`` or ``<model>-<data>``."""
        if self.name:
            return self.name
        model = Path(self.model.name_or_path.rstrip("/")).name or "model"
        data = self.data.label()
        return f"{model}-{data}".replace(" ", "_")

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- loading and overrides


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ``lora.r``."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(config_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so 8 is an int, [q,v] a list, true a bool)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. --set lora.r=8)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for key ``a.b``, checking the key exists in the schema.

    PEFT's names (``lora.lora_alpha``) set loralab's key (``lora.alpha``), replacing the value under either name."""
    if key in RETIRED_KEYS:
        raise ConfigError(f"config key {key!r} ({value!r}) is {RETIRED_KEYS[key]}")
    key = KEY_ALIASES.get(key, key)
    for alias, canonical in KEY_ALIASES.items():
        section = data.get(alias.split(".")[0])
        if canonical == key and isinstance(section, dict):
            section.pop(alias.split(".")[1], None)
    known = config_keys()
    if key not in known:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(known)}")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in item["loc"][:-1])
            allowed = [k[len(section) + 1 :] if section else k for k in config_keys() if k.startswith(section)]
            allowed = sorted({a.split(".")[0] for a in allowed})
            where = f"in section '{section}'" if section else "at the top level"
            lines.append(f"unknown config key {key!r} {where}; allowed: {', '.join(allowed)}")
        elif not key or key in RunConfig.model_fields:  # a rule across keys (of a section): the message names them
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"config key {key!r}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Validate a config mapping with ``key=value`` overrides applied on top."""
    merged = copy.deepcopy(data or {})
    if not isinstance(merged, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, lora, data, train), got {type(merged).__name__}")
    spelled: dict[str, tuple[str, Any]] = {}  # canonical key -> (as written, value), to catch alias conflicts
    for item in overrides or []:
        key, value = parse_override(item)
        canonical = KEY_ALIASES.get(key, key)
        first = spelled.setdefault(canonical, (key, value))
        if first[0] != key and first[1] != value:
            raise ConfigError(f"overrides {first[0]}={first[1]!r} and {key}={value!r} disagree: "
                              f"{key if key != canonical else first[0]} is PEFT's name for {canonical}; give one of them")
        set_dotted(merged, key, value)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with an error that names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = read_yaml(path) if path else {}
    return build_config(data, overrides, source=str(path) if path else "defaults")


# ---------------------------------------------------------------- remote code

_REMOTE_CODE = contextvars.ContextVar("loralab_remote_code_allowed", default=False)


@contextlib.contextmanager
def remote_code_allowed(allowed: bool = True) -> Iterator[None]:
    """Within this block, run folders whose config sets ``model.trust_remote_code`` may load (the CLI's
    ``--trust-remote-code``); outside it a run folder's config.yaml alone never switches remote code on."""
    token = _REMOTE_CODE.set(allowed)
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def check_remote_code(config: RunConfig, where: str) -> None:
    """Refuse a saved config that asks for the model's own Python code unless the caller allowed it."""
    if config.model.trust_remote_code and not _REMOTE_CODE.get():
        raise ConfigError(f"{where} sets model.trust_remote_code: true, which runs Python code shipped with the model "
                          f"{config.model.name_or_path!r}; pass --trust-remote-code on the command line to allow it "
                          "(from Python: with loralab.config.remote_code_allowed(): ...)")
