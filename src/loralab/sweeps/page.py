"""A sweep's pictures and page: curves.png (with seeds: each cell's mean curve with a ± sd band) and one
self-contained report.html; :func:`write_all` writes every report file."""

from __future__ import annotations

import base64
import html
import io
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.runs import read_metrics, write_bytes_atomic, write_text_atomic
from loralab.sweeps.cells import gap_line
from loralab.sweeps.report import (BASE_NAME, SEED_NOTE, answer_columns, answer_grid, best_line, cell_table, counts_line,
                                   notes, render_answers_markdown, render_csv, render_markdown, render_runs_csv, table)

if TYPE_CHECKING:
    from loralab.sweeps.execute import SweepResult


# ---------------------------------------------------------------- curves


def series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(step, value) points of one logged key, the last value kept where a resumed run logged a step twice."""
    points: dict[int, float] = {}
    for record in read_metrics(run_dir):
        value = record.get(key)
        if isinstance(value, (int, float)) and "step" in record:
            points[int(record["step"])] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def mean_series(run_dirs: list[Path], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every one of the runs, the mean value there and the sample sd (0 for a single run)."""
    per_run = [dict(zip(*series(run_dir, key))) for run_dir in run_dirs]
    per_run = [points for points in per_run if points]
    if not per_run:
        return [], [], []
    steps = sorted(set.intersection(*(set(points) for points in per_run)))
    means = [statistics.fmean(points[s] for points in per_run) for s in steps]
    sds = [statistics.stdev(points[s] for points in per_run) if len(per_run) > 1 else 0.0 for s in steps]
    return steps, means, sds


def render_curves_png(result: SweepResult) -> bytes:
    """Eval loss (left) and train loss (right) against the step: one colour per run, or with seeds one per cell
    (the mean over its finished seeds, shaded ± sd)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    eval_ax, train_ax = figure.subplots(1, 2)
    plotted = False
    if result.seeded:
        for cell in result.cells():
            dirs = [o.run.run_dir for o in cell.runs if o.status != "pending"]
            label = f"{cell.name} (n={len(cell.done)})"
            for ax, key, marker in ((eval_ax, "eval_loss", "o"), (train_ax, "loss", None)):
                steps, means, sds = mean_series(dirs, key)
                if steps:
                    line, = ax.plot(steps, means, marker=marker, markersize=3, label=label)
                    ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
                    plotted = True
    else:
        for outcome in result.runs:
            style = {"linestyle": ":" if outcome.status == "failed" else "-", "label": outcome.run.name}
            steps, values = series(outcome.run.run_dir, "eval_loss")
            if steps:
                eval_ax.plot(steps, values, marker="o", markersize=3, **style)
                plotted = True
            steps, values = series(outcome.run.run_dir, "loss")
            if steps:
                train_ax.plot(steps, values, **style)
                plotted = True
    suffix = " (mean ± sd over seeds)" if result.seeded else ""
    for ax, title in ((eval_ax, f"eval loss (step 0: base model){suffix}"), (train_ax, f"train loss{suffix}")):
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


def html_table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
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


def _classes(cells: list[list[str]], names: list[str], best: str | None, failed: set[str]) -> list[str]:
    has_base = bool(cells) and cells[0][0] == BASE_NAME
    return (["base"] if has_base else []) + ["best" if n == best else ("failed" if n in failed else "") for n in names]


def render_html(result: SweepResult, png: bytes, prompts: list[str], answers: dict[str, list[dict[str, str]]]) -> str:
    esc = html.escape
    parts = [f"<h1>Sweep {esc(result.spec.name)}</h1>",
             f"<p class=note>{esc(counts_line(result))}; generated {esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
             f"<p><strong>{esc(best_line(result))}</strong></p>"]
    header, cells = table(result)
    failed_runs = {o.run.name for o in result.runs if o.status == "failed"}
    if result.seeded:
        gap = gap_line(result.cells(), result.spec.metric)
        cell_header, cell_cells = cell_table(result)
        groups = result.cells()
        failed_cells = {c.name for c in groups if c.status() == "failed"}
        parts += ([f"<p>{esc(gap)}</p>"] if gap else []) + [
            "<h2>Comparison (mean ± sd over seeds)</h2>",
            html_table(cell_header, cell_cells, _classes(cell_cells, [c.name for c in groups], result.best, failed_cells)),
            f"<p class=note>{esc(SEED_NOTE)}</p>", "<h2>Runs</h2>",
            html_table(header, cells, _classes(cells, [o.run.name for o in result.runs], None, failed_runs))]
    else:
        parts += ["<h2>Comparison</h2>",
                  html_table(header, cells, _classes(cells, [o.run.name for o in result.runs], result.best, failed_runs))]
    parts.append(f"<p class=note>{esc(notes(result))}</p>")
    failed = [o for o in result.runs if o.status == "failed"]
    if failed:
        parts += ["<h2>Failed runs</h2><ul>"] + [f"<li><strong>{esc(o.run.name)}</strong>: {esc(o.reason or 'unknown')}</li>"
                                                  for o in failed] + ["</ul>"]
    parts += ["<h2>Loss curves</h2>",
              f'<img alt="eval and train loss curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">']
    parts.append("<h2>Answers</h2>")
    if answers:
        grid = answer_grid(result, prompts, answers, first_seed=result.seeded)
        rows = [[prompt, *row] for prompt, row in zip(prompts, grid)]
        if result.seeded:
            parts.append("<p class=note>The first finished seed of each cell; answers.md has every run's.</p>")
        parts.append(html_table(["prompt", *answer_columns(result, answers, first_seed=result.seeded)], rows,
                                cell_class="answer"))
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
    names = [("csv", "comparison.csv"), ("markdown", "comparison.md"), ("png", "curves.png"), ("answers", "answers.md"),
             ("html", "report.html")] + ([("runs_csv", "runs.csv")] if result.seeded else [])
    files = {kind: folder / name for kind, name in names}
    write_text_atomic(files["csv"], render_csv(result))
    if result.seeded:
        write_text_atomic(files["runs_csv"], render_runs_csv(result))
    write_text_atomic(files["markdown"], render_markdown(result))
    png = render_curves_png(result)
    write_bytes_atomic(files["png"], png)
    write_text_atomic(files["answers"], render_answers_markdown(result, prompts, answers))
    write_text_atomic(files["html"], render_html(result, png, prompts, answers))
    return files
