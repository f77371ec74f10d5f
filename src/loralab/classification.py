"""Sequence classification runs (SEQ_CLS): label names, predictions, accuracy / macro-F1.

- Training maps the user's label values to ids 0..n-1 (``data.label_vocabulary``) and :func:`save_labels` writes the
  mapping next to the adapter (``adapter/labels.json``); the base model's config carries the same id2label / label2id.
- :func:`evaluate_classifier` predicts the eval split with the trained head (adapter on) and the base head (adapter
  off: the head is in ``modules_to_save``, so the base head is the original one, untrained or new and random) and
  writes ``eval.json`` (accuracy, macro-F1) and ``predictions.jsonl`` (text, reference, base, adapter labels).
- ``loralab export`` (:mod:`loralab.export.heads`) merges the adapter and saves a model that
  ``AutoModelForSequenceClassification`` loads with the run's label names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loralab.config import DataConfig, ModelConfig, RunConfig
from loralab.data import Example, label_vocabulary, load_splits, parse_rows, read_rows, tokenize_classification
from loralab.errors import DataError, LoralabError
from loralab.runs import RunPaths, load_run_config, read_summary, write_json_atomic

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
METRIC_NAMES = ("accuracy", "macro_f1")


# ---------------------------------------------------------------- label names


def label_names(label_ids: dict[str, int]) -> list[str]:
    """The class names in id order (``names[i]`` is the name of id ``i``); the ids must be 0..n-1."""
    names = sorted(label_ids, key=label_ids.__getitem__)
    if [label_ids[n] for n in names] != list(range(len(names))):
        raise LoralabError(f"label ids must be 0..{len(names) - 1}, got {sorted(label_ids.values())}")
    return names


def save_labels(adapter_dir: str | Path, label_ids: dict[str, int]) -> list[str]:
    """Write ``labels.json`` (id2label / label2id, as in a transformers config) into an adapter folder; the names."""
    names = label_names(label_ids)
    write_json_atomic(Path(adapter_dir) / LABELS_FILE, {"id2label": {str(i): n for i, n in enumerate(names)},
                                                        "label2id": {n: i for i, n in enumerate(names)}})
    return names


def _labels_from_file(path: Path) -> list[str]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        id2label = {int(i): str(name) for i, name in saved["id2label"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoralabError(f"{path}: not a labels file with id2label ({exc})") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise LoralabError(f"{path}: label ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}")
    return [id2label[i] for i in range(len(id2label))]


def read_labels(run_dir: str | Path, adapter_path: str | Path | None = None, config: RunConfig | None = None) -> list[str]:
    """A run's class names in id order: the adapter's ``labels.json`` (a checkpoint's falls back to the run's
    adapter), else ``labels`` in summary.json, else computed from the run's data as training did."""
    paths = RunPaths(Path(run_dir))
    for folder in ([Path(adapter_path)] if adapter_path else []) + [paths.adapter]:
        if (folder / LABELS_FILE).is_file():
            return _labels_from_file(folder / LABELS_FILE)
    labels = read_summary(run_dir).get("labels")
    if labels:
        return [str(n) for n in labels]
    config = config or load_run_config(run_dir)
    try:
        train_part, eval_part = load_splits(config.data, "SEQ_CLS")
    except DataError as exc:
        raise LoralabError(f"run {run_dir} has no {LABELS_FILE} and its data cannot be read to recover the labels "
                           f"({exc}); train it again") from None
    return label_names(label_vocabulary(train_part + eval_part))


def set_labels(model: Any, labels: Sequence[str]) -> None:
    """Put the class names into a model's config (id2label / label2id, as transformers expects)."""
    model.config.id2label = {i: name for i, name in enumerate(labels)}
    model.config.label2id = {name: i for i, name in enumerate(labels)}


def load_classifier_base(run_dir: str | Path, adapter_path: Path, config: RunConfig, model_cfg: ModelConfig,
                         tokenizer: Any) -> Any:
    """The base classifier of a run: a head with one output per run label, named by them, and a pad token id.

    A head that the base checkpoint lacks is initialised from ``train.seed``, as training initialised it, so the
    "base" predictions are those of the head training started from (and the same every time).
    """
    from loralab.models import load_model

    labels = read_labels(run_dir, adapter_path, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        base = load_model(model_cfg, "SEQ_CLS", num_labels=len(labels))
    set_labels(base, labels)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id  # decoder-only classifiers find the last token by it
    return base


def run_task_type(run_dir: str | Path, loaded: Any = None) -> str:
    """The task type of a run in memory or on disk (without loading weights)."""
    from loralab.models import resolve_task_type

    return loaded.task_type if loaded is not None else resolve_task_type(load_run_config(run_dir))


def load_classifier(run_dir: str | Path, checkpoint: str | int = "best", full_precision: bool = False) -> Any:
    """A SEQ_CLS run's base model with its adapter (a :class:`loralab.generation.LoadedRun`)."""
    from loralab.generation import load_run_model

    run = load_run_model(run_dir, checkpoint, full_precision=full_precision, allow_classifier=True)
    if run.task_type != "SEQ_CLS":
        raise LoralabError(f"run {run_dir} is a {run.task_type} run, not a classifier (SEQ_CLS)")
    return run


# ---------------------------------------------------------------- predictions


def _text(item: Example | str) -> str:
    return item.prompt if isinstance(item, Example) else str(item)


def encode_text(tokenizer: Any, text: str, cfg: DataConfig) -> list[int]:
    """Token ids of one text exactly as training built them (special tokens, truncation to ``data.max_length``)."""
    example = Example(prompt=text, response="", row=0)
    return tokenize_classification(tokenizer, example, cfg, {"": 0}).input_ids


def classifier_logits(run: Any, items: Sequence[Example | str], use_adapter: bool = True, batch_size: int = 8,
                      progress: bool = False, description: str | None = None) -> torch.Tensor:
    """Logits (float32, on the CPU, one row per text in the input order), in batches padded on the right as in training.

    ``use_adapter=False``: the base model with its original head (the adapter, head copy included, switched off).
    """
    from loralab.generation import _pad, inference, model_device, progress_bar

    if batch_size < 1:
        raise LoralabError(f"batch_size must be at least 1, got {batch_size}")
    tok, model = run.tokenizer, run.model
    encoded = [encode_text(tok, _text(item), run.config.data) for item in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    rows: list[torch.Tensor | None] = [None] * len(encoded)
    device = model_device(model)
    bar, task = progress_bar(progress and bool(items), len(encoded), description or ("adapter" if use_adapter else "base"))
    with bar, inference(model, use_adapter):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention = _pad([encoded[i] for i in batch], tok.pad_token_id, left=False)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
            for index, row in zip(batch, logits):
                rows[index] = row
            bar.update(task, advance=len(batch))
    if not rows:
        return torch.empty(0, model.config.num_labels)
    return torch.stack(rows)  # type: ignore[arg-type]


def predict_labels(run: Any, items: Sequence[Example | str], use_adapter: bool = True, batch_size: int = 8,
                   progress: bool = False, description: str | None = None) -> tuple[list[str], list[float]]:
    """The predicted label name of each text and its probability (softmax of the logits)."""
    logits = classifier_logits(run, items, use_adapter, batch_size, progress, description)
    if not len(logits):
        return [], []
    probabilities, ids = logits.softmax(-1).max(-1)
    id2label = run.model.config.id2label
    return [str(id2label[int(i)]) for i in ids], [round(float(p), 4) for p in probabilities]


# ---------------------------------------------------------------- metrics


def accuracy(predicted: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to the reference label."""
    return sum(p == r for p, r in zip(predicted, references)) / len(references) if references else 0.0


def macro_f1(predicted: Sequence[str], references: Sequence[str]) -> float:
    """Unweighted mean of the per-class F1 over every class in the references or the predictions (scikit-learn's
    ``f1_score(average="macro")``; a class never predicted correctly scores 0)."""
    classes = sorted(set(references) | set(predicted))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predicted, references))
        fp = sum(p == c and r != c for p, r in zip(predicted, references))
        fn = sum(p != c and r == c for p, r in zip(predicted, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def classification_scores(predicted: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"accuracy", "macro_f1"}`` (both 0-1) and ``n``."""
    return {"accuracy": accuracy(predicted, references), "macro_f1": macro_f1(predicted, references), "n": len(references)}


# ---------------------------------------------------------------- eval and compare


def load_classification_file(path: str | Path, cfg: DataConfig) -> tuple[list[Example], bool]:
    """The rows of a data file and whether they carry labels (``data.label_field``); a file where no row has a
    label gives texts to classify (predictions only)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"data file {path}: no examples found (the dataset is empty)")
    if any(not isinstance(record, dict) or cfg.label_field in record for _, record in rows):
        return parse_rows(rows, cfg, str(path), "SEQ_CLS"), True
    filled = [(row, {**record, cfg.label_field: ""}) for row, record in rows]
    return parse_rows(filled, cfg, str(path), "SEQ_CLS"), False


def evaluate_classifier(run_dir: str | Path, data_path: str | Path | None = None, limit: int | None = None,
                        checkpoint: str | int = "best", batch_size: int = 8, progress: bool = True,
                        loaded: Any = None, split: str = "eval") -> dict[str, Any]:
    """Predict the eval split (``split="test"``: the held-out test split, into eval_test.json /
    predictions_test.jsonl; or every row of ``data_path``) with the base head and the trained head, and score both.

    Writes ``eval.json`` (``{"task_type": "SEQ_CLS", "base": {accuracy, macro_f1, n}, "adapter": {...}, "n",
    "checkpoint", "data", "labels"}``) and ``predictions.jsonl`` (``row``, ``text``, ``reference``, ``base``,
    ``adapter`` and each prediction's probability); a file without labels gives predictions only (no eval.json).
    Returns eval.json's content with ``references`` (bool) and ``predictions`` (the rows of predictions.jsonl).
    """
    from loralab.evaluation import eval_examples, evaluation_config, report_source, write_evaluation

    config = evaluation_config(run_dir, checkpoint, split, data_path, limit, loaded)
    if data_path is not None:
        examples, with_references = load_classification_file(data_path, config.data)
    else:
        examples, with_references = eval_examples(config, "SEQ_CLS", run_dir, split), True
    examples = examples[:limit] if limit else examples
    run = loaded or load_classifier(run_dir, checkpoint)
    paths = RunPaths(Path(run_dir))
    labels = [str(run.model.config.id2label[i]) for i in range(len(run.model.config.id2label))]

    base, base_p = predict_labels(run, examples, False, batch_size, progress, "base head")
    adapter, adapter_p = predict_labels(run, examples, True, batch_size, progress, "trained head")
    references = [e.response for e in examples]
    unseen = sorted(set(references) - set(labels)) if with_references else []
    if unseen:
        log.warning("labels %s of %s are not among the run's labels %s: those examples cannot be predicted right",
                    unseen, data_path or f"the {split} split", labels)
    predictions = [{"row": e.row, "text": e.prompt, "reference": e.response if with_references else None,
                    "base": b, "adapter": a, "base_probability": bp, "adapter_probability": ap}
                   for e, b, a, bp, ap in zip(examples, base, adapter, base_p, adapter_p)]
    report: dict[str, Any] = {
        "task_type": "SEQ_CLS",
        "base": classification_scores(base, references) if with_references else None,
        "adapter": classification_scores(adapter, references) if with_references else None,
        **report_source(run, paths, data_path, split, len(examples)),
        "labels": labels,
    }
    return write_evaluation(paths, split, report, predictions, with_references)


def compare_classifier(run_dir: str | Path, prompts: Sequence[str | Example], checkpoint: str | int = "best",
                       loaded: Any = None, batch_size: int = 8) -> list[dict[str, Any]]:
    """The base head's and the trained head's label for each text:
    ``[{"prompt", "base", "adapter", "base_probability", "adapter_probability"}, ...]``."""
    if not prompts:
        raise LoralabError("no prompts given; pass --prompt TEXT or --prompts-file FILE")
    run = loaded or load_classifier(run_dir, checkpoint)
    base, base_p = predict_labels(run, prompts, False, batch_size)
    adapter, adapter_p = predict_labels(run, prompts, True, batch_size)
    return [{"prompt": _text(p), "base": b, "adapter": a, "base_probability": bp, "adapter_probability": ap}
            for p, b, a, bp, ap in zip(prompts, base, adapter, base_p, adapter_p)]
