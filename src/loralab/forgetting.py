"""What an adapter cost elsewhere: perplexity on general text, base model vs adapter.

LoRA is sold on keeping the base model's general knowledge (no "catastrophic forgetting"). ``general_text_change``
measures it: the perplexity of a small general-text sample (``resources/general_text.jsonl``: short Chinese and
English paragraphs on science, geography, history and daily life, written for loralab, Apache-2.0) with the adapter
switched off and on, overall and per language. A rise means the adapter made ordinary text less likely.

- Causal LMs: every token of a paragraph after the first is predicted (BOS where the tokenizer adds one).
- Seq2seq models: the paragraph's second half is predicted from its first half (split at the sentence end nearest
  the middle), as the model's decoder would continue it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import weakref
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from loralab.data import IGNORE_INDEX
from loralab.errors import DataError
from loralab.generation import LoadedRun, base_model_key, inference, model_device
from loralab.readers import read_rows

BATCH_SIZE = 4
_SENTENCE_END = re.compile(r"(?<=[。！？!?.])\s*")


@dataclass(frozen=True)
class GeneralText:
    """One paragraph of the general-text sample."""

    text: str
    lang: str
    row: int


def general_text_path() -> Path:
    """The bundled general-text sample (Chinese and English paragraphs written for loralab)."""
    return Path(str(resources.files("loralab") / "resources" / "general_text.jsonl"))


def read_general_text(path: str | Path | None = None) -> list[GeneralText]:
    """The paragraphs of a JSON / JSONL / CSV file of ``{"text": ..., "lang": ...}`` rows (``lang`` optional)."""
    source = Path(path) if path is not None else general_text_path()
    rows = read_rows(source)
    texts = []
    for row, record in rows:
        where = f"general-text file {source}, row {row}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with a 'text' field, got {type(record).__name__}")
        text, lang = record.get("text"), record.get("lang", "all")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r}")
        if not isinstance(lang, str) or not lang.strip():
            raise DataError(f"{where}: 'lang' must be a language name such as 'zh' or 'en', got {lang!r}")
        texts.append(GeneralText(text.strip(), lang.strip(), row))
    if not texts:
        raise DataError(f"general-text file {source}: no paragraphs found (expected rows with a 'text' field)")
    return texts


def halves(text: str) -> tuple[str, str]:
    """A paragraph split at the sentence end nearest its middle (at the middle when it has one sentence)."""
    cuts = [m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.end() < len(text)]
    cut = min(cuts, key=lambda c: abs(c - len(text) / 2)) if cuts else len(text) // 2
    return text[:cut].strip(), text[cut:].strip()


def _causal_batch(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    encoded = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_length] for t in texts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _seq2seq_batch(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    from loralab.data import make_collator

    features = []
    for text in texts:
        first, second = halves(text)
        ids = list(tokenizer(first)["input_ids"])[:max_length]
        target = list(tokenizer(text_target=second)["input_ids"])[:max_length]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target})
    return make_collator(tokenizer, "SEQ_2_SEQ_LM")(features)


def summed_loss(model: Any, batch: dict[str, torch.Tensor], task_type: str) -> tuple[float, int]:
    """Summed next-token cross-entropy over the batch's labelled positions and their count (the model's own loss,
    vocabulary projected only at those positions where ``supervised_lm_loss`` is exact)."""
    from loralab.speed import supervised_lm_loss, supervised_logits_exact

    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    if task_type == "CAUSAL_LM" and supervised_logits_exact(model):
        total, count = supervised_lm_loss(model, batch)
        return float(total), int(count)
    labels = batch["labels"]
    count = int((labels[:, 1:] != IGNORE_INDEX).sum()) if task_type == "CAUSAL_LM" else int((labels != IGNORE_INDEX).sum())
    return float(model(**batch).loss) * count, count


def text_losses(model: Any, tokenizer: Any, texts: Sequence[GeneralText], task_type: str, max_length: int,
                use_adapter: bool = True, batch_size: int = BATCH_SIZE) -> dict[str, tuple[float, int]]:
    """Summed loss and predicted tokens per language (``{"zh": (nll, tokens), ...}``)."""
    make = _seq2seq_batch if task_type == "SEQ_2_SEQ_LM" else _causal_batch
    sums: dict[str, tuple[float, int]] = {}
    with inference(model, use_adapter):
        for lang in dict.fromkeys(t.lang for t in texts):
            group = [t.text for t in texts if t.lang == lang]
            total, count = 0.0, 0
            for start in range(0, len(group), batch_size):
                loss, tokens = summed_loss(model, make(tokenizer, group[start : start + batch_size], max_length), task_type)
                total, count = total + loss, count + tokens
            sums[lang] = (total, count)
    return sums


def _scores(base: tuple[float, int], adapter: tuple[float, int], texts: int) -> dict[str, Any]:
    (base_nll, tokens), (adapter_nll, _) = base, adapter
    mean_before, mean_after = base_nll / max(tokens, 1), adapter_nll / max(tokens, 1)
    # perplexity = exp(mean NLL); an untrained model's NLL can overflow exp(): then None, the change from the NLLs
    change = 100.0 * math.expm1(min(mean_after - mean_before, 700.0))
    return {"texts": texts, "tokens": tokens, "base_perplexity": _perplexity(mean_before),
            "adapter_perplexity": _perplexity(mean_after), "base_nll": round(mean_before, 4),
            "adapter_nll": round(mean_after, 4), "change_percent": round(change, 3)}


def _perplexity(mean_nll: float) -> float | None:
    return round(math.exp(mean_nll), 4) if mean_nll < 700 else None


_BASE_CACHE: dict[str, tuple[float, int]] = {}  # a sweep's runs share one base model: measured once per process
_RUN_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]]" = weakref.WeakKeyDictionary()


def _base_key(run: LoadedRun, texts: Sequence[GeneralText]) -> str:
    """What the base model's losses depend on: the base itself, the texts and the token limit."""
    settings = [base_model_key(run), run.config.data.max_length, [(t.lang, t.text) for t in texts]]
    return hashlib.sha256(repr(settings).encode()).hexdigest()


def general_text_change(run: LoadedRun, path: str | Path | None = None, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Perplexity of the general-text sample (``path``, default the bundled one) with the adapter off and on.

    Returns ``{"file", "texts", "tokens", "base_perplexity", "adapter_perplexity", "change_percent",
    "languages": {"zh": {...same keys...}, "en": {...}}}``; ``change_percent`` > 0: the adapter made the text less
    likely. The base model's numbers are kept in memory for the next run of the same base (a sweep's runs), and a
    run in memory is measured once per file (its eval and test split reports share the numbers).
    """
    texts = read_general_text(path)
    key = _base_key(run, texts)
    measured = _RUN_CACHE.setdefault(run.model, {})  # eval and test split of one loaded run: measured once
    if key not in measured:
        measured[key] = _measure(run, texts, key, "bundled general_text.jsonl" if path is None else str(path), batch_size)
    return copy.deepcopy(measured[key])


def _measure(run: LoadedRun, texts: list[GeneralText], key: str, name: str, batch_size: int) -> dict[str, Any]:
    max_length = run.config.data.max_length
    base = {lang: _BASE_CACHE[f"{key}:{lang}"] for lang in dict.fromkeys(t.lang for t in texts)
            if f"{key}:{lang}" in _BASE_CACHE}
    if len(base) < len({t.lang for t in texts}):
        base = text_losses(run.model, run.tokenizer, texts, run.task_type, max_length, False, batch_size)
        _BASE_CACHE.update({f"{key}:{lang}": value for lang, value in base.items()})
    adapter = text_losses(run.model, run.tokenizer, texts, run.task_type, max_length, True, batch_size)
    counts = {lang: sum(1 for t in texts if t.lang == lang) for lang in adapter}
    overall = _scores(_total(base.values()), _total(adapter.values()), len(texts))
    return {"file": name, **overall,
            "languages": {lang: _scores(base[lang], adapter[lang], counts[lang]) for lang in adapter}}


def _total(parts: Any) -> tuple[float, int]:
    parts = list(parts)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)
