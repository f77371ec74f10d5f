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

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from loralab.errors import ConfigError, LoralabError
from loralab.runs import write_bytes_atomic, write_json_atomic
from loralab.tune.budget import Budget, Clock, CostModel, TuneProgress, format_duration
from loralab.tune.range_test import RangeTest, render_range_test_png, run_range_test
from loralab.tune.results import TuneResult, train_best_config, write_results
from loralab.tune.space import SpaceSummary, coverage_targets, evaluations, resolve_space, step_bounds
from loralab.tune.spec import TuneSpec, check_metric_data, check_output, validate_spec, write_tune_file
from loralab.tune.study import _optuna, open_study, progress_of, reclaim_trials, requeue_interrupted, trial_records
from loralab.tune.trial import TrialDuplicate, TrialFailed, TrialNotStarted, TrialRunner

log = logging.getLogger(__name__)

MIN_EVALS = 4  # every trial reports its metric at least this often, so that pruning has something to act on


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


# ---------------------------------------------------------------- the whole tune


def run_tune(spec: TuneSpec, *, budget_s: float | None = None, trials: int | None = None, lr_only: bool = False,
             train_best: bool = False, seeds: list[int] | None = None, baselines: bool = False,
             clock: Clock = time.monotonic, on_progress: Callable[[TuneProgress], None] | None = None,
             progress: bool = False, preflight: Callable[..., None] | None = None,
             enqueue: Iterable[dict[str, Any]] = (), keep_checkpoints: bool = False) -> TuneResult:
    """Run (or continue) a tune: the range test, then trials until ``trials`` new ones ran or ``budget_s`` seconds
    (wall clock, from this call, measured with ``clock``) would be exceeded by the next one, then best.yaml and the
    report. ``lr_only`` stops after the range test. ``enqueue``: trial values to try first (``{"lora.r": 8, ...}``;
    without them a new study's first trial is the base config's own values).
    ``on_progress`` gets a :class:`TuneProgress` after each trial.

    After the search the best trial is scored on the data's held-out test split (when it holds one out).
    ``train_best`` trains best.yaml into DIR/best; ``seeds`` (and ``baselines``: also loralab's defaults and the
    usual recipe) trains the comparison of :mod:`loralab.tune.final` into DIR/final, once per seed. Without a
    budget or a trial count, ``train_best`` / ``seeds`` / ``baselines`` work on the study as it is (no new trials).

    Every input is checked before anything is written: the metric and space, the folder (another study is
    refused), the data (it must have what the metric needs), the budget (after the range test: it must fit one trial).
    """
    from loralab import training

    finishing = train_best or seeds is not None or baselines
    if not lr_only and budget_s is None and trials is None:
        if not finishing:
            raise ConfigError("give --budget (e.g. 20m) or --trials N (or --lr-only for the range test alone)")
        if not (spec.output / "trials").is_dir():
            raise ConfigError(f"{spec.output} has no trials yet to train the best of: give --budget (e.g. 20m) or "
                              "--trials N for the search first")
        trials = 0
    budget = Budget(budget_s, trials, clock)
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
    enqueue = list(enqueue)
    study, storage, summary = open_study(spec, space_summary(spec, test, n_train), base_first=not enqueue)
    result.space = summary
    result.requeued = requeue_interrupted(study, storage)
    for values in enqueue:
        unknown = sorted(set(values) - set(summary.params))
        if unknown:
            raise ConfigError(f"enqueued trial values for {', '.join(unknown)}, which the space does not search; "
                              f"searched: {', '.join(summary.params)}")
        study.enqueue_trial({name: summary.params[name].encode(value) for name, value in values.items()})
    _search(result, study, storage, budget, TrialRunner(spec, summary, _cost(test, study, summary), budget, training,
                                                        n_train, progress, keep_checkpoints), on_progress)
    write_results(result, study, trial_records(study), report=False)  # _finish writes the report
    _finish(result, study, train_best=train_best, seeds=seeds, baselines=baselines, progress=progress,
            preflight=preflight)
    return result


REDRAWS = 3  # trials in a row drawn too long for the budget left before the search stops


def _cost(test: RangeTest, study: Any, summary: SpaceSummary) -> CostModel:
    """What a trial costs: the range test's measurements, then what this study's trials took."""
    cost = CostModel(setup_s=test.setup_s, step_s=test.step_s, eval_s=test.eval_s)
    for record in trial_records(study):
        if record.time_s is not None and record.steps:
            cost.observe(record.time_s, record.steps, evaluations(record.steps, summary.eval_steps))
    return cost


def _search(result: TuneResult, study: Any, storage: Any, budget: Budget, runner: TrialRunner,
            on_progress: Callable[[TuneProgress], None] | None) -> None:
    """Trials, one at a time, while the trial count and the budget allow; the report after each. A drawn trial too
    long for the time left is not started and another is drawn, up to REDRAWS times in a row (a shorter one may fit)."""
    spec, summary, cost = result.spec, runner.summary, runner.cost
    started = unfit = 0
    while True:
        if budget.trials_left(started) <= 0:
            result.stopped = (f"{started} trial{'s' * (started != 1)} run (--trials {budget.trials})" if budget.trials
                              else "no new trials (the best of the study so far)")
            break
        shortest = cost.estimate(summary.min_steps, evaluations(summary.min_steps, summary.eval_steps))
        if not budget.fits(shortest):
            result.stopped = (f"budget: {format_duration(budget.remaining())} left, the shortest trial "
                              f"({summary.min_steps} steps) needs ~{format_duration(shortest)}")
            if started == 0:
                raise LoralabError(
                    f"--budget {format_duration(budget.seconds)} is too small for one trial: the shortest trial "
                    f"({summary.min_steps} steps, {evaluations(summary.min_steps, summary.eval_steps)} evaluations) "
                    f"needs ~{format_duration(shortest)} and {format_duration(max(0.0, budget.remaining()))} is left "
                    f"after the range test ({cost.describe()}). Give a larger --budget, or fewer steps (e.g. --space "
                    f"train.max_steps=...); the range test is kept in {spec.output}")
            break
        runner.last = None
        reclaim_trials(study, storage)  # a worker that died since: its trial is queued again (by one worker)
        study.optimize(runner, n_trials=1, catch=(TrialFailed, TrialNotStarted, TrialDuplicate))
        if (runner.last or {}).get("outcome") == "duplicate":
            continue
        started += 1
        records = trial_records(study)
        if on_progress is not None:
            on_progress(progress_of(records, spec.metric, budget, last=runner.describe_last()))
        write_results(result, study, records)
        if (runner.last or {}).get("outcome") == "not started":  # too long for what is left: another draw may fit
            unfit += 1
            result.stopped = f"budget: {runner.last.get('reason')}"
            if unfit >= REDRAWS:
                break
        else:
            unfit = 0
    result.started = started


def _finish(result: TuneResult, study: Any, *, train_best: bool, seeds: list[int] | None, baselines: bool,
            progress: bool, preflight: Callable[..., None] | None) -> None:
    """The best trial on the held-out test split; best.yaml trained (DIR/best, or DIR/final once per seed)."""
    from loralab.tune.final import run_final, score_on_test
    from loralab.tune.report import write_report

    spec = result.spec
    if result.best is not None:
        try:
            result.best_test = score_on_test(spec.output / "trials" / str(result.best.number))
        except LoralabError as exc:  # e.g. another worker's trial folder, not visible from here
            log.warning("the best trial was not scored on the test split: %s", exc)
    if (train_best or seeds is not None or baselines) and result.best_config is None:
        raise LoralabError(f"no complete trial in {spec.output} yet, so there is no best config to train; give "
                           "--budget or --trials for (more of) the search")
    if seeds is not None or baselines:
        result.final = run_final(spec, result.best_config, seeds or [spec.base.train.seed], baselines=baselines,
                                 progress=progress, preflight=preflight)
    elif train_best:
        result.best_run = train_best_config(spec, result.best_config, progress=progress)
    result.files.update(write_report(result, study))


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

