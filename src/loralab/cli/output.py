"""What the ``loralab`` commands print: summaries, score tables, sweep and tune results, check reports (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
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


def head_metrics_table(report: dict[str, Any], labels: dict[str, str], title: str) -> Table:
    """A classifier's or tagger's scores (0-1): base head, trained head and the change, one row per metric."""
    table = Table("metric", "base head", "trained head", "change", title=title)
    for name, label in labels.items():
        base, adapter = report["base"][name], report["adapter"][name]
        table.add_row(label, f"{base:.3f}", f"{adapter:.3f}", f"{adapter - base:+.3f}")
    return table


def print_classifier_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    """A SEQ_CLS run: accuracy and macro-F1 of the base head vs the trained head, then a few predicted labels."""
    title = f"{run_dir}: {report['n']} examples ({report['data']}), checkpoint {report['checkpoint']}"
    if report["references"]:
        console.print(head_metrics_table(report, CLASSIFIER_METRIC_LABELS, title))
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
    console.print(f"wrote {_written(report)} in {run_dir}", highlight=False)


def _written(report: dict[str, Any]) -> str:
    """The files an evaluation wrote (the test split's are eval_test.json / predictions_test.jsonl)."""
    report_file, predictions = (("eval_test.json", "predictions_test.jsonl") if report.get("split") == "test"
                                else ("eval.json", "predictions.jsonl"))
    return f"{report_file} and {predictions}" if report["references"] else predictions


def print_eval(report: dict[str, Any], run_dir: Path, show: int) -> None:
    """The base vs adapter scores side by side, then a few example answers."""
    if report.get("task_type") == "SEQ_CLS":
        return print_classifier_eval(report, run_dir, show)
    if report.get("task_type") == "TOKEN_CLS":
        from loralab.tasks.token_eval import print_token_eval

        return print_token_eval(report, run_dir, show)
    if report.get("task_type") == "QUESTION_ANSWERING":
        from loralab.tasks.qa_eval import print_qa_eval

        return print_qa_eval(report, run_dir, show)
    if report.get("task_type") == "FEATURE_EXTRACTION":
        from loralab.tasks.retrieval import print_embedding_eval

        return print_embedding_eval(report, run_dir, show)
    title = f"{run_dir}: {report['n']} examples ({report['data']}), checkpoint {report['checkpoint']}"
    if report.get("turns"):
        title += f"; {report['turns']}"
    if report["references"]:
        table = Table("metric", "base", "adapter", "change", title=title)
        for name, label in METRIC_LABELS.items():
            base, adapter = report["base"][name], report["adapter"][name]
            digits = 3 if name in ("exact_match", "rouge_l") else 1
            table.add_row(label, f"{base:.{digits}f}", f"{adapter:.{digits}f}", f"{adapter - base:+.{digits}f}")
        console.print(table)
    else:
        console.print(f"{title}\n[yellow]no reference answers in {report['data']}: answers only, no scores[/]")
    if report.get("general_text"):
        print_general_text(report["general_text"])
    if show:
        examples = Table("prompt", *(["reference"] if report["references"] else []), "base", "adapter",
                         title=f"first {min(show, report['n'])} answers", show_lines=True)
        for row in report["predictions"][:show]:
            examples.add_row(row["prompt"], *([row["reference"]] if report["references"] else []), row["base"], row["adapter"])
        console.print(examples, markup=False)
    console.print(f"wrote {_written(report)} in {run_dir}", highlight=False)


def print_general_text(change: dict[str, Any]) -> None:
    """Perplexity on general text, base vs adapter, overall and per language (what the adapter cost elsewhere)."""
    table = Table("general text", "texts", "tokens", "base perplexity", "adapter perplexity", "change",
                  title=f"what the adapter cost elsewhere: perplexity on {escape(change['file'])} (lower is better)")
    for name, row in [("all", change), *change["languages"].items()]:
        table.add_row(escape(name), str(row["texts"]), str(row["tokens"]), _ppl(row['base_perplexity']),
                      _ppl(row['adapter_perplexity']), f"{row['change_percent']:+.1f}%")
    console.print(table)


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
        best = " (best)" if outcome.run.cell == result.best else ""
        table.add_row(outcome.run.name + best, outcome.status, outcome.action, _fmt(outcome.metric(spec.metric)),
                      outcome.reason or "", style="bold green" if best else ("red" if outcome.status == "failed" else None))
    console.print(table, markup=False)
    if result.best:
        over = f"cell by mean {spec.metric} over seeds {', '.join(map(str, spec.seeds))}" if spec.seeds else f"run by {spec.metric}"
        console.print(f"best {over}: {result.best}", highlight=False)
    console.print(f"wrote {', '.join(p.name for p in result.files.values())} in {result.sweep_dir}", highlight=False)


def print_tune(result: Any) -> None:
    """The range test's suggestion, then every trial, the best one and the files written."""
    from loralab.tune.report import held_out_sections, label

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
    for title, header, rows, notes in held_out_sections(result):
        held_out = Table(*header, title=title)
        for row in rows:
            held_out.add_row(*row)
        console.print(held_out, markup=False)
        console.print(" ".join(notes), highlight=False, markup=False)
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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_export(report: dict[str, Any] | None, path: Path) -> None:
    """What ``loralab export`` checked (max |logit difference|, greedy answers) and the files it wrote, with sizes."""
    from rich.text import Text

    if report is None or "loads_with" in report:  # a classifier, tagger, reader or encoder: its own outputs check
        check = "" if report is None else (f"; its outputs on {report['probes']} probe inputs differ from base + "
                                           f"adapter by at most {report['max_abs_diff_merged_vs_adapter']:.3g}")
        loads = "AutoModel...from_pretrained" if report is None else report["loads_with"]
        console.print(f"merged model written to {path}{check}; loads with {loads} (no peft needed)", markup=False,
                      highlight=False)
        return
    what = report.get("quant") if report.get("format") == "gguf" else report.get("dtype")
    table = Table(title=f"export {report['source']} -> {path} ({what})")
    for column in ("check", "compared", "max |logit diff|", "tolerance", "greedy answers equal", "verdict"):
        table.add_column(column, overflow="fold")
    for check in report["checks"]:
        verdict = {True: Text("pass", style="bold green"), False: Text("FAIL", style="bold red"),
                   None: Text("reported")}[check["passed"]]
        table.add_row(check["name"], f"{check['candidate']} vs {check['reference']}",
                      f"{check['max_abs_logit_diff']:.3g}", "-" if check["tolerance"] is None else f"{check['tolerance']:.3g}",
                      f"{check['greedy_agree']}/{check['n']}" + (f" ({check['near_ties']} parted at a near tie)"
                                                                  if check.get("near_ties") else ""), verdict)
    console.print(table)
    prompts = report.get("prompts", {})
    console.print(f"prompts: {prompts.get('n')} from the {prompts.get('source')}, up to {prompts.get('max_new_tokens')} "
                  f"greedy tokens each; merged into {report['merged_into']}", markup=False, highlight=False)
    llama = report.get("llama_cpp")
    if llama and not llama.get("checked"):
        console.print(f"llama.cpp check skipped: {llama.get('reason')}", markup=False, highlight=False, style="yellow")
    elif llama and llama.get("tokenization"):
        tok = llama["tokenization"]
        console.print(f"llama.cpp tokenizes {tok['equal']}/{tok['texts']} texts (prompts, CJK) exactly like the "
                      "model's tokenizer", markup=False, highlight=False)
    folder = path if path.is_dir() else path.parent
    files = Table("file", "size", title=f"written in {folder}")
    for name, size in report.get("files", {}).items():
        files.add_row(name, _size(size))
    console.print(files, markup=False)
    if report.get("format") == "gguf":
        modelfile = path.with_name(path.name[: -len(".gguf")] + ".Modelfile")
        console.print(f"Ollama: ollama create NAME -f {modelfile}    llama.cpp: llama-cli -m {path}", markup=False,
                      highlight=False)
    else:
        console.print("loads with AutoModelForCausalLM.from_pretrained (no peft needed)", markup=False, highlight=False)


def tensor_progress() -> Any:
    """A context giving an ``on_tensor(done, total)`` callback that drives a progress bar on stderr."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    @contextlib.contextmanager
    def bar() -> Any:
        progress = Progress(TextColumn("writing tensors"), BarColumn(), MofNCompleteColumn(), console=err_console,
                            transient=True)
        task = progress.add_task("tensors", total=None)
        with progress:
            yield lambda done, total: progress.update(task, completed=done, total=total)

    return bar()


def _ppl(value: float | None) -> str:
    """A perplexity for the table (None: exp() of the mean NLL overflowed, as for an untrained model)."""
    return "overflow" if value is None else f"{value:.2f}"
