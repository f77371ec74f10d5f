"""FEATURE_EXTRACTION runs: LoRA on an embedding model trained on (anchor, positive) pairs.

- Data: rows with ``data.anchor_field`` / ``data.positive_field`` (``anchor`` / ``positive``; ``query`` / ``document``
  or ``sentence1`` / ``sentence2`` are accepted when the configured names are absent and exactly one such pair is
  present). An example keeps the anchor as ``prompt`` and the positive as ``response``; tokenized, the anchor's ids
  are ``input_ids`` and the positive's ids ``labels`` (so the cached Arrow tables of ``loralab.data`` hold them).
- Embeddings: the encoder's last hidden state pooled as the model's sentence-transformers pooling config says
  (``1_Pooling/config.json``: mean over the attention mask, CLS or max; mean when the folder has none), L2-normalised.
- Loss: in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss): cross-entropy over the
  anchor-vs-every-positive cosine similarity matrix times 20, the right positive on the diagonal.
Retrieval evaluation (accuracy@1, recall@5, MRR@10, base vs adapter) lives in :mod:`loralab.tasks.retrieval`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from loralab.errors import DataError, LoralabError

log = logging.getLogger(__name__)

TASK = "FEATURE_EXTRACTION"
SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default (similarity: cosine)
PAIR_ALTERNATIVES = (("query", "document"), ("sentence1", "sentence2"))
POOLING_MODES = ("mean", "cls", "max")
DEMO_PATH = "src/loralab/resources/retrieval_demo.jsonl"


# ---------------------------------------------------------------- pooling


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean (mask-aware), cls, max
    normalize: bool = True
    source: str = "default (no 1_Pooling/config.json)"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "normalize": self.normalize, "source": self.source}


def read_pooling(model_dir: str | Path) -> Pooling:
    """The pooling of a sentence-transformers folder (``modules.json`` -> its Pooling module's ``config.json``; a
    Normalize module or none: normalised); mean pooling for a plain transformers folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return Pooling()
    pooling_dir, normalize = folder / "1_Pooling", True
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
            for module in modules:
                if str(module.get("type", "")).endswith(".Pooling"):
                    pooling_dir = folder / module.get("path", "1_Pooling")
            normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules) or normalize
        except (ValueError, AttributeError, TypeError) as exc:
            raise LoralabError(f"{modules_file}: not a sentence-transformers modules list ({exc})") from None
    config_file = pooling_dir / "config.json"
    if not config_file.is_file():
        return Pooling(normalize=normalize)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LoralabError(f"{config_file}: not JSON ({exc})") from None
    modes = [m for m, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                              ("max", "pooling_mode_max_tokens")) if config.get(key)]
    if config.get("pooling_mode") in POOLING_MODES:
        modes = [config["pooling_mode"]]
    other = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in
             ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens")]
    if other or len(modes) != 1:
        raise LoralabError(f"{config_file}: loralab pools with exactly one of mean, cls or max; this config asks for "
                           f"{modes + other or 'none'}")
    return Pooling(modes[0], normalize, str(config_file))


def model_pooling(model_cfg: Any) -> Pooling:
    from loralab.models import resolve_model_path

    return read_pooling(resolve_model_path(model_cfg.name_or_path))


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """One vector per sequence from ``hidden`` (batch, tokens, dim): the mean or max over the attended tokens
    (``mask`` 1), or the first (CLS) token."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embed(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """L2-normalised embeddings of a padded batch (``model``: the encoder, or a PeftModel on it)."""
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return F.normalize(pool(hidden, attention_mask, pooling.mode).float(), p=2, dim=-1)


def in_batch_negatives_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """Cross-entropy of each anchor over every positive of the batch (cosine similarity x ``scale``), the anchor's
    own positive being the right class (the others: in-batch negatives)."""
    scores = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))


# ---------------------------------------------------------------- data


def _pair_fields(record: dict, cfg: Any, path: str, row: int) -> tuple[str, str]:
    configured = (cfg.anchor_field, cfg.positive_field)
    if all(name in record for name in configured):
        return configured
    if configured == ("anchor", "positive"):  # the defaults: a common alternative naming, when only one fits
        found = [pair for pair in PAIR_ALTERNATIVES if all(name in record for name in pair)]
        if len(found) == 1:
            return found[0]
    from loralab.formats import _row_error

    missing = [name for name in configured if name not in record]
    hint = (f"; with no data.path loralab reads its instruction demo: set data.path (e.g. {DEMO_PATH})"
            if "instruction" in record and "response" in record else "")
    raise _row_error(path, row, f"missing field {missing[0]!r}; a {TASK} row needs {configured[0]!r} and "
                                f"{configured[1]!r} (found {', '.join(map(repr, record)) or 'none'}; set "
                                f"data.anchor_field / data.positive_field, or name them query/document or "
                                f"sentence1/sentence2){hint}")


def parse_pair(record: dict, cfg: Any, path: str, row: int) -> Any:
    """One (anchor, positive) row as an Example (prompt: the anchor, response: the positive)."""
    from loralab.formats import Example, _row_error, _text_field

    anchor_name, positive_name = _pair_fields(record, cfg, path, row)
    texts = []
    for name in (anchor_name, positive_name):
        text = _text_field(record, name, path, row, [anchor_name, positive_name])
        if not text.strip():
            raise _row_error(path, row, f"field {name!r} is empty")
        texts.append(text)
    return Example(prompt=texts[0], response=texts[1], row=row)


def tokenize_pair(tokenizer: Any, example: Any, cfg: Any) -> Any:
    """The anchor's ids as ``input_ids``, the positive's as ``labels`` (each with the tokenizer's special tokens,
    cut at ``data.max_length``)."""
    from loralab.data.tokenize import TokenizedExample

    anchor = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    positive = tokenizer(example.response, add_special_tokens=True)["input_ids"]
    limit = cfg.max_length
    return TokenizedExample(input_ids=_cut(anchor, limit), labels=_cut(positive, limit), prompt_length=len(anchor),
                            response_length=len(positive), truncated=len(anchor) > limit,
                            response_truncated=len(positive) > limit)


def _cut(ids: list[int], limit: int) -> list[int]:
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]  # keeps the closing [SEP] / </s>


class PairCollator:
    """Pads the anchors (``input_ids`` / ``attention_mask``) and the positives (``positive_input_ids`` /
    ``positive_attention_mask``) of a batch, each to its own longest."""

    def __init__(self, tokenizer: Any):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = self._pad([list(f["input_ids"]) for f in features])
        positive_ids, positive_mask = self._pad([list(f["labels"]) for f in features])
        return {"input_ids": ids, "attention_mask": mask, "positive_input_ids": positive_ids,
                "positive_attention_mask": positive_mask}


def batch_loss(model: Any, batch: dict[str, torch.Tensor], pooling: Pooling) -> torch.Tensor:
    anchors = embed(model, batch["input_ids"], batch["attention_mask"], pooling)
    positives = embed(model, batch["positive_input_ids"], batch["positive_attention_mask"], pooling)
    return in_batch_negatives_loss(anchors, positives)


# ---------------------------------------------------------------- training


class EmbeddingTrainer(Trainer):
    """The Trainer with the in-batch-negatives loss (training and eval loss alike); everything else as loralab's."""

    pooling: Pooling = Pooling()

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        self.loss_is_scaled_for_ga = False  # a mean over the batch: the Trainer divides by the accumulation steps
        loss = batch_loss(model, inputs, self.pooling)
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = batch_loss(model, inputs, self.pooling)
        return loss.detach(), None, None


def check_batch_size(config: Any) -> None:
    """In-batch negatives need a second pair in the batch."""
    if config.train.batch_size < 2:
        raise LoralabError(f"train.batch_size is {config.train.batch_size}: a {TASK} run learns from in-batch "
                           "negatives (the other pairs of the batch), so it needs at least 2; set train.batch_size "
                           "to 16-64 where memory allows (train.gradient_accumulation adds no negatives)")
    if config.train.eval_batch_size is not None and config.train.eval_batch_size < 2:
        raise LoralabError(f"train.eval_batch_size is {config.train.eval_batch_size}: the eval loss uses in-batch "
                           "negatives too; set it to at least 2 (or leave it unset)")


def trainer_class(session: Any) -> type:
    """The Trainer class for a FEATURE_EXTRACTION session (its pooling read from the base model)."""
    check_batch_size(session.config)
    return type("EmbeddingTrainer", (EmbeddingTrainer,), {"pooling": model_pooling(session.config.model)})


# ---------------------------------------------------------------- task detection


def rows_are_pairs(config: Any) -> bool:
    """Whether the first row of ``data.path`` (a local file) has anchor and positive fields and no label field."""
    from loralab.data.sources import first_local_record

    record = first_local_record(config.data)
    if record is None:
        return False
    try:
        _pair_fields(record, config.data, config.data.path or "data", 1)
    except (DataError, LoralabError, ValueError, TypeError):
        return False
    return isinstance(record, dict) and config.data.label_field not in record


# ---------------------------------------------------------------- preflight checks


def check_pairs(session: Any) -> Any:
    """Pair hygiene: a batch size in-batch negatives can use, repeated pairs (false negatives), truncation."""
    from loralab.checks.data import rows_text, splits, where
    from loralab.checks.report import verdict

    problems: list[tuple[str, str]] = []
    try:
        check_batch_size(session.config)
    except LoralabError as exc:
        problems.append(("fail", str(exc)))
    seen: dict[tuple[str, str], list[str]] = defaultdict(list)
    positives: dict[str, set[str]] = defaultdict(set)
    counts = {}
    for split, examples, tokenized in splits(session):
        counts[split] = len(examples)
        for example in examples:
            seen[(example.prompt.strip(), example.response.strip())].append(where(split, example))
            positives[example.response.strip()].add(example.prompt.strip())
    repeated = [rows for rows in seen.values() if len(rows) > 1]
    if repeated:
        shown = "; ".join(f"rows {', '.join(rows)}" for rows in repeated[:3])
        problems.append(("warn", f"{len(repeated)} (anchor, positive) pairs appear more than once ({shown}"
                                 f"{'; ...' if len(repeated) > 3 else ''}): in one batch a copy is a false negative "
                                 "of its twin; remove the duplicates"))
    shared = sum(1 for anchors in positives.values() if len(anchors) > 1)
    if shared:
        problems.append(("warn", f"{shared} positives are the positive of several different anchors: in one batch "
                                 "they are false negatives of each other"))
    truncated = [where(split, e) for split, examples, tokenized in splits(session)
                 for e, t in zip(examples, tokenized) if t.truncated or t.response_truncated]
    if truncated:
        problems.append(("warn", f"{len(truncated)} pairs are cut at data.max_length={session.config.data.max_length} "
                                 f"tokens (rows {rows_text(truncated)})"))
    details = {"pairs": counts, "repeated_pairs": len(repeated), "shared_positives": shared,
               "truncated": len(truncated), "batch_size": session.config.train.batch_size}
    ok = (f"{sum(counts.values())} (anchor, positive) pairs, no repeats; batch size "
          f"{session.config.train.batch_size}: {session.config.train.batch_size - 1} in-batch negatives per anchor")
    return verdict("pairs", problems, ok, details)


def check_pair_loss(session: Any, fast: bool = False) -> Any:
    """The in-batch-negatives loss on the first train batch: finite, near log(batch) for a fresh adapter, and a
    gradient on the LoRA weights."""
    import math

    from loralab.checks.model import device_of, to_device, untouched
    from loralab.checks.report import CheckResult
    from torch.utils.data import DataLoader

    model = session.model
    size = min(max(session.config.train.batch_size, 2), len(session.data.train))
    if size < 2:
        return CheckResult("loss", "fail", f"only {len(session.data.train)} train pair: in-batch negatives need 2")
    pooling = model_pooling(session.config.model)
    batch = next(iter(DataLoader(session.data.train, batch_size=size, collate_fn=session.collator)))
    with untouched(model):
        model.train()
        device = device_of(model)
        loss = batch_loss(model, to_device(batch, device), pooling)
        if not torch.isfinite(loss):
            return CheckResult("loss", "fail", f"the loss on the first batch is {loss.item()}", {"loss": loss.item()})
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        flowing = sum(1 for g in grads if g is not None and g.abs().sum() > 0)
    details = {"loss": round(loss.item(), 4), "chance_loss": round(math.log(size), 4), "batch_size": size,
               "pooling": pooling.to_dict(), "lora_tensors_with_gradient": flowing, "lora_tensors": len(grads)}
    if not flowing:
        return CheckResult("loss", "fail", "no LoRA weight gets a gradient from the in-batch-negatives loss", details)
    return CheckResult("loss", "pass", f"in-batch-negatives loss {loss.item():.4f} on a batch of {size} (chance "
                                       f"{math.log(size):.4f}), {pooling.mode} pooling; gradients reach {flowing} of "
                                       f"{len(grads)} LoRA tensors", details)


def session_checks() -> tuple[list[Any], list[Any]]:
    """The data checks and model checks of a FEATURE_EXTRACTION session (the generation-oriented ones do not apply)."""
    from loralab.checks.data import check_hyperparameters
    from loralab.checks.model import check_targets

    return [check_pairs, check_hyperparameters], [check_targets, check_pair_loss]

