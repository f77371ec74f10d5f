"""What the ``loralab`` commands print: summaries, score tables, sweep and tune results, check reports (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run']}", show_header=False)
    rows = [
        ("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,} ({summary['trainable_percent']:.3f}%)"),
        ("examples", f"{summary['n_train']} train / {summary['n_eval']} eval; {summary['truncated_examples']} truncated"),
        ("steps / epochs", f"{summary['steps']} / {summary['epochs']}"),
        ("train time", f"{summary['train_time_s']:.1f} s ({summary['precision']})"),
        ("train loss (final)", _fmt(summary.get("final_train_loss"))),
        ("eval loss base -> final", f"{_fmt(summary.get('base_eval_loss'))} -> {_fmt(summary.get('final_eval_loss'))}"),
        ("best checkpoint", f"{summary.get('best_checkpoint')} (eval loss {_fmt(summary.get('best_eval_loss'))})"),
        ("adapter", f"{summary['run']}/adapter"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


METRIC_LABELS = {"exact_match": "exact match (0-1)", "rouge_l": "ROUGE-L F1 (0-1)", "chrf": "chrF (0-100)", "bleu": "BLEU (0-100)"}


CLASSIFIER_METRIC_LABELS = {"accuracy": "accuracy (0-1)", "macro_f1": "macro-F1 (0-1)"}


def print_classifier_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    """A SEQ_CLS run: accuracy and macro-F1 of the base head vs the trained head, then a few predicted labels."""
    title = f"{run_dir}: {report['n']} examples ({report['data']}), checkpoint {report['checkpoint']}"
    if report["references"]:
        table = Table("metric", "base head", "trained head", "change", title=title)
        for name, label in CLASSIFIER_METRIC_LABELS.items():
            base, adapter = report["base"][name], report["adapter"][name]
            table.add_row(label, f"{base:.3f}", f"{adapter:.3f}", f"{adapter - base:+.3f}")
        console.print(table)
    else:
        console.print(f"{title}\n[yellow]no labels in {report['data']}: predictions only, no scores[/]")
    console.print(f"labels: {', '.join(report['labels'])}", markup=False, highlight=False)
    if show:
        examples = Table("text", *(["reference"] if report["references"] else []), "base head", "trained head",
                         title=f"first {min(show, report['n'])} predictions", show_lines=True)
        for row in report["predictions"][:show]:
            examples.add_row(row["text"], *([row["reference"]] if report["references"] else []),
                             f"{row['base']} ({row['base_probability']:.2f})", f"{row['adapter']} ({row['adapter_probability']:.2f})")
        console.print(examples, markup=False)
    written = "eval.json and predictions.jsonl" if report["references"] else "predictions.jsonl"
    console.print(f"wrote {written} in {run_dir}", highlight=False)


def print_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    """The base vs adapter scores side by side, then a few example answers."""
    if report.get("task_type") == "SEQ_CLS":
        return print_classifier_eval(report, run_dir, show)
    title = f"{run_dir}: {report['n']} examples ({report['data']}), checkpoint {report['checkpoint']}"
    if report["references"]:
        table = Table("metric", "base", "adapter", "change", title=title)
        for name, label in METRIC_LABELS.items():
            base, adapter = report["base"][name], report["adapter"][name]
            digits = 3 if name in ("exact_match", "rouge_l") else 1
            table.add_row(label, f"{base:.{digits}f}", f"{adapter:.{digits}f}", f"{adapter - base:+.{digits}f}")
        console.print(table)
    else:
        console.print(f"{title}\n[yellow]no reference answers in {report['data']}: answers only, no scores[/]")
    if show:
        examples = Table("prompt", *(["reference"] if report["references"] else []), "base", "adapter",
                         title=f"first {min(show, report['n'])} answers", show_lines=True)
        for row in report["predictions"][:show]:
            examples.add_row(row["prompt"], *([row["reference"]] if report["references"] else []), row["base"], row["adapter"])
        console.print(examples, markup=False)
    written = "eval.json and predictions.jsonl" if report["references"] else "predictions.jsonl"
    console.print(f"wrote {written} in {run_dir}", highlight=False)


def print_sweep(result: Any, retry_failed: bool = False) -> None:
    """The runs of a sweep: planned actions for a dry run, else status, metric and the best run."""
    spec = result.spec
    title = f"sweep {spec.name}: {len(result.runs)} runs in {result.sweep_dir}"
    if result.dry_run:
        table = Table("#", title=f"{title} (dry run: nothing is trained)")
        for column in ("run", "values", "would"):
            table.add_column(column, overflow="fold")
        for i, outcome in enumerate(result.runs, 1):
            would = {"skipped": "skip (finished)", "failed": "retry" if retry_failed else f"skip (failed: {outcome.reason})",
                     "resume": "resume from its last checkpoint"}.get(outcome.action, outcome.action)
            table.add_row(str(i), outcome.run.name, "\n".join(outcome.run.overrides), would)
        console.print(table, markup=False)
        return
    table = Table(title=title)
    for column in ("run", "status", "this time", spec.metric, "reason"):
        table.add_column(column, overflow="fold")
    for outcome in result.runs:
        best = " (best)" if outcome.run.name == result.best else ""
        table.add_row(outcome.run.name + best, outcome.status, outcome.action, _fmt(outcome.metric(spec.metric)),
                      outcome.reason or "", style="bold green" if best else ("red" if outcome.status == "failed" else None))
    console.print(table, markup=False)
    if result.best:
        console.print(f"best run by {spec.metric}: {result.best}", highlight=False)
    console.print(f"wrote {', '.join(p.name for p in result.files.values())} in {result.sweep_dir}", highlight=False)


def print_tune(result: Any) -> None:
    """The range test's suggestion, then every trial, the best one and the files written."""
    from loralab.tune.report import label

    test = result.range_test
    if test is not None:
        console.print(f"range test ({test.stopped}): {test.suggestion.describe()}; plot: "
                      f"{result.output / 'lr_find.png'}", highlight=False, markup=False)
    if not result.trials:
        if result.stopped:
            console.print(f"stopped: {result.stopped}", highlight=False, markup=False)
        return
    keys = list(result.space.params) if result.space else []
    table = Table("trial", title=f"tune {result.output}: {len(result.trials)} trials ({result.started} this run)")
    for column in ("state", *(label(k) for k in keys), result.spec.metric, "steps", "time"):
        table.add_column(column, overflow="fold")
    best = result.best.number if result.best else None
    for record in result.trials:
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (record.values.get(k, "-") for k in keys)]
        state = record.state + (f" at {record.pruned_step}" if record.pruned_step is not None else "")
        table.add_row(f"{record.number}{' (best)' if record.number == best else ''}", state, *values,
                      _fmt(record.value), str(record.steps if record.steps is not None else "-"),
                      f"{record.time_s:.1f} s" if record.time_s is not None else "-",
                      style="bold green" if record.number == best else None)
    console.print(table, markup=False)
    console.print(f"stopped: {result.stopped}", highlight=False, markup=False)
    if result.best is not None:
        console.print(f"best: trial {result.best.number} ({result.spec.metric} {result.best.value:.4g}); train it with: "
                      f"loralab train {result.output / 'best.yaml'}", highlight=False, markup=False)
    if result.best_run is not None:
        console.print(f"trained the best config: {result.best_run.get('run')}", highlight=False, markup=False)
    console.print(f"wrote {', '.join(p.name for p in result.files.values())} in {result.output}", highlight=False,
                  markup=False)


STATUS_STYLES = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}


def print_checks(report: Any) -> None:
    """The checks as a table (check, status, reason) and a one-line verdict."""
    from rich.text import Text

    table = Table(title=f"loralab check ({report.seconds:.1f} s)")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for result in report.results:
        table.add_row(result.name, Text(result.status, style=STATUS_STYLES[result.status]), Text(result.reason))
    console.print(table)
    warnings = len(report.warnings)
    verdict = (f"{len(report.failed)} failed" if report.failed else "nothing failed") + f", {warnings} warning{'s' * (warnings != 1)}"
    console.print(Text(verdict, style="bold red" if report.failed else "bold green"))
