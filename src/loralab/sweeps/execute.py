"""Running a sweep: each run's state on disk, training and evaluating one run, the answers to the sweep's prompts,
and the whole sweep (checked first, then run one after another or as Optuna trials, then reported).

A run that fails is recorded with its reason under ``failed/`` and the sweep goes on; a re-run skips finished
runs and resumes half-finished ones from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loralab.config import RunConfig, config_keys
from loralab.errors import ConfigError, LoralabError
from loralab.guards import TrainingInterrupted
from loralab.runs import RunPaths, comparable_config, list_checkpoints, load_run_config, read_summary, write_json_atomic, \
    write_text_atomic
from loralab.sweeps.grid import PlannedRun, expand_grid, get_dotted
from loralab.sweeps.spec import RESERVED_KEYS, SweepSpec

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = 3
# Exceptions that fail one run (recorded with the reason) without stopping the sweep; anything else is a bug.
RUN_FAILURES: tuple[type[BaseException], ...] = (LoralabError, RuntimeError, ValueError, ArithmeticError, MemoryError, OSError)


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


# ---------------------------------------------------------------- outcomes


@dataclass
class RunOutcome:
    """What became of one planned run: ``done``, ``failed`` or ``pending`` (not run yet), with its results."""

    run: PlannedRun
    status: str
    action: str = ""  # trained, resumed, evaluated, skipped, failed, planned
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)  # eval_test.json: the held-out test split, never used to rank

    def metric(self, name: str) -> float | None:
        """The run's value for a sweep metric (``eval_loss`` is the best checkpoint's, i.e. the adapter's)."""
        if name == "eval_loss":
            value = self.summary.get("best_eval_loss", self.summary.get("final_eval_loss"))
        else:
            value = (self.evaluation.get("adapter") or {}).get(name)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class SweepResult:
    """A sweep after running (or planning): every run's outcome, the best run (with seeds: the best cell, by the
    mean over its seeds) and the report files."""

    spec: SweepSpec
    runs: list[RunOutcome]
    best: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def sweep_dir(self) -> Path:
        return self.spec.sweep_dir

    @property
    def seeded(self) -> bool:
        return self.spec.seeds is not None

    def cells(self) -> list[Any]:
        """Every grid cell with its runs and mean ± sd per metric (:class:`loralab.sweeps.cells.Cell`)."""
        from loralab.sweeps.cells import group_cells

        return group_cells(self.runs)


def read_outcome(run: PlannedRun) -> RunOutcome:
    """A run's outcome from its folder alone (what any worker or ``--report-only`` sees)."""
    failure = read_failure(run)
    summary = read_summary(run.run_dir) if is_trained(run.run_dir) else {}
    if failure is not None:
        return RunOutcome(run, "failed", "failed", failure.get("reason"), summary)
    paths = RunPaths(run.run_dir)
    if summary and paths.eval_report.is_file():
        test = json.loads(paths.test_eval_report.read_text(encoding="utf-8")) if paths.test_eval_report.is_file() else {}
        return RunOutcome(run, "done", "skipped", None, summary,
                          json.loads(paths.eval_report.read_text(encoding="utf-8")), test)
    return RunOutcome(run, "pending", run_state(run))


def has_test_split(config: RunConfig) -> bool:
    """Whether a run holds a test split out (``data.test_path`` or ``data.test_split``)."""
    return bool(getattr(config.data, "test_path", None) or getattr(config.data, "test_split", 0))


def _generation_settings(spec: SweepSpec) -> Any:
    from loralab.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=spec.max_new_tokens)


def record_failure(run: PlannedRun, reason: str, stage: str) -> None:
    write_json_atomic(failure_path(run), {"run": run.name, "stage": stage, "reason": reason,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def interrupted(run: PlannedRun) -> str:
    return (f"sweep interrupted during run {run.name}; run the same command again to resume "
            "(finished runs are skipped, this one continues from its last checkpoint)")


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
        if has_test_split(run.config):  # reported next to the eval split, never used to rank runs
            evaluate_run(run.run_dir, limit=spec.test_limit, settings=_generation_settings(spec), progress=progress,
                         loaded=loaded, split="test", general_text=False)
        evaluate_run(run.run_dir, limit=spec.eval_limit, settings=_generation_settings(spec), progress=progress,
                     loaded=loaded)
    except KeyboardInterrupt:  # Ctrl-C while evaluating (training turns it into TrainingInterrupted): no failure
        raise LoralabError(interrupted(run)) from None
    except RUN_FAILURES as exc:
        if isinstance(exc, TrainingInterrupted) or isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C
            raise LoralabError(interrupted(run)) from None
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

    train_part, eval_part = load_splits(config.data, resolve_task_type(config))[:2]
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
    """Run every combination of the grid (each once per seed; finished runs skipped), then write the reports.

    ``backend="optuna"`` dispatches runs as trials of an Optuna study in ``storage`` (shared by any number of
    workers); ``report_only`` builds the reports from the run folders without training anything.
    """
    if backend not in ("local", "optuna"):
        raise ConfigError(f"--backend must be local or optuna, got {backend!r}")
    outcomes = plan(spec)  # every config validated and every folder checked before anything runs
    planned = [o.run for o in outcomes]
    if dry_run:
        return SweepResult(spec, outcomes, dry_run=True)
    if report_only:
        return write_reports(spec, planned, resolve_prompts(spec, planned), generate_answers=False)
    return run_planned(spec, planned, backend=backend, storage=storage, retry_failed=retry_failed, progress=progress,
                       preflight=preflight, write_spec=True)


def run_planned(spec: SweepSpec, planned: list[PlannedRun], *, backend: str = "local", storage: str | None = None,
                retry_failed: bool = False, progress: bool = False, preflight: Callable[..., None] | None = None,
                write_spec: bool = False) -> SweepResult:
    """Train and evaluate these runs (finished ones skipped, half-finished ones resumed), then write the reports
    (and with ``write_spec`` sweep.yaml) into ``spec.sweep_dir``. The inputs of the runs still to do are loaded
    first, so that bad input fails before anything is written."""
    for run in planned:
        check_run_folder(run)
    outcomes = [read_outcome(run) for run in planned]
    todo = [o.run for o in outcomes if o.status == "pending" or (retry_failed and o.status == "failed")]
    if todo:
        check_inputs(todo)
    prompts = resolve_prompts(spec, planned)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    if write_spec:
        write_text_atomic(spec.sweep_dir / "sweep.yaml", spec.to_yaml())
    options = {"prompts": prompts, "retry_failed": retry_failed, "progress": progress, "preflight": preflight}
    if backend == "optuna":
        from loralab.sweeps.distributed import run_optuna_worker

        actions = run_optuna_worker(spec, planned, storage, **options)
    else:
        actions = {}
        for i, run in enumerate(planned, 1):
            log.info("[%d/%d] %s", i, len(planned), run.name)
            actions[run.name] = execute_run(run, spec, **options).action
    return write_reports(spec, planned, prompts, actions)


def write_reports(spec: SweepSpec, planned: list[PlannedRun], prompts: list[str], actions: dict[str, str] | None = None,
                  generate_answers: bool = True) -> SweepResult:
    """Read every run folder back and write comparison.csv/.md, curves.png, answers.md and report.html (with seeds
    also runs.csv, every run's own row).

    ``actions`` (run name -> trained / resumed / skipped / ...) is what this process did, for the console.
    Answers missing from a finished run are generated here unless ``generate_answers`` is false.
    """
    from loralab.sweeps.cells import best_cell
    from loralab.sweeps.page import write_all

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
    result = SweepResult(spec, outcomes)
    result.best = best_cell(result.cells(), spec.metric)
    result.files = write_all(result, prompts, answers)
    return result
