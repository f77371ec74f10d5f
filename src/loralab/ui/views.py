"""What the pages show, computed from run and sweep views: list rows, eval tables, filtered predictions, overlays."""

from __future__ import annotations

import json
import time
from typing import Any

from loralab.ui.scan import GENERATION_KEYS, RunView, get_dotted, number, read_jsonl
from loralab.ui.sweep_folders import SweepView

PAGE_SIZE = 50
FILTERS = {"all": "all examples", "changed": "adapter answer differs from base", "better": "adapter scores higher",
           "worse": "adapter scores lower", "same": "same score"}


def run_row(run: RunView) -> dict[str, Any]:
    """One run as a JSON object (``/api/runs``) and as a row of the front page."""
    adapter = run.eval_scores.get("adapter") or {}
    return {"id": run.id, "name": run.name, "sweep": run.sweep, "status": run.status, "notes": run.notes,
            "model": run.model, "data": run.data, "hyperparameters": dict(run.hyperparameters),
            "eval_loss": {w: run.loss(w) for w in ("base", "best", "final")},
            "eval_scores": adapter, "train_time_s": number(run.summary.get("train_time_s")),
            "steps": run.summary.get("steps", run.last_step), "updated": run.updated, "version": run.version}


def display(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def ago(timestamp: float) -> str:
    if not timestamp:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return time.strftime("%Y-%m-%d", time.localtime(timestamp))


def facts(run: RunView) -> list[tuple[str, str]]:
    """The run's key numbers, in the order a reader looks for them."""
    s = run.summary
    rows = [("model", run.model), ("data", run.data), ("task", display(s.get("task_type") or run.setting("model.task_type")))]
    rows += [(label, display(value)) for label, value in run.hyperparameters]
    if "trainable_params" in s:
        rows.append(("trainable params", f"{display(s['trainable_params'])} ({display(s.get('trainable_percent'))}%)"))
    rows += [("steps", display(s.get("steps", run.last_step))), ("epochs done", display(s.get("epochs"))),
             ("train time", f"{s['train_time_s']:.1f} s" if number(s.get("train_time_s")) is not None else "-"),
             ("eval loss: base model", display(run.loss("base"))), ("eval loss: best", display(run.loss("best"))),
             ("eval loss: final", display(run.loss("final"))), ("train loss (mean)", display(s.get("train_loss"))),
             ("best checkpoint", display(s.get("best_checkpoint"))), ("precision", display(s.get("precision")))]
    return [(k, v) for k, v in rows if v != "-" or k.startswith("eval loss")]


def eval_table(run: RunView) -> list[tuple[str, float | None, float | None]]:
    """(metric, base, adapter) for every score in eval.json."""
    scores = run.eval_scores
    base, adapter = scores.get("base", {}), scores.get("adapter", {})
    names = [k for k in GENERATION_KEYS if k in base or k in adapter]
    names += sorted(k for k in {**base, **adapter} if k not in names)
    return [(name, base.get(name), adapter.get(name)) for name in names]


def _score_key(row: dict[str, Any]) -> str | None:
    scores = row.get("adapter_scores")
    if isinstance(scores, dict):
        return next((k for k in ("chrf", "rouge_l", "exact_match", "bleu") if k in scores), None)
    return None


def _verdict(row: dict[str, Any]) -> int | None:
    """+1 adapter better than base, -1 worse, 0 same, None when the row has no scores or reference."""
    key = _score_key(row)
    if key is not None:
        base, adapter = number((row.get("base_scores") or {}).get(key)), number(row["adapter_scores"].get(key))
        if base is None or adapter is None:
            return None
        return (adapter > base) - (adapter < base)
    if row.get("reference") is not None:  # a classifier: right or wrong label
        return int(row.get("adapter") == row.get("reference")) - int(row.get("base") == row.get("reference"))
    return None


def predictions(run: RunView, query: str = "", which: str = "all", page: int = 1) -> dict[str, Any]:
    """predictions.jsonl filtered by text and by how the adapter compares with the base model, one page of it."""
    notes: list[str] = []
    rows = read_jsonl(run.paths.predictions, "predictions.jsonl", notes)
    needle = query.strip().lower()
    kept = []
    for row in rows:
        text = " ".join(str(row.get(k) or "") for k in ("prompt", "text", "reference", "base", "adapter")).lower()
        if needle and needle not in text:
            continue
        verdict = _verdict(row)
        if which == "changed" and row.get("base") == row.get("adapter"):
            continue
        if which in ("better", "worse", "same") and verdict != {"better": 1, "worse": -1, "same": 0}[which]:
            continue
        key = _score_key(row)
        kept.append({"row": row.get("row"), "prompt": row.get("prompt", row.get("text")), "reference": row.get("reference"),
                     "base": row.get("base"), "adapter": row.get("adapter"), "verdict": verdict, "score_key": key,
                     "base_score": (row.get("base_scores") or {}).get(key) if key else row.get("base_probability"),
                     "adapter_score": (row.get("adapter_scores") or {}).get(key) if key else row.get("adapter_probability")})
    pages = max(1, -(-len(kept) // PAGE_SIZE))
    page = min(max(1, page), pages)
    return {"rows": kept[(page - 1) * PAGE_SIZE: page * PAGE_SIZE], "total": len(rows), "matching": len(kept),
            "page": page, "pages": pages, "query": query, "which": which if which in FILTERS else "all",
            "filters": FILTERS, "notes": notes, "present": run.paths.predictions.is_file()}


def checks_rows(run: RunView) -> list[dict[str, Any]]:
    checks = (run.checks or {}).get("checks")
    return [c for c in checks if isinstance(c, dict)] if isinstance(checks, list) else []


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(runs: list[RunView]) -> list[tuple[str, list[str]]]:
    """The config keys whose values differ between the runs (where the run lives and resume left out)."""
    flats = [_flat(run.config) for run in runs]
    keys = sorted(set().union(*flats)) if flats else []
    skip = {"output_dir", "name", "train.resume"}
    return [(k, [display(f.get(k)) for f in flats]) for k in keys
            if k not in skip and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]


def sweep_table(sweep: SweepView) -> tuple[list[str], list[dict[str, Any]]]:
    """The live comparison: the grid's values, status, losses and scores of each run found so far."""
    keys = sweep.grid_keys
    best = sweep.best
    rows = []
    for run in sweep.runs:
        adapter = run.eval_scores.get("adapter") or {}
        rows.append({"run": run, "values": [display(get_dotted(run.config, k)) for k in keys],
                     "best": best is not None and run.id == best.id, "final": run.loss("final"),
                     "best_loss": run.loss("best"), "scores": [adapter.get(k) for k in GENERATION_KEYS],
                     "time": number(run.summary.get("train_time_s")), "metric": run.metric(sweep.metric)})
    return keys, rows
