"""One trial of a tune: its run config, the budget check, training with the pruning callback, what it measured
(kept as the trial's user attributes and in its run folder's summary.json)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from loralab.errors import ConfigError, LoralabError
from loralab.runs import read_metrics, write_json_atomic
from loralab.tune.budget import Budget, CostModel, format_duration
from loralab.tune.space import SpaceSummary, evaluations, planned_steps, trial_config
from loralab.tune.spec import TuneSpec, study_name
from loralab.tune.study import PruningCallback, _optuna, duplicate_of

log = logging.getLogger(__name__)


class TrialFailed(Exception):
    """A trial's training failed (diverged, out of memory, ...); recorded, and the search goes on."""


class TrialNotStarted(Exception):
    """A trial whose estimated time does not fit in the budget left; recorded, and the search stops."""


class TrialDuplicate(Exception):
    """A second copy of a re-queued trial (two workers queued it at once); skipped, and not counted."""


class TrialRunner:
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

        twin = duplicate_of(trial.study, trial)
        if twin is not None:
            note(outcome="duplicate", reason=f"trial {trial.user_attrs.get('requeued_from')} is re-run as trial {twin}")
            raise TrialDuplicate(attrs["reason"])
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

