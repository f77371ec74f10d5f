"""QUESTION_ANSWERING evaluation: span decoding over every window, SQuAD v1 exact match / F1, base vs adapter.

- :func:`best_spans`: the Hugging Face ``run_qa`` post-processing: per window the ``n_best`` highest start and end
  logits over context tokens, spans with end >= start and at most ``max_answer_length`` tokens, scored by start + end
  logit; the best span over all windows of an example is its answer (its text cut from the context by the offsets).
- :func:`exact_match` / :func:`f1_score`: the official SQuAD v1.1 script's (lowercase, no punctuation, no articles
  a / an / the, whitespace collapsed; F1 over the normalised words; the maximum over the reference answers).
- :func:`evaluate_qa`: the eval split with the base head (adapter off: the original ``qa_outputs``, untrained and
  seeded as training started from when the checkpoint had none) and the trained one; ``eval.json`` and
  ``predictions.jsonl`` (question, reference answers, base answer, adapter answer).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loralab.errors import DataError, LoralabError
from loralab.formats import Example
from loralab.runs import RunPaths
from loralab.tasks.qa import TASK, QAItem, encode_windows, parse_qa_rows, qa_item

N_BEST = 20
MAX_ANSWER_TOKENS = 30
METRICS = ("exact_match", "f1")


# ---------------------------------------------------------------- SQuAD v1 metrics


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a / an / the, collapse whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, reference: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer, else 0.0."""
    return max((float(normalize_answer(prediction) == normalize_answer(r)) for r in references), default=0.0)


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """Word-overlap F1 of the normalised prediction, the best over the reference answers."""
    return max((_f1(prediction, r) for r in references), default=0.0)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``{"exact_match", "f1"}`` as the SQuAD script reports them (0-100) and ``n``."""
    n = len(references)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    f1 = sum(f1_score(p, r) for p, r in zip(predictions, references))
    return {"exact_match": round(100 * em / n, 2) if n else 0.0, "f1": round(100 * f1 / n, 2) if n else 0.0, "n": n}


# ---------------------------------------------------------------- span decoding


def best_spans(encoded: Any, start_logits: torch.Tensor, end_logits: torch.Tensor, items: Sequence[QAItem],
               n_best: int = N_BEST, max_answer_length: int = MAX_ANSWER_TOKENS) -> list[tuple[str, float]]:
    """The best answer (text, score) of each item over all its windows; ("", -inf) when no span is valid."""
    best: list[tuple[str, float]] = [("", float("-inf"))] * len(items)
    for index in range(len(encoded["input_ids"])):
        sample = encoded["overflow_to_sample_mapping"][index]
        sequence_ids = encoded.sequence_ids(index)
        offsets = encoded["offset_mapping"][index]
        length = len(sequence_ids)
        starts, ends = start_logits[index][:length], end_logits[index][:length]
        context = [i for i, s in enumerate(sequence_ids) if s == 1]
        if not context:
            continue
        allowed = torch.tensor(context)
        k = min(n_best, len(context))
        top_starts = allowed[starts[allowed].topk(k).indices].tolist()
        top_ends = allowed[ends[allowed].topk(k).indices].tolist()
        for s in top_starts:
            for e in top_ends:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(starts[s] + ends[e])
                if score > best[sample][1]:
                    text = items[sample].context[offsets[s][0] : offsets[e][1]]
                    best[sample] = (text, score)
    return best


def predict_answers(run: Any, items: Sequence[QAItem], use_adapter: bool = True, batch_size: int = 8,
                    progress: bool = False, description: str | None = None) -> list[tuple[str, float]]:
    """Each item's answer span and its score (start + end logit), from the run's model with or without the adapter."""
    from transformers import DataCollatorWithPadding

    from loralab.generation import inference, model_device, progress_bar

    if batch_size < 1:
        raise LoralabError(f"batch_size must be at least 1, got {batch_size}")
    if not items:
        return []
    tok, model = run.tokenizer, run.model
    tok.padding_side = "right"
    encoded = encode_windows(tok, items, run.config.data)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    collate = DataCollatorWithPadding(tok)
    n = len(encoded["input_ids"])
    width = max(len(ids) for ids in encoded["input_ids"])
    start_all = torch.full((n, width), float("-inf"))
    end_all = torch.full((n, width), float("-inf"))
    device = model_device(model)
    bar, task = progress_bar(progress, n, description or ("adapter" if use_adapter else "base"))
    with bar, inference(model, use_adapter):
        for first in range(0, n, batch_size):
            rows = range(first, min(first + batch_size, n))
            batch = collate([{k: encoded[k][i] for k in keys} for i in rows])
            out = model(**{k: v.to(device) for k, v in batch.items()})
            size = out.start_logits.shape[1]
            start_all[first : first + len(rows), :size] = out.start_logits.float().cpu()
            end_all[first : first + len(rows), :size] = out.end_logits.float().cpu()
            bar.update(task, advance=len(rows))
    return best_spans(encoded, start_all, end_all, items)


# ---------------------------------------------------------------- eval and compare


def load_qa_run(run_dir: str | Path, checkpoint: str | int = "best") -> Any:
    from loralab.generation import load_run_model

    run = load_run_model(run_dir, checkpoint, allow_classifier=True)
    if run.task_type != TASK:
        raise LoralabError(f"run {run_dir} is a {run.task_type} run, not a QUESTION_ANSWERING run")
    return run


def load_qa_file(path: str | Path, cfg: Any) -> tuple[list[QAItem], bool]:
    """The (question, context) rows of a data file and whether they carry answers."""
    from loralab.data import read_rows

    rows = read_rows(path)
    if not rows:
        raise DataError(f"data file {path}: no examples found (the dataset is empty)")
    answered = any(isinstance(r, dict) and (cfg.answer_field in r or "answer" in r) for _, r in rows)
    return [qa_item(e) for e in parse_qa_rows(rows, cfg, f"{path}", need_answer=answered)], answered


def evaluate_qa(run_dir: str | Path, data_path: str | Path | None = None, limit: int | None = None,
                checkpoint: str | int = "best", batch_size: int = 8, progress: bool = True, loaded: Any = None,
                split: str = "eval") -> dict[str, Any]:
    """Answer the eval split (``split="test"``: the test split; or every row of ``data_path``) with the base head and
    the trained head; writes ``eval.json`` (``{"task_type", "base": {exact_match, f1, n}, "adapter": {...}, ...}``,
    scores 0-100) and ``predictions.jsonl``. Returns eval.json's content with ``references`` and ``predictions``."""
    from loralab.evaluation import eval_examples, evaluation_config, report_source, write_evaluation

    config = evaluation_config(run_dir, checkpoint, split, data_path, limit, loaded)
    if data_path is not None:
        items, with_references = load_qa_file(data_path, config.data)
    else:
        items, with_references = [qa_item(e) for e in eval_examples(config, TASK, run_dir, split)], True
    items = items[:limit] if limit else items
    run = loaded or load_qa_run(run_dir, checkpoint)
    base = predict_answers(run, items, False, batch_size, progress, "base head")
    adapter = predict_answers(run, items, True, batch_size, progress, "trained head")
    predictions = [{"row": i.row, "question": i.question, "context": i.context,
                    "reference": i.answers if with_references else None, "base": b, "adapter": a,
                    **({"base_f1": round(100 * f1_score(b, i.answers), 2),
                        "adapter_f1": round(100 * f1_score(a, i.answers), 2)} if with_references else {})}
                   for i, (b, _), (a, _) in zip(items, base, adapter)]
    references = [i.answers for i in items]
    paths = RunPaths(Path(run_dir))
    report: dict[str, Any] = {
        "task_type": TASK,
        "base": squad_scores([b for b, _ in base], references) if with_references else None,
        "adapter": squad_scores([a for a, _ in adapter], references) if with_references else None,
        **report_source(run, paths, data_path, split, len(items)),
        "n_best": N_BEST,
        "max_answer_length": MAX_ANSWER_TOKENS,
    }
    return write_evaluation(paths, split, report, predictions, with_references)


CONTEXT_HINT = ("a QUESTION_ANSWERING run answers from a context: pass --prompt QUESTION with --context TEXT "
                "(one context for every question), or --prompts-file FILE with question / context rows")


def compare_items(prompts: Sequence[Any], context: str | None) -> list[QAItem]:
    """(question, context) items from questions and one context, or from QA examples (a prompts file)."""
    items = []
    for p in prompts:
        if isinstance(p, QAItem):
            items.append(p)
        elif isinstance(p, Example) and p.response.startswith("{"):
            items.append(qa_item(p))
        elif context:
            items.append(QAItem(getattr(p, "prompt", str(p)), context, [], []))
        else:
            raise LoralabError(f"no context for the question {getattr(p, 'prompt', p)!r}; {CONTEXT_HINT}")
    return items


def compare_qa(run: Any, prompts: Sequence[Any], context: str | None = None,
               batch_size: int = 8) -> list[dict[str, Any]]:
    """The base head's and the trained head's answer to each question: ``[{"question", "context", "base", "adapter",
    "base_score", "adapter_score"}, ...]``."""
    if not prompts:
        raise LoralabError(f"no questions given; {CONTEXT_HINT}")
    items = compare_items(prompts, context)
    base = predict_answers(run, items, False, batch_size)
    adapter = predict_answers(run, items, True, batch_size)
    return [{"question": i.question, "context": i.context, "base": b, "adapter": a,
             "base_score": round(bs, 3), "adapter_score": round(as_, 3)}
            for i, (b, bs), (a, as_) in zip(items, base, adapter)]


def read_qa_prompts(path: str | Path, cfg: Any) -> list[QAItem]:
    return load_qa_file(path, cfg)[0]


# ---------------------------------------------------------------- printing


def print_qa_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    from rich.table import Table

    from loralab.cli.output import _written, console

    title = f"{run_dir}: {report['n']} questions ({report['data']}), checkpoint {report['checkpoint']}"
    if report["references"]:
        table = Table("metric", "base head", "trained head", "change", title=title)
        for name, label in (("exact_match", "exact match (0-100)"), ("f1", "F1 (0-100)")):
            base, adapter = report["base"][name], report["adapter"][name]
            table.add_row(label, f"{base:.2f}", f"{adapter:.2f}", f"{adapter - base:+.2f}")
        console.print(table)
    else:
        console.print(f"{title}\nno answers in {report['data']}: predictions only, no scores", markup=False)
    if show:
        examples = Table("question", *(["reference"] if report["references"] else []), "base head", "trained head",
                         title=f"first {min(show, report['n'])} answers", show_lines=True)
        for row in report["predictions"][:show]:
            examples.add_row(row["question"], *([" | ".join(row["reference"])] if report["references"] else []),
                             row["base"], row["adapter"])
        console.print(examples, markup=False)
    console.print(f"wrote {_written(report)} in {run_dir}", highlight=False)


def print_qa_compare(rows: list[dict[str, Any]], title: str) -> None:
    from rich.table import Table

    from loralab.cli.output import console

    table = Table("question", "base head", "trained head", title=title, show_lines=True)
    for row in rows:
        table.add_row(row["question"], f"{row['base']} ({row['base_score']:.2f})",
                      f"{row['adapter']} ({row['adapter_score']:.2f})")
    console.print(table, markup=False)


def compare_cli(run: Any, run_dir: Any, checkpoint: str, prompt: Sequence[str] | None, prompts_file: Any,
                context: str | None, batch_size: int, as_json: bool) -> None:
    """``loralab compare RUN --prompt QUESTION --context TEXT`` (or ``--prompts-file`` question / context rows)."""
    if run.task_type != TASK:
        raise LoralabError(f"--context is for QUESTION_ANSWERING runs; {run_dir} is a {run.task_type} run")
    if prompt and not context:
        raise LoralabError(f"--prompt gives a question without its passage; {CONTEXT_HINT}")
    items: list[Any] = list(prompt or [])
    if prompts_file:
        items += read_qa_prompts(prompts_file, run.config.data)
    rows = compare_qa(run, items, context, batch_size)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    print_qa_compare(rows, f"{run_dir} (adapter {checkpoint})")
