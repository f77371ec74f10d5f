"""A sweep's tables: comparison.csv / .md (with seeds: one row per cell, mean ± sd and n over its seeds, and
runs.csv with every run), and answers.md. curves.png and report.html are in :mod:`loralab.sweeps.page`."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from loralab.metrics import HIGHER_IS_BETTER
from loralab.sweeps.cells import (AGGREGATED, GEN_METRICS, GENERAL_METRICS, TEST_METRICS, base_values, gap_line,
                                  general_change, has_general, has_test)
from loralab.sweeps.grid import display_value

if TYPE_CHECKING:
    from loralab.sweeps.execute import SweepResult

BASE_NAME = "base model"


# ---------------------------------------------------------------- rows


def comparison_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per run: varied values (and seed), status, size, time, losses, adapter and base metrics."""
    rows = []
    tested, general = has_test(result.runs), has_general(result.runs)
    for outcome in result.runs:
        summary, evaluation = outcome.summary, outcome.evaluation
        adapter, base = evaluation.get("adapter") or {}, evaluation.get("base") or {}
        row: dict[str, Any] = {"run": outcome.run.name, "status": outcome.status}
        if result.seeded:
            row.update({"cell": outcome.run.cell, "seed": outcome.run.seed})
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
        })
        if tested:
            test_adapter, test_base = outcome.test.get("adapter") or {}, outcome.test.get("base") or {}
            row.update({**{f"test_{name}": test_adapter.get(name) for name in GEN_METRICS}, "test_n": test_adapter.get("n"),
                        **{f"base_test_{name}": test_base.get(name) for name in GEN_METRICS}})
        if general:
            row.update({key: general_change(outcome, key) for key in GENERAL_METRICS})
        row["reason"] = outcome.reason or ""
        if not result.seeded:
            row["best"] = "yes" if outcome.run.name == result.best else ""
            row["reason"] = row.pop("reason")
        rows.append(row)
    return rows


def cell_rows(result: SweepResult) -> list[dict[str, Any]]:
    """Seeded sweeps: the base model's row, then one row per cell with ``<key>_mean``, ``<key>_sd`` and the count of
    finished seeds ``n`` for every metric."""
    base = base_values(result.runs)
    keys = list(result.spec.grid)
    blank = {key: None for key in keys}
    aggregated = [key for key in AGGREGATED if (key not in TEST_METRICS or has_test(result.runs))
                  and (key not in GENERAL_METRICS or has_general(result.runs))]
    rows: list[dict[str, Any]] = []
    if base:
        row: dict[str, Any] = {"cell": BASE_NAME, **blank, "seeds": "", "n": base["eval_loss"].n, "status": ""}
        for key in aggregated:  # the base model's general-text change is 0 by definition: left empty
            stat = base.get("eval_loss" if key in ("final_eval_loss", "best_eval_loss") else key)
            row[f"{key}_mean"], row[f"{key}_sd"] = (stat.mean, stat.sd) if stat else (None, None)
        rows.append({**row, "best": ""})
    for cell in result.cells():
        row = {"cell": cell.name, **cell.values, "seeds": " ".join(str(s) for s in cell.seeds), "n": len(cell.done),
               "status": cell.status()}
        for key in aggregated:
            stat = cell.stat(key)
            row[f"{key}_mean"], row[f"{key}_sd"] = stat.mean, stat.sd
        row["best"] = "yes" if cell.name == result.best else ""
        rows.append(row)
    return rows


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return display_value(value) if isinstance(value, list) else value


def _render(rows: list[dict[str, Any]], empty: list[str]) -> str:
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else empty, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return handle.getvalue()


def render_csv(result: SweepResult) -> str:
    """comparison.csv: one row per run, or with seeds one row per cell (and the base model's)."""
    if result.seeded:
        return _render(cell_rows(result), ["cell", "status"])
    return _render(comparison_rows(result), ["run", "status"])


def render_runs_csv(result: SweepResult) -> str:
    """runs.csv of a seeded sweep: every run's own row (its cell and seed included)."""
    return _render(comparison_rows(result), ["run", "status"])


# ---------------------------------------------------------------- human-readable cells


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _metric_cells(source: dict[str, Any]) -> list[str]:
    return [_num(source.get("exact_match"), 3), _num(source.get("rouge_l"), 3), _num(source.get("chrf"), 1),
            _num(source.get("bleu"), 1)]


METRIC_HEADER = ["exact match", "ROUGE-L", "chrF", "BLEU"]
TEST_HEADER = [f"test {name}" for name in METRIC_HEADER]
GENERAL_HEADER = "general-text ppl change % (zh / en)"


def _general_text(values: list[str]) -> str:
    """``+3.2 (+4.0 / +2.1)``: the overall change, then per language where measured."""
    overall, *langs = values
    return overall if all(v == "-" for v in langs) else f"{overall} ({' / '.join(langs)})"


def _signed(value: Any) -> str:
    return f"{value:+.1f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
DIGITS = {"exact_match": 3, "rouge_l": 3, "chrf": 1, "bleu": 1}


def table(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-run table: the base model first, then every run."""
    keys = list(result.spec.grid)
    seed = ["seed"] if result.seeded else []
    tested, general = has_test(result.runs), has_general(result.runs)
    header = ["run", *keys, *seed, "status", "trainable params", "train time", "train loss", "eval loss (final / best)",
              *METRIC_HEADER, *(TEST_HEADER if tested else []), *([GENERAL_HEADER] if general else [])]
    cells: list[list[str]] = []
    base = base_values(result.runs)
    if base:
        cells.append([BASE_NAME, *("" for _ in keys), *("" for _ in seed), "-", "0", "-", "-",
                      _num(base["eval_loss"].mean, 4), *(_num(base[m].mean, DIGITS[m]) for m in GEN_METRICS),
                      *((_num(base[f"test_{m}"].mean, DIGITS[m]) for m in GEN_METRICS) if tested else ()),
                      *(["0 (base)"] if general else [])])
    for outcome in result.runs:
        s = outcome.summary
        name = outcome.run.name + (" ★ best" if not result.seeded and outcome.run.name == result.best else "")
        status = outcome.status if outcome.status != "failed" else f"failed: {_short(outcome.reason or '')}"
        params = f"{s['trainable_params']:,} ({s['trainable_percent']:.3f}%)" if "trainable_params" in s else "-"
        cells.append([name, *(display_value(outcome.run.values[k]) for k in keys),
                      *([str(outcome.run.seed)] if seed else []), status, params,
                      f"{s['train_time_s']:.1f} s" if "train_time_s" in s else "-", _num(s.get("final_train_loss"), 4),
                      f"{_num(s.get('final_eval_loss'), 4)} / {_num(s.get('best_eval_loss'), 4)}",
                      *_metric_cells(outcome.evaluation.get("adapter") or {}),
                      *(_metric_cells(outcome.test.get("adapter") or {}) if tested else []),
                      *([_general_text([_signed(general_change(outcome, k)) for k in GENERAL_METRICS])] if general else [])])
    return header, cells


def cell_table(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    """Seeded sweeps: header and cells of the comparison, mean ± sd over each cell's finished seeds (n of them)."""
    keys = list(result.spec.grid)
    tested, general = has_test(result.runs), has_general(result.runs)
    metrics = [*GEN_METRICS, *(TEST_METRICS if tested else ())]
    header = ["cell", *keys, "seeds done", "status", "trainable params", "train time", "train loss",
              "eval loss (best)", *METRIC_HEADER, *(TEST_HEADER if tested else []), *([GENERAL_HEADER] if general else [])]
    cells: list[list[str]] = []
    base = base_values(result.runs)
    if base:
        cells.append([BASE_NAME, *("" for _ in keys), str(base["eval_loss"].n), "-", "0", "-", "-",
                      base["eval_loss"].text(4), *(base[m].text(DIGITS[m.replace("test_", "")]) for m in metrics),
                      *(["0 (base)"] if general else [])])
    for cell in result.cells():
        params = cell.stat("trainable_params")
        time_s = cell.stat("train_time_s")
        cells.append([cell.name + (" ★ best" if cell.name == result.best else ""),
                      *(display_value(cell.values[k]) for k in keys), f"{len(cell.done)} of {len(cell.runs)}",
                      cell.status(), f"{params.mean:,.0f}" if params.mean is not None else "-",
                      f"{time_s.text(1)} s" if time_s.mean is not None else "-", cell.stat("final_train_loss").text(4),
                      cell.stat("eval_loss").text(4),
                      *(cell.stat(m).text(DIGITS[m.replace("test_", "")]) for m in metrics),
                      *([_general_text([cell.stat(k).text(1) for k in GENERAL_METRICS])] if general else [])])
    return header, cells


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def best_line(result: SweepResult) -> str:
    metric = result.spec.metric
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    if result.best is None:
        if result.seeded:
            return f"No cell has every seed finished with a value for {metric} yet."
        return f"No finished run has a value for {metric} yet."
    cell = next(c for c in result.cells() if c.name == result.best)
    stat = cell.stat(metric)
    if not result.seeded:
        return f"Best run by {metric} ({direction} is better): {result.best} ({metric} = {stat.mean:.4g})"
    return (f"Best cell by mean {metric} over {stat.n} seeds ({direction} is better): {result.best} "
            f"({metric} = {stat.text(4, 'g')})")


def counts_line(result: SweepResult) -> str:
    counts = {status: sum(o.status == status for o in result.runs) for status in ("done", "failed", "pending")}
    cells = f"{len(result.cells())} cells x {len(result.spec.seeds)} seeds = " if result.seeded else ""
    return f"{cells}{len(result.runs)} runs: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending"


NOTE = ("eval loss: the base model's at step 0; for runs the last evaluation and the best one (the adapter is the "
        "best checkpoint). Generation metrics: exact match and ROUGE-L in 0..1, chrF and BLEU in 0..100, on the eval "
        "split.")
TEST_NOTE = ("test ...: the same metrics on the test split the data holds out (data.test_split / data.test_path): no "
             "run trained on it, chose a checkpoint by it, or is ranked by it.")
GENERAL_NOTE = ("general-text ppl change: how much less likely the adapter made a small general-text sample (Chinese "
                "and English paragraphs no run trained on; loralab.forgetting) than the base model did, in percent of "
                "the base model's perplexity: > 0 is what the adapter cost elsewhere.")
SEED_NOTE = ("Each cell is trained once per seed (train.seed; the eval split does not change); its row is the mean ± "
             "the sample standard deviation over its finished seeds. Only cells whose every seed finished are ranked.")


def notes(result: SweepResult) -> str:
    """What the table's columns mean (the test split's and the general text's only where measured)."""
    return " ".join([NOTE, *([TEST_NOTE] if has_test(result.runs) else []),
                     *([GENERAL_NOTE] if has_general(result.runs) else [])])


def _md_table(header: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(md_cell(c) for c in row) + " |" for row in cells)]


def render_markdown(result: SweepResult) -> str:
    lines = [f"# Sweep {result.spec.name}", "", f"{counts_line(result)}. **{best_line(result)}**", ""]
    if result.seeded:
        gap = gap_line(result.cells(), result.spec.metric)
        lines += ([gap, ""] if gap else []) + _md_table(*cell_table(result)) + ["", SEED_NOTE, "", "## Runs", ""]
    lines += _md_table(*table(result))
    failed = [o for o in result.runs if o.status == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- **{o.run.name}**: {md_cell(o.reason or 'unknown')}" for o in failed]
    every = " Every run: [runs.csv](runs.csv)." if result.seeded else ""
    lines += ["", notes(result), "", "Curves: [curves.png](curves.png). Answers: [answers.md](answers.md). "
              f"Everything: [report.html](report.html).{every}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- answers


def answer_columns(result: SweepResult, answers: dict[str, list[dict[str, str]]], first_seed: bool = False) -> list[str]:
    """Column names of the side-by-side answers: the base model, then every run with answers (``first_seed``: only
    the first such run of each cell)."""
    names, cells = [], set()
    for outcome in result.runs:
        if outcome.run.name in answers and not (first_seed and outcome.run.cell in cells):
            names.append(outcome.run.name)
            cells.add(outcome.run.cell)
    return [BASE_NAME] + names


def answer_grid(result: SweepResult, prompts: list[str], answers: dict[str, list[dict[str, str]]],
                first_seed: bool = False) -> list[list[str]]:
    """For each prompt: the base model's answer, then each run's adapter answer."""
    runs = answer_columns(result, answers, first_seed)[1:]
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
        lines += [f"| {md_cell(name)} | {md_cell(answer)} |" for name, answer in zip(columns, row)]
        lines.append("")
    return "\n".join(lines)
