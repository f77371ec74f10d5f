"""A sweep's cells: the runs of one grid combination over its seeds, summarised as mean ± sd (and n) per metric.

Without seeds every cell has one run (its name is the run's). The best cell is judged by its mean over the seeds,
and only cells whose every seed finished are ranked (a seed that diverged says something about the cell too).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loralab.metrics import HIGHER_IS_BETTER

if TYPE_CHECKING:
    from loralab.sweeps.execute import RunOutcome

GEN_METRICS: tuple[str, ...] = ("exact_match", "rouge_l", "chrf", "bleu")
# what is aggregated over a cell's finished seeds, in table order
SUMMARY_KEYS: tuple[str, ...] = ("trainable_params", "train_time_s", "steps", "final_train_loss", "final_eval_loss",
                                 "best_eval_loss")
TEST_METRICS: tuple[str, ...] = tuple(f"test_{name}" for name in GEN_METRICS)  # the held-out test split
# what the adapter cost elsewhere: % change of the general-text perplexity, base -> adapter (loralab.forgetting)
GENERAL_METRICS: tuple[str, ...] = ("general_ppl_change", "general_ppl_change_zh", "general_ppl_change_en")
AGGREGATED: tuple[str, ...] = (*SUMMARY_KEYS, *GEN_METRICS, *TEST_METRICS, *GENERAL_METRICS)


@dataclass
class Stat:
    """Mean, sample standard deviation (None for fewer than 2 values) and count of a metric over seeds."""

    mean: float | None
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if not values:
            return cls(None, None, 0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def text(self, digits: int, fmt: str = "f") -> str:
        """``1.234 ± 0.012`` (``1.234`` for one value, ``-`` for none)."""
        if self.mean is None:
            return "-"
        mean = f"{self.mean:.{digits}{fmt}}"
        return mean if self.sd is None else f"{mean} ± {self.sd:.{digits}{fmt}}"


def run_value(outcome: RunOutcome, key: str) -> float | None:
    """One run's value of an aggregated key: a summary number, or a generation metric of its adapter."""
    if key in GEN_METRICS:
        value = (outcome.evaluation.get("adapter") or {}).get(key)
    elif key in TEST_METRICS:
        value = (outcome.test.get("adapter") or {}).get(key[len("test_"):])
    elif key in GENERAL_METRICS:
        value = general_change(outcome, key)
    else:
        value = outcome.summary.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def general_change(outcome: RunOutcome, key: str) -> float | None:
    """The run's general-text perplexity change in percent: overall, or of one language (``..._zh``)."""
    general = outcome.evaluation.get("general_text") or {}
    lang = key[len("general_ppl_change_"):] if key != "general_ppl_change" else None
    source = ((general.get("languages") or {}).get(lang) or {}) if lang else general
    value = source.get("change_percent")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def has_general(outcomes: list[RunOutcome]) -> bool:
    """Whether any finished run measured the general-text perplexity change."""
    return any(general_change(o, "general_ppl_change") is not None for o in outcomes)


@dataclass
class Cell:
    """One grid combination: its name, grid values and runs (one per seed)."""

    name: str
    values: dict[str, Any]
    runs: list[RunOutcome] = field(default_factory=list)

    @property
    def done(self) -> list[RunOutcome]:
        return [o for o in self.runs if o.status == "done"]

    @property
    def complete(self) -> bool:
        return bool(self.runs) and all(o.status == "done" for o in self.runs)

    @property
    def seeds(self) -> list[int]:
        return [o.run.seed for o in self.runs if o.run.seed is not None]

    def stat(self, key: str) -> Stat:
        """Mean ± sd over the finished seeds of an aggregated key, or of a sweep metric (``eval_loss``: the adapter's)."""
        if key in HIGHER_IS_BETTER:
            return Stat.of([o.metric(key) for o in self.done])
        return Stat.of([run_value(o, key) for o in self.done])

    def status(self) -> str:
        """``done`` when every seed finished, else the counts: ``2 done, 1 failed``."""
        counts = {s: sum(o.status == s for o in self.runs) for s in ("done", "failed", "pending")}
        if counts["done"] == len(self.runs):
            return "done"
        if counts["failed"] == len(self.runs):
            return "failed"
        if counts["pending"] == len(self.runs):
            return "pending"
        return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def group_cells(outcomes: list[RunOutcome]) -> list[Cell]:
    """The outcomes grouped by cell, cells in grid order, seeds in the given order."""
    cells: dict[str, Cell] = {}
    for outcome in outcomes:
        cells.setdefault(outcome.run.cell, Cell(outcome.run.cell, outcome.run.values)).runs.append(outcome)
    return list(cells.values())


def ranked(cells: list[Cell], metric: str) -> list[tuple[Cell, Stat]]:
    """The cells whose every seed finished and has a value of ``metric``, best first (grid order on a tie)."""
    scored = [(cell, cell.stat(metric), i) for i, cell in enumerate(cells) if cell.complete]
    scored = [(cell, stat, i) for cell, stat, i in scored if stat.mean is not None and stat.n == len(cell.runs)]
    sign = -1 if HIGHER_IS_BETTER[metric] else 1
    return [(cell, stat) for cell, stat, _ in sorted(scored, key=lambda item: (sign * item[1].mean, item[2]))]


def best_cell(cells: list[Cell], metric: str) -> str | None:
    """The name of the best cell by its mean ``metric`` (without seeds: the best run), or None."""
    order = ranked(cells, metric)
    return order[0][0].name if order else None


def base_values(outcomes: list[RunOutcome]) -> dict[str, Stat] | None:
    """The base model's eval loss and generation metrics: one measurement per seed (the base model and the eval split
    do not depend on train.seed, so they agree), summarised like a cell's."""
    per_seed: dict[Any, RunOutcome] = {}
    for outcome in outcomes:
        if outcome.status == "done" and outcome.evaluation.get("base"):
            per_seed.setdefault(outcome.run.seed, outcome)
    if not per_seed:
        return None
    chosen = list(per_seed.values())
    values = {"eval_loss": Stat.of([o.summary.get("base_eval_loss") for o in chosen])}
    for name in GEN_METRICS:
        values[name] = Stat.of([(o.evaluation.get("base") or {}).get(name) for o in chosen])
        values[f"test_{name}"] = Stat.of([(o.test.get("base") or {}).get(name) for o in chosen])
    return values


def has_test(outcomes: list[RunOutcome]) -> bool:
    """Whether any finished run was also scored on a held-out test split."""
    return any(o.test.get("adapter") for o in outcomes)


def gap_line(cells: list[Cell], metric: str) -> str:
    """How far the best cell is ahead of the next one, in standard deviations of the two (seeded sweeps)."""
    order = ranked(cells, metric)
    if len(order) < 2:
        return ""
    (_, first), (runner_up, second) = order[0], order[1]
    spread = max(first.sd or 0.0, second.sd or 0.0)
    gap = abs(first.mean - second.mean)
    ratio = f"{gap / spread:.1f}x the larger sd" if spread > 0 else "no spread measured"
    return (f"Next: {runner_up.name} ({metric} = {second.text(4, 'g')}, n={second.n}); the gap of {gap:.4g} is {ratio}"
            f"{' (within the seed-to-seed spread: not clearly better)' if spread > 0 and gap < 2 * spread else ''}.")
