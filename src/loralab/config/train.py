"""``train``: optimisation and bookkeeping settings passed to the Hugging Face Trainer, and the known trackers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from loralab.config.base import _Section

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
                   "adafactor", "sgd"] = "adamw_torch_fused"  # the Trainer's names (8-bit / paged: bitsandbytes);
    # the default is the Trainer's own: torch's fused AdamW, one kernel for all weights (a third of adamw_torch's time)
    logging_steps: int = Field(5, gt=0)
    group_by_length: bool = False  # length-grouped batches: less padding but all-short / all-long batches, which
    # measured a worse loss after an epoch than random order (benchmarks/train_throughput.py)
    packing: bool = True  # causal LM: pack each batch's examples into rows, attention kept inside each example, so
    # random-order batches carry no padding (18% faster than padding them, same loss)
    segment_attention: bool = True  # packed rows on CPU: each example's own causal attention (speed.attention)
    # instead of SDPA over the whole row with a block-diagonal mask; same loss, several times less attention work
    fused_lora: bool = True  # LoRA's scaling and add folded into one addmm, no fp32 copy of the input
    # (speed.lora_forward); same function as PEFT's forward, which DoRA and other variants keep
    share_sibling_dropout: bool = True  # q/k/v and gate/up LoRA layers (same input) draw one dropout mask and run one
    # A matmul (speed.lora_forward.SiblingLora; with fused_lora); each still sees dropout p, exact at dropout 0
    pack_length: int | None = Field(None, gt=8)  # tokens per packed row (default: data.max_length);
    # with segment attention (CPU) a batch is one row of any length
    supervised_logits_only: bool = True  # causal LM: vocabulary projection only where labels are supervised
    fused_cross_entropy: bool = True  # with it, on CPU: projection and loss in row chunks, no [tokens, vocabulary]
    # tensor (speed.head_loss); models that return their output layer's logits unchanged, the layer frozen
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
    neftune_noise_alpha: float | None = Field(None, gt=0)  # NEFTune: uniform noise of alpha / sqrt(length x width)
    # on the input embeddings while training (the Trainer's neftune_noise_alpha; the paper uses 5-15), length
    # being each example's own, packed or not; against memorising the training phrasings

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
