"""A tune's report: ``report.md`` and a self-contained ``report.html`` (the sweep report's style), ``trials.png``.

Every trial with its parameters, metric, time and pruned step; the base model's row; parameter importance
(Optuna's fANOVA with scikit-learn installed, else Optuna's default evaluator, PED-ANOVA); the range test's loss
against the learning rate and the trials' metric against the learning rate and against r.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.metrics import HIGHER_IS_BETTER
from loralab.runs import write_bytes_atomic, write_text_atomic
from loralab.tune.budget import format_duration

if TYPE_CHECKING:
    from loralab.tune.results import TuneResult
    from loralab.tune.study import TrialRecord

LABELS = {"train.learning_rate": "learning rate", "lora.r": "r", "lora.alpha_ratio": "alpha / r", "lora.alpha": "alpha",
          "lora.dropout": "dropout", "lora.coverage": "coverage", "lora.target_modules": "target modules",
          "train.epochs": "epochs", "train.max_steps": "max steps"}
BASE_NAME = "base model"


def label(key: str) -> str:
    return LABELS.get(key, key)


def param_importances(study: Any) -> tuple[dict[str, float], str]:
    """Importance of each parameter for the metric over the complete trials, and how it was computed (or why not)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, f"needs at least 2 complete trials ({len(complete)} so far)"
    try:
        import sklearn  # noqa: F401 - fANOVA's random forest

        evaluator, method = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        evaluator, method = None, "PED-ANOVA, Optuna's default evaluator (fANOVA needs scikit-learn: pip install scikit-learn)"
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), method
    except Exception as exc:  # noqa: BLE001 - too few distinct values, a single point, ...
        return {}, f"not computed ({method}): {exc}"


def base_values(result: TuneResult, study: Any) -> dict[str, float | None]:
    """The base model's eval loss at step 0 and its value of the metric (trials' step-0 evaluation, else the
    range test's measurement)."""
    values: dict[str, float | None] = {"eval_loss": None, "metric": None}
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if values["eval_loss"] is None and isinstance(attrs.get("base_eval_loss"), (int, float)):
            values["eval_loss"] = attrs["base_eval_loss"]
        if values["metric"] is None and isinstance(attrs.get("base_metric"), (int, float)):
            values["metric"] = attrs["base_metric"]
    test = result.range_test
    if test is not None:
        if values["eval_loss"] is None:
            values["eval_loss"] = test.base_eval_loss
        if values["metric"] is None:
            values["metric"] = test.base_metrics.get(result.spec.metric_key)
    if result.spec.metric == "eval_loss":
        values["metric"] = values["eval_loss"]
    return values


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


def _value(key: str, value: Any) -> str:
    from loralab.sweeps import display_value

    if value is None:
        return "-"
    if key == "train.learning_rate" and isinstance(value, (int, float)):
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return display_value(value)


def trial_table(result: TuneResult, study: Any) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, cells and row classes (base, best, pruned, failed) of the trials table: the base model first."""
    spec = result.spec
    keys = list(result.space.params) if result.space else sorted({k for r in result.trials for k in r.values})
    header = ["trial", "state", *(label(k) for k in keys), spec.metric, "best eval loss", "steps", "pruned at",
              "time", "note"]
    base = base_values(result, study)
    cells = [[BASE_NAME, "-", *("" for _ in keys), _num(base["metric"]), _num(base["eval_loss"]), "0", "", "", ""]]
    classes = ["base"]
    best = result.best.number if result.best else None
    for record in result.trials:
        steps = "-" if record.steps is None else str(record.steps)
        if record.planned_steps is not None:
            steps = f"{steps} / {record.planned_steps}"
        name = f"{record.number}" + (" ★ best" if record.number == best else "")
        cells.append([name, record.state, *(_value(k, record.values.get(k)) for k in keys), _num(record.value),
                      _num(record.best_eval_loss), steps, "" if record.pruned_step is None else str(record.pruned_step),
                      format_duration(record.time_s) if record.time_s is not None else "-", _short(record.reason or "")])
        classes.append("best" if record.number == best else
                       ("failed" if record.state in ("failed", "interrupted", "not started") else
                        ("pruned" if record.state == "pruned" else "")))
    return header, cells, classes


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _counts(records: list[TrialRecord]) -> str:
    states = ["complete", "pruned", "failed", "interrupted", "not started", "running", "queued"]
    parts = [f"{sum(r.state == s for r in records)} {s}" for s in states if any(r.state == s for r in records)]
    return f"{len(records)} trials" + (f": {', '.join(parts)}" if parts else "")


def _best_line(result: TuneResult) -> str:
    metric = result.spec.metric
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    if result.best is None:
        return f"No complete trial yet ({metric}, {direction} is better)."
    return (f"Best: trial {result.best.number}, {metric} = {result.best.value:.4g} ({direction} is better); "
            f"its config is best.yaml: loralab train {result.output / 'best.yaml'}")


def _space_lines(result: TuneResult) -> list[str]:
    if result.space is None:
        return []
    lines = [f"- **{label(name)}** (`{name}`): {param.describe()}" + (f" (from the {param.source})"
                                                                      if param.source != "default" else "")
             for name, param in result.space.params.items()]
    if "lora.coverage" in result.space.params:
        from loralab.sweeps import display_value

        lines.append("- coverage means: " + "; ".join(f"{name} = {display_value(t) if t is not None else 'the preset'}"
                                                       for name, t in result.space.coverages.items()))
    lines.append(f"- every trial evaluates every {result.space.eval_steps} steps (the shortest has "
                 f"{result.space.min_steps} steps, the longest {result.space.max_steps}); pruner: {result.spec.pruner}")
    lines += [f"- note: {note}" for note in result.space.notes]
    return lines


def _range_test_line(result: TuneResult) -> str:
    test = result.range_test
    if test is None:
        return "No range test."
    return (f"{len(test.lrs)} of {test.steps} steps from {test.lr_min:.0e} to {test.lr_max:.0e} ({test.stopped}): "
            f"{test.suggestion.describe()}. Measured {test.step_s:.3g} s per step, {test.eval_s:.3g} s per evaluation, "
            f"{test.setup_s:.3g} s to load.")


def render_markdown(result: TuneResult, study: Any, importances: tuple[dict[str, float], str]) -> str:
    header, cells, _ = trial_table(result, study)
    cell = lambda text: " ".join(str(text).split()).replace("|", "\\|") or " "  # noqa: E731
    lines = [f"# Tune {result.output.name}", "", f"{_counts(result.trials)}. **{_best_line(result)}**", "",
             "## Learning-rate range test", "", _range_test_line(result), "", "![loss against learning rate](lr_find.png)",
             "", "## Trials", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in cells]
    lines += ["", f"{result.spec.metric}: the best evaluation of each trial (the checkpoint it keeps); a pruned trial "
              "shows its last reported value. The base model's row is its evaluation at step 0.", "",
              "![metric against learning rate and r](trials.png)", "", "## Parameter importance", ""]
    values, method = importances
    if values:
        lines += [f"By {method}, over the complete trials:", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {label(k)} | {v:.3f} |" for k, v in values.items()]
    else:
        lines.append(f"Not available: {method}.")
    lines += ["", "## Search space", "", *_space_lines(result), ""]
    if result.stopped:
        lines += [f"Stopped: {result.stopped}.", ""]
    for title, header, rows, notes in held_out_sections(result):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        lines += ["", *(f"{note} " for note in notes), ""]
    return "\n".join(lines)


def held_out_sections(result: TuneResult) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, header, rows, notes) of the best trial on the test split and of the final comparison, when there."""
    from loralab.tune.final import best_test_table, final_table

    sections = []
    if result.best_test and result.best is not None:
        header, rows = best_test_table(result.best_test)
        sections.append((f"Held-out test split: trial {result.best.number}", header, rows,
                         ["The search never saw these examples: not in training, the checkpoint choice or the ranking."]))
    if result.final is not None:
        sections.append(("Final comparison", *final_table(result.final, result.spec.metric)))
    return sections


def render_trials_png(result: TuneResult) -> bytes:
    """The metric of every complete / pruned trial against the learning rate and against r (the best starred)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), dpi=100, layout="constrained")
    lr_ax, r_ax = figure.subplots(1, 2)
    best = result.best.number if result.best else None
    plotted = False
    for record in result.trials:
        if record.value is None:
            continue
        style = {"complete": dict(marker="o", color="#1f77b4"), "pruned": dict(marker="x", color="#999999")}.get(
            record.state, dict(marker=".", color="#d62728"))
        if record.number == best:
            style = dict(marker="*", color="#2ca02c", s=160)
        for ax, key in ((lr_ax, "train.learning_rate"), (r_ax, "lora.r")):
            value = record.values.get(key)
            if isinstance(value, (int, float)):
                ax.scatter([value], [record.value], **style)
                plotted = True
    metric = result.spec.metric
    for ax, key, log in ((lr_ax, "train.learning_rate", True), (r_ax, "lora.r", True)):
        ax.set_xlabel(label(key))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if plotted and ax.collections:
            ax.set_xscale("log", base=10 if key == "train.learning_rate" else 2)
    ranks = sorted({r.values.get("lora.r") for r in result.trials if r.value is not None
                    and isinstance(r.values.get("lora.r"), int)})
    if ranks:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        r_ax.set_xticks(ranks)
        r_ax.xaxis.set_major_formatter(ScalarFormatter())
        r_ax.xaxis.set_minor_formatter(NullFormatter())
    lr_ax.set_title(f"{metric} against learning rate")
    r_ax.set_title(f"{metric} against r")
    if not plotted:
        lr_ax.text(0.5, 0.5, "no trial has a value yet", ha="center", va="center", transform=lr_ax.transAxes)
    figure.suptitle(f"tune {result.output.name}: complete (o), pruned (x, last value), best (*)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(result: TuneResult, study: Any, importances: tuple[dict[str, float], str], trials_png: bytes) -> str:
    from loralab.sweeps.page import CSS, html_table as _html_table

    esc = html.escape
    header, cells, classes = trial_table(result, study)
    lr_png = result.output / "lr_find.png"

    def image(data: bytes, alt: str) -> str:
        return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    parts = [f"<h1>Tune {esc(result.output.name)}</h1>",
             f"<p class=note>{esc(_counts(result.trials))}; generated {esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
             f"<p><strong>{esc(_best_line(result))}</strong></p>",
             "<h2>Learning-rate range test</h2>", f"<p>{esc(_range_test_line(result))}</p>"]
    if lr_png.is_file():
        parts.append(image(lr_png.read_bytes(), "loss against learning rate"))
    parts += ["<h2>Trials</h2>", _html_table(header, cells, classes),
              f"<p class=note>{esc(result.spec.metric)}: the best evaluation of each trial (the checkpoint it keeps); a "
              "pruned trial shows its last reported value. The base model's row is its evaluation at step 0.</p>",
              image(trials_png, "metric against learning rate and r"), "<h2>Parameter importance</h2>"]
    values, method = importances
    if values:
        parts += [f"<p>By {esc(method)}, over the complete trials:</p>",
                  _html_table(["parameter", "importance"], [[label(k), f"{v:.3f}"] for k, v in values.items()])]
    else:
        parts.append(f"<p class=note>Not available: {esc(method)}.</p>")
    parts += ["<h2>Search space</h2><ul>"] + [f"<li>{esc(line[2:].replace('**', '').replace('`', ''))}</li>"
                                              for line in _space_lines(result)] + ["</ul>"]
    if result.stopped:
        parts.append(f"<p class=note>Stopped: {esc(result.stopped)}.</p>")
    for title, header, rows, notes in held_out_sections(result):
        parts += [f"<h2>{esc(title)}</h2>", _html_table(header, rows), f"<p class=note>{esc(' '.join(notes))}</p>"]
    style = CSS + "tr.pruned td { color: #777; }\n"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Tune {esc(result.output.name)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(result: TuneResult, study: Any) -> dict[str, Path]:
    """Write report.md, report.html and trials.png into the tune folder (each atomically)."""
    folder = result.output
    files = {"markdown": folder / "report.md", "html": folder / "report.html", "plot": folder / "trials.png"}
    importances = param_importances(study)
    png = render_trials_png(result)
    write_bytes_atomic(files["plot"], png)
    write_text_atomic(files["markdown"], render_markdown(result, study, importances))
    write_text_atomic(files["html"], render_html(result, study, importances, png))
    if (folder / "lr_find.png").is_file():
        files["range_test"] = folder / "lr_find.png"
    return files
