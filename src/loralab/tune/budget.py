"""The wall-clock budget of a tune: parsing ``20m``, what is left, what a trial will cost, the progress line.

Every time comes from one clock (``time.monotonic`` unless a test passes a fake one), so the budget logic can be
tested without waiting. A trial is started only when its estimated cost fits in what is left.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from loralab.errors import ConfigError

Clock = Callable[[], float]

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """Seconds of a duration: ``20m``, ``1h30m``, ``90s``, ``1.5h``, or a plain number of seconds (``1200``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", raw):
            seconds = float(raw)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", raw)
            if not parts or "".join(f"{n}{u}" for n, u in parts) != raw or any(u not in _UNITS for _, u in parts):
                raise ConfigError(f"--budget {text!r} is not a duration; write e.g. 20m, 1h30m, 90s or 1200 (seconds)")
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--budget {text!r} must be a positive duration (e.g. 20m)")
    return seconds


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m 30s``, ``1h 05m``; ``-`` for None or infinity."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@dataclass
class Budget:
    """What this invocation may spend: ``seconds`` of wall clock and/or ``trials`` new trials (None: no limit)."""

    seconds: float | None = None
    trials: int | None = None
    clock: Clock = time.monotonic
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        """Seconds left (infinity without a time budget)."""
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        """Whether a trial estimated to take ``estimate_s`` can finish inside what is left."""
        return self.seconds is None or estimate_s <= self.remaining()

    def trials_left(self, started: int) -> float:
        return math.inf if self.trials is None else self.trials - started


@dataclass
class CostModel:
    """Seconds a trial takes: setup (model load) + steps x seconds per step + evaluations x seconds per evaluation.

    The three rates come from the learning-rate range test (measured on the real model and data). Once trials have
    run, what they took is what counts: their wall time beyond loading per unit of work (steps plus evaluations, an
    evaluation weighing eval_s / step_s steps; the median over trials), times ``margin`` for the spread between
    trials (a larger r or more target modules cost more per step).
    """

    setup_s: float = 0.0
    step_s: float = 0.0
    eval_s: float = 0.0
    margin: float = 1.1
    observed: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, steps, evaluations)

    def prior(self, steps: int, evals: int) -> float:
        return self.setup_s + steps * self.step_s + evals * self.eval_s

    def observe(self, seconds: float, steps: int, evals: int) -> None:
        if math.isfinite(seconds) and seconds >= 0 and steps + evals > 0:
            self.observed.append((seconds, steps, evals))

    def _units(self, steps: int, evals: int) -> float:
        """Work in step-equivalents: an evaluation weighs eval_s / step_s steps (1 before anything is measured)."""
        weight = self.eval_s / self.step_s if self.step_s > 0 else 1.0
        return steps + evals * weight

    def estimate(self, steps: int, evals: int) -> float:
        """The expected wall time of a trial of ``steps`` optimizer steps and ``evals`` evaluations."""
        prior = self.prior(steps, evals)
        # seconds per unit of work beyond loading the model (a trial pruned early is mostly loading)
        rates = [max(0.0, seconds - self.setup_s) / self._units(s, e) for seconds, s, e in self.observed
                 if self._units(s, e) > 0]
        if not rates:
            return prior
        return self.margin * (self.setup_s + statistics.median(rates) * self._units(steps, evals))

    def describe(self) -> str:
        """The measured rates in words, for messages."""
        return (f"measured {self.step_s:.3g} s per training step, {self.eval_s:.3g} s per evaluation and "
                f"{self.setup_s:.3g} s to load the model")


@dataclass
class TuneProgress:
    """Where a tune stands after a trial: counts, the best value so far, and the budget left."""

    metric: str
    trials: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    best_value: float | None = None
    best_trial: int | None = None
    elapsed_s: float = 0.0
    remaining_s: float | None = None  # None: no time budget
    budget_s: float | None = None
    last: str = ""  # what the last trial did, in words


def progress_bar(fraction: float, width: int = 20) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return "█" * filled + "░" * (width - filled)


def progress_line(progress: TuneProgress) -> str:
    """One line: trials done, pruned, best so far, time left (with a bar of the time budget used)."""
    counts = (f"{progress.trials} trial{'s' * (progress.trials != 1)} ({progress.complete} complete, "
              f"{progress.pruned} pruned, {progress.failed} failed)")
    best = (f"best {progress.metric} {progress.best_value:.4g} (trial {progress.best_trial})"
            if progress.best_value is not None else f"no {progress.metric} yet")
    if progress.budget_s:
        used = progress.elapsed_s / progress.budget_s
        clock = f"{format_duration(progress.remaining_s)} of {format_duration(progress.budget_s)} left {progress_bar(used)}"
    else:
        clock = f"{format_duration(progress.elapsed_s)} elapsed"
    parts = [f"tune: {counts}", best, clock]
    if progress.last:
        parts.insert(0, progress.last)
    return " | ".join(parts)
