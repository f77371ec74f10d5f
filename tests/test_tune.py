"""loralab tune on a tiny model: the range test's suggestion, the budget with a fake clock, a 3-trial study with
pruning, best.yaml, continuing a study, refused inputs, and the new train keys (metric_for_best_model, early stopping)."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import opposite_records, run_cli, tiny_overrides
from loralab.config import build_config, load_config
from loralab.errors import ConfigError, LoralabError
from loralab.tune import (Budget, CostModel, TuneProgress, format_duration, load_tune, parse_duration, progress_line,
                          run_tune, smooth_losses, suggest_lr_range)

optuna = pytest.importorskip("optuna")

# a tiny, fixed-length study: two step counts, so that the shortest trial (8 steps) evaluates 4 times (every 2)
SPACE = ["train.learning_rate=1e-6..5e-2:log", "lora.r=4,8", "train.max_steps=8,12"]
GOOD = {"train.learning_rate": 3e-2, "lora.r": 8, "train.max_steps": 8}
BAD = {"train.learning_rate": 1e-6, "lora.r": 8, "train.max_steps": 12}  # learns nothing: pruned at its first report


class FakeClock:
    """Time that moves only when told (``advance``), or by ``tick`` seconds at every reading."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _slow_training(monkeypatch) -> FakeClock:
    """A fake clock that every training call moves by 100 s (trials 'take' 100 s each)."""
    from loralab import training

    clock = FakeClock()
    real = training.train

    def slow_train(config, **kwargs):
        summary = real(config, **kwargs)
        clock.advance(100)
        return summary

    monkeypatch.setattr(training, "train", slow_train)
    return clock


def _base(model_dir: Path, data: Path, **extra: object):
    return build_config(overrides=tiny_overrides(model_dir, data, data.parent / "unused", **extra))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune-data") / "opposites.json"
    path.write_text(json.dumps(opposite_records()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(tiny_llama_dir, data_file, tmp_path_factory):
    """A 3-trial study with successive-halving pruning: a good trial, a bad one (pruned), one sampled by TPE."""
    out = tmp_path_factory.mktemp("tune") / "study"
    spec = load_tune(out, _base(tiny_llama_dir, data_file), space_args=SPACE, pruner="halving", lr_steps=20)
    progress: list[TuneProgress] = []
    result = run_tune(spec, trials=3, enqueue=[GOOD, BAD], on_progress=progress.append)
    return spec, result, progress


# ---------------------------------------------------------------- the range test's suggestion (pure)


def _curve(lrs: list[float], noise: float = 0.03, seed: int = 0) -> list[float]:
    """A loss that falls around 3e-4 (a sigmoid in log10 lr) and explodes above 3e-2."""
    rng = random.Random(seed)
    out = []
    for lr in lrs:
        x = math.log10(lr)
        out.append(1.0 + 2.5 / (1 + math.exp((x - math.log10(3e-4)) * 3)) + math.exp((x - math.log10(3e-2)) * 4)
                   + rng.gauss(0, noise))
    return out


LRS = [1e-6 * (1e-1 / 1e-6) ** (i / 59) for i in range(60)]


def test_lr_suggestion_on_a_synthetic_curve():
    suggestion = suggest_lr_range(LRS, _curve(LRS))
    assert suggestion.note == ""
    assert 1.5e-4 < suggestion.steepest < 6e-4  # the steepest descent of the curve is at 3e-4
    assert 1e-2 < suggestion.explosion < 1e-1  # back above the start loss past 3e-2
    assert suggestion.low < suggestion.steepest < suggestion.high < suggestion.minimum < suggestion.explosion
    assert suggestion.high <= suggestion.explosion / 2 and suggestion.high / suggestion.low >= 10  # at least a decade
    for seed in range(5):  # the noise does not move it much
        other = suggest_lr_range(LRS, _curve(LRS, seed=seed))
        assert 1.5e-4 < other.steepest < 6e-4 and other.high < other.explosion


# recorded: `loralab tune --lr-only --lr-steps 40` on SmolLM2-135M-Instruct and the demo data (2-core CPU)
SMOLLM2_DEMO = [2.751, 2.483, 3.291, 3.657, 3.361, 4.099, 2.497, 3.698, 2.951, 3.884, 3.275, 3.068, 3.94, 4.003, 2.953,
                3.343, 1.99, 3.807, 3.277, 3.355, 3.02, 2.905, 2.256, 2.53, 2.309, 1.636, 1.716, 2.218, 2.16, 2.278,
                1.743, 2.111, 2.033, 2.288, 3.108, 6.201, 10.82, 16.673, 15.713, 79.724]


def test_lr_suggestion_on_a_recorded_noisy_curve():
    lrs = [1e-6 * (1e-1 / 1e-6) ** (i / 39) for i in range(40)]
    suggestion = suggest_lr_range(lrs, SMOLLM2_DEMO)
    assert 1e-4 < suggestion.steepest < 2e-3 and 5e-3 < suggestion.explosion < 3e-2
    assert suggestion.low < 3e-4 < suggestion.high < suggestion.explosion / 2  # loralab's default rate is inside


def test_lr_suggestion_cut_at_a_nan_and_on_a_flat_curve():
    losses = _curve(LRS, noise=0.0)[:45] + [float("nan")] * 15
    cut = suggest_lr_range(LRS, losses)
    assert cut.explosion == pytest.approx(LRS[45]) and cut.high <= cut.explosion / 2 and cut.low < cut.high
    flat = suggest_lr_range(LRS, [2.0 + 0.01 * math.sin(i) for i in range(60)], fallback=3e-4)
    assert "no clear descent" in flat.note and flat.steepest is None and flat.explosion is None
    assert flat.low == pytest.approx(9e-5) and flat.high == pytest.approx(9e-4)  # a decade around the config's rate
    few = suggest_lr_range(LRS[:3], [3.0, 2.0, float("inf")])
    assert "too few" in few.note and few.high < few.explosion
    with pytest.raises(ValueError):
        suggest_lr_range(LRS, [1.0])


def test_smoothed_loss_is_debiased():
    assert smooth_losses([2.0, 2.0, 2.0], beta=0.9) == pytest.approx([2.0, 2.0, 2.0])
    rising = smooth_losses([1.0, 2.0, 3.0, 4.0], beta=0.5)
    assert rising[0] == 1.0 and all(a < b for a, b in zip(rising, rising[1:])) and rising[-1] < 4.0


# ---------------------------------------------------------------- the budget (fake clock, no timing)


def test_durations():
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("600") == 600 and parse_duration(45) == 45
    for bad in ("20x", "m", "", "-5m", "0", "1h 2q"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_duration(bad)
    assert format_duration(5) == "5.0s" and format_duration(750) == "12m 30s" and format_duration(3900) == "1h 05m"
    assert format_duration(None) == "-" and format_duration(math.inf) == "-"


def test_budget_and_cost_model_with_a_fake_clock():
    clock = FakeClock()
    budget = Budget(seconds=100, clock=clock)
    assert budget.remaining() == 100 and budget.fits(100) and not budget.fits(100.5)
    clock.advance(70)
    assert budget.elapsed() == 70 and budget.remaining() == 30 and budget.fits(30) and not budget.fits(31)
    assert Budget(clock=clock).fits(1e9) and math.isinf(Budget(clock=clock).remaining())
    assert Budget(trials=3, clock=clock).trials_left(2) == 1

    cost = CostModel(setup_s=2, step_s=0.5, eval_s=1.5)
    assert cost.estimate(10, 3) == pytest.approx(2 + 5 + 4.5)  # the range test's measurements
    cost.observe(40.0, 10, 3)  # a trial took longer than measured: 40 s for 10 steps + 3 evaluations (= 19 units)
    assert cost.estimate(10, 3) == pytest.approx(1.1 * 40.0)  # what trials take counts, with a 10% margin
    assert cost.estimate(20, 3) == pytest.approx(1.1 * (2 + (40.0 - 2) / 19 * 29))  # loading, then scaled by work
    cost.observe(80.0, 10, 3)
    cost.observe(41.0, 10, 3)
    assert cost.estimate(10, 3) == pytest.approx(1.1 * 41.0)  # the median trial
    cheap = CostModel(setup_s=2, step_s=0.5, eval_s=1.5)
    cheap.observe(7.7, 10, 3)  # faster than the range test measured: the trials win
    assert cheap.estimate(10, 3) == pytest.approx(1.1 * 7.7)
    assert "0.5 s per training step" in cost.describe()


def test_progress_line():
    line = progress_line(TuneProgress(metric="eval_loss", trials=5, complete=3, pruned=2, best_value=1.2345,
                                      best_trial=3, elapsed_s=300, remaining_s=900, budget_s=1200,
                                      last="trial 4 pruned at step 6"))
    assert line.startswith("trial 4 pruned at step 6 | tune: 5 trials (3 complete, 2 pruned, 0 failed)")
    assert "best eval_loss 1.234 (trial 3)" in line and "15m 00s of 20m 00s left" in line and "█" in line
    assert "no exact_match yet" in progress_line(TuneProgress(metric="exact_match", elapsed_s=12))


def test_budget_stops_the_search_before_a_trial_that_cannot_finish(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    """Every trial 'takes' 100 s of a 250 s budget (the fake clock is moved by the training call): two run, the
    third would not finish and is not started."""
    clock = _slow_training(monkeypatch)
    spec = load_tune(tmp_path / "t", _base(tiny_llama_dir, data_file), space_args=["train.max_steps=4", "lora.r=4"],
                     pruner="none", lr_steps=5)
    progress: list[TuneProgress] = []
    result = run_tune(spec, budget_s=250, clock=clock, on_progress=progress.append)
    assert result.started == 2 and [r.state for r in result.trials] == ["complete", "complete"]
    assert result.stopped.startswith("budget: 50s left, the shortest trial (4 steps) needs ~1m 50s")
    assert [p.remaining_s for p in progress] == [150, 50] and progress[-1].budget_s == 250
    assert sorted(p.name for p in (tmp_path / "t" / "trials").iterdir()) == ["0", "1"]
    report = (tmp_path / "t" / "report.md").read_text()
    assert "over the complete trials:" in report and "| learning rate |" in report  # parameter importance


def test_a_trial_drawn_too_long_for_the_budget_left_is_skipped_and_a_shorter_one_runs(tiny_llama_dir, data_file,
                                                                                        tmp_path, monkeypatch):
    """Each training call 'takes' 100 s: after the 4-step trial, two 40-step draws (estimated far past the 160 s left)
    are not started, and the next 4-step draw still runs."""
    clock = _slow_training(monkeypatch)
    spec = load_tune(tmp_path / "t", _base(tiny_llama_dir, data_file), space_args=["train.max_steps=4,40", "lora.r=4"],
                     pruner="none", lr_steps=5)
    steps = [{"train.max_steps": n} for n in (4, 40, 40, 4)]
    result = run_tune(spec, budget_s=260, clock=clock, enqueue=steps)
    states = [(r.state, r.planned_steps) for r in result.trials]
    assert states[:4] == [("complete", 4), ("not started", 40), ("not started", 40), ("complete", 4)], states
    assert sorted(p.name for p in (tmp_path / "t" / "trials").iterdir()) == ["0", "3"]
    assert result.stopped.startswith("budget:")


def test_a_budget_too_small_for_one_trial_says_so(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "t"
    spec = load_tune(out, _base(tiny_llama_dir, data_file), space_args=["train.max_steps=8"], lr_steps=5)
    with pytest.raises(LoralabError, match="too small for one trial") as caught:
        run_tune(spec, budget_s=60, clock=FakeClock(tick=10))  # every reading of the clock is 10 s later
    message = str(caught.value)
    assert "s per training step" in message and "--budget 1m 00s" in message and "8 steps" in message
    assert not (out / "trials").exists() and (out / "lr_find.json").is_file()  # the range test is kept


# ---------------------------------------------------------------- a study


def test_three_trial_study_with_pruning(study):
    spec, result, progress = study
    out = spec.output
    assert [r.number for r in result.trials] == [0, 1, 2] and result.started == 3
    good, bad = result.trials[0], result.trials[1]
    assert good.state == "complete" and good.steps == 8 and good.values["lora.r"] == 8
    assert bad.state == "pruned" and bad.pruned_step == 2 and bad.steps == 2 and bad.planned_steps == 12
    assert result.best is not None and result.best.state == "complete"
    assert result.best.value == min(r.value for r in result.trials if r.state == "complete")
    assert [p.trials for p in progress] == [1, 2, 3] and progress[1].pruned >= 1 and "pruned at step 2" in progress[1].last

    for record in result.trials:  # every trial is an ordinary, complete run folder
        run = out / "trials" / str(record.number)
        for name in ("config.yaml", "adapter/adapter_config.json", "metrics.jsonl", "summary.json", "data.json"):
            assert (run / name).is_file(), f"{record.number}/{name}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["tune"]["state"] == record.state
        config = load_config(run / "config.yaml")
        assert config.train.eval_steps == config.train.save_steps == 2 and config.train.metric_for_best_model == "eval_loss"
        evals = [h for h in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
                 if "eval_loss" in h]
        assert evals[0]["step"] == 0 and len(evals) == 1 + record.steps // 2  # every trial reports each 2 steps
    pruned = json.loads((out / "trials" / "1" / "summary.json").read_text())
    assert pruned["stopped_early"] is True and pruned["tune"]["pruned_at_step"] == 2 and pruned["steps"] == 2
    complete = json.loads((out / "trials" / "0" / "summary.json").read_text())
    assert complete["stopped_early"] is False and complete["best_metric"] == pytest.approx(good.value)

    stored = optuna.load_study(study_name=f"loralab-tune-{spec.fingerprint()}",
                               storage=optuna.storages.JournalStorage(
                                   optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))))
    assert [t.state.name for t in stored.trials][:2] == ["COMPLETE", "PRUNED"]
    assert sorted(stored.trials[0].intermediate_values) == [2, 4, 6, 8]

    for name in ("tune.yaml", "lr_find.json", "lr_find.png", "trials.png", "report.md", "report.html", "best.yaml"):
        assert (out / name).is_file(), name
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG" and (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| base model |" in report and "★ best" in report and "## Parameter importance" in report
    assert "| 1 | pruned |" in report and "search " in report and "(from the --space)" in report
    base = complete["base_eval_loss"]
    assert "| base model | - |" in report and f"{base:.4g}" in report  # the base model's eval loss at step 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page and 'class="pruned"' in page


def test_best_yaml_is_the_best_trial_and_validates(study):
    spec, result, _ = study
    text = (spec.output / "best.yaml").read_text()
    assert text.startswith(f"# loralab tune {spec.output}: trial {result.best.number}")
    best = load_config(spec.output / "best.yaml")
    trial = load_config(spec.output / "trials" / str(result.best.number) / "config.yaml")
    assert best.name == "best" and Path(best.output_dir) == spec.output.resolve()
    assert best.model_dump(exclude={"name", "output_dir"}) == trial.model_dump(exclude={"name", "output_dir"})
    assert best.lora.alpha == best.lora.r * result.best.values["lora.alpha_ratio"]


def test_rerun_continues_the_study_and_best_yaml_trains(study, tmp_path):
    """Through the command line: a copy of the study gets one more trial (nothing re-run), then best.yaml trains."""
    from loralab.cli import app

    spec, result, _ = study
    out = tmp_path / "moved"
    shutil.copytree(spec.output, out)  # a tune folder can be moved
    before = {name: stamp for name, stamp in _snapshot(out).items() if name.startswith("trials/") or name == "lr_find.json"}
    runner = CliRunner()
    run = runner.invoke(app, ["tune", "--output", str(out), "--trials", "1", "--skip-checks"])
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    assert "tune: 4 trials" in text and "4 trials (1 this run)" in text and "best: trial" in text
    after = _snapshot(out)
    assert all(after[name] == stamp for name, stamp in before.items())  # finished trials and range test untouched
    assert sorted(p.name for p in (out / "trials").iterdir() if p.name != "failed") == ["0", "1", "2", "3"]
    report = (out / "report.md").read_text()
    assert report.startswith("# Tune moved\n\n4 trials")

    best = load_config(out / "best.yaml")
    trained = runner.invoke(app, ["train", str(out / "best.yaml"), "--skip-checks"])
    assert trained.exit_code == 0, trained.output
    summary = json.loads((Path(best.output_dir) / "best" / "summary.json").read_text())
    assert summary["status"] == "finished" and (out / "best" / "adapter" / "adapter_config.json").is_file()


def test_an_interrupted_trial_is_queued_again(study, tmp_path):
    from loralab.tune.search import space_summary
    from loralab.tune.study import open_study, requeue_interrupted, study_name

    spec, result, _ = study
    out = tmp_path / "copy"
    shutil.copytree(spec.output, out)
    moved = load_tune(out)
    summary = space_summary(moved, result.range_test, n_train=19)
    opened, storage, stored = open_study(moved, summary)
    assert stored.to_dict() == result.space.to_dict()  # the space the study was created with
    trial = opened.ask()  # a trial a killed tune left behind: it never got an outcome
    trial.suggest_categorical("lora.r", [4, 8])
    opened.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert requeue_interrupted(opened, storage) == [trial.number]
    assert requeue_interrupted(opened, storage) == []  # once
    waiting = opened.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["requeued_from"] for t in waiting] == [trial.number]
    assert study_name(moved) == study_name(spec)


# ---------------------------------------------------------------- refused inputs


@pytest.mark.parametrize("space, fragment", [
    (["lora.rank=4,8"], "'lora.rank' is not a config key (did you mean lora.r?)"),
    (["train.learning_rate=1e-3..1e-4:log"], "the range 0.001 .. 0.0001 is empty"),
    (["lora.dropout=0.1..0.1"], "is empty"),
    (["lora.r=4,4"], "lists a value twice"),
    (["lora.r=0,8"], "lora.r"),
    (["train.eval_steps=2,4"], "tune sets it for every trial"),
    (["lora.coverage=attention,everything"], "allowed values: attention, all-linear, preset"),
    (["lora.alpha=8,16", "lora.alpha_ratio=1,2"], "set the same thing"),
    (["lora.r=4..8:log", "train.learning_rate=0..1e-3:log"], "must be above 0"),
    (["lora.r=4,8:log"], "applies to a range"),
    (["lora.r"], "is not key=v1,v2"),
])
def test_bad_space_is_refused(tiny_llama_dir, data_file, tmp_path, space, fragment):
    with pytest.raises(ConfigError) as caught:
        load_tune(tmp_path / "t", _base(tiny_llama_dir, data_file), space_args=space)
    assert fragment in str(caught.value)
    assert not (tmp_path / "t").exists()


def test_bad_options_are_refused(tiny_llama_dir, data_file, tmp_path):
    base = _base(tiny_llama_dir, data_file)
    with pytest.raises(ConfigError, match="not a tune metric"):
        load_tune(tmp_path / "t", base, metric="accuracy")
    with pytest.raises(ConfigError, match="--pruner"):
        load_tune(tmp_path / "t", base, pruner="asha")
    spec = load_tune(tmp_path / "t", base)
    with pytest.raises(ConfigError, match="give --budget"):
        run_tune(spec)
    assert not (tmp_path / "t").exists()


def test_the_command_line_refuses_bad_input_in_one_line(tiny_llama_dir, data_file, tmp_path):
    from loralab.cli import app

    runner = CliRunner()
    common = ["--model", str(tiny_llama_dir), "--data", str(data_file), "--output", str(tmp_path / "t")]
    for extra, fragment in ((["--trials", "1", "--space", "lora.rank=4"], "is not a config key"),
                            (["--budget", "soon"], "is not a duration"),
                            ([], "give --budget"),
                            (["--trials", "1", "--metric", "accuracy"], "not a tune metric")):
        result = runner.invoke(app, ["tune", *common, *extra])
        text = " ".join((result.stdout + (result.stderr or "")).split())
        assert result.exit_code == 1 and fragment in text and "Traceback" not in text, (extra, text)
    assert not (tmp_path / "t").exists()


def test_a_metric_the_data_cannot_measure_is_refused(tiny_llama_dir, data_file, tmp_path):
    spec = load_tune(tmp_path / "t", _base(tiny_llama_dir, data_file, **{"data.eval_split": 0}), metric="exact_match")
    with pytest.raises(ConfigError, match="eval split, and this data has none"):
        run_tune(spec, trials=1)
    assert not (tmp_path / "t").exists()


def test_another_study_in_the_folder_is_refused_with_nothing_changed(study, tiny_llama_dir, data_file):
    spec, _, _ = study
    before = _snapshot(spec.output)
    other = load_tune(spec.output, _base(tiny_llama_dir, data_file, **{"lora.dropout": 0.1}), space_args=SPACE)
    with pytest.raises(LoralabError, match=r"holds another study \(it differs in: base config \(lora.dropout\)") as caught:
        run_tune(other, trials=1)
    assert "nothing was changed" in str(caught.value)
    metric = load_tune(spec.output, spec.base, space_args=SPACE, metric="chrf")
    with pytest.raises(LoralabError, match="metric \\('eval_loss' there, 'chrf' here\\)"):
        run_tune(metric, trials=1)
    assert _snapshot(spec.output) == before


def test_a_folder_that_holds_something_else_is_refused(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    spec = load_tune(out, _base(tiny_llama_dir, data_file))
    with pytest.raises(LoralabError, match="holds no loralab tune .* notes.txt"):
        run_tune(spec, trials=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_lr_only_writes_the_range_test_and_the_space_can_still_be_chosen(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "t"
    result = run_tune(load_tune(out, _base(tiny_llama_dir, data_file), lr_steps=8), lr_only=True)
    assert result.trials == [] and result.stopped.startswith("range test only")
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png", "tune.yaml"]
    test = result.range_test
    assert len(test.lrs) <= 8 and test.lrs[0] == pytest.approx(1e-6) and test.suggestion.low < test.suggestion.high
    assert test.step_s >= 0 and test.base_eval_loss is not None and test.base_eval_loss > 0
    # no trial yet: another --space is accepted (and the range test reused)
    again = load_tune(out, _base(tiny_llama_dir, data_file), lr_steps=8, space_args=["lora.r=4"])
    stamp = (out / "lr_find.json").stat().st_mtime_ns
    assert run_tune(again, lr_only=True).range_test.suggestion == test.suggestion
    assert (out / "lr_find.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- train.metric_for_best_model / early stopping


def test_metric_for_best_model_needs_generation():
    with pytest.raises(ConfigError, match="measured only with train.eval_generate: true"):
        build_config(overrides=["train.metric_for_best_model=exact_match"])
    config = build_config(overrides=["train.metric_for_best_model=chrf", "train.eval_generate=true",
                                     "train.early_stopping_patience=2"])
    assert config.train.metric_for_best_model == "chrf" and config.train.early_stopping_patience == 2
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        build_config(overrides=["train.early_stopping_patience=0"])


def test_early_stopping_on_a_generation_metric(tiny_llama_dir, data_file, tmp_path):
    """exact match of a tiny random model stays 0: never better, so training stops after 2 evaluations without
    improvement; callbacks given to train() see the generation metric at each evaluation."""
    from transformers import TrainerCallback

    from loralab.training import train

    seen: list[tuple[int, list[str]]] = []

    class Recorder(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append((state.global_step, sorted(metrics or {})))

    config = _base(tiny_llama_dir, data_file, **{"output_dir": str(tmp_path), "name": "es", "train.max_steps": 20,
                                                  "train.eval_steps": 2, "train.eval_generate": "true",
                                                  "train.eval_generate_limit": 2, "train.early_stopping_patience": 2,
                                                  "train.metric_for_best_model": "exact_match",
                                                  "train.learning_rate": 1e-6})
    summary = train(config, progress=False, callbacks=[Recorder()])
    assert summary["metric_for_best_model"] == "exact_match" and summary["best_metric"] == 0.0
    assert summary["steps"] == 6 and summary["stopped_early"] is True  # evaluations at 2 (best), 4, 6: stop
    assert summary["best_checkpoint"].endswith("checkpoint-2")
    history = [json.loads(line) for line in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    at_two = next(h["eval_loss"] for h in history if h.get("step") == 2 and "eval_loss" in h)
    assert summary["best_eval_loss"] == pytest.approx(at_two)  # the eval loss of the checkpoint kept
    assert [step for step, _ in seen] == [0, 2, 4, 6] and all("eval_exact_match" in keys for _, keys in seen)


def test_a_generation_metric_on_eval_answers_that_are_empty_is_refused(tiny_llama_dir, data_file, tmp_path):
    empty = tmp_path / "eval.json"
    empty.write_text(json.dumps([{"instruction": r["instruction"], "response": ""} for r in opposite_records()[:4]]))
    spec = load_tune(tmp_path / "t", _base(tiny_llama_dir, data_file, **{"data.eval_path": str(empty)}),
                     metric="exact_match")
    with pytest.raises(ConfigError, match="its 4 examples have none \\(empty responses\\); use --metric eval_loss"):
        run_tune(spec, trials=1)
    assert not (tmp_path / "t").exists()


def test_a_duplicate_of_a_requeued_trial_is_skipped(study, tmp_path):
    """Two workers that start at once may both queue an interrupted trial again: only the first copy runs."""
    from loralab.tune.search import space_summary
    from loralab.tune.study import open_study, requeue

    spec, result, _ = study
    out = tmp_path / "copy"
    shutil.copytree(spec.output, out)
    moved = load_tune(out)
    opened, _, _ = open_study(moved, space_summary(moved, result.range_test, n_train=19))
    trial = opened.ask({"train.learning_rate": optuna.distributions.FloatDistribution(1e-6, 5e-2, log=True),
                        "lora.r": optuna.distributions.CategoricalDistribution([4, 8]),
                        "train.max_steps": optuna.distributions.CategoricalDistribution([8, 12])})
    opened.tell(trial, state=optuna.trial.TrialState.FAIL)  # a killed worker's trial, failed by two others at once
    frozen = opened.trials[trial.number]
    requeue(opened, frozen, None)
    requeue(opened, frozen, None)
    again = run_tune(moved, trials=2)
    assert again.started == 2
    copies = [t for t in opened.get_trials() if t.user_attrs.get("requeued_from") == trial.number]
    assert [t.state.name for t in copies][1:] == ["FAIL"] and copies[1].user_attrs["outcome"] == "duplicate"
    assert copies[0].state.name in ("COMPLETE", "PRUNED")  # it ran (successive halving may stop it early)
    assert frozen.params.items() <= copies[0].params.items() and not (out / "trials" / str(copies[1].number)).exists()
    assert copies[1].number not in [r.number for r in again.trials]  # not in the report either
    assert len([r for r in again.trials if r.state in ("complete", "pruned")]) == 5


# ---------------------------------------------------------------- honest selection: the held-out test split


@pytest.fixture(scope="module")
def held_out_study(tiny_llama_dir, data_file, tmp_path_factory):
    """Two trials on data that holds a test split out, then the final comparison with two seeds and the baselines."""
    out = tmp_path_factory.mktemp("held-out") / "study"
    base = _base(tiny_llama_dir, data_file, **{"data.test_split": 0.2, "train.epochs": 1})
    spec = load_tune(out, base, space_args=["lora.r=4,8", "train.max_steps=4", "lora.coverage=attention"],
                     pruner="none", lr_steps=5)
    searched = run_tune(spec, trials=2)
    return spec, searched


def test_the_base_config_as_a_point_of_the_space():
    from loralab.tune.space import Param, base_point

    base = build_config(overrides=["lora.r=16", "lora.alpha=32", "lora.dropout=0.05", "train.learning_rate=3e-4",
                                   "train.epochs=2"])
    params = {"train.learning_rate": Param("train.learning_rate", "float", low=1e-5, high=1e-3, log=True),
              "lora.r": Param("lora.r", "categorical", choices=[4, 8, 16, 32]),
              "lora.alpha_ratio": Param("lora.alpha_ratio", "categorical", choices=[0.5, 1.0, 2.0, 4.0]),
              "lora.dropout": Param("lora.dropout", "float", low=0.0, high=0.1),
              "lora.coverage": Param("lora.coverage", "categorical", choices=["attention", "preset"]),
              "train.epochs": Param("train.epochs", "categorical", choices=[1, 2, 3]),
              "train.warmup": Param("train.warmup", "int", low=1, high=10)}
    coverages = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "preset": None}
    point = base_point(base, params, coverages)
    assert point == {"train.learning_rate": 3e-4, "lora.r": 16, "lora.alpha_ratio": 2.0, "lora.dropout": 0.05,
                     "lora.coverage": "preset", "train.epochs": 2}  # warmup 0.05 is no integer of 1..10: sampled
    assert type(point["train.epochs"]) is int  # the choice itself, not the config's 2.0
    outside = build_config(overrides=["lora.r=12", "lora.alpha=24", "train.learning_rate=5e-2", "lora.target_modules=[q_proj]"])
    assert set(base_point(outside, params, coverages)) == {"lora.alpha_ratio", "lora.dropout", "train.epochs"}
    flag = Param("train.packing", "categorical", choices=[1, 0])
    assert flag.holds(True) is None and Param("x", "categorical", choices=[True, False]).holds(True) is True


def test_a_new_study_starts_from_the_base_config(held_out_study):
    spec, result = held_out_study
    first = result.trials[0]
    assert first.values["lora.r"] == spec.base.lora.r == 8  # the base config's r, not a draw
    assert load_config(Path(first.run_dir) / "config.yaml").lora.r == 8


def test_the_best_trial_is_scored_on_the_test_split_no_trial_saw(held_out_study):
    from loralab.data import load_all_splits

    spec, result = held_out_study
    splits = load_all_splits(spec.base.data, "CAUSAL_LM")
    held_out = {e.prompt for e in splits.test}
    assert len(held_out) == 5 and not held_out & {e.prompt for e in [*splits.train, *splits.eval]}
    best = spec.output / "trials" / str(result.best.number)
    saved = json.loads((best / "eval_test.json").read_text())
    assert saved["split"] == "test" and saved["adapter"]["n"] == 5 and result.best_test["adapter"] == saved["adapter"]
    assert {row["prompt"] for row in map(json.loads, (best / "predictions_test.jsonl").read_text().splitlines())} == held_out
    for record in result.trials:  # what the search saw: eval-split evaluations only
        history = (spec.output / "trials" / str(record.number) / "metrics.jsonl").read_text()
        assert all(prompt not in history for prompt in held_out)
    report = (spec.output / "report.md").read_text()
    assert f"## Held-out test split: trial {result.best.number}" in report
    assert f"| best trial | {saved['adapter']['exact_match']:.3f} | {saved['adapter']['rouge_l']:.3f} |" in report


def test_seeds_and_baselines_train_the_final_comparison(held_out_study):
    """`tune --output DIR --seeds 1,2 --baselines` (no new trials): best.yaml, loralab's defaults and the usual
    recipe, each trained with both seeds, mean ± sd on the test split, in DIR/final and in the report."""
    spec, result = held_out_study
    code, output = run_cli("tune", "--output", spec.output, "--seeds", "1,2", "--baselines", "--skip-checks")
    assert code == 0, output
    final = spec.output / "final"
    names = [f"{cell}_seed-{seed}" for cell in ("tuned", "defaults", "usual-recipe") for seed in (1, 2)]
    assert sorted(p.name for p in final.iterdir() if (p / "summary.json").is_file()) == sorted(names)
    best = load_config(spec.output / "best.yaml")
    for name in names:
        config = load_config(final / name / "config.yaml")
        assert config.train.seed == int(name[-1]) and (final / name / "eval_test.json").is_file()
        if name.startswith("tuned"):
            assert config.lora == best.lora and config.train.learning_rate == best.train.learning_rate
        elif name.startswith("defaults"):
            assert config.lora == spec.base.lora and config.train.epochs == spec.base.train.epochs
        else:
            assert (config.lora.r, config.lora.alpha, config.train.learning_rate, config.train.epochs) == (16, 32, 2e-4, 3)
    rows = {r["cell"]: r for r in csv.DictReader((final / "comparison.csv").open())}
    assert {rows[c]["n"] for c in ("tuned", "defaults", "usual-recipe")} == {"2"} and "test_exact_match_mean" in rows["tuned"]
    report = (spec.output / "report.md").read_text()
    assert "## Final comparison" in report and "| usual recipe (r 16, alpha 32, lr 2e-4, 3 epochs) | 2 of 2 |" in report
    assert "Fewer than 3 seeds" in report and "held out of every trial" in report
    chrf = [json.loads((final / n / "eval_test.json").read_text())["adapter"]["chrf"] for n in names[:2]]
    assert f"{statistics.fmean(chrf):.1f} ± {statistics.stdev(chrf):.1f}" in report
    assert "Final comparison" in output and "trials" in output
    # again: finished runs are kept
    stamps = {n: (final / n / "summary.json").stat().st_mtime_ns for n in names}
    code, output = run_cli("tune", "--output", spec.output, "--seeds", "1,2", "--baselines", "--skip-checks")
    assert code == 0 and stamps == {n: (final / n / "summary.json").stat().st_mtime_ns for n in names}, output


def test_seeds_need_a_trial_first(tiny_llama_dir, data_file, tmp_path):
    spec = load_tune(tmp_path / "t", _base(tiny_llama_dir, data_file))
    with pytest.raises(ConfigError, match="has no trials yet to train the best of"):
        run_tune(spec, seeds=[1, 2, 3])
    code, output = run_cli("tune", "--output", tmp_path / "t", "--seeds", "1,x")
    assert code == 1 and "'x' is not an integer seed" in output
    assert not (tmp_path / "t").exists()
