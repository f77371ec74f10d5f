"""Distributed sweeps on Optuna: every run of the grid is a trial of a study in shared storage.

Start ``loralab sweep SWEEP.yaml --backend optuna --storage URL`` on as many machines as you like (the sweep
folder on a shared filesystem). Each worker queues the runs that are not finished and that no trial works on
(``enqueue_trial``), and pops queued trials until none is left (re-checking after every trial); Optuna hands every
queued trial to exactly one worker. A run that another worker is already running is skipped (the trial is pruned);
a finished run is never trained again.

Storage: an Optuna RDB URL (``sqlite:///sweep.db``, ``postgresql://...``; with heartbeats every
``LORALAB_HEARTBEAT_S`` seconds (default 60), so the trial of a worker silent for 3 heartbeats is failed, by exactly
one other worker, and its run queued again) or a journal file path (``optuna.storages.JournalStorage``; the default
is ``<sweep folder>/optuna.journal``). A journal file has no heartbeats: the trial of a killed worker is failed and
its run queued again by a worker on the same machine (it sees the process is gone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable

from loralab.errors import LoralabError
from loralab.metrics import HIGHER_IS_BETTER
from loralab.runs import comparable_config
from loralab.sweeps.execute import execute_run, read_outcome
from loralab.sweeps.grid import PlannedRun
from loralab.sweeps.spec import SweepSpec

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 60
GRACE_HEARTBEATS = 3  # a trial whose worker missed this many heartbeats is stale


class RunFailed(Exception):
    """A sweep run failed (its reason is recorded in the sweep folder); the Optuna trial is marked FAIL."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LoralabError("the optuna backend needs optuna: pip install 'loralab[optuna]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def heartbeat_interval() -> int:
    """Seconds between a worker's heartbeats on a database (``LORALAB_HEARTBEAT_S``, default 60)."""
    raw = os.environ.get("LORALAB_HEARTBEAT_S", "")
    if not raw:
        return HEARTBEAT_INTERVAL_S
    if not raw.isdigit() or int(raw) < 1:
        raise LoralabError(f"LORALAB_HEARTBEAT_S={raw!r} must be a whole number of seconds, at least 1")
    return int(raw)


def open_storage(storage: str | None, folder: Path, on_stale: Callable[[Any, Any], None] | None = None) -> Any:
    """An RDB storage for a URL (with heartbeats; ``on_stale(study, trial)`` runs once, in the one worker that
    fails a stale trial), else a journal file (default: ``<folder>/optuna.journal``)."""
    optuna = _optuna()
    if storage and "://" in storage:
        interval = heartbeat_interval()
        try:
            return optuna.storages.RDBStorage(storage, heartbeat_interval=interval,
                                              grace_period=GRACE_HEARTBEATS * interval,
                                              heartbeat_stale_trial_callback=on_stale)
        except ImportError as exc:
            raise LoralabError(f"--storage {storage}: {exc} (PostgreSQL needs a driver: pip install "
                               "'loralab[postgres]')") from None
        except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds for a bad URL
            raise LoralabError(f"--storage {storage}: cannot open the Optuna database: {exc}") from None
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage) if storage else folder / "optuna.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def fingerprint(spec: SweepSpec, planned: list[PlannedRun]) -> str:
    """What a worker must agree on: every run's name and config, and how runs are evaluated."""
    data = [[run.name, comparable_config(run.config)] for run in planned] + [spec.eval_limit, spec.max_new_tokens]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def study_name(spec: SweepSpec) -> str:
    return f"loralab-sweep-{spec.name}-{spec.metric}"


def _run_index(trial: Any) -> int | None:
    value = trial.params.get("run", trial.user_attrs.get("run_index"))
    return int(value) if value is not None else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_dead_trials(study: Any, storage: Any) -> list[Any]:
    """Fail trials left running by a worker of this machine that no longer exists (killed, crashed); returns the
    trials this worker failed (when two workers try, the storage lets exactly one of them)."""
    optuna = _optuna()
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                if not storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker was first
                continue
            failed.append(trial)
            log.info("trial %d (%s) was left running by a dead worker (pid %d); queued again", trial.number,
                     trial.user_attrs.get("run_name") or trial.params, pid)
    return failed


def enqueue_pending(study: Any, planned: list[PlannedRun], retry_failed: bool) -> int:
    """Queue a trial for every unfinished run that no trial is queued for or running; returns the queue length."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    active = {_run_index(t) for t in study.get_trials(deepcopy=False, states=(states.WAITING, states.RUNNING))}
    for index, run in enumerate(planned):
        status = read_outcome(run).status
        if index not in active and (status == "pending" or (retry_failed and status == "failed")):
            study.enqueue_trial({"run": index}, user_attrs={"run_index": index, "run_name": run.name})
    return len(study.get_trials(deepcopy=False, states=(states.WAITING,)))


def open_study(spec: SweepSpec, planned: list[PlannedRun], storage: str | None) -> tuple[Any, Any]:
    optuna = _optuna()
    backend = open_storage(storage, spec.sweep_dir)
    direction = "maximize" if HIGHER_IS_BETTER[spec.metric] else "minimize"
    study = optuna.create_study(storage=backend, study_name=study_name(spec), direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())
    mark = fingerprint(spec, planned)
    existing = study.user_attrs.get("fingerprint")
    if existing is None:
        study.set_user_attr("fingerprint", mark)
        study.set_user_attr("runs", [run.name for run in planned])
    elif existing != mark:
        raise LoralabError(f"the Optuna study {study.study_name!r} in {storage or 'the sweep journal'} belongs to a "
                           "different sweep (its runs, configs or eval settings differ); use another --name")
    return study, backend


def run_optuna_worker(spec: SweepSpec, planned: list[PlannedRun], storage: str | None, *, prompts: list[str] | None = None,
                      retry_failed: bool = False, progress: bool = False,
                      preflight: Callable[..., None] | None = None) -> dict[str, str]:
    """Work on the sweep's study until no queued trial is left; returns what this worker did per run."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    study, backend = open_study(spec, planned, storage)

    def refill(retry: bool) -> int:
        """Fail the trials of dead workers, queue every run nobody works on; returns the queue length."""
        reclaim_dead_trials(study, backend)
        if isinstance(backend, optuna.storages.RDBStorage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)
        return enqueue_pending(study, planned, retry)

    waiting = refill(retry_failed)  # failed runs are retried once, when asked, not again after failing anew
    actions: dict[str, str] = {}
    if not waiting:
        log.info("optuna study %s: no run left to do", study.study_name)
        return actions

    def objective(trial: Any) -> float:
        index = trial.suggest_categorical("run", list(range(len(planned))))
        run = planned[index]
        for key, value in (("run_index", index), ("run_name", run.name), ("host", socket.gethostname()), ("pid", os.getpid())):
            trial.set_user_attr(key, value)
        running = [t.number for t in study.get_trials(deepcopy=False, states=(states.RUNNING,))
                   if _run_index(t) == index and t.number < trial.number]
        if running:
            raise optuna.TrialPruned(f"run {run.name} is already running as trial {running[0]}")
        log.info("trial %d: %s", trial.number, run.name)
        outcome = execute_run(run, spec, prompts=prompts, retry_failed=retry_failed, progress=progress,
                              preflight=preflight)
        actions[run.name] = outcome.action
        if outcome.status == "failed":
            raise RunFailed(f"run {run.name} failed: {outcome.reason}")
        value = outcome.metric(spec.metric)
        if value is None:
            raise optuna.TrialPruned(f"run {run.name} has no {spec.metric}")
        return value

    def stop_when_queue_empty(study: Any, _trial: Any) -> None:
        if not refill(False):
            study.stop()

    study.optimize(objective, catch=(RunFailed,), callbacks=[stop_when_queue_empty])
    return actions
