"""Retrieval evaluation of FEATURE_EXTRACTION runs: each eval anchor against every eval positive, base vs adapter.

:func:`evaluate_embeddings` (``loralab eval RUN``) writes ``eval.json`` (accuracy@1 = recall@1, recall@5, MRR@10 of
the base model, adapter off, and of the adapter) and ``predictions.jsonl`` (anchor, reference positive, each model's
top-1 passage and the rank it gave the reference); :func:`compare_embeddings` (``loralab compare RUN "query"``)
gives the eval positives most similar to each query under both.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch

from loralab.errors import LoralabError
from loralab.tasks.embeddings import TASK, Pooling, embed, model_pooling

METRICS = {"accuracy_at_1": "accuracy@1 (= recall@1)", "recall_at_5": "recall@5", "mrr_at_10": "MRR@10"}
TOP_K = 3  # passages shown per query by compare


def retrieval_metrics(scores: torch.Tensor, gold: Sequence[int]) -> dict[str, float]:
    """accuracy@1, recall@5 and MRR@10 of a (queries, passages) similarity matrix whose right passage for query i
    is ``gold[i]`` (a tie counts against the query: the right passage ranks after every passage scoring as high)."""
    gold_t = torch.as_tensor(list(gold), dtype=torch.long)
    right = scores[torch.arange(len(gold_t)), gold_t]
    ranks = (scores >= right.unsqueeze(1)).sum(dim=1).float()  # 1 = first
    n = max(len(gold_t), 1)
    return {"accuracy_at_1": float((ranks <= 1).sum()) / n, "recall_at_5": float((ranks <= 5).sum()) / n,
            "mrr_at_10": float(torch.where(ranks <= 10, 1.0 / ranks, torch.zeros_like(ranks)).sum()) / n,
            "n": len(gold_t)}


def ranks_of(scores: torch.Tensor, gold: Sequence[int]) -> list[int]:
    gold_t = torch.as_tensor(list(gold), dtype=torch.long)
    right = scores[torch.arange(len(gold_t)), gold_t]
    return [int(r) for r in (scores >= right.unsqueeze(1)).sum(dim=1)]


def encode(run: Any, texts: Sequence[str], pooling: Pooling, use_adapter: bool, batch_size: int = 32,
           max_length: int = 512) -> torch.Tensor:
    """Normalised embeddings of ``texts`` with the adapter on or off (CPU tensor, float32)."""
    model, tokenizer = run.model, run.tokenizer
    device = next(model.parameters()).device
    off = model.disable_adapter() if not use_adapter and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    out = []
    model.eval()
    with off, torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            out.append(embed(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), pooling).cpu())
    return torch.cat(out) if out else torch.zeros((0, 1))


def passages_of(examples: Sequence[Any]) -> tuple[list[str], list[int]]:
    """The distinct positives (the retrieval corpus) and each example's right one among them."""
    index: dict[str, int] = {}
    gold = [index.setdefault(e.response, len(index)) for e in examples]
    return list(index), gold


def load_embedding_run(run_dir: str | Path, checkpoint: str | int = "best") -> Any:
    from loralab.generation import load_run_model

    run = load_run_model(run_dir, checkpoint, allow_classifier=True)
    if run.task_type != TASK:
        raise LoralabError(f"run {run_dir} is a {run.task_type} run, not an embedding run ({TASK})")
    return run


def evaluate_embeddings(run_dir: str | Path, data_path: str | Path | None = None, limit: int | None = None,
                        checkpoint: str | int = "best", batch_size: int = 32, progress: bool = True,
                        loaded: Any = None, split: str = "eval") -> dict[str, Any]:
    """Retrieval on the eval split (or ``split="test"``, or every (anchor, positive) row of ``data_path``): base
    vs adapter. Returns eval.json's content with ``references`` and ``predictions``."""
    from loralab.evaluation import eval_examples, evaluation_config, report_source, write_evaluation
    from loralab.runs import RunPaths

    config = evaluation_config(run_dir, checkpoint, split, data_path, limit, loaded)
    if data_path is not None:
        from loralab.data import parse_rows, read_rows

        examples = parse_rows(read_rows(data_path), config.data, str(data_path), TASK)
    else:
        examples = list(eval_examples(config, TASK, run_dir, split))
    examples = examples[:limit] if limit else examples
    if len(examples) < 2:
        raise LoralabError(f"retrieval needs at least 2 (anchor, positive) pairs to rank, got {len(examples)}")
    run = loaded or load_embedding_run(run_dir, checkpoint)
    pooling = model_pooling(config.model)
    passages, gold = passages_of(examples)
    anchors = [e.prompt for e in examples]
    scores, report_models = {}, {}
    for name, use_adapter in (("base", False), ("adapter", True)):
        query_vectors = encode(run, anchors, pooling, use_adapter, batch_size, config.data.max_length)
        passage_vectors = encode(run, passages, pooling, use_adapter, batch_size, config.data.max_length)
        scores[name] = query_vectors @ passage_vectors.T
        report_models[name] = retrieval_metrics(scores[name], gold)
    tops = {name: s.argmax(dim=1).tolist() for name, s in scores.items()}
    ranks = {name: ranks_of(s, gold) for name, s in scores.items()}
    predictions = [{"row": e.row, "anchor": e.prompt, "reference": e.response,
                    "base": passages[tops["base"][i]], "adapter": passages[tops["adapter"][i]],
                    "base_rank": ranks["base"][i], "adapter_rank": ranks["adapter"][i]}
                   for i, e in enumerate(examples)]
    paths = RunPaths(Path(run_dir))
    report: dict[str, Any] = {
        "task_type": TASK,
        "base": report_models["base"],
        "adapter": report_models["adapter"],
        **report_source(run, paths, data_path, split, len(examples)),
        "passages": len(passages),
        "pooling": pooling.to_dict(),
        "similarity": "cosine",
    }
    return write_evaluation(paths, split, report, predictions)


def compare_embeddings(run_dir: str | Path, prompts: Sequence[Any], checkpoint: str | int = "best",
                       loaded: Any = None, batch_size: int = 32, top_k: int = TOP_K) -> list[dict[str, Any]]:
    """For each query, the ``top_k`` eval positives (the run's eval split) most similar under the base model and
    under the adapter: ``[{"prompt", "base": [[passage, score], ...], "adapter": [...]}, ...]``."""
    from loralab.evaluation import eval_examples

    if not prompts:
        raise LoralabError("no prompts given; pass --prompt TEXT or --prompts-file FILE")
    run = loaded or load_embedding_run(run_dir, checkpoint)
    if run.run_dir is None:  # --adapter PATH --model BASE: no run, so no eval passages to rank
        raise LoralabError("compare on an embedding adapter ranks the run's eval passages: give the run folder")
    examples = list(eval_examples(run.config, TASK, run.run_dir, "eval"))
    if not examples:
        raise LoralabError(f"run {run_dir} has no eval split to search: compare ranks its eval passages")
    passages, _ = passages_of(examples)
    queries = [getattr(p, "prompt", p) for p in prompts]
    pooling = model_pooling(run.config.model)
    found: dict[str, list[list[list[Any]]]] = {}
    for name, use_adapter in (("base", False), ("adapter", True)):
        scores = encode(run, queries, pooling, use_adapter, batch_size) @ \
            encode(run, passages, pooling, use_adapter, batch_size).T
        best = scores.topk(min(top_k, len(passages)), dim=1)
        found[name] = [[[passages[j], round(float(v), 4)] for v, j in zip(vals.tolist(), idx.tolist())]
                       for vals, idx in zip(best.values, best.indices)]
    return [{"prompt": q, "base": b, "adapter": a} for q, b, a in zip(queries, found["base"], found["adapter"])]


# ---------------------------------------------------------------- printing


def _short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_embedding_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    from rich.table import Table

    from loralab.cli.output import _written, console

    title = (f"{run_dir}: {report['n']} queries against {report['passages']} passages ({report['data']}), "
             f"checkpoint {report['checkpoint']}, {report['pooling']['mode']} pooling, cosine")
    table = Table("metric", "base", "adapter", "change", title=title)
    for name, label in METRICS.items():
        base, adapter = report["base"][name], report["adapter"][name]
        table.add_row(label, f"{base:.3f}", f"{adapter:.3f}", f"{adapter - base:+.3f}")
    console.print(table)
    if show:
        examples = Table("anchor", "reference", "base top-1 (rank of reference)", "adapter top-1 (rank of reference)",
                         title=f"first {min(show, report['n'])} queries", show_lines=True)
        for row in report["predictions"][:show]:
            examples.add_row(_short(row["anchor"]), _short(row["reference"]),
                             f"{_short(row['base'])} ({row['base_rank']})", f"{_short(row['adapter'])} ({row['adapter_rank']})")
        console.print(examples, markup=False)
    console.print(f"wrote {_written(report)} in {run_dir}", highlight=False)


def print_embedding_compare(rows: list[dict[str, Any]], title: str) -> None:
    from rich.table import Table

    from loralab.cli.output import console

    table = Table("query", "base: closest eval passages", "adapter: closest eval passages", title=title,
                  show_lines=True)
    for row in rows:
        cells = ["\n".join(f"{score:.3f}  {_short(text, 100)}" for text, score in row[name]) for name in ("base", "adapter")]
        table.add_row(row["prompt"], *cells)
    console.print(table, markup=False)
