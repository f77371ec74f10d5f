"""TOKEN_CLS evaluation: each word's tag from the base head and the trained head, scored, compared and printed.

- :func:`evaluate_token_classifier` tags the eval split with the trained head (adapter on) and the base head
  (adapter off: the head is in ``modules_to_save``, so the base head is the new one training started from) and
  writes ``eval.json`` (token accuracy, entity precision / recall / F1, per entity type) and ``predictions.jsonl``
  (words, reference tags, base tags, adapter tags).
- :func:`compare_token_classifier`: the words of each text (split on whitespace) with both heads' tags.
- Words cut off by ``data.max_length`` get no prediction and count as ``O``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loralab.errors import DataError, LoralabError
from loralab.formats import Example
from loralab.runs import RunPaths
from loralab.tasks.token_cls import TASK, encode_words, first_tokens, parse_token_rows, words_and_tags
from loralab.tasks.token_metrics import token_scores

log = logging.getLogger(__name__)
METRIC_LABELS = {"f1": "entity F1 (0-1)", "precision": "entity precision (0-1)", "recall": "entity recall (0-1)",
                 "token_accuracy": "token accuracy (0-1)"}


def load_token_classifier(run_dir: str | Path, checkpoint: str | int = "best", full_precision: bool = False) -> Any:
    """A TOKEN_CLS run's base model with its adapter (a :class:`loralab.generation.LoadedRun`)."""
    from loralab.generation import load_run_model

    run = load_run_model(run_dir, checkpoint, full_precision=full_precision, allow_classifier=True)
    if run.task_type != TASK:
        raise LoralabError(f"run {run_dir} is a {run.task_type} run, not a token classifier ({TASK})")
    return run


def _words(item: Example | str | Sequence[str]) -> list[str]:
    if isinstance(item, Example):  # a sentence row (words as JSON), or a line of a prompts file
        return words_and_tags(item)[0] if item.prompt.lstrip().startswith("[") else item.prompt.split()
    if isinstance(item, str):
        return item.split()
    return [str(w) for w in item]


def word_logits(run: Any, sentences: Sequence[Sequence[str]], use_adapter: bool = True, batch_size: int = 8,
                progress: bool = False, description: str | None = None) -> list[torch.Tensor]:
    """Per sentence, the logits (float32, CPU) at the first sub-token of each word kept by ``data.max_length``
    (``[words kept, tags]``), in batches padded on the right as in training. ``use_adapter=False``: the base head."""
    from loralab.generation import _pad, inference, model_device, progress_bar

    if batch_size < 1:
        raise LoralabError(f"batch_size must be at least 1, got {batch_size}")
    tok, model = run.tokenizer, run.model
    encoded = [encode_words(tok, words, run.config.data.max_length) for words in sentences]
    firsts = [first_tokens(word_ids) for _, word_ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    device = model_device(model)
    bar, task = progress_bar(progress and bool(sentences), len(encoded), description or ("adapter" if use_adapter else "base"))
    with bar, inference(model, use_adapter):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention = _pad([encoded[i][0] for i in batch], tok.pad_token_id, left=False)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
            for index, row in zip(batch, logits):
                positions = [firsts[index][w] for w in sorted(firsts[index])]
                rows[index] = row[positions]
            bar.update(task, advance=len(batch))
    return rows


def predict_tags(run: Any, items: Sequence[Example | str | Sequence[str]], use_adapter: bool = True, batch_size: int = 8,
                 progress: bool = False, description: str | None = None) -> list[list[str]]:
    """Each sentence's predicted tag per word (``O`` for words cut off by ``data.max_length``)."""
    sentences = [_words(item) for item in items]
    id2label = run.model.config.id2label
    tags = []
    for words, logits in zip(sentences, word_logits(run, sentences, use_adapter, batch_size, progress, description)):
        found = [str(id2label[int(i)]) for i in logits.argmax(-1)] if len(logits) else []
        tags.append(found + ["O"] * (len(words) - len(found)))
    return tags


def load_token_file(path: str | Path, cfg: Any) -> tuple[list[Example], bool]:
    """The sentences of a data file and whether they carry tags; a file where no row has tags gives sentences to tag
    (predictions only)."""
    from loralab.data import read_rows
    from loralab.tasks.token_cls import tags_field_of

    rows = read_rows(path)
    if not rows:
        raise DataError(f"data file {path}: no examples found (the dataset is empty)")
    tagged = any(not isinstance(r, dict) or tags_field_of(r, cfg) in r for _, r in rows)
    return parse_token_rows(rows, cfg, str(path), need_tags=tagged), tagged


def evaluate_token_classifier(run_dir: str | Path, data_path: str | Path | None = None, limit: int | None = None,
                              checkpoint: str | int = "best", batch_size: int = 8, progress: bool = True,
                              loaded: Any = None, split: str = "eval") -> dict[str, Any]:
    """Tag the eval split (``split="test"``: the test split, into eval_test.json / predictions_test.jsonl; or every
    row of ``data_path``) with the base head and the trained head, and score both.

    Writes ``eval.json`` (``{"task_type": "TOKEN_CLS", "base": {token_accuracy, precision, recall, f1, per_type,
    entities, words, n}, "adapter": {...}, "n", "checkpoint", "data", "split", "labels"}``) and ``predictions.jsonl``
    (``row``, ``words``, ``reference``, ``base``, ``adapter``: one tag per word); a file without tags gives
    predictions only (no eval.json). Returns eval.json's content with ``references`` (bool) and ``predictions``.
    """
    from loralab.evaluation import eval_examples, evaluation_config, report_source, write_evaluation

    config = evaluation_config(run_dir, checkpoint, split, data_path, limit, loaded)
    if data_path is not None:
        examples, with_references = load_token_file(data_path, config.data)
    else:
        examples, with_references = list(eval_examples(config, TASK, run_dir, split)), True
    examples = examples[:limit] if limit else examples
    run = loaded or load_token_classifier(run_dir, checkpoint)
    paths = RunPaths(Path(run_dir))
    labels = [str(run.model.config.id2label[i]) for i in range(len(run.model.config.id2label))]
    base = predict_tags(run, examples, False, batch_size, progress, "base head")
    adapter = predict_tags(run, examples, True, batch_size, progress, "trained head")
    sentences = [words_and_tags(e) for e in examples]
    references = [tags for _, tags in sentences]
    unseen = sorted({t for tags in references for t in tags} - set(labels)) if with_references else []
    if unseen:
        log.warning("tags %s of %s are not among the run's tags %s: those words cannot be tagged right",
                    unseen, data_path or f"the {split} split", labels)
    predictions = [{"row": e.row, "words": words, "reference": tags if with_references else None, "base": b,
                    "adapter": a} for e, (words, tags), b, a in zip(examples, sentences, base, adapter)]
    report: dict[str, Any] = {
        "task_type": TASK,
        "base": token_scores(base, references) if with_references else None,
        "adapter": token_scores(adapter, references) if with_references else None,
        **report_source(run, paths, data_path, split, len(examples)),
        "labels": labels,
    }
    return write_evaluation(paths, split, report, predictions, with_references)


def compare_token_classifier(run_dir: str | Path, prompts: Sequence[str | Example], checkpoint: str | int = "best",
                             loaded: Any = None, batch_size: int = 8) -> list[dict[str, Any]]:
    """Each text's words (split on whitespace) with the base head's and the trained head's tags:
    ``[{"prompt", "words", "base", "adapter"}, ...]``."""
    if not prompts:
        raise LoralabError("no prompts given; pass --prompt TEXT or --prompts-file FILE")
    empty = [i for i, p in enumerate(prompts, start=1) if not _words(p)]
    if empty:
        raise LoralabError(f"prompt {empty[0]} has no words to tag")
    run = loaded or load_token_classifier(run_dir, checkpoint)
    base = predict_tags(run, prompts, False, batch_size)
    adapter = predict_tags(run, prompts, True, batch_size)
    return [{"prompt": " ".join(_words(p)), "words": _words(p), "base": b, "adapter": a}
            for p, b, a in zip(prompts, base, adapter)]


# ---------------------------------------------------------------- printing


def _tagged(words: Sequence[str], tags: Sequence[str]) -> str:
    """``Anna/B-PER lives in Paris/B-LOC``: a word shows its tag unless it is O."""
    return " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(words, tags))


def print_token_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    """Entity F1, precision, recall and token accuracy of the base head vs the trained head; then a few sentences."""
    from rich.table import Table

    from loralab.cli.output import _written, console, head_metrics_table

    title = f"{run_dir}: {report['n']} sentences ({report['data']}), checkpoint {report['checkpoint']}"
    if report["references"]:
        table = head_metrics_table(report, METRIC_LABELS, title)
        for type_, scores in report["adapter"]["per_type"].items():
            base = report["base"]["per_type"].get(type_, {}).get("f1", 0.0)
            table.add_row(f"  F1 {type_} ({scores['support']} entities)", f"{base:.3f}", f"{scores['f1']:.3f}",
                          f"{scores['f1'] - base:+.3f}")
        console.print(table)
        console.print(f"{report['adapter']['entities']} entities in {report['adapter']['words']} words; "
                      "entity scores: exact spans (seqeval's default)", highlight=False)
    else:
        console.print(f"{title}\n[yellow]no tags in {report['data']}: predictions only, no scores[/]")
    console.print(f"tags: {', '.join(report['labels'])}", markup=False, highlight=False)
    if show:
        examples = Table("", "tagged words", title=f"first {min(show, report['n'])} sentences", show_lines=True)
        for row in report["predictions"][:show]:
            if report["references"]:
                examples.add_row("reference", _tagged(row["words"], row["reference"]))
            examples.add_row("base head", _tagged(row["words"], row["base"]))
            examples.add_row("trained head", _tagged(row["words"], row["adapter"]))
        console.print(examples, markup=False)
    console.print(f"wrote {_written(report)} in {run_dir}", highlight=False)


def print_token_compare(rows: Sequence[dict[str, Any]], title: str) -> None:
    """One table per text: each word with its base-head and trained-head tag."""
    from rich.table import Table

    from loralab.cli.output import console

    for row in rows:
        table = Table("word", "base head", "trained head", title=f"{title}: {row['prompt']}")
        for word, base, adapter in zip(row["words"], row["base"], row["adapter"]):
            table.add_row(word, base, adapter)
        console.print(table, markup=False)
