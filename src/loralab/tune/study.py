"""The Optuna side of a tune: the study (created or continued, in a journal file or a shared database), its
sampler (multivariate TPE) and pruner (Hyperband by default), the callback that reports each evaluation to the
trial, trials left behind by a killed worker queued again (exactly once), and the trials read back as records.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from loralab.errors import LoralabError
from loralab.metrics import HIGHER_IS_BETTER
from loralab.tune.budget import Budget, TuneProgress
from loralab.tune.space import SpaceSummary, base_point
from loralab.tune.spec import TuneSpec, study_name

log = logging.getLogger(__name__)

STARTUP_TRIALS = 5  # TPE samples at random for the first trials of a study, then models the good ones


def _optuna() -> Any:
    from loralab.sweeps.distributed import _optuna as load

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


def requeue(study: Any, trial: Any, why: str | None) -> None:
    """Queue a trial's values again as a new trial that remembers where it came from (``requeued_from``); ``why``
    is logged (None: the caller said it)."""
    if trial.params:
        study.enqueue_trial(dict(trial.params), user_attrs={"requeued_from": trial.number})
        if why:
            log.info("trial %d %s; its values are queued again", trial.number, why)


def requeue_stale(study: Any, trial: Any) -> None:
    """Optuna's heartbeat callback: called once, by the one worker that failed a trial whose worker went silent."""
    requeue(study, trial, "stopped sending heartbeats (its worker was killed or lost)")


def open_study(spec: TuneSpec, summary: SpaceSummary, base_first: bool = True) -> tuple[Any, Any, SpaceSummary]:
    """The tune's study (created, or loaded to continue it) with its sampler and pruner, its storage, and its space:
    the space the study was created with (a continued study keeps its distributions, whatever changed since).
    A new study's first trial is the base config (``base_point``) unless ``base_first`` is False."""
    from loralab.sweeps.distributed import open_storage

    optuna = _optuna()
    storage = open_storage(spec.storage, spec.output, on_stale=requeue_stale)
    study = optuna.create_study(storage=storage, study_name=study_name(spec), direction=spec.direction,
                                load_if_exists=True)
    existing = study.user_attrs.get("fingerprint")
    if existing is None:
        study.set_user_attr("fingerprint", spec.fingerprint())
        study.set_user_attr("space", summary.to_dict())
        study.set_user_attr("metric", spec.metric)
        point = base_point(spec.base, summary.params, summary.coverages)
        if base_first and point and not study.trials:  # the first trial is the user's own config (or loralab's defaults)
            study.enqueue_trial(point, user_attrs={"base_config": True})
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


def reclaim_trials(study: Any, storage: Any) -> list[int]:
    """Fail the trials of workers that died (this machine: the process is gone; a database: no heartbeat for 3
    intervals) and queue their values again, each exactly once (the storage lets one worker fail a trial)."""
    from loralab.sweeps.distributed import reclaim_dead_trials

    optuna = _optuna()
    again = []
    for trial in reclaim_dead_trials(study, storage):
        requeue(study, trial, None)  # reclaim_dead_trials said so
        again.append(trial.number)
    if isinstance(storage, optuna.storages.RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental
            optuna.storages.fail_stale_trials(study)  # stale trials: requeue_stale, in the worker that failed them
    return again


def requeue_interrupted(study: Any, storage: Any) -> list[int]:
    """When a worker starts: queue again, once, every trial left unfinished by an interrupted or killed tune
    (a worker that starts at the same moment may queue one too: :func:`duplicate_of` skips the later copy)."""
    optuna = _optuna()
    again = reclaim_trials(study, storage)
    trials = study.get_trials(deepcopy=False)
    done = {t.user_attrs.get("requeued_from") for t in trials}
    for trial in trials:
        if trial.state == optuna.trial.TrialState.FAIL and "outcome" not in trial.user_attrs and trial.number not in done \
                and trial.params:
            requeue(study, trial, "was interrupted")
            again.append(trial.number)
    return again


def duplicate_of(study: Any, trial: Any) -> int | None:
    """The earlier trial that re-runs the same interrupted trial as ``trial`` (two workers queued it at once), if any:
    the lower number runs, the other is skipped, whichever worker gets which."""
    origin = trial.user_attrs.get("requeued_from")
    if origin is None:
        return None
    for other in study.get_trials(deepcopy=False):
        if other.number < trial.number and other.user_attrs.get("requeued_from") == origin \
                and other.user_attrs.get("outcome") != "duplicate":
            return other.number
    return None


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
        if attrs.get("outcome") == "duplicate":  # a second copy of a re-queued trial, never run
            continue
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

