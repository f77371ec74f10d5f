"""Preflight checks: everything that can make a run useless, found in seconds before any compute is spent.

Each check is a function ``check_x(session) -> CheckResult`` computed from the session's real tokenizer, collator
and model (``loralab.training.setup``). ``run_checks`` runs them all for ``loralab check``; ``fast_preflight`` runs
the quick subset before every ``loralab train`` and stops on a failure.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Callable

from loralab.checks.data import (
    check_hygiene,
    check_hyperparameters,
    check_label_masking,
    check_lengths,
    check_tokenizer,
)
from loralab.checks.model import check_cost, check_data_flow, check_loss, check_targets
from loralab.checks.report import CheckReport, CheckResult
from loralab.checks.show import render_examples
from loralab.config import RunConfig
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

Check = Callable[..., CheckResult]
DATA_CHECKS: list[Check] = [check_tokenizer, check_hygiene, check_lengths, check_label_masking, check_hyperparameters]
MODEL_CHECKS: list[Check] = [check_targets, check_data_flow, check_loss]
# tasks whose data is not prompts and answers: their module's session_checks() names their data and model checks
# (QA: windows and span positions; TOKEN_CLS: word / tag alignment; FEATURE_EXTRACTION: pairs)
TASK_CHECKS = {"QUESTION_ANSWERING": "loralab.tasks.qa", "TOKEN_CLS": "loralab.tasks.token_cls",
               "FEATURE_EXTRACTION": "loralab.tasks.embeddings"}

__all__ = ["CheckReport", "CheckResult", "run_checks", "fast_preflight", "render_examples", "run_session_checks",
           "check_tokenizer", "check_hygiene", "check_lengths", "check_label_masking", "check_hyperparameters",
           "check_targets", "check_data_flow", "check_loss", "check_cost"]


def _run_one(check: Check, session: Any, debug: bool, **kwargs: Any) -> CheckResult:
    """Run one check; a crash becomes a failing row (re-raised with ``debug``) so one check never hides the others."""
    started = time.perf_counter()
    try:
        result = check(session, **kwargs)
    except LoralabError as exc:
        if debug:
            raise
        result = CheckResult(check.__name__.removeprefix("check_"), "fail", str(exc))
    except Exception as exc:  # noqa: BLE001 - reported as a failed check, traceback with --debug
        if debug:
            raise
        result = CheckResult(check.__name__.removeprefix("check_"), "fail",
                             f"the check itself failed: {type(exc).__name__}: {exc} (--debug shows the traceback)")
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def run_session_checks(session: Any, *, fast: bool = False, debug: bool = False) -> list[CheckResult]:
    """The checks on a loaded session (data checks only when ``session.model`` is None); ``fast`` skips the cost."""
    task = TASK_CHECKS.get(session.task_type)
    data_checks, model_checks = importlib.import_module(task).session_checks() if task else (DATA_CHECKS, MODEL_CHECKS)
    results = [_run_one(c, session, debug) for c in data_checks]
    if session.model is not None:
        results += [_run_one(c, session, debug, fast=fast) if c is check_loss else _run_one(c, session, debug)
                    for c in model_checks]
        if not fast and task is None:
            results.append(_run_one(check_cost, session, debug))
    return results


def run_checks(config: RunConfig, show: int = 0, include_cost: bool = True, debug: bool = False) -> CheckReport:
    """Load the run's tokenizer, data and model as ``train`` would, and run every check.

    Loading errors (an unreadable file, a row without the expected field, target modules matching nothing) become
    failing ``data`` / ``model`` rows instead of exceptions, unless ``debug``.
    """
    from loralab.training import Session, load_tokenizer_and_data, setup

    started = time.perf_counter()
    results: list[CheckResult] = []
    try:
        prepared = load_tokenizer_and_data(config)
    except LoralabError as exc:
        if debug:
            raise
        return CheckReport([CheckResult("data", "fail", str(exc))], seconds=time.perf_counter() - started)
    task_type, tokenizer, data = prepared
    results.append(CheckResult("data", "pass", f"{len(data.train)} train / {len(data.eval or [])} eval examples ({task_type})",
                               {"n_train": len(data.train), "n_eval": len(data.eval or []), "task_type": task_type}))
    try:
        session = setup(config, prepared)
    except LoralabError as exc:
        if debug:
            raise
        results.append(CheckResult("model", "fail", str(exc)))
        session = Session(config, task_type, tokenizer, data, model=None, targets=None, collator=None)
    results += run_session_checks(session, fast=not include_cost, debug=debug)
    examples = render_examples(session, show, color=False) if show and session.collator is not None \
        and session.task_type not in ("FEATURE_EXTRACTION", "QUESTION_ANSWERING", "TOKEN_CLS") else []
    return CheckReport(results, examples=examples, seconds=time.perf_counter() - started, session=session)


def fast_preflight(session: Any) -> CheckReport:
    """The quick checks ``loralab train`` runs before training: warnings are logged, failures raise LoralabError;
    the report is returned (training writes it into the run folder as checks.json)."""
    started = time.perf_counter()
    report = CheckReport(run_session_checks(session, fast=True), seconds=0.0)
    for result in report.results:
        if result.status == "warn":
            log.warning("check %s: %s", result.name, result.reason)
    if report.failed:
        lines = "\n".join(f"  {r.name}: {r.reason}" for r in report.failed)
        raise LoralabError(f"preflight checks failed:\n{lines}\n"
                           "`loralab check` with the same arguments shows the details; "
                           "`loralab train --skip-checks` trains anyway")
    report.seconds = time.perf_counter() - started
    log.info("preflight: %d checks passed, %d warnings (%.1f s)", sum(r.status == "pass" for r in report.results),
             sum(r.status == "warn" for r in report.results), report.seconds)
    return report
