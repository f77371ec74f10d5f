"""``loralab tune``: a learning-rate range test, then a budgeted Optuna search with pruning, then ``best.yaml``.

A tune lives in one folder (``--output DIR``)::

    DIR/tune.yaml        what the study is: base config, data fingerprint, metric, the --space given (re-runs compare it)
    DIR/optuna.journal   the Optuna study (or --storage URL: a database shared by several workers)
    DIR/lr_find.json     the range test's points, suggestion and measured costs (kept: a re-run does not redo it)
    DIR/lr_find.png      loss against learning rate
    DIR/trials/<n>/      one ordinary run folder per trial (config.yaml, adapter, metrics.jsonl, summary.json)
    DIR/best.yaml        the best trial's complete run config: ``loralab train DIR/best.yaml`` trains it as is
    DIR/report.md/.html  every trial, parameter importance, the plots, the base model's row

Re-running ``tune`` on the same folder continues the study (finished trials are kept, new ones are added); a folder
holding another study (a different base config, data, metric or space) is refused with nothing changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from transformers import TrainerCallback

from loralab.config import RunConfig, build_config, check_remote_code, read_yaml
from loralab.errors import ConfigError, LoralabError
from loralab.metrics import HIGHER_IS_BETTER
from loralab.runs import comparable_config, config_differences, load_run_config, read_metrics, write_bytes_atomic, \
    write_json_atomic, write_text_atomic
from loralab.tune.budget import Budget, Clock, CostModel, TuneProgress, format_duration
from loralab.tune.range_test import LR_MAX, LR_MIN, STEPS, RangeTest, render_range_test_png, run_range_test
from loralab.tune.space import (Param, SpaceSummary, check_space, coverage_targets, evaluations, parse_space,
                                planned_steps, resolve_space, step_bounds, trial_config)

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("eval_loss", "exact_match", "chrf", "rouge_l", "bleu")
PRUNERS: tuple[str, ...] = ("hyperband", "halving", "median", "none")
MIN_EVALS = 4  # every trial reports its metric at least this often, so that pruning has something to act on
TUNE_FILE = "tune.yaml"
STARTUP_TRIALS = 5  # TPE samples at random for the first trials of a study, then models the good ones


@dataclass
class TuneSpec:
    """What to tune: the base config, the folder, the metric and the space given on top of the default one."""

    base: RunConfig
    output: Path
    metric: str = "eval_loss"
    space: dict[str, Param] = field(default_factory=dict)  # --space only; the resolved space adds the defaults
    seed: int = 0
    pruner: str = "hyperband"
    eval_limit: int | None = None  # a generation metric: eval examples answered at each evaluation
    lr_min: float = LR_MIN
    lr_max: float = LR_MAX
    lr_steps: int = STEPS
    storage: str | None = None  # None: DIR/optuna.journal

    def record(self) -> dict[str, Any]:
        """What defines the study (tune.yaml without the fingerprint): two runs of the same study agree on all of it."""

        from loralab.fingerprints import data_sources

        base = comparable_config(self.base)
        base.pop("name", None)
        data = {}
        for role, path in data_sources(self.base.data).items():
            if not Path(path).exists():
                raise LoralabError(f"data file not found: {path}")
            data[role] = _data_digest(path)
        return {"metric": self.metric, "space": {name: p.to_dict() for name, p in self.space.items()},
                "eval_limit": self.eval_limit,
                "range_test": {"lr_min": self.lr_min, "lr_max": self.lr_max, "steps": self.lr_steps},
                "data": data, "base": base}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def direction(self) -> str:
        return "maximize" if HIGHER_IS_BETTER[self.metric] else "minimize"

    @property
    def metric_key(self) -> str:
        return self.metric if self.metric == "eval_loss" else f"eval_{self.metric}"


def _data_digest(path: str) -> dict[str, Any]:
    """sha256 and size of a data file or folder; hashed once per content state (path, size, modification time)."""
    target = Path(path)
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return dict(_digest_of(str(target.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)))


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, state: tuple) -> tuple[tuple[str, Any], ...]:
    from loralab.fingerprints import file_fingerprint

    found = file_fingerprint(path)
    return (("sha256", found["sha256"]), ("bytes", found["bytes"]))


# ---------------------------------------------------------------- the spec


def _saved(output: Path) -> dict[str, Any] | None:
    path = Path(output) / TUNE_FILE
    return read_yaml(path) if path.is_file() else None


def load_tune(output: str | Path, base: RunConfig | None = None, *, metric: str | None = None,
              space_args: Iterable[str] = (), space: dict[str, Any] | None = None, seed: int | None = None,
              pruner: str | None = None, eval_limit: int | None = None, lr_min: float | None = None,
              lr_max: float | None = None, lr_steps: int | None = None, storage: str | None = None) -> TuneSpec:
    """A tune spec. What is not given comes from the folder's tune.yaml when it holds a tune (``base`` None: its base
    config; no ``--space``: its space), so that ``loralab tune --output DIR --budget 10m`` continues a study. Checked: the metric, the
    pruner, every ``--space`` key and value (the base config itself validated when it was built)."""
    output = Path(output)
    saved = _saved(output) or {}
    user_space = parse_space(space_args, space)
    if base is None:
        if saved.get("base"):
            base = build_config(saved["base"], source=f"{output / TUNE_FILE} (base)")
            check_remote_code(base, f"{output / TUNE_FILE}")
        else:
            base = build_config(source="defaults")
    if not user_space and saved.get("space"):  # no --space: the folder's
        user_space = parse_space(mapping=saved["space"])
    stored_range = saved.get("range_test") or {}
    spec = TuneSpec(
        base=base, output=output,
        metric=metric or saved.get("metric") or "eval_loss",
        space=user_space,
        seed=seed if seed is not None else int(saved.get("seed", 0)),
        pruner=pruner or saved.get("pruner") or "hyperband",
        eval_limit=eval_limit if eval_limit is not None else saved.get("eval_limit"),
        lr_min=lr_min if lr_min is not None else stored_range.get("lr_min", LR_MIN),
        lr_max=lr_max if lr_max is not None else stored_range.get("lr_max", LR_MAX),
        lr_steps=lr_steps if lr_steps is not None else stored_range.get("steps", STEPS),
        storage=storage if storage is not None else saved.get("storage"),
    )
    validate_spec(spec)
    return spec


def validate_spec(spec: TuneSpec) -> None:
    if spec.metric not in METRICS:
        raise ConfigError(f"--metric {spec.metric!r} is not a tune metric; choose one of: {', '.join(METRICS)}")
    if spec.pruner not in PRUNERS:
        raise ConfigError(f"--pruner {spec.pruner!r}; choose one of: {', '.join(PRUNERS)}")
    if spec.eval_limit is not None and (not isinstance(spec.eval_limit, int) or spec.eval_limit <= 0):
        raise ConfigError(f"--eval-limit must be a positive number of examples, got {spec.eval_limit!r}")
    if not (0 < spec.lr_min < spec.lr_max):
        raise ConfigError(f"the range test needs 0 < lr_min < lr_max, got {spec.lr_min} and {spec.lr_max}")
    if not isinstance(spec.lr_steps, int) or spec.lr_steps < 5:
        raise ConfigError(f"--lr-steps must be at least 5, got {spec.lr_steps!r}")
    check_space(spec.space, spec.base)


def _differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What differs between a folder's study and this one, in words."""
    out = []
    if saved.get("base") != record["base"]:
        try:
            before = build_config(saved.get("base") or {}, source="the saved base config")
            keys = config_differences(before, build_config(record["base"], source="the base config"))
        except ConfigError:
            keys = []
        out.append(f"base config ({', '.join(keys[:8]) or 'its content'})")
    if saved.get("data") != record["data"]:
        out.append("data (the data file's content or the eval file)")
    def space_text(space: dict[str, Any] | None) -> str:
        return "; ".join(f"{k}={Param.from_dict(k, v).describe()}" for k, v in (space or {}).items()) or "none"

    if saved.get("space") != record["space"]:
        out.append(f"--space ({space_text(saved.get('space'))} there, {space_text(record['space'])} here)")
    for key, label in (("metric", "metric"), ("eval_limit", "--eval-limit"), ("range_test", "range test settings")):
        if saved.get(key) != record[key]:
            out.append(f"{label} ({saved.get(key)!r} there, {record[key]!r} here)")
    return out


def check_output(spec: TuneSpec) -> dict[str, Any] | None:
    """Refuse a folder that is a file, holds something else than a tune, or holds another study; changes nothing.
    Returns the folder's tune.yaml (None for a new or empty folder)."""
    output = spec.output
    if output.exists() and not output.is_dir():
        raise LoralabError(f"--output {output} is a file, not a folder; choose another --output")
    if not output.exists() or not any(p for p in output.iterdir() if not p.name.startswith(".")):
        return None
    saved = _saved(output)
    if saved is None:
        names = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
        raise LoralabError(f"--output {output} is not empty and holds no loralab tune (no {TUNE_FILE}; it has "
                           f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); nothing was changed. "
                           "Choose another --output")
    record = spec.record()
    only_space = all(saved.get(key) == value for key, value in record.items() if key != "space")
    if only_space and not (output / "trials").exists():
        return saved  # only the range test ran (--lr-only): the space may still be chosen
    if saved.get("fingerprint") != spec.fingerprint():
        differing = _differences(saved, record)
        raise LoralabError(f"--output {output} holds another study (it differs in: {'; '.join(differing) or 'its record'}); "
                           f"nothing was changed. Use another --output for a different study, or run "
                           f"`loralab tune --output {output}` without a config to continue that one")
    if spec.storage and saved.get("storage") and spec.storage != saved["storage"]:
        raise LoralabError(f"the study of {output} lives in {saved['storage']}, not in {spec.storage}; pass the same "
                           "--storage (or none)")
    spec.storage = spec.storage or saved.get("storage")  # where the study lives, whoever calls
    return saved


def write_tune_file(spec: TuneSpec) -> None:
    record = spec.record()
    data = {"study": study_name(spec), "fingerprint": spec.fingerprint(), "seed": spec.seed, "pruner": spec.pruner,
            "storage": spec.storage, **record}
    text = ("# loralab tune: what this study is. Re-run `loralab tune --output DIR` to continue it.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None))
    write_text_atomic(spec.output / TUNE_FILE, text)


def study_name(spec: TuneSpec) -> str:
    return f"loralab-tune-{spec.fingerprint()}"


# ---------------------------------------------------------------- inputs


def check_metric_data(spec: TuneSpec, task_type: str, data: Any) -> None:
    """The metric needs an eval split; a generation metric also needs reference answers and a generative model."""
    eval_examples = list(data.eval_examples or [])
    if not eval_examples:
        raise ConfigError(f"tune measures {spec.metric} on the eval split, and this data has none (data.eval_split="
                          f"{spec.base.data.eval_split}, no data.eval_path); set data.eval_split (e.g. 0.2) or "
                          "data.eval_path")
    if spec.metric == "eval_loss":
        return
    if task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ConfigError(f"--metric {spec.metric} scores generated answers, and a {task_type} model generates none; "
                          "use --metric eval_loss")
    if not any(str(e.response or "").strip() for e in eval_examples):
        raise ConfigError(f"--metric {spec.metric} compares answers with the eval split's reference answers, and "
                          f"its {len(eval_examples)} examples have none (empty responses); use --metric eval_loss or "
                          "give data with answers")


def _range_test_file(output: Path) -> Path:
    return output / "lr_find.json"


def load_range_test(output: Path) -> RangeTest | None:
    path = _range_test_file(output)
    if not path.is_file():
        return None
    return RangeTest.from_dict(json.loads(path.read_text(encoding="utf-8")))


def lr_range_test(spec: TuneSpec, *, clock: Clock = time.perf_counter, prepared: Any = None,
                  preflight: Callable[..., None] | None = None, reuse: bool = True) -> RangeTest:
    """The range test of a tune folder: read back from ``lr_find.json`` when it was run before (``reuse``), else run
    (``preflight`` checks the loaded session first) and written with its plot ``lr_find.png``."""
    saved = load_range_test(spec.output) if reuse else None
    if saved is not None:
        return saved
    log.info("learning-rate range test: %d steps from %.0e to %.0e", spec.lr_steps, spec.lr_min, spec.lr_max)
    test = run_range_test(spec.base, lr_min=spec.lr_min, lr_max=spec.lr_max, steps=spec.lr_steps,
                          generation_metric=None if spec.metric == "eval_loss" else spec.metric,
                          generate_limit=spec.eval_limit, prepared=prepared, clock=clock, preflight=preflight)
    write_json_atomic(_range_test_file(spec.output), test.to_dict())
    write_bytes_atomic(spec.output / "lr_find.png", render_range_test_png(test, f"range test: {spec.output.name}"))
    log.info("range test: %s; %s", test.stopped, test.suggestion.describe())
    return test


# ---------------------------------------------------------------- Optuna


def _optuna() -> Any:
    from loralab.sweep_distributed import _optuna as load

    optuna = load()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune reports trials itself
    return optuna


def make_pruner(name: str, eval_steps: int, max_steps: int) -> Any:
    """Multi-fidelity pruning on the reported metric (the resource is the optimizer step)."""
    optuna = _optuna()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_steps, max_resource=max(max_steps, eval_steps),
                                              reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_steps, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=eval_steps)
    return optuna.pruners.NopPruner()


def make_sampler(seed: int, n_existing: int) -> Any:
    """Multivariate TPE; seeded with the seed plus the number of trials so far, so that a continued study does not
    draw its first random trials again."""
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
        return optuna.samplers.TPESampler(multivariate=True, seed=seed + n_existing, n_startup_trials=STARTUP_TRIALS)


def open_study(spec: TuneSpec, summary: SpaceSummary) -> tuple[Any, Any, SpaceSummary]:
    """The tune's study (created, or loaded to continue it) with its sampler and pruner, its storage, and its space:
    the space the study was created with (a continued study keeps its distributions, whatever changed since)."""
    from loralab.sweep_distributed import open_storage

    optuna = _optuna()
    storage = open_storage(spec.storage, spec.output)
    study = optuna.create_study(storage=storage, study_name=study_name(spec), direction=spec.direction,
                                load_if_exists=True)
    existing = study.user_attrs.get("fingerprint")
    if existing is None:
        study.set_user_attr("fingerprint", spec.fingerprint())
        study.set_user_attr("space", summary.to_dict())
        study.set_user_attr("metric", spec.metric)
    elif existing != spec.fingerprint():
        raise LoralabError(f"the Optuna study {study.study_name!r} in {spec.storage or 'the tune journal'} belongs to "
                           "another tune; use another --output or --storage")
    elif study.user_attrs.get("space"):
        summary = SpaceSummary.from_dict(study.user_attrs["space"])
    trials_dir = spec.output / "trials"
    if not study.trials and trials_dir.is_dir() and any(p.is_dir() for p in trials_dir.iterdir() if p.name != "failed"):
        raise LoralabError(f"{trials_dir} holds trial folders but the study in {spec.storage or spec.output / 'optuna.journal'} "
                           "has no trials (was the journal deleted, or is --storage another database?); nothing was "
                           "changed. Pass the --storage the study lives in, or use another --output")
    study.sampler = make_sampler(spec.seed, len(study.trials))
    study.pruner = make_pruner(spec.pruner, summary.eval_steps, summary.max_steps)
    return study, storage, summary


def requeue_interrupted(study: Any, storage: Any) -> list[int]:
    """Queue again, once, every trial left unfinished by an interrupted or killed tune; returns their numbers."""
    from loralab.sweep_distributed import reclaim_dead_trials

    optuna = _optuna()
    reclaim_dead_trials(study, storage)  # RUNNING trials of dead processes on this machine -> FAIL
    trials = study.get_trials(deepcopy=False)
    done = {t.user_attrs.get("requeued_from") for t in trials}
    again = []
    for trial in trials:
        if trial.state == optuna.trial.TrialState.FAIL and "outcome" not in trial.user_attrs and trial.number not in done \
                and trial.params:
            study.enqueue_trial(dict(trial.params), user_attrs={"requeued_from": trial.number})
            again.append(trial.number)
    return again


class PruningCallback(TrainerCallback):
    """Reports the tune metric to the trial at each evaluation (not the base model's at step 0) and stops the
    training of a trial the pruner prunes (the run folder then ends as a shorter, complete run: its adapter is the
    best checkpoint so far, summary.json says ``stopped_early``)."""

    def __init__(self, trial: Any, metric_key: str):
        self.trial, self.metric_key = trial, metric_key
        self.reported: list[tuple[int, float]] = []
        self.pruned_step: int | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        value = (metrics or {}).get(self.metric_key)
        if state.global_step == 0 or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.trial.report(float(value), state.global_step)
        self.reported.append((state.global_step, float(value)))
        if self.trial.should_prune():
            self.pruned_step = state.global_step
            control.should_training_stop = True


class TrialFailed(Exception):
    """A trial's training failed (diverged, out of memory, ...); recorded, and the search goes on."""


class TrialNotStarted(Exception):
    """A trial whose estimated time does not fit in the budget left; recorded, and the search stops."""


# ---------------------------------------------------------------- records


@dataclass
class TrialRecord:
    """One trial as the report shows it."""

    number: int
    state: str  # complete, pruned, failed, not started, interrupted, running, queued
    values: dict[str, Any]
    value: float | None = None
    time_s: float | None = None
    steps: int | None = None
    planned_steps: int | None = None
    pruned_step: int | None = None
    best_eval_loss: float | None = None
    reason: str | None = None
    run_dir: str | None = None


def trial_records(study: Any) -> list[TrialRecord]:
    optuna = _optuna()
    states = optuna.trial.TrialState
    records = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.state == states.COMPLETE:
            state = "complete"
        elif trial.state == states.PRUNED:
            state = "pruned"
        elif trial.state == states.RUNNING:
            state = "running"
        elif trial.state == states.WAITING:
            state = "queued"
        else:
            state = attrs.get("outcome") or "interrupted"
        value = trial.value if trial.state in (states.COMPLETE, states.PRUNED) else None
        records.append(TrialRecord(
            number=trial.number, state=state, values=attrs.get("values") or dict(trial.params),
            value=value if value is None or math.isfinite(value) else None, time_s=attrs.get("time_s"),
            steps=attrs.get("steps"), planned_steps=attrs.get("planned_steps"), pruned_step=attrs.get("pruned_step"),
            best_eval_loss=attrs.get("best_eval_loss"), reason=attrs.get("reason"), run_dir=attrs.get("run_dir")))
    return records


def best_record(records: list[TrialRecord], metric: str) -> TrialRecord | None:
    """The complete trial with the best value (the first on a tie); pruned trials never count as best."""
    scored = [r for r in records if r.state == "complete" and r.value is not None]
    if not scored:
        return None
    sign = -1 if HIGHER_IS_BETTER[metric] else 1
    return min(scored, key=lambda r: (sign * r.value, r.number))


def progress_of(records: list[TrialRecord], metric: str, budget: Budget, last: str = "") -> TuneProgress:
    best = best_record(records, metric)
    remaining = budget.remaining()
    return TuneProgress(metric=metric, trials=len([r for r in records if r.state not in ("queued",)]),
                        complete=sum(r.state == "complete" for r in records),
                        pruned=sum(r.state == "pruned" for r in records),
                        failed=sum(r.state in ("failed", "interrupted") for r in records),
                        best_value=best.value if best else None, best_trial=best.number if best else None,
                        elapsed_s=budget.elapsed(), remaining_s=None if math.isinf(remaining) else remaining,
                        budget_s=budget.seconds, last=last)


# ---------------------------------------------------------------- the result


@dataclass
class TuneResult:
    """A tune after running: the range test, every trial, the best one, the files written, why it stopped."""

    spec: TuneSpec
    range_test: RangeTest | None
    space: SpaceSummary | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    best: TrialRecord | None = None
    best_config: RunConfig | None = None
    files: dict[str, Path] = field(default_factory=dict)
    stopped: str = ""
    started: int = 0  # trials this call ran
    best_run: dict[str, Any] | None = None  # --train-best: the run's summary
    requeued: list[int] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return self.spec.output


def _absolute(value: str | None) -> str | None:
    if value and not Path(value).is_absolute() and Path(value).exists():
        return str(Path(value).resolve())
    return value


def best_config_of(spec: TuneSpec, best: TrialRecord) -> RunConfig:
    """The best trial's own config.yaml, as a run that trains into DIR/best (paths made absolute)."""
    run_dir = spec.output / "trials" / str(best.number)  # not the recorded path: a tune folder may be moved
    config = load_run_config(run_dir)
    data = config.model_dump(mode="json")
    data["name"], data["output_dir"] = "best", str(spec.output.resolve())
    data["data"]["path"] = _absolute(data["data"]["path"])
    data["data"]["eval_path"] = _absolute(data["data"]["eval_path"])
    data["model"]["name_or_path"] = _absolute(data["model"]["name_or_path"])
    return build_config(data, source=f"the best trial ({run_dir / 'config.yaml'})")


def write_best_yaml(spec: TuneSpec, best: TrialRecord, config: RunConfig, total: int) -> Path:
    path = spec.output / "best.yaml"
    header = (f"# loralab tune {spec.output}: trial {best.number}, {spec.metric} = {best.value:.6g} "
              f"(the best of {total} trials)\n# train it with: loralab train {path}\n")
    write_text_atomic(path, header + config.to_yaml())
    return path


# ---------------------------------------------------------------- the whole tune


def run_tune(spec: TuneSpec, *, budget_s: float | None = None, trials: int | None = None, lr_only: bool = False,
             train_best: bool = False, clock: Clock = time.monotonic, on_progress: Callable[[TuneProgress], None] | None = None,
             progress: bool = False, preflight: Callable[..., None] | None = None,
             enqueue: Iterable[dict[str, Any]] = (), keep_checkpoints: bool = False) -> TuneResult:
    """Run (or continue) a tune: the range test, then trials until ``trials`` new ones ran or ``budget_s`` seconds
    (wall clock, from this call, measured with ``clock``) would be exceeded by the next one, then best.yaml and the
    report. ``lr_only`` stops after the range test. ``enqueue``: trial values to try first (``{"lora.r": 8, ...}``).
    ``on_progress`` gets a :class:`TuneProgress` after each trial. ``train_best`` trains best.yaml into DIR/best.

    Every input is checked before anything is written: the metric and space, the folder (another study is
    refused), the data (it must have what the metric needs), the budget (after the range test: it must fit one trial).
    """
    from loralab import training

    budget = Budget(budget_s, trials, clock)
    if not lr_only and budget_s is None and trials is None:
        raise ConfigError("give --budget (e.g. 20m) or --trials N (or --lr-only for the range test alone)")
    validate_spec(spec)
    check_output(spec)
    task_type, tokenizer, data = prepared = training.load_tokenizer_and_data(spec.base)
    check_metric_data(spec, task_type, data)
    if not lr_only:
        _optuna()  # a missing optuna is said before anything runs
    spec.output.mkdir(parents=True, exist_ok=True)
    write_tune_file(spec)

    test = lr_range_test(spec, clock=clock, prepared=prepared, preflight=preflight)
    result = TuneResult(spec, test)
    if lr_only:
        result.stopped = "range test only (--lr-only)"
        result.files = {"range_test": spec.output / "lr_find.png", "range_test_data": _range_test_file(spec.output)}
        return result
    del prepared, tokenizer

    n_train = len(data.train)
    study, storage, summary = open_study(spec, space_summary(spec, test, n_train))
    result.space = summary
    space = summary.params
    result.requeued = requeue_interrupted(study, storage)
    for values in enqueue:
        unknown = sorted(set(values) - set(space))
        if unknown:
            raise ConfigError(f"enqueued trial values for {', '.join(unknown)}, which the space does not search; "
                              f"searched: {', '.join(space)}")
        study.enqueue_trial({name: space[name].encode(value) for name, value in values.items()})

    cost = CostModel(setup_s=test.setup_s, step_s=test.step_s, eval_s=test.eval_s)
    for record in trial_records(study):  # what earlier trials of this study measured
        if record.time_s is not None and record.steps:
            cost.observe(record.time_s, record.steps, evaluations(record.steps, summary.eval_steps))
    runner = _TrialRunner(spec, summary, cost, budget, training, n_train, progress, keep_checkpoints)
    started = 0
    while True:
        if budget.trials_left(started) <= 0:
            result.stopped = f"{started} trial{'s' * (started != 1)} run (--trials {trials})"
            break
        shortest = cost.estimate(summary.min_steps, evaluations(summary.min_steps, summary.eval_steps))
        if not budget.fits(shortest):
            result.stopped = (f"budget: {format_duration(budget.remaining())} left, the shortest trial "
                              f"({summary.min_steps} steps) needs ~{format_duration(shortest)}")
            if started == 0:
                raise LoralabError(
                    f"--budget {format_duration(budget_s)} is too small for one trial: the shortest trial "
                    f"({summary.min_steps} steps, {evaluations(summary.min_steps, summary.eval_steps)} evaluations) "
                    f"needs ~{format_duration(shortest)} and {format_duration(max(0.0, budget.remaining()))} is left "
                    f"after the range test ({cost.describe()}). Give a larger --budget, or fewer steps (e.g. --space "
                    f"train.max_steps=...); the range test is kept in {spec.output}")
            break
        runner.last = None
        study.optimize(runner, n_trials=1, catch=(TrialFailed, TrialNotStarted))
        started += 1
        records = trial_records(study)
        last = runner.last
        if on_progress is not None:
            on_progress(progress_of(records, spec.metric, budget, last=runner.describe_last()))
        _write_results(result, study, records)
        if last is not None and last.get("outcome") == "not started":
            result.stopped = f"budget: {last.get('reason')}"
            break
    result.started = started
    records = trial_records(study)
    _write_results(result, study, records)
    if train_best and result.best_config is not None:
        result.best_run = train_best_config(spec, result.best_config, progress=progress)
    return result


def space_summary(spec: TuneSpec, test: RangeTest, n_train: int) -> SpaceSummary:
    """The resolved space (defaults + --space, the learning rate inside the range test's range) and the schedule
    every trial shares: evaluate every ``eval_steps`` steps, so that the shortest trial evaluates MIN_EVALS times."""
    coverages = coverage_targets(spec.base)
    params = resolve_space(spec.base, spec.space, (test.suggestion.low, test.suggestion.high), coverages)
    low, high = step_bounds(spec.base, params, n_train)
    eval_steps = max(1, low // MIN_EVALS)
    notes = []
    if low < MIN_EVALS:
        notes.append(f"the shortest trial has only {low} steps: fewer than {MIN_EVALS} evaluations to prune on")
    if "train.learning_rate" in spec.space:
        notes.append("the learning-rate range is the one given with --space (the range test's is "
                     f"{test.suggestion.low:.2g} .. {test.suggestion.high:.2g})")
    return SpaceSummary(params, {name: coverages[name] for name in coverages}, eval_steps, low, high, notes)


class _TrialRunner:
    """The objective of one trial: its config, the budget check, training with the pruning callback, bookkeeping."""

    def __init__(self, spec: TuneSpec, summary: SpaceSummary, cost: CostModel, budget: Budget, training: Any,
                 n_train: int, progress: bool, keep_checkpoints: bool):
        self.spec, self.summary, self.cost, self.budget = spec, summary, cost, budget
        self.training, self.n_train, self.progress, self.keep_checkpoints = training, n_train, progress, keep_checkpoints
        self.last: dict[str, Any] | None = None

    def describe_last(self) -> str:
        last = self.last or {}
        if not last:
            return ""
        what = {"complete": "complete", "pruned": f"pruned at step {last.get('pruned_step')}",
                "failed": f"failed: {last.get('reason')}", "not started": f"not started: {last.get('reason')}"}
        return f"trial {last.get('number')} {what.get(last.get('outcome'), last.get('outcome'))}"

    def __call__(self, trial: Any) -> float:
        from loralab.guards import TrainingInterrupted
        from loralab.sweeps import RUN_FAILURES, PlannedRun, record_failure

        optuna = _optuna()
        spec, summary = self.spec, self.summary
        self.last = attrs = {"number": trial.number}

        def note(**values: Any) -> None:
            for key, value in values.items():
                trial.set_user_attr(key, value)
            attrs.update(values)

        note(host=socket.gethostname(), pid=os.getpid())
        values = {name: param.suggest(trial) for name, param in summary.params.items()}
        run_dir = spec.output / "trials" / str(trial.number)
        try:
            config = trial_config(spec.base, values, name=str(trial.number), output_dir=str(spec.output / "trials"),
                                  metric=spec.metric, eval_steps=summary.eval_steps, eval_limit=spec.eval_limit,
                                  coverages=summary.coverages)
        except ConfigError as exc:  # a combination of values that does not validate (e.g. an odd r with orthogonal)
            note(values=_jsonable(values), outcome="failed", reason=str(exc))
            raise TrialFailed(str(exc)) from None
        steps = planned_steps(config.train, self.n_train)
        estimate = self.cost.estimate(steps, evaluations(steps, summary.eval_steps))
        note(values=_jsonable(values), run_dir=str(run_dir), planned_steps=steps, estimate_s=round(estimate, 2))
        if not self.budget.fits(estimate):
            reason = (f"trial {trial.number} ({steps} steps) needs ~{format_duration(estimate)}, "
                      f"{format_duration(max(0.0, self.budget.remaining()))} left")
            note(outcome="not started", reason=reason)
            raise TrialNotStarted(reason)
        callback = PruningCallback(trial, spec.metric_key)
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={_show(v)}" for k, v in values.items()))
        began = self.budget.clock()
        try:
            run_summary = self.training.train(config, run_dir=run_dir, progress=self.progress, callbacks=[callback])
        except TrainingInterrupted:
            raise LoralabError(f"tune interrupted during trial {trial.number}; run the same command again to continue "
                               "(that trial is queued again and starts over)") from None
        except RUN_FAILURES as exc:
            reason = str(exc) if isinstance(exc, LoralabError) else f"{type(exc).__name__}: {exc}"
            note(outcome="failed", reason=reason, time_s=round(self.budget.clock() - began, 2))
            record_failure(PlannedRun(str(trial.number), values, config), reason, "train")
            log.warning("trial %d failed: %s", trial.number, reason)
            raise TrialFailed(reason) from None
        elapsed = self.budget.clock() - began
        history = read_metrics(run_dir)
        evals = sum(1 for h in history if "eval_loss" in h)
        done = int(run_summary.get("steps") or 0)
        self.cost.observe(elapsed, done, evals)
        base_metric = next((h.get(spec.metric_key) for h in history if h.get("step") == 0 and spec.metric_key in h), None)
        note(time_s=round(elapsed, 2), steps=done, evals=evals, best_eval_loss=run_summary.get("best_eval_loss"),
             base_eval_loss=run_summary.get("base_eval_loss"), base_metric=base_metric,
             reported=[list(p) for p in callback.reported])
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the adapter (best checkpoint) stays
        tune_info = {"trial": trial.number, "study": study_name(spec), "metric": spec.metric}
        if not self.keep_checkpoints:
            tune_info["checkpoints"] = "removed by tune after the trial (the adapter is the best checkpoint)"
        if callback.pruned_step is not None:
            note(outcome="pruned", pruned_step=callback.pruned_step)
            _annotate_summary(run_dir, {**tune_info, "state": "pruned", "pruned_at_step": callback.pruned_step})
            raise optuna.TrialPruned(f"pruned at step {callback.pruned_step}")
        value = run_summary.get("best_metric")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            reason = f"the run has no finite {spec.metric} (best_metric {value!r})"
            note(outcome="failed", reason=reason)
            raise TrialFailed(reason)
        note(outcome="complete")
        _annotate_summary(run_dir, {**tune_info, "state": "complete"})
        return float(value)


def _annotate_summary(run_dir: Path, info: dict[str, Any]) -> None:
    path = run_dir / "summary.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        data["tune"] = info
        write_json_atomic(path, data)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _show(value: Any) -> str:
    from loralab.sweeps import display_value

    return display_value(value)


def _write_results(result: TuneResult, study: Any, records: list[TrialRecord]) -> None:
    """best.yaml (when a trial completed) and the report, from the study as it is now."""
    from loralab.tune.report import write_report

    spec = result.spec
    result.trials = records
    result.best = best_record(records, spec.metric)
    if result.best is not None:
        try:
            result.best_config = best_config_of(spec, result.best)
            result.files["best"] = write_best_yaml(spec, result.best, result.best_config, len(records))
        except LoralabError as exc:  # another worker's trial folder not visible from here
            log.warning("no best.yaml: %s", exc)
    result.files.update(write_report(result, study))


def train_best_config(spec: TuneSpec, config: RunConfig, progress: bool = False) -> dict[str, Any]:
    """Train best.yaml into DIR/best (skipped when DIR/best already holds this run, finished)."""
    from loralab import training
    from loralab.runs import read_summary
    from loralab.sweeps import is_trained

    run_dir = spec.output / "best"
    if is_trained(run_dir):
        if not config_differences(load_run_config(run_dir), config):
            log.info("%s already holds the best config, trained", run_dir)
            return read_summary(run_dir)
    log.info("training the best config into %s", run_dir)
    return training.train(config, run_dir=run_dir, overwrite=run_dir.exists(), progress=progress)
