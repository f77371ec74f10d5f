"""Hyperparameter sweeps: a base config times a grid of values, one ordinary run folder per combination.

A sweep lives in ``<sweeps_dir>/<name>/``: the run folders, ``sweep.yaml`` (the resolved spec), failure records
under ``failed/``, and the reports written by :mod:`loralab.sweep_report`. Everything is checked before any
training starts; a run that fails is recorded with its reason and the sweep goes on. Re-running a sweep skips
finished runs and resumes half-finished ones from their last checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from loralab.config import KEY_ALIASES, RunConfig, check_remote_code, build_config, config_keys, parse_override, read_yaml, set_dotted
from loralab.errors import ConfigError, LoralabError
from loralab.guards import TrainingInterrupted
from loralab.runs import (RunPaths, comparable_config, list_checkpoints, load_run_config, read_summary, write_json_atomic,
                          write_text_atomic)

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("eval_loss", "rouge_l", "chrf", "exact_match", "bleu")
SWEEP_FILE_KEYS: tuple[str, ...] = ("name", "base", "grid", "metric", "eval_limit", "max_new_tokens", "prompts",
                                    "prompts_file", "sweeps_dir")
RESERVED_KEYS: tuple[str, ...] = ("name", "output_dir")  # set by the sweep for every run
DEFAULT_PROMPTS = 3
# Exceptions that fail one run (recorded with the reason) without stopping the sweep; anything else is a bug.
RUN_FAILURES: tuple[type[BaseException], ...] = (LoralabError, RuntimeError, ValueError, ArithmeticError, MemoryError, OSError)

_ABBREVIATIONS = {
    "train.learning_rate": "lr", "lora.target_modules": "tm", "train.batch_size": "bs", "train.epochs": "ep",
    "train.max_steps": "steps", "train.gradient_accumulation": "ga", "train.weight_decay": "wd",
    "train.scheduler": "sched", "model.name_or_path": "model", "data.path": "data",
}
_MAX_NAME = 80


# ---------------------------------------------------------------- the spec


@dataclass
class SweepSpec:
    """What to sweep: a base config mapping, a grid of values per dotted key, and how to judge the runs."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    name: str = "sweep"
    metric: str = "eval_loss"
    eval_limit: int | None = None
    max_new_tokens: int = 64
    prompts: list[str] | None = None  # None: the first few prompts of the eval split
    sweeps_dir: Path = Path("sweeps")

    @property
    def sweep_dir(self) -> Path:
        return Path(self.sweeps_dir) / self.name

    def to_yaml(self) -> str:
        data = {"name": self.name, "metric": self.metric, "eval_limit": self.eval_limit,
                "max_new_tokens": self.max_new_tokens, "prompts": self.prompts, "grid": self.grid, "base": self.base}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None)


def split_values(raw: str) -> list[str]:
    """Split ``v1,v2`` on commas outside brackets and quotes, so ``[q,v],[q,k,v,o]`` gives two lists."""
    items, depth, quote, current = [], 0, "", ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    items.append(current.strip())
    return items


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` with each value parsed as YAML (``[q_proj,v_proj]`` is one list value)."""
    if "=" not in item:
        raise ConfigError(f"--grid {item!r} is not key=v1,v2,... (e.g. --grid train.learning_rate=1e-4,3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = split_values(raw)
    if any(part == "" for part in parts):
        raise ConfigError(f"--grid {item!r}: empty value (values are separated by commas)")
    return key, [parse_override(f"{key}={part}")[1] for part in parts]


def read_prompts_file(path: str | Path, base: dict[str, Any]) -> list[str]:
    """The prompts of a ``--prompts-file`` (one per line, or a JSON / JSONL / CSV data file), as ``loralab compare`` reads it."""
    from loralab.evaluation import read_prompts

    config = build_config(base, source="the sweep's base config")
    task_type = config.model.task_type or config.lora.task_type or "CAUSAL_LM"
    return [example.prompt for example in read_prompts(path, config.data, task_type)]


def _resolve_relative(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def load_sweep(path: str | Path | None = None, grid_args: Iterable[str] = (), overrides: Iterable[str] = (), *,
               name: str | None = None, metric: str | None = None, eval_limit: int | None = None,
               max_new_tokens: int | None = None, prompts_file: str | Path | None = None,
               sweeps_dir: str | Path | None = None) -> SweepSpec:
    """A sweep from a sweep file (top-level ``grid:``) or a base config file, plus ``--grid`` and ``--set``.

    Command-line values win over the file's. The grid is not expanded here; see :func:`expand_grid`.
    """
    data: dict[str, Any] = read_yaml(path) if path else {}
    is_sweep_file = "grid" in data
    file_grid: dict[str, list[Any]] = {}
    if is_sweep_file:
        unknown = sorted(set(data) - set(SWEEP_FILE_KEYS))
        if unknown:
            raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SWEEP_FILE_KEYS)}")
        folder = Path(path).parent
        base = data.get("base") or {}
        if isinstance(base, str):
            base = read_yaml(_resolve_relative(base, folder))
        if not isinstance(base, dict):
            raise ConfigError(f"sweep file {path}: 'base' must be a config mapping or the path of a config file")
        grid = data.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"sweep file {path}: 'grid' must map config keys to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list):
                raise ConfigError(f"sweep file {path}: grid key {key!r} must have a list of values, got {values!r}")
            file_grid[str(key)] = values
        if prompts_file is None and data.get("prompts_file"):
            prompts_file = _resolve_relative(str(data["prompts_file"]), folder)
    else:
        base = data
    base = copy.deepcopy(base)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(base, key, value)

    grid = dict(file_grid)
    for item in grid_args:
        key, values = parse_grid_arg(item)
        grid[key] = values

    prompts = read_prompts_file(prompts_file, base) if prompts_file else None
    if prompts is None and is_sweep_file and data.get("prompts") is not None:
        prompts = data["prompts"]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"sweep file {path}: 'prompts' must be a non-empty list of strings")

    default_name = Path(path).stem if path else "sweep"
    spec = SweepSpec(
        base=base, grid=grid,
        name=name or (data.get("name") if is_sweep_file else None) or default_name,
        metric=metric or (data.get("metric") if is_sweep_file else None) or "eval_loss",
        eval_limit=eval_limit if eval_limit is not None else (data.get("eval_limit") if is_sweep_file else None),
        max_new_tokens=max_new_tokens or (data.get("max_new_tokens") if is_sweep_file else None) or 64,
        prompts=prompts,
        sweeps_dir=Path(sweeps_dir or (data.get("sweeps_dir") if is_sweep_file else None) or "sweeps"),
    )
    validate_spec(spec, source=str(path) if path else "command line")
    return spec


def load_saved_sweep(sweep_dir: str | Path) -> SweepSpec:
    """The spec a sweep folder was made with (its ``sweep.yaml``), for ``--report-only``."""
    sweep_dir = Path(sweep_dir)
    spec_file = sweep_dir / "sweep.yaml"
    if not spec_file.is_file():
        raise LoralabError(f"{sweep_dir} holds no sweep (no sweep.yaml); give the sweep file or --grid options")
    spec = load_sweep(spec_file, sweeps_dir=sweep_dir.parent)
    spec.name = sweep_dir.name
    return spec


def validate_spec(spec: SweepSpec, source: str = "sweep") -> None:
    """Check the name, metric, limits and grid keys (values are checked per run by :func:`expand_grid`)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", str(spec.name)):
        raise ConfigError(f"sweep name {spec.name!r} must be a plain folder name (letters, digits, . _ + = -)")
    if spec.metric not in METRICS:
        raise ConfigError(f"--metric {spec.metric!r} is not a sweep metric; choose one of: {', '.join(METRICS)}")
    if spec.eval_limit is not None and (not isinstance(spec.eval_limit, int) or spec.eval_limit <= 0):
        raise ConfigError(f"eval_limit must be a positive number of examples, got {spec.eval_limit!r}")
    if not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {spec.max_new_tokens!r}")
    if not spec.grid:
        raise ConfigError(f"the sweep grid is empty ({source}): give --grid key=v1,v2 or a 'grid:' mapping in a sweep file")
    spec.grid = {KEY_ALIASES.get(key, key): values for key, values in spec.grid.items()}  # PEFT's lora_alpha, ...
    known = config_keys()
    for key, values in spec.grid.items():
        if key in RESERVED_KEYS:
            raise ConfigError(f"grid key {key!r} cannot be varied: the sweep sets each run's {key}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            valid = ", ".join(k for k in known if k not in RESERVED_KEYS)
            raise ConfigError(f"grid key {key!r} is not a config key{hint}; valid keys: {valid}")
        if not values:
            raise ConfigError(f"grid key {key!r} has no values")
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"grid key {key!r} lists a value twice: {values!r}")


# ---------------------------------------------------------------- expanding the grid


@dataclass
class PlannedRun:
    """One combination of grid values: its folder name, the values (as validated) and the full config."""

    name: str
    values: dict[str, Any]
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={display_value(value)}" for key, value in self.values.items()]


def get_dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def format_number(value: float | int) -> str:
    """Short text for a number: 3e-4, 9.65e-7, 0.03, 8, 2.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e5:
        return str(int(value))
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.6g}"


def display_value(value: Any) -> str:
    """A grid value as a user would write it: numbers short, lists as ``[a, b]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, list):
        return "[" + ", ".join(display_value(v) for v in value) + "]"
    return str(value)


def _name_part(value: Any) -> str:
    if isinstance(value, list):
        items = [str(v) for v in value]
        suffix = _common_suffix(items)
        return "+".join(item[: len(item) - len(suffix)] if suffix else item for item in items) or "none"
    if isinstance(value, str) and "/" in value:
        value = Path(value.rstrip("/")).name
    return display_value(value)


def _common_suffix(items: list[str]) -> str:
    """A shared ``_xxx`` suffix such as ``_proj`` (kept out of run names), when every item has more before it."""
    if len(items) < 2:
        return ""
    match = re.search(r"_[A-Za-z0-9]+$", items[0])
    suffix = match.group(0) if match else ""
    return suffix if suffix and all(i.endswith(suffix) and len(i) > len(suffix) for i in items) else ""


def _key_labels(keys: list[str]) -> dict[str, str]:
    labels = {key: _ABBREVIATIONS.get(key, key.split(".")[-1]) for key in keys}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: label if counts[label] == 1 else key.replace(".", "-") for key, label in labels.items()}


def _sanitize(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+=_-]", "_", text)).strip("._") or "run"


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(values: dict[str, Any], labels: dict[str, str]) -> str:
    """``tm-q+v_lr-3e-4`` for ``{lora.target_modules: [q_proj, v_proj], train.learning_rate: 3e-4}``."""
    name = _sanitize("_".join(f"{labels[key]}-{_name_part(value)}" for key, value in values.items()))
    if len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 9].rstrip('._-')}-{_digest(values)}"
    return name


def expand_grid(spec: SweepSpec) -> list[PlannedRun]:
    """Every combination of the grid as a validated config, in grid order; raises on the first invalid one."""
    validate_spec(spec)
    build_config(spec.base, source="the sweep's base config")
    keys = list(spec.grid)
    labels = _key_labels(keys)
    planned: list[PlannedRun] = []
    combinations = list(itertools.product(*(spec.grid[key] for key in keys)))
    for number, combination in enumerate(combinations, 1):
        merged = copy.deepcopy(spec.base)
        label = ", ".join(f"{key}={display_value(value)}" for key, value in zip(keys, combination))
        for key, value in zip(keys, combination):
            set_dotted(merged, key, copy.deepcopy(value))
        config = build_config(merged, source=f"sweep run {number} of {len(combinations)} [{label}]")
        check_remote_code(config, f"sweep run {number} [{label}]")  # the config alone never enables remote code
        dumped = config.model_dump(mode="json")
        values = {key: get_dotted(dumped, key) for key in keys}
        planned.append(PlannedRun(run_name(values, labels), values, config))
    names = [run.name for run in planned]
    for run in planned:
        if names.count(run.name) > 1:
            run.name = f"{run.name}-{_digest(run.values)}"
    seen: set[str] = set()
    for run in planned:
        if run.name in seen:
            raise ConfigError(f"two grid combinations give the same run config ({run.name}); remove the duplicate value")
        seen.add(run.name)
        run.config.name = run.name
        run.config.output_dir = str(spec.sweep_dir)
    return planned


# ---------------------------------------------------------------- run state on disk


def failure_path(run: PlannedRun) -> Path:
    return run.run_dir.parent / "failed" / f"{run.name}.json"


def read_failure(run: PlannedRun) -> dict[str, Any] | None:
    path = failure_path(run)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_trained(run_dir: Path) -> bool:
    paths = RunPaths(run_dir)
    return paths.summary.is_file() and (paths.adapter / "adapter_config.json").is_file()


def run_state(run: PlannedRun) -> str:
    """``new``, ``resume`` (checkpoints), ``trained`` (not evaluated), ``finished`` or ``failed`` (recorded)."""
    if read_failure(run) is not None:
        return "failed"
    paths = RunPaths(run.run_dir)
    if is_trained(run.run_dir):
        return "finished" if paths.eval_report.is_file() else "trained"
    return "resume" if list_checkpoints(run.run_dir) else "new"


def check_run_folder(run: PlannedRun) -> None:
    """Refuse a run folder that holds something else than this run (a different config or foreign files)."""
    folder = run.run_dir
    if not folder.exists() or not any(folder.iterdir()):
        return
    paths = RunPaths(folder)
    if not paths.config.is_file():
        raise LoralabError(f"sweep run folder {folder} is not empty and holds no loralab run; remove it or use another --name")
    saved = comparable_config(load_run_config(folder))
    wanted = comparable_config(run.config)
    if saved != wanted:
        differing = [key for key in config_keys() if key not in RESERVED_KEYS and key != "train.resume"
                     and get_dotted(saved, key) != get_dotted(wanted, key)]
        raise LoralabError(f"sweep run folder {folder} holds a different run (config differs in: {', '.join(differing)}); "
                           "use another --name for a changed sweep, or delete the folder")


# ---------------------------------------------------------------- executing runs


@dataclass
class RunOutcome:
    """What became of one planned run: ``done``, ``failed`` or ``pending`` (not run yet), with its results."""

    run: PlannedRun
    status: str
    action: str = ""  # trained, resumed, evaluated, skipped, failed, planned
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        """The run's value for a sweep metric (``eval_loss`` is the best checkpoint's, i.e. the adapter's)."""
        if name == "eval_loss":
            value = self.summary.get("best_eval_loss", self.summary.get("final_eval_loss"))
        else:
            value = (self.evaluation.get("adapter") or {}).get(name)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class SweepResult:
    """A sweep after running (or planning): every run's outcome, the best run and the report files."""

    spec: SweepSpec
    runs: list[RunOutcome]
    best: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def sweep_dir(self) -> Path:
        return self.spec.sweep_dir


def read_outcome(run: PlannedRun) -> RunOutcome:
    """A run's outcome from its folder alone (what any worker or ``--report-only`` sees)."""
    failure = read_failure(run)
    summary = read_summary(run.run_dir) if is_trained(run.run_dir) else {}
    if failure is not None:
        return RunOutcome(run, "failed", "failed", failure.get("reason"), summary)
    eval_file = RunPaths(run.run_dir).eval_report
    if summary and eval_file.is_file():
        return RunOutcome(run, "done", "skipped", None, summary, json.loads(eval_file.read_text(encoding="utf-8")))
    return RunOutcome(run, "pending", run_state(run))


def _generation_settings(spec: SweepSpec) -> Any:
    from loralab.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=spec.max_new_tokens)


def record_failure(run: PlannedRun, reason: str, stage: str) -> None:
    write_json_atomic(failure_path(run), {"run": run.name, "stage": stage, "reason": reason,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def execute_run(run: PlannedRun, spec: SweepSpec, *, prompts: list[str] | None = None, retry_failed: bool = False,
                progress: bool = False, preflight: Callable[..., None] | None = None) -> RunOutcome:
    """Train (or resume), evaluate, and answer the prompts; a failure is recorded and returned, never raised."""
    from loralab import training
    from loralab.evaluation import evaluate_run
    from loralab.generation import load_run_model

    state = run_state(run)
    if state == "finished" or (state == "failed" and not retry_failed):
        return read_outcome(run)
    stage = "train"
    action = {"new": "trained", "resume": "resumed", "trained": "evaluated", "failed": "trained"}[state]
    try:
        if state != "trained":
            retry = state == "failed"
            if retry:
                failure_path(run).unlink(missing_ok=True)
            log.info("%s: %s", run.name, "resuming from its last checkpoint" if state == "resume" else "training")
            training.train(run.config, run_dir=run.run_dir, resume=not retry, overwrite=retry, progress=progress,
                           preflight=preflight)
        summary = read_summary(run.run_dir)
        for key in ("final_train_loss", "final_eval_loss", "best_eval_loss"):
            value = summary.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise LoralabError(f"training diverged: {key} is {value}; lower train.learning_rate")
        stage = "eval"
        log.info("%s: evaluating base model and adapter", run.name)
        loaded = load_run_model(run.run_dir)
        if prompts:  # before eval.json marks the run done, so other workers never generate them twice
            ensure_answers(run, spec, prompts, loaded=loaded)
        evaluate_run(run.run_dir, limit=spec.eval_limit, settings=_generation_settings(spec), progress=progress,
                     loaded=loaded)
    except RUN_FAILURES as exc:
        if isinstance(exc, TrainingInterrupted) or isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C
            raise LoralabError(f"sweep interrupted during run {run.name}; run the same command again to resume "
                               "(finished runs are skipped, this one continues from its last checkpoint)") from None
        reason = str(exc) if isinstance(exc, LoralabError) else f"{type(exc).__name__}: {exc}"
        if stage == "eval":
            reason = f"evaluation failed: {reason}"
        log.warning("%s failed: %s", run.name, reason)
        record_failure(run, reason, stage)
        return read_outcome(run)
    outcome = read_outcome(run)
    outcome.action = action
    return outcome


# ---------------------------------------------------------------- prompts and answers


def resolve_prompts(spec: SweepSpec, planned: list[PlannedRun]) -> list[str]:
    """The sweep's prompts, or the first prompts of the eval split (none when they cannot be read)."""
    if spec.prompts is not None:
        return spec.prompts
    try:
        return default_prompts(planned[0].config)
    except LoralabError as exc:
        log.warning("no default prompts for the answers table: %s", exc)
        return []


def default_prompts(config: RunConfig, count: int = DEFAULT_PROMPTS) -> list[str]:
    """The first prompts of the eval split (the examples no run trained on)."""
    from loralab.data import load_splits
    from loralab.models import resolve_task_type

    train_part, eval_part = load_splits(config.data, resolve_task_type(config))
    return [example.prompt for example in (eval_part or train_part)[:count]]


def answers_path(run: PlannedRun) -> Path:
    return run.run_dir / "answers.json"


def read_answers(run: PlannedRun, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]] | None:
    """Saved answers of a run to exactly these prompts, or None."""
    path = answers_path(run)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("prompts") != prompts or saved.get("max_new_tokens") != max_new_tokens:
        return None
    return saved.get("answers")


def ensure_answers(run: PlannedRun, spec: SweepSpec, prompts: list[str], loaded: Any = None) -> list[dict[str, str]] | None:
    """The base model's and the adapter's answers to the prompts (generated once, saved in the run folder)."""
    saved = read_answers(run, prompts, spec.max_new_tokens)
    if saved is not None:
        return saved
    from loralab.evaluation import compare_prompts

    try:
        answers = compare_prompts(run.run_dir, prompts, settings=_generation_settings(spec), loaded=loaded)
    except RUN_FAILURES as exc:
        log.warning("%s: could not generate answers to the sweep prompts: %s", run.name, exc)
        return None
    write_json_atomic(answers_path(run), {"prompts": prompts, "max_new_tokens": spec.max_new_tokens, "answers": answers})
    return answers


# ---------------------------------------------------------------- the whole sweep


def check_inputs(planned: list[PlannedRun]) -> None:
    """Load tokenizer and data once per distinct model+data setting, so bad input fails before any training."""
    from loralab.training import load_tokenizer_and_data

    seen: set[str] = set()
    for run in planned:
        key = json.dumps([run.config.model.model_dump(mode="json"), run.config.data.model_dump(mode="json")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            load_tokenizer_and_data(run.config)


def plan(spec: SweepSpec) -> list[RunOutcome]:
    """The runs a sweep would make and what would happen to each (nothing is written)."""
    planned = expand_grid(spec)
    outcomes = []
    for run in planned:
        check_run_folder(run)
        outcome = read_outcome(run)
        if outcome.status == "pending":
            outcome.action = {"new": "train", "resume": "resume", "trained": "evaluate"}[run_state(run)]
        outcomes.append(outcome)
    return outcomes


def run_sweep(spec: SweepSpec, *, dry_run: bool = False, report_only: bool = False, backend: str = "local",
              storage: str | None = None, retry_failed: bool = False, progress: bool = False,
              preflight: Callable[..., None] | None = None) -> SweepResult:
    """Run every combination of the grid (skipping finished runs), then write the comparison reports.

    ``backend="optuna"`` dispatches runs as trials of an Optuna study in ``storage`` (shared by any number of
    workers); ``report_only`` builds the reports from the run folders without training anything.
    """
    if backend not in ("local", "optuna"):
        raise ConfigError(f"--backend must be local or optuna, got {backend!r}")
    outcomes = plan(spec)  # every config validated and every folder checked before anything runs
    planned = [o.run for o in outcomes]
    if dry_run:
        return SweepResult(spec, outcomes, dry_run=True)
    actions: dict[str, str] = {}
    prompts: list[str] = []
    if not report_only:
        todo = [o.run for o in outcomes if o.status == "pending" or (retry_failed and o.status == "failed")]
        if todo:
            check_inputs(todo)
        prompts = resolve_prompts(spec, planned)
        spec.sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(spec.sweep_dir / "sweep.yaml", spec.to_yaml())
        options = {"prompts": prompts, "retry_failed": retry_failed, "progress": progress, "preflight": preflight}
        if backend == "optuna":
            from loralab.sweep_distributed import run_optuna_worker

            actions = run_optuna_worker(spec, planned, storage, **options)
        else:
            for i, run in enumerate(planned, 1):
                log.info("[%d/%d] %s", i, len(planned), run.name)
                actions[run.name] = execute_run(run, spec, **options).action
    else:
        prompts = resolve_prompts(spec, planned)
    return write_reports(spec, planned, prompts, actions, generate_answers=not report_only)


def write_reports(spec: SweepSpec, planned: list[PlannedRun], prompts: list[str], actions: dict[str, str] | None = None,
                  generate_answers: bool = True) -> SweepResult:
    """Read every run folder back and write comparison.csv/.md, curves.png, answers.md and report.html.

    ``actions`` (run name -> trained / resumed / skipped / ...) is what this process did, for the console.
    Answers missing from a finished run are generated here unless ``generate_answers`` is false.
    """
    from loralab.sweep_report import best_run, write_all

    outcomes = [read_outcome(run) for run in planned]
    for outcome in outcomes:
        outcome.action = (actions or {}).get(outcome.run.name, outcome.action)
    answers: dict[str, list[dict[str, str]]] = {}
    for outcome in outcomes:
        if outcome.status == "done" and prompts:
            found = ensure_answers(outcome.run, spec, prompts) if generate_answers else \
                read_answers(outcome.run, prompts, spec.max_new_tokens)
            if found is not None:
                answers[outcome.run.name] = found
    result = SweepResult(spec, outcomes, best=best_run(outcomes, spec.metric))
    result.files = write_all(result, prompts, answers)
    return result
