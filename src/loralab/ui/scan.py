"""Reading run and sweep folders for the dashboard: everything tolerated, every problem a note on the row.

A folder being written (a run still training), half-written or damaged never raises here: unreadable files become
notes (``RunView.notes``) and the status says what could be told. Parsed files are cached by size and mtime.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from loralab.config import KEY_ALIASES
from loralab.runs import RunPaths

LIVE_WINDOW_S = 600  # a run without summary.json whose files changed this recently is shown as training
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "adapter")  # a folder holding any of these is a run
GENERATION_KEYS = ("exact_match", "rouge_l", "chrf", "bleu")


# ---------------------------------------------------------------- tolerant, cached file reading

class _Cache:
    """Parsed files by (path, size, mtime): polling a dashboard re-reads only what changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}

    def get(self, path: Path, kind: str, parse: Callable[[bytes], Any]) -> Any:
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        key = (str(path), kind)
        with self._lock:
            hit = self._items.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        value = parse(path.read_bytes())
        with self._lock:
            if len(self._items) > 4000:
                self._items.clear()
            self._items[key] = (stamp, value)
        return value


CACHE = _Cache()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def read_mapping(path: Path, what: str, notes: list[str], yaml_file: bool = False) -> dict[str, Any] | None:
    """A JSON / YAML file holding a mapping; None (and a note) when it is missing-but-expected, torn or not a mapping."""
    if not path.is_file():
        return None

    def parse(data: bytes) -> Any:
        try:
            return ("ok", yaml.safe_load(_text(data)) if yaml_file else json.loads(_text(data)))
        except ValueError as exc:
            return ("bad", " ".join(str(exc).split())[:120])
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            return ("bad", where + " ".join(str(getattr(exc, "problem", None) or exc).split())[:120])

    try:
        state, value = CACHE.get(path, "mapping", parse)
    except OSError as exc:
        notes.append(f"{what} cannot be read: {exc.strerror or exc}")
        return None
    if state == "bad":
        notes.append(f"{what} is not valid {'YAML' if yaml_file else 'JSON'} (half-written or damaged): {value}")
        return None
    if not isinstance(value, dict):
        notes.append(f"{what} does not hold a mapping (found {type(value).__name__})")
        return None
    return value


def read_jsonl(path: Path, what: str, notes: list[str]) -> list[dict[str, Any]]:
    """The mapping lines of a JSONL file; torn or foreign lines are skipped and counted in a note."""
    if not path.is_file():
        return []

    def parse(data: bytes) -> tuple[list[dict[str, Any]], int]:
        rows, bad = [], 0
        lines = _text(data).splitlines()
        unfinished = len(lines) - 1 if lines and not data.endswith(b"\n") else -1
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += i != unfinished  # the last line may be being written right now: not counted
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
        return rows, bad

    try:
        rows, bad = CACHE.get(path, "jsonl", parse)
    except OSError as exc:
        notes.append(f"{what} cannot be read: {exc.strerror or exc}")
        return []
    if bad:
        notes.append(f"{what}: {bad} unreadable line{'s' if bad > 1 else ''} skipped (torn by a crash, or not JSON)")
    return rows


def number(value: Any) -> float | None:
    """A finite number, or None (for strings, NaN, booleans, missing values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def get_dotted(data: dict[str, Any], key: str) -> Any:
    key = KEY_ALIASES.get(key, key)
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


# ---------------------------------------------------------------- one run

@dataclass
class RunView:
    """What the dashboard shows of one run folder."""

    id: str
    path: Path
    sweep: str | None = None
    status: str = "unknown"
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] | None = None
    updated: float = 0.0
    failure: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.path)

    def setting(self, key: str) -> Any:
        return get_dotted(self.config, key)

    @property
    def model(self) -> str:
        return str(self.summary.get("model") or self.setting("model.name_or_path") or "-")

    @property
    def data(self) -> str:
        return str(self.setting("data.path") or ("demo data" if self.config else "-"))

    @property
    def hyperparameters(self) -> list[tuple[str, Any]]:
        keys = [("r", "lora.r"), ("alpha", "lora.alpha"), ("lr", "train.learning_rate"), ("epochs", "train.epochs"),
                ("max steps", "train.max_steps"), ("batch", "train.batch_size"), ("targets", "lora.target_modules")]
        return [(label, value) for label, key in keys if (value := self.setting(key)) is not None]

    def loss(self, which: str) -> float | None:
        """``base``, ``best`` or ``final`` eval loss: summary.json, else (while training) what metrics.jsonl logged."""
        value = number(self.summary.get(f"{which}_eval_loss"))
        if value is not None or self.summary:
            return value
        losses = [(int(r.get("step", 0)), number(r.get("eval_loss"))) for r in self.metrics]
        losses = [(s, v) for s, v in losses if v is not None]
        if not losses:
            return None
        if which == "base":
            return next((v for s, v in losses if s == 0), None)
        trained = [v for s, v in losses if s > 0]
        return (min(trained) if which == "best" else trained[-1]) if trained else None

    @property
    def eval_scores(self) -> dict[str, dict[str, float]]:
        """eval.json's corpus scores: ``{"base": {...}, "adapter": {...}}`` (numbers only)."""
        out = {}
        for side in ("base", "adapter"):
            scores = self.evaluation.get(side)
            if isinstance(scores, dict):
                out[side] = {k: v for k, v in scores.items() if number(v) is not None and k != "n"}
        return out

    @property
    def last_step(self) -> int | None:
        steps = [r.get("step") for r in self.metrics if isinstance(r.get("step"), int)]
        return max(steps) if steps else None

    def metric(self, name: str) -> float | None:
        """A sweep metric: eval_loss is the adapter's (best checkpoint), the others eval.json's adapter score."""
        if name == "eval_loss":
            best = self.loss("best")
            return best if best is not None else self.loss("final")
        return number((self.eval_scores.get("adapter") or {}).get(name))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged key; a step logged twice (a resume) keeps its last value."""
        points: dict[int, float] = {}
        for record in self.metrics:
            value, step = number(record.get(key)), record.get("step")
            if value is not None and isinstance(step, int) and "train_runtime" not in record:
                points[step] = value
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    @property
    def version(self) -> str:
        """Changes whenever anything the pages show changed (for cache-busting images)."""
        return f"{self.updated:.3f}-{len(self.metrics)}-{self.status}"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def read_run(path: Path, run_id: str, sweep: str | None = None, failure: dict[str, Any] | None = None) -> RunView:
    """One run folder as the dashboard shows it; never raises for what is in the folder."""
    view = RunView(run_id, path, sweep, failure=failure)
    paths, notes = view.paths, view.notes
    try:
        entries = {p.name for p in path.iterdir()}
    except OSError as exc:
        view.status, view.notes = "unreadable", [f"the folder cannot be read: {exc.strerror or exc}"]
        return view
    if paths.config.is_file():
        view.config = read_mapping(paths.config, "config.yaml", notes, yaml_file=True) or {}
        try:
            view.config_text = paths.config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            pass
    else:
        notes.append("no config.yaml: not a complete loralab run folder")
    summary_notes: list[str] = []
    view.summary = read_mapping(paths.summary, "summary.json", summary_notes) or {}
    notes.extend(summary_notes)
    view.evaluation = read_mapping(paths.eval_report, "eval.json", notes) or {}
    view.metrics = read_jsonl(paths.metrics, "metrics.jsonl", notes)
    view.checks = read_mapping(paths.checks_report, "checks.json", notes)
    view.updated = max([_mtime(path / name) for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
                        if name in entries] or [_mtime(path)])
    view.status = status_of(view, entries, bool(summary_notes))
    return view


def status_of(view: RunView, entries: set[str], summary_unreadable: bool) -> str:
    if view.failure is not None:
        view.notes.insert(0, f"failed ({view.failure.get('stage', 'run')}): {view.failure.get('reason', 'no reason recorded')}")
        return "failed"
    if not view.config and "config.yaml" in entries:
        return "unreadable"
    state = view.summary.get("status")
    if state == "finished":
        if not (view.paths.adapter / "adapter_config.json").is_file():
            view.notes.append("summary.json says finished but adapter/adapter_config.json is missing")
            return "incomplete"
        return "finished"
    if state == "diverged":
        view.notes.insert(0, f"diverged at step {view.summary.get('step', '?')}: {view.summary.get('reason', '')}")
        return "diverged"
    if isinstance(state, str) and state:
        return state
    if summary_unreadable:
        return "unreadable"
    age = time.time() - view.updated
    if age < LIVE_WINDOW_S and ("metrics.jsonl" in entries or "checkpoints" in entries or "config.yaml" in entries):
        return "training"
    if "checkpoints" in entries or "metrics.jsonl" in entries:
        view.notes.append(f"no summary.json and no update for {_ago(age)}: stopped before the end; continue with "
                          f"loralab train --resume {view.path}")
        return "stopped"
    return "not started"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h" if seconds < 172800 else f"{seconds / 86400:.0f} days"


def looks_like_run(folder: Path) -> bool:
    try:
        return folder.is_dir() and not folder.name.startswith(".") and any((folder / m).exists() for m in RUN_MARKERS)
    except OSError:
        return False


def subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []
