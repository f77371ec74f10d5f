"""A sweep folder as the dashboard shows it: sweep.yaml, the run folders found so far, failure records, the best run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.metrics import HIGHER_IS_BETTER
from loralab.ui.scan import RunView, looks_like_run, status_of, read_mapping, read_run, subfolders


@dataclass
class SweepView:
    """A sweep folder: its spec (sweep.yaml), the runs found so far, the best one, the reports written."""

    name: str
    path: Path
    spec: dict[str, Any] = field(default_factory=dict)
    runs: list[RunView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def grid_keys(self) -> list[str]:
        grid = self.spec.get("grid")
        return [str(k) for k in grid] if isinstance(grid, dict) else []

    @property
    def metric(self) -> str:
        metric = self.spec.get("metric")
        return metric if isinstance(metric, str) and metric in HIGHER_IS_BETTER else "eval_loss"

    @property
    def best(self) -> RunView | None:
        scored = [(r.metric(self.metric), i, r) for i, r in enumerate(self.runs) if r.status == "finished"]
        scored = [(v, i, r) for v, i, r in scored if v is not None]
        if not scored:
            return None
        sign = -1 if HIGHER_IS_BETTER[self.metric] else 1
        return min(scored, key=lambda item: (sign * item[0], item[1]))[2]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    @property
    def reports(self) -> list[str]:
        return [n for n in REPORT_FILES if (self.path / n).is_file()]

    def answers(self) -> tuple[list[str], list[tuple[str, list[str]]]]:
        """The side-by-side answers (answers.json of each run): prompts, then (column, answers) for the base model
        and each run with answers."""
        prompts: list[str] = []
        columns: list[tuple[str, list[str]]] = []
        for run in self.runs:
            saved = read_mapping(run.path / "answers.json", "answers.json", run.notes)
            if not saved or not isinstance(saved.get("answers"), list):
                continue
            rows = [a for a in saved["answers"] if isinstance(a, dict)]
            if not prompts:
                prompts = [str(p) for p in saved.get("prompts") or []]
                columns.append(("base model", [str(a.get("base", "-")) for a in rows]))
            columns.append((run.name, [str(a.get("adapter", "-")) for a in rows]))
        return prompts, columns


def natural(name: str) -> list[Any]:
    """Sort key that puts r4 before r16."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


REPORT_FILES = ("comparison.md", "comparison.csv", "answers.md", "curves.png", "report.html")


def read_sweep(path: Path) -> SweepView:
    view = SweepView(path.name, path)
    view.spec = read_mapping(path / "sweep.yaml", "sweep.yaml", view.notes, yaml_file=True) or {}
    failures: dict[str, dict[str, Any]] = {}
    for record in sorted((path / "failed").glob("*.json")) if (path / "failed").is_dir() else []:
        data = read_mapping(record, f"failed/{record.name}", view.notes)
        failures[record.stem] = data or {"reason": "the failure record cannot be read"}
    folders = {p.name: p for p in subfolders(path) if looks_like_run(p)}
    for name in sorted(set(folders) | set(failures), key=natural):
        run_path = folders.get(name, path / name)
        if run_path.is_dir():
            view.runs.append(read_run(run_path, f"{path.name}/{name}", path.name, failures.get(name)))
        else:  # failed before its folder was made
            run = RunView(f"{path.name}/{name}", run_path, path.name, failure=failures[name])
            run.status = status_of(run, set(), False)
            view.runs.append(run)
    return view
