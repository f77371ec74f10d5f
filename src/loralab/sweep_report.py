"""A sweep's reports: comparison.csv / .md, curves.png, answers.md and one self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.metrics import HIGHER_IS_BETTER
from loralab.runs import read_metrics, write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from loralab.sweeps import RunOutcome, SweepResult

GEN_METRICS: tuple[str, ...] = ("exact_match", "rouge_l", "chrf", "bleu")
BASE_NAME = "base model"


def best_run(outcomes: list[RunOutcome], metric: str) -> str | None:
    """The finished run with the best value of ``metric`` (the first one on a tie)."""
    scored = [(o.metric(metric), i, o.run.name) for i, o in enumerate(outcomes) if o.status == "done"]
    scored = [(value, i, name) for value, i, name in scored if value is not None]
    if not scored:
        return None
    sign = -1 if HIGHER_IS_BETTER[metric] else 1
    return min(scored, key=lambda item: (sign * item[0], item[1]))[2]


# ---------------------------------------------------------------- rows


def comparison_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per run: varied values, status, size, time, losses, adapter and base metrics."""
    rows = []
    for outcome in result.runs:
        summary, evaluation = outcome.summary, outcome.evaluation
        adapter, base = evaluation.get("adapter") or {}, evaluation.get("base") or {}
        row: dict[str, Any] = {"run": outcome.run.name, "status": outcome.status}
        row.update(outcome.run.values)
        row.update({
            "trainable_params": summary.get("trainable_params"),
            "trainable_percent": summary.get("trainable_percent"),
            "train_time_s": summary.get("train_time_s"),
            "steps": summary.get("steps"),
            "final_train_loss": summary.get("final_train_loss"),
            "final_eval_loss": summary.get("final_eval_loss"),
            "best_eval_loss": summary.get("best_eval_loss"),
            **{name: adapter.get(name) for name in GEN_METRICS},
            "eval_n": adapter.get("n"),
            "base_eval_loss": summary.get("base_eval_loss"),
            **{f"base_{name}": base.get(name) for name in GEN_METRICS},
            "best": "yes" if outcome.run.name == result.best else "",
            "reason": outcome.reason or "",
        })
        rows.append(row)
    return rows


def base_row(result: SweepResult) -> dict[str, Any] | None:
    """The base model's eval loss and metrics (shared by every run: same model, same data)."""
    for outcome in result.runs:
        if outcome.status == "done" and outcome.evaluation.get("base"):
            base = outcome.evaluation["base"]
            return {"eval_loss": outcome.summary.get("base_eval_loss"), **{m: base.get(m) for m in GEN_METRICS}}
    return None


def _csv_value(value: Any) -> Any:
    from loralab.sweeps import display_value

    if value is None:
        return ""
    return display_value(value) if isinstance(value, list) else value


def render_csv(result: SweepResult) -> str:
    rows = comparison_rows(result)
    handle = io.StringIO()
    fields = list(rows[0]) if rows else ["run", "status"]
    writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return handle.getvalue()


# ---------------------------------------------------------------- human-readable cells


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _metric_cells(source: dict[str, Any]) -> list[str]:
    return [_num(source.get("exact_match"), 3), _num(source.get("rouge_l"), 3), _num(source.get("chrf"), 1),
            _num(source.get("bleu"), 1)]


def table(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the human comparison table: the base model first, then every run."""
    from loralab.sweeps import display_value

    keys = list(result.spec.grid)
    header = ["run", *keys, "status", "trainable params", "train time", "train loss", "eval loss (final / best)",
              "exact match", "ROUGE-L", "chrF", "BLEU"]
    cells: list[list[str]] = []
    base = base_row(result)
    if base:
        cells.append([BASE_NAME, *("" for _ in keys), "-", "0", "-", "-", _num(base["eval_loss"], 4), *_metric_cells(base)])
    for outcome in result.runs:
        s = outcome.summary
        name = outcome.run.name + (" ★ best" if outcome.run.name == result.best else "")
        status = outcome.status if outcome.status != "failed" else f"failed: {_short(outcome.reason or '')}"
        params = f"{s['trainable_params']:,} ({s['trainable_percent']:.3f}%)" if "trainable_params" in s else "-"
        cells.append([name, *(display_value(outcome.run.values[k]) for k in keys), status, params,
                      f"{s['train_time_s']:.1f} s" if "train_time_s" in s else "-", _num(s.get("final_train_loss"), 4),
                      f"{_num(s.get('final_eval_loss'), 4)} / {_num(s.get('best_eval_loss'), 4)}",
                      *_metric_cells(outcome.evaluation.get("adapter") or {})])
    return header, cells


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def _best_line(result: SweepResult) -> str:
    metric = result.spec.metric
    if result.best is None:
        return f"No finished run has a value for {metric} yet."
    outcome = next(o for o in result.runs if o.run.name == result.best)
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    return f"Best run by {metric} ({direction} is better): {result.best} ({metric} = {outcome.metric(metric):.4g})"


def _counts(result: SweepResult) -> str:
    counts = {status: sum(o.status == status for o in result.runs) for status in ("done", "failed", "pending")}
    return f"{len(result.runs)} runs: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending"


def render_markdown(result: SweepResult) -> str:
    header, cells = table(result)
    lines = [f"# Sweep {result.spec.name}", "", f"{_counts(result)}. **{_best_line(result)}**", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in cells]
    failed = [o for o in result.runs if o.status == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- **{o.run.name}**: {_md_cell(o.reason or 'unknown')}" for o in failed]
    lines += ["", "eval loss: the base model's at step 0; for runs the last evaluation and the best one "
              "(the adapter is the best checkpoint). Generation metrics: exact match and ROUGE-L in 0..1, "
              "chrF and BLEU in 0..100, on the eval split.", "",
              "Curves: [curves.png](curves.png). Answers: [answers.md](answers.md). Everything: [report.html](report.html).", ""]
    return "\n".join(lines)


def answer_columns(result: SweepResult, answers: dict[str, list[dict[str, str]]]) -> list[str]:
    """Column names of the side-by-side answers: the base model, then every run with answers."""
    return [BASE_NAME] + [o.run.name for o in result.runs if o.run.name in answers]


def answer_grid(result: SweepResult, prompts: list[str], answers: dict[str, list[dict[str, str]]]) -> list[list[str]]:
    """For each prompt: the base model's answer, then each run's adapter answer."""
    runs = answer_columns(result, answers)[1:]
    first = answers[runs[0]] if runs else []
    grid = []
    for i, _ in enumerate(prompts):
        base = first[i]["base"] if i < len(first) else "-"
        grid.append([base] + [answers[name][i]["adapter"] if i < len(answers[name]) else "-" for name in runs])
    return grid


def render_answers_markdown(result: SweepResult, prompts: list[str], answers: dict[str, list[dict[str, str]]]) -> str:
    lines = [f"# Sweep {result.spec.name}: answers", ""]
    if not answers:
        return "\n".join(lines + ["No finished run has answers yet.", ""])
    columns = answer_columns(result, answers)
    for i, (prompt, row) in enumerate(zip(prompts, answer_grid(result, prompts, answers)), 1):
        lines += [f"## Prompt {i}", "", "> " + "\n> ".join(prompt.splitlines() or [""]), "",
                  "| model | answer |", "|---|---|"]
        lines += [f"| {_md_cell(name)} | {_md_cell(answer)} |" for name, answer in zip(columns, row)]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- curves


def _series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(step, value) points of one logged key, the last value kept where a resumed run logged a step twice."""
    points: dict[int, float] = {}
    for record in read_metrics(run_dir):
        value = record.get(key)
        if isinstance(value, (int, float)) and "step" in record:
            points[int(record["step"])] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def render_curves_png(result: SweepResult) -> bytes:
    """Eval loss (left) and train loss (right) against the step, one colour per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    eval_ax, train_ax = figure.subplots(1, 2)
    plotted = False
    for outcome in result.runs:
        style = {"linestyle": ":" if outcome.status == "failed" else "-", "label": outcome.run.name}
        steps, values = _series(outcome.run.run_dir, "eval_loss")
        if steps:
            eval_ax.plot(steps, values, marker="o", markersize=3, **style)
            plotted = True
        steps, values = _series(outcome.run.run_dir, "loss")
        if steps:
            train_ax.plot(steps, values, **style)
            plotted = True
    for ax, title in ((eval_ax, "eval loss (step 0: base model)"), (train_ax, "train loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if plotted:
        handles, labels = eval_ax.get_legend_handles_labels()
        if not handles:
            handles, labels = train_ax.get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize="small")
    else:
        eval_ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=eval_ax.transAxes)
    figure.suptitle(f"sweep {result.spec.name}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------- html

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1400px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.best td { background: #e8f6e8; font-weight: 600; } tr.base td { background: #f7f7fb; }
tr.failed td { color: #a00; } td.answer { white-space: pre-wrap; max-width: 28rem; }
.note { color: #555; font-size: .9rem; } img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; }
"""


def _html_table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
                cell_class: str = "") -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        td = f'<td class="{cell_class}">' if cell_class else "<td>"
        cells = "".join(f"{td if j else '<td>'}{esc(str(c))}</td>" for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(result: SweepResult, png: bytes, prompts: list[str], answers: dict[str, list[dict[str, str]]]) -> str:
    esc = html.escape
    header, cells = table(result)
    has_base = bool(cells) and cells[0][0] == BASE_NAME
    classes = (["base"] if has_base else []) + [
        "best" if o.run.name == result.best else ("failed" if o.status == "failed" else "") for o in result.runs]
    parts = [f"<h1>Sweep {esc(result.spec.name)}</h1>",
             f"<p class=note>{esc(_counts(result))}; generated {esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
             f"<p><strong>{esc(_best_line(result))}</strong></p>",
             "<h2>Comparison</h2>", _html_table(header, cells, classes),
             "<p class=note>eval loss: the base model's at step 0; for runs the last evaluation and the best one (the "
             "adapter is the best checkpoint). Exact match and ROUGE-L in 0..1, chrF and BLEU in 0..100.</p>"]
    failed = [o for o in result.runs if o.status == "failed"]
    if failed:
        parts += ["<h2>Failed runs</h2><ul>"] + [f"<li><strong>{esc(o.run.name)}</strong>: {esc(o.reason or 'unknown')}</li>"
                                                  for o in failed] + ["</ul>"]
    parts += ["<h2>Loss curves</h2>",
              f'<img alt="eval and train loss curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">']
    parts.append("<h2>Answers</h2>")
    if answers:
        grid = answer_grid(result, prompts, answers)
        rows = [[prompt, *row] for prompt, row in zip(prompts, grid)]
        parts.append(_html_table(["prompt", *answer_columns(result, answers)], rows, cell_class="answer"))
    else:
        parts.append("<p class=note>No finished run has answers yet.</p>")
    parts += ["<h2>Sweep spec</h2>", f"<pre>{esc(result.spec.to_yaml())}</pre>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Sweep {esc(result.spec.name)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------- all of it


def write_all(result: SweepResult, prompts: list[str], answers: dict[str, list[dict[str, str]]]) -> dict[str, Path]:
    """Write every report into the sweep folder (each atomically); returns their paths by kind."""
    folder = result.sweep_dir
    files = {kind: folder / name for kind, name in (("csv", "comparison.csv"), ("markdown", "comparison.md"),
                                                    ("png", "curves.png"), ("answers", "answers.md"), ("html", "report.html"))}
    write_text_atomic(files["csv"], render_csv(result))
    write_text_atomic(files["markdown"], render_markdown(result))
    png = render_curves_png(result)
    write_bytes_atomic(files["png"], png)
    write_text_atomic(files["answers"], render_answers_markdown(result, prompts, answers))
    write_text_atomic(files["html"], render_html(result, png, prompts, answers))
    return files
