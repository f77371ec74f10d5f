"""Sweeps on a tiny model: a 2x2 grid end to end, resume, a failing run, bad input, dry run, the Optuna backend."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import opposite_records, run_cli, tiny_overrides
from loralab.errors import ConfigError, LoralabError
from loralab.sweeps import expand_grid, load_sweep, parse_grid_arg, run_sweep

TARGETS = "lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def _base(model_dir: Path, data: Path, tmp: Path, epochs: int = 2) -> list[str]:
    return tiny_overrides(model_dir, data, tmp / "unused", **{"train.epochs": epochs})


def _spec(model_dir: Path, data: Path, tmp: Path, grid: list[str], epochs: int = 2, **kwargs: object):
    options = {"name": "tiny", "eval_limit": 3, "max_new_tokens": 8, "sweeps_dir": tmp / "sweeps", **kwargs}
    return load_sweep(None, grid, _base(model_dir, data, tmp, epochs), **options)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "opposites.json"
    path.write_text(json.dumps(opposite_records()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grid_sweep(tiny_llama_dir, data_file, tmp_path_factory):
    """The 2x2 sweep (target modules x learning rate), run once for the module."""
    tmp = tmp_path_factory.mktemp("sweep2x2")
    spec = _spec(tiny_llama_dir, data_file, tmp, [TARGETS, "train.learning_rate=3e-2,1e-3"])
    return spec, run_sweep(spec)


def test_2x2_sweep_writes_every_report_with_four_runs(grid_sweep):
    spec, result = grid_sweep
    folder = spec.sweep_dir
    names = ["tm-q+v_lr-0.03", "tm-q+v_lr-0.001", "tm-q+k+v+o+gate+up+down_lr-0.03", "tm-q+k+v+o+gate+up+down_lr-0.001"]
    assert [o.run.name for o in result.runs] == names
    for name in names:  # ordinary run folders, trained and evaluated
        for item in ("config.yaml", "summary.json", "eval.json", "adapter/adapter_config.json", "answers.json"):
            assert (folder / name / item).is_file(), f"{name}/{item}"

    rows = _csv(folder / "comparison.csv")
    assert [r["run"] for r in rows] == names and {r["status"] for r in rows} == {"done"}
    assert rows[0]["lora.target_modules"] == "[q_proj, v_proj]" and float(rows[1]["train.learning_rate"]) == 0.001
    for row in rows:
        assert int(row["trainable_params"]) > 0 and 0 < float(row["trainable_percent"]) < 100
        assert float(row["train_time_s"]) > 0 and float(row["final_train_loss"]) > 0 and float(row["best_eval_loss"]) > 0
        assert row["rouge_l"] != "" and row["base_rouge_l"] != "" and row["eval_n"] == "3"
    # all seven projections train more parameters than q/v only
    assert int(rows[2]["trainable_params"]) > int(rows[0]["trainable_params"])
    best = min(rows, key=lambda r: float(r["best_eval_loss"]))
    assert [r["run"] for r in rows if r["best"] == "yes"] == [best["run"]] == [result.best]

    markdown = (folder / "comparison.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 1 + 4  # header, the base model, four runs
    assert f"Best run by eval_loss (lower is better): {result.best}" in markdown
    assert f"{result.best} ★ best" in markdown

    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = (folder / "answers.md").read_text(encoding="utf-8")
    assert answers.count("## Prompt ") == 3 and answers.count("| base model |") == 3
    assert all(answers.count(f"| {name} |") == 3 for name in names)

    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "<style>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # viewable offline
    assert all(name in page for name in names) and page.count('<tr class="best">') == 1
    assert "Give the opposite of" in page  # the prompts from the eval split


def test_rerun_skips_finished_runs_and_resumes_a_half_finished_one(grid_sweep, tmp_path, monkeypatch):
    from loralab import training

    spec, _ = grid_sweep
    shutil.copytree(spec.sweep_dir, tmp_path / "sweeps" / spec.name)
    spec.sweeps_dir = tmp_path / "sweeps"
    calls = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda config, **kw: calls.append((config.name, kw)) or real_train(config, **kw))

    folder = spec.sweep_dir
    summaries = {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/summary.json")}
    result = run_sweep(spec)
    assert calls == [] and {o.action for o in result.runs} == {"skipped"}
    assert {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/summary.json")} == summaries

    # interrupt one run after its first epoch: no summary, adapter, eval or last checkpoint
    victim = folder / "tm-q+v_lr-0.001"
    checkpoints = sorted((victim / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(victim / "adapter")
    for name in ("summary.json", "eval.json", "answers.json"):
        (victim / name).unlink()
    result = run_sweep(spec)
    assert [c[0] for c in calls] == [victim.name] and calls[0][1]["resume"] is True
    assert {o.run.name: o.action for o in result.runs}[victim.name] == "resumed"
    summary = json.loads((victim / "summary.json").read_text())
    assert summary["resumed_from"].endswith(checkpoints[0].name)
    assert (victim / "eval.json").is_file()
    assert {r["status"] for r in _csv(folder / "comparison.csv")} == {"done"}
    del summaries[victim.name]
    assert {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/summary.json") if p.parent != victim} == summaries

    # --report-only rebuilds the reports from the run folders and the saved sweep.yaml
    from typer.testing import CliRunner

    from loralab.cli import app

    (folder / "comparison.csv").unlink()
    out = CliRunner().invoke(app, ["sweep", "--report-only", "--name", spec.name, "--sweeps-dir", str(spec.sweeps_dir)])
    assert out.exit_code == 0, out.output
    assert len(_csv(folder / "comparison.csv")) == 4 and len(calls) == 1 and "best run by eval_loss" in out.output


def test_a_diverging_run_is_reported_failed_and_the_sweep_goes_on(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    from loralab import training

    spec = _spec(tiny_llama_dir, data_file, tmp_path, ["train.learning_rate=1e6,3e-2"], epochs=1)
    result = run_sweep(spec)
    rows = {r["run"]: r for r in _csv(spec.sweep_dir / "comparison.csv")}
    assert len(rows) == 2
    assert rows["lr-1e6"]["status"] == "failed" and "diverged" in rows["lr-1e6"]["reason"]
    assert rows["lr-0.03"]["status"] == "done" and rows["lr-0.03"]["best"] == "yes" and result.best == "lr-0.03"
    assert json.loads((spec.sweep_dir / "failed" / "lr-1e6.json").read_text())["stage"] == "train"
    markdown = (spec.sweep_dir / "comparison.md").read_text()
    assert "## Failed runs" in markdown and "**lr-1e6**: training diverged" in markdown
    assert "training diverged" in (spec.sweep_dir / "report.html").read_text()

    # a rerun does not repeat the recorded failure (unless asked to)
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("nothing should be trained"))
    assert [o.status for o in run_sweep(spec).runs] == ["failed", "done"]


def test_bad_grid_input_fails_before_any_training(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    from loralab import training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("nothing should be trained"))
    with pytest.raises(ConfigError, match=r"grid key 'lora.rank' is not a config key \(did you mean lora.r\?\); valid keys: .*lora\.r,"):
        _spec(tiny_llama_dir, data_file, tmp_path, ["lora.rank=4,8"])
    spec = _spec(tiny_llama_dir, data_file, tmp_path, ["lora.r=4,8", "lora.dropout=0.1,1.5"])
    with pytest.raises(ConfigError, match=r"(?s)sweep run 2 of 4 \[lora.r=4, lora.dropout=1.5\].*'lora.dropout'"):
        run_sweep(spec)
    with pytest.raises(ConfigError, match="the sweep grid is empty"):
        _spec(tiny_llama_dir, data_file, tmp_path, [])
    with pytest.raises(ConfigError, match="cannot be varied"):
        _spec(tiny_llama_dir, data_file, tmp_path, ["output_dir=a,b"])
    with pytest.raises(ConfigError, match="not a sweep metric; choose one of: eval_loss, rouge_l, chrf, exact_match"):
        _spec(tiny_llama_dir, data_file, tmp_path, ["lora.r=4,8"], metric="accuracy")
    missing = load_sweep(None, ["lora.r=4,8"], _base(tiny_llama_dir, tmp_path / "nope.json", tmp_path),
                         sweeps_dir=tmp_path / "sweeps")
    with pytest.raises(LoralabError, match="data file not found"):
        run_sweep(missing)
    assert not (tmp_path / "sweeps").exists()


def test_ctrl_c_stops_the_sweep_without_recording_a_failure(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    from loralab import training

    def interrupted(config, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise LoralabError("training interrupted; continue with: loralab train --resume") from None

    monkeypatch.setattr(training, "train", interrupted)
    spec = _spec(tiny_llama_dir, data_file, tmp_path, ["lora.r=4,8"])
    with pytest.raises(LoralabError, match="sweep interrupted during run r-4; run the same command again to resume"):
        run_sweep(spec)
    assert not (spec.sweep_dir / "failed").exists()


def test_grid_values_and_run_names():
    assert parse_grid_arg("lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj],all-linear") == \
        ("lora.target_modules", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"])
    assert parse_grid_arg("train.learning_rate=1e-4, 9.65e-7") == ("train.learning_rate", [1e-4, 9.65e-7])
    spec = load_sweep(None, ["train.learning_rate=1e-4,9.65e-7", "lora.r=8", "model.name_or_path=/m/tiny-a,/m/b"])
    names = [run.name for run in expand_grid(spec)]
    assert names[:2] == ["lr-1e-4_r-8_model-tiny-a", "lr-1e-4_r-8_model-b"] and names[2] == "lr-9.65e-7_r-8_model-tiny-a"
    assert expand_grid(spec)[0].config.run_dir() == Path("sweeps") / "sweep" / names[0]


def test_dry_run_lists_the_runs_and_trains_nothing(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    from loralab import training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("nothing should be trained"))
    spec = _spec(tiny_llama_dir, data_file, tmp_path, [TARGETS, "train.learning_rate=3e-2,1e-3"])
    result = run_sweep(spec, dry_run=True)
    assert len(result.runs) == 4 and {o.action for o in result.runs} == {"train"}
    assert result.runs[0].run.overrides == ["lora.target_modules=[q_proj, v_proj]", "train.learning_rate=0.03"]
    assert not spec.sweep_dir.exists()


def test_cli_dry_run_of_a_sweep_file_and_the_shipped_example(tiny_llama_dir, data_file, tmp_path):
    from typer.testing import CliRunner

    from loralab.cli import app

    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(json.dumps({"name": "lr-study", "base": {"model": {"name_or_path": str(tiny_llama_dir)},
                                                                   "data": {"path": str(data_file)}},
                                      "grid": {"train.learning_rate": ["1e-4", "3e-4"], "lora.r": [4]}}))
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(sweep_file), "--dry-run", "--grid", "lora.r=4,16", "--sweeps-dir",
                                 str(tmp_path / "sw")])
    assert result.exit_code == 0, result.output
    assert "4 runs" in result.output and "lr-3e-4_r-16" in result.output and "lr-study" in result.output
    assert not (tmp_path / "sw").exists()

    example = Path(__file__).resolve().parents[1] / "examples" / "sweep_classic.yaml"
    result = runner.invoke(app, ["sweep", str(example), "--dry-run", "--sweeps-dir", str(tmp_path / "sw")])
    assert result.exit_code == 0, result.output
    assert "4 runs" in result.output and "tm-q+v_lr-3e-4" in result.output

    result = runner.invoke(app, ["sweep", "--grid", "lora.rank=4,8", "--dry-run"])
    assert result.exit_code == 1 and "not a config key" in result.output


def test_optuna_backend_with_a_journal_file(tiny_llama_dir, data_file, tmp_path):
    optuna = pytest.importorskip("optuna")
    import os
    import socket
    import subprocess

    from loralab.sweeps.distributed import open_study

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Give the opposite of hot.\n\nGive the opposite of wet.\n", encoding="utf-8")
    spec = _spec(tiny_llama_dir, data_file, tmp_path, ["lora.r=4,8"], epochs=1, metric="rouge_l", prompts_file=prompts)
    journal = str(tmp_path / "optuna.journal")

    # another worker (a live process) is busy with r-4: this worker only does r-8
    study, _ = open_study(spec, expand_grid(spec), journal)
    study.enqueue_trial({"run": 0})
    held = study.ask()
    assert held.suggest_categorical("run", [0, 1]) == 0
    for key, value in (("run_name", "r-4"), ("host", socket.gethostname()), ("pid", os.getppid())):
        held.set_user_attr(key, value)
    result = run_sweep(spec, backend="optuna", storage=journal)
    assert [(o.status, o.action) for o in result.runs] == [("pending", "new"), ("done", "trained")]
    rows = _csv(spec.sweep_dir / "comparison.csv")
    assert [r["status"] for r in rows] == ["pending", "done"] and (spec.sweep_dir / "report.html").is_file()

    # that worker dies: the next worker fails its trial and does r-4
    dead = subprocess.Popen(["true"])
    dead.wait()
    held.set_user_attr("pid", dead.pid)
    result = run_sweep(spec, backend="optuna", storage=journal)
    assert [(o.status, o.action) for o in result.runs] == [("done", "trained"), ("done", "skipped")]
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = {r["run"]: r for r in _csv(spec.sweep_dir / "comparison.csv")}
    assert {t.user_attrs["run_name"]: t.value for t in trials} == pytest.approx({k: float(r["rouge_l"]) for k, r in rows.items()})
    answers = (spec.sweep_dir / "answers.md").read_text(encoding="utf-8")
    assert answers.count("## Prompt ") == 2 and "> Give the opposite of wet." in answers

    # a worker started after everything is done finds nothing to do
    again = run_sweep(spec, backend="optuna", storage=journal)
    assert {o.action for o in again.runs} == {"skipped"} and len(study.get_trials()) == 3


# ---------------------------------------------------------------- seeds


@pytest.fixture(scope="module")
def seeded_sweep(tiny_llama_dir, data_file, tmp_path_factory):
    """Two cells (lora.r 4, 8) x seeds 1 and 2, one epoch each, with a held-out test split."""
    tmp = tmp_path_factory.mktemp("seeded")
    spec = load_sweep(None, ["lora.r=4,8"], _base(tiny_llama_dir, data_file, tmp, 1) + ["data.test_split=0.2"],
                      name="tiny", eval_limit=2, max_new_tokens=4, sweeps_dir=tmp / "sweeps", seeds="1,2")
    return spec, run_sweep(spec)


def test_seeds_repeat_every_cell_and_the_comparison_is_mean_and_sd(seeded_sweep):
    import statistics

    from loralab.config import load_config

    spec, result = seeded_sweep
    folder = spec.sweep_dir
    names = ["r-4_seed-1", "r-4_seed-2", "r-8_seed-1", "r-8_seed-2"]
    assert [o.run.name for o in result.runs] == names and {o.status for o in result.runs} == {"done"}
    for name in names:
        assert load_config(folder / name / "config.yaml").train.seed == int(name[-1])

    runs = _csv(folder / "runs.csv")
    assert [(r["run"], r["cell"], r["seed"]) for r in runs] == [(n, n.split("_")[0], n[-1]) for n in names]
    losses = [float(r["best_eval_loss"]) for r in runs]
    assert losses[0] != losses[1]  # another seed, another adapter

    rows = _csv(folder / "comparison.csv")
    assert [r["cell"] for r in rows] == ["base model", "r-4", "r-8"]
    base, cells = rows[0], rows[1:]
    assert float(base["best_eval_loss_mean"]) == pytest.approx(float(runs[0]["base_eval_loss"])) and base["n"] == "2"
    for cell, pair in zip(cells, (runs[:2], runs[2:])):
        assert cell["seeds"] == "1 2" and cell["n"] == "2" and cell["status"] == "done" and cell["lora.r"] in ("4", "8")
        for key in ("best_eval_loss", "final_train_loss", "train_time_s", "rouge_l", "chrf"):
            values = [float(r[key]) for r in pair]
            assert float(cell[f"{key}_mean"]) == pytest.approx(statistics.fmean(values)), key
            assert float(cell[f"{key}_sd"]) == pytest.approx(statistics.stdev(values)), key
    best = min(cells, key=lambda r: float(r["best_eval_loss_mean"]))
    assert [r["cell"] for r in rows if r["best"] == "yes"] == [best["cell"]] == [result.best]

    # the test split: scored for every run (all of it: 5 of the 24 rows), reported, never used to rank
    for name, run in zip(names, runs):
        test = json.loads((folder / name / "eval_test.json").read_text())
        assert test["split"] == "test" and test["adapter"]["n"] == 5 == int(run["test_n"])
        assert float(run["test_chrf"]) == pytest.approx(test["adapter"]["chrf"])
        assert float(run["base_test_chrf"]) == pytest.approx(test["base"]["chrf"])
    for cell, pair in zip(cells, (runs[:2], runs[2:])):
        assert float(cell["test_chrf_mean"]) == pytest.approx(statistics.fmean(float(r["test_chrf"]) for r in pair))
    assert float(base["test_chrf_mean"]) == pytest.approx(float(runs[0]["base_test_chrf"]))

    # what each adapter cost on general text: every run's eval.json number, averaged per cell, in every table
    changes = [json.loads((folder / name / "eval.json").read_text())["general_text"]["change_percent"] for name in names]
    assert [float(r["general_ppl_change"]) for r in runs] == pytest.approx(changes)
    assert {float(r["general_ppl_change_zh"]) != float(r["general_ppl_change_en"]) for r in runs} == {True}
    for cell, pair in zip(cells, (changes[:2], changes[2:])):
        assert float(cell["general_ppl_change_mean"]) == pytest.approx(statistics.fmean(pair))
    assert base["general_ppl_change_mean"] == ""  # the base model against itself: nothing to report

    markdown = (folder / "comparison.md").read_text(encoding="utf-8")
    mean, sd = float(best["best_eval_loss_mean"]), float(best["best_eval_loss_sd"])
    assert f"{mean:.4f} ± {sd:.4f}" in markdown and f"| {result.best} ★ best | " in markdown
    assert "Best cell by mean eval_loss over 2 seeds (lower is better)" in markdown and "| base model |" in markdown
    assert "2 cells x 2 seeds = 4 runs: 4 done" in markdown and "## Runs" in markdown and "Next: " in markdown
    assert "| test chrF |" in markdown and "no run trained on it" in markdown
    assert "| general-text ppl change % (zh / en) |" in markdown and "what the adapter cost elsewhere" in markdown
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "general-text ppl change % (zh / en)" in page
    assert "mean ± sd over seeds" in page and page.count('<tr class="best">') == 1 and all(n in page for n in names)
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_sweep(folder / "sweep.yaml").seeds == [1, 2]  # --report-only reads the seeds back


def test_seeded_report_only_and_a_failed_seed(seeded_sweep, tmp_path):
    spec, _ = seeded_sweep
    shutil.copytree(spec.sweep_dir, tmp_path / "sweeps" / spec.name)
    spec.sweeps_dir = tmp_path / "sweeps"
    (spec.sweep_dir / "failed").mkdir()
    (spec.sweep_dir / "failed" / "r-4_seed-2.json").write_text(json.dumps({"reason": "out of memory", "stage": "train"}))
    result = run_sweep(spec, report_only=True)
    rows = {r["cell"]: r for r in _csv(spec.sweep_dir / "comparison.csv")}
    assert rows["r-4"]["status"] == "1 done, 1 failed" and rows["r-4"]["n"] == "1" and rows["r-4"]["best_eval_loss_sd"] == ""
    assert result.best == "r-8" and rows["r-8"]["best"] == "yes"  # a cell with a failed seed is not ranked


def test_seed_input_is_checked(tiny_llama_dir, data_file, tmp_path):
    for seeds, fragment in (("1,x", "'x' is not an integer seed"), ("1,1", "lists a seed twice"), ("", "is empty")):
        with pytest.raises(ConfigError, match=fragment):
            _spec(tiny_llama_dir, data_file, tmp_path, ["lora.r=4"], seeds=seeds)
    with pytest.raises(ConfigError, match="'train.seed' and seeds both set the seed"):
        _spec(tiny_llama_dir, data_file, tmp_path, ["train.seed=1,2"], seeds="3,4")
    sweep_file = tmp_path / "seeds.yaml"
    sweep_file.write_text("seeds: 3\nbase: {train: {epochs: 1}}\n")
    with pytest.raises(ConfigError, match=r"'seeds' must be a list of distinct integers, e.g. \[1, 2, 3\]; got 3"):
        load_sweep(sweep_file)
    # a sweep file with seeds and no grid: the base config once per seed
    sweep_file.write_text(json.dumps({"seeds": [7, 8, 9], "base": {"model": {"name_or_path": str(tiny_llama_dir)},
                                                                     "data": {"path": str(data_file)}}}))
    planned = expand_grid(load_sweep(sweep_file))
    assert [(r.name, r.cell, r.config.train.seed) for r in planned] == \
        [("seed-7", "config", 7), ("seed-8", "config", 8), ("seed-9", "config", 9)]
    code, out = run_cli("sweep", sweep_file, "--dry-run", "--grid", "lora.r=4,8", "--seeds", "1,2",
                        "--sweeps-dir", tmp_path / "sw")
    assert code == 0 and "4 runs" in out and "r-8_seed-2" in out and "train.seed=2" in out, out
    code, out = run_cli("sweep", sweep_file, "--dry-run", "--seeds", "1,1")
    assert code == 1 and "lists a seed twice" in out and "Traceback" not in out
