"""What a tune leaves: the result object, ``best.yaml`` (the best trial's own config), the report, and the best
config trained into ``DIR/best``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.config import RunConfig, build_config
from loralab.errors import LoralabError
from loralab.runs import config_differences, load_run_config, write_text_atomic
from loralab.tune.range_test import RangeTest
from loralab.tune.space import SpaceSummary
from loralab.tune.spec import TuneSpec
from loralab.tune.study import TrialRecord, best_record

log = logging.getLogger(__name__)



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
    best_test: dict[str, Any] | None = None  # the best trial on the held-out test split (eval_test.json)
    final: Any = None  # --seeds / --baselines: the comparison in DIR/final (a loralab.sweeps.SweepResult)

    @property
    def output(self) -> Path:
        return self.spec.output


def best_config_of(spec: TuneSpec, best: TrialRecord) -> RunConfig:
    """The best trial's own config.yaml, as a run that trains into DIR/best (paths made absolute)."""
    from loralab.tune.final import absolute_paths

    run_dir = spec.output / "trials" / str(best.number)  # not the recorded path: a tune folder may be moved
    data = absolute_paths(load_run_config(run_dir).model_dump(mode="json"))
    data["name"], data["output_dir"] = "best", str(spec.output.resolve())
    return build_config(data, source=f"the best trial ({run_dir / 'config.yaml'})")


def write_best_yaml(spec: TuneSpec, best: TrialRecord, config: RunConfig, total: int) -> Path:
    path = spec.output / "best.yaml"
    header = (f"# loralab tune {spec.output}: trial {best.number}, {spec.metric} = {best.value:.6g} "
              f"(the best of {total} trials)\n# train it with: loralab train {path}\n")
    write_text_atomic(path, header + config.to_yaml())
    return path


def write_results(result: TuneResult, study: Any, records: list[TrialRecord], report: bool = True) -> None:
    """best.yaml (when a trial completed) and the report (unless ``report`` is false), from the study as it is now."""
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
    if report:
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
