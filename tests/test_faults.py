"""The fault suite: runs that diverge, are killed, are torn mid-save, are overwritten, or see their data change.

Each test does to a run what happens to users (SIGKILL, Ctrl-C, a damaged checkpoint, an edited data file, a
typo in an overwriting config) and asserts on what they would see: exit codes, messages, files, reloaded weights.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import opposite_records, tiny_overrides
from loralab.cli import app
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.guards import TrainingDiverged
from loralab.training import train

runner = CliRunner()

# 19 train examples, batch 4: 5 steps per epoch, 20 in all; a checkpoint (and an evaluation) every 3 steps.
FAULT_SETTINGS = {"train.logging_steps": 1, "train.save_steps": 3, "train.save_total_limit": 3, "lora.dropout": 0.1}

WORKER = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.training import train

overrides, at_step, sig = json.loads(sys.argv[1]), int(sys.argv[2]), getattr(signal, sys.argv[3])

class SendSignal(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == at_step:
            os.kill(os.getpid(), sig)

try:
    train(build_config(overrides=overrides), progress=False, callbacks=[SendSignal()])
except LoralabError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "opposites.json"
    path.write_text(json.dumps(opposite_records()), encoding="utf-8")
    return path


def _overrides(model_dir: Path, data: Path, out: Path, name: str, **extra: object) -> list[str]:
    return tiny_overrides(model_dir, data, out, name=name, **{**FAULT_SETTINGS, **extra})


def _run_worker(tmp: Path, overrides: list[str], at_step: int, signal_name: str) -> subprocess.CompletedProcess:
    script = tmp / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script), json.dumps(overrides), str(at_step), signal_name],
                          capture_output=True, text=True, timeout=300, env=env)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir: Path, key: str) -> dict[int, float]:
    rows = [r for r in _metrics(run_dir) if key in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {steps}"
    return {r["step"]: r[key] for r in rows}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_run(resumed: Path, reference: Path) -> None:
    for key in ("loss", "eval_loss"):
        got, want = _curve(resumed, key), _curve(reference, key)
        assert got.keys() == want.keys(), key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), f"{key} at step {step}"
    a, b = _adapter(resumed), _adapter(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, data_file, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    train(build_config(overrides=_overrides(tiny_llama_dir, data_file, out, "run")), progress=False)
    return out / "run"


@pytest.fixture(scope="module")
def killed_run(tiny_llama_dir, data_file, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run killed with SIGKILL in the middle of its second epoch (at the end of step 8, before its log line;
    checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("killed")
    overrides = _overrides(tiny_llama_dir, data_file, out, "run")
    done = _run_worker(out, overrides, at_step=8, signal_name="SIGKILL")
    assert done.returncode == -9, done.stderr[-2000:]
    run_dir = out / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    assert max(r["step"] for r in _metrics(run_dir)) == 7  # step 7 was logged, then lost with the kill (< 3 steps)
    return run_dir, overrides


def _copy(run_dir: Path, tmp: Path) -> Path:
    target = tmp / "copy" / run_dir.name
    shutil.copytree(run_dir, target)
    return target


# ---------------------------------------------------------------- interrupted runs resume exactly


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(killed_run, reference_run, tmp_path):
    run_dir = _copy(killed_run[0], tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--skip-checks"])  # no config: the run's own
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == "checkpoints/checkpoint-6"
    assert summary["steps"] == 20
    _assert_same_run(run_dir, reference_run)  # lost one step (< one save interval), redid it identically


def test_output_and_resume_without_config_reloads_the_runs_own_config(killed_run, reference_run, tmp_path):
    run_dir = _copy(killed_run[0], tmp_path)
    # the run was started with --set options; --output RUN --resume alone must still find them
    result = runner.invoke(app, ["train", "--output", str(run_dir), "--resume", "--skip-checks"])
    assert result.exit_code == 0, result.output
    _assert_same_run(run_dir, reference_run)


def test_resume_with_a_different_config_names_the_keys(killed_run, tmp_path):
    run_dir = _copy(killed_run[0], tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run_dir), *_sets(killed_run[1] + ["lora.r=4"])])
    assert result.exit_code == 1
    assert "config.yaml differs in lora.r)" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1 and "nothing to resume" in result.output


@pytest.mark.parametrize("damage", ["no trainer_state.json", "truncated optimizer.pt", "truncated adapter weights"])
def test_a_torn_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(damage, killed_run, reference_run,
                                                                              tmp_path, caplog):
    run_dir = _copy(killed_run[0], tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint-6"
    if damage == "no trainer_state.json":
        (newest / "trainer_state.json").unlink()
    else:
        path = newest / ("optimizer.pt" if "optimizer" in damage else "adapter_model.safetensors")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    summary = train(build_config(overrides=killed_run[1]), run_dir=run_dir, resume=True, progress=False)
    assert summary["resumed_from"] == "checkpoints/checkpoint-3"
    assert "checkpoint-6 is incomplete" in caplog.text and "not resumed from" in caplog.text
    assert (run_dir / "checkpoints" / "torn-checkpoint-6").is_dir()  # set aside, not deleted
    _assert_same_run(run_dir, reference_run)


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tiny_llama_dir, data_file, reference_run, tmp_path):
    overrides = _overrides(tiny_llama_dir, data_file, tmp_path, "run")
    done = _run_worker(tmp_path, overrides, at_step=8, signal_name="SIGINT")
    assert done.returncode == 1, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    # Ctrl-C came after step 8 had ended: step 9 is finished, saved, and the run stops
    assert "training stopped at step 9 after saving a checkpoint" in done.stderr
    assert f"loralab train --resume {run_dir}" in done.stderr and "Traceback" not in done.stderr
    assert (run_dir / "checkpoints" / "checkpoint-9" / "trainer_state.json").is_file()  # nothing lost
    assert not (run_dir / "adapter").exists()
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--skip-checks"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == "checkpoints/checkpoint-9"
    _assert_same_run(run_dir, reference_run)


# ---------------------------------------------------------------- divergence fails loudly


def test_a_diverging_run_stops_within_a_few_steps_and_writes_no_adapter(tiny_llama_dir, data_file, tmp_path):
    config = build_config(overrides=_overrides(tiny_llama_dir, data_file, tmp_path, "lr", **{"train.learning_rate": 1e6}))
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: .*train.learning_rate=1e\+06") as caught:
        train(config, progress=False)
    assert caught.value.step <= 5
    run_dir = tmp_path / "lr"
    assert not (run_dir / "adapter").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == caught.value.step
    for checkpoint in (run_dir / "checkpoints").glob("checkpoint-*"):  # whatever was saved is finite
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapter_model.safetensors").values())
    # the losses logged are the real ones (the Trainer's NaN filter would have averaged them away)
    result = runner.invoke(app, ["train", *[a for o in _overrides(tiny_llama_dir, data_file, tmp_path, "cli",
                                                                  **{"train.learning_rate": 1e6}) for a in ("--set", o)],
                                 "--skip-checks"])
    assert result.exit_code == 1 and "training diverged at step" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- nothing deleted that loralab did not write


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_overwrite_refuses_folders_that_are_not_runs(tiny_llama_dir, data_file, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["train", "--output", str(precious), "--overwrite", "--skip-checks",
                                 *_sets(_overrides(tiny_llama_dir, data_file, tmp_path, "x"))])
    assert result.exit_code == 1 and "holds no loralab run" in result.output
    assert (precious / "thesis.tex").read_text() == "years of work"
    # a run folder someone added their own files to is not replaced either
    runner.invoke(app, ["train", "--skip-checks", *_sets(_overrides(tiny_llama_dir, data_file, tmp_path, "run",
                                                                    **{"train.max_steps": 2}))])
    (tmp_path / "run" / "notes.md").write_text("my notes")
    result = runner.invoke(app, ["train", "--overwrite", "--skip-checks",
                                 *_sets(_overrides(tiny_llama_dir, data_file, tmp_path, "run", **{"train.max_steps": 2}))])
    assert result.exit_code == 1 and "files loralab did not write (notes.md)" in result.output
    assert (tmp_path / "run" / "notes.md").is_file() and (tmp_path / "run" / "adapter").is_dir()


def test_overwrite_keeps_the_old_run_until_the_new_one_loads(tiny_llama_dir, data_file, tmp_path):
    base = _overrides(tiny_llama_dir, data_file, tmp_path, "run", **{"train.max_steps": 3})
    assert runner.invoke(app, ["train", "--skip-checks", *_sets(base)]).exit_code == 0
    run_dir = tmp_path / "run"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    typo = base + ["lora.target_modules=[q_projj]"]
    result = runner.invoke(app, ["train", "--overwrite", *_sets(typo)])
    assert result.exit_code == 1 and "matched no module" in result.output
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # untouched, byte for byte
    # a new run that fails before its first checkpoint gives the old one back
    bad = base + ["train.learning_rate=1e6", "train.save_steps=50"]
    result = runner.invoke(app, ["train", "--overwrite", "--skip-checks", *_sets(bad)])
    assert result.exit_code == 1 and "previous run" in result.output and "was restored" in result.output
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # and a good one replaces it, leaving nothing behind
    result = runner.invoke(app, ["train", "--overwrite", "--skip-checks", *_sets(base + ["lora.r=4"])])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "a/b", ".."])
def test_run_names_cannot_leave_output_dir(name, tmp_path):
    result = runner.invoke(app, ["train", "--set", f"name={name}", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 1 and "plain folder name inside output_dir" in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- files are shareable


def test_files_get_the_permissions_the_umask_gives(tiny_llama_dir, data_file, tmp_path):
    old = os.umask(0o022)
    try:
        config = build_config(overrides=_overrides(tiny_llama_dir, data_file, tmp_path, "run", **{"train.max_steps": 3}))
        train(config, progress=False)
    finally:
        os.umask(old)
    run_dir = tmp_path / "run"
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path.relative_to(tmp_path)}: {oct(mode)}"


# ---------------------------------------------------------------- evaluation sees what training held out


def test_eval_refuses_a_data_file_changed_since_training(tiny_llama_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(opposite_records()), encoding="utf-8")
    overrides = tiny_overrides(tiny_llama_dir, data, tmp_path, name="run", **{"train.max_steps": 2})
    train(build_config(overrides=overrides), progress=False)
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "data.json").read_text())
    assert record["files"]["train"]["sha256"] and len(record["split"]["eval_rows"]) == 5
    # inserting one row shifts the seeded split: a re-split would evaluate on training rows
    data.write_text(json.dumps([{"instruction": "new", "response": "row"}, *opposite_records()]), encoding="utf-8")
    result = runner.invoke(app, ["eval", str(run_dir), "--max-new-tokens", "2"])
    assert result.exit_code == 1 and "changed since training" in result.output and "--data FILE" in result.output
    assert not (run_dir / "eval.json").exists()
    result = runner.invoke(app, ["eval", str(run_dir), "--data", str(data), "--max-new-tokens", "2", "--limit", "2"])
    assert result.exit_code == 0, result.output  # a file named explicitly is still fine
    shutil.rmtree(run_dir / "adapter")  # as if interrupted: resuming on other data is refused too
    with pytest.raises(LoralabError, match="changed since training.*Resuming on other data"):
        train(build_config(overrides=overrides), resume=True, progress=False)


# ---------------------------------------------------------------- remote code needs the command line


def test_trust_remote_code_in_a_config_file_needs_the_flag(tiny_llama_dir, data_file, tmp_path):
    config = tmp_path / "remote.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_llama_dir}\n  trust_remote_code: true\ndata:\n  path: {data_file}\n")
    for command in (["check", str(config), "--fast"], ["train", str(config)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "pass --trust-remote-code" in result.output, command
    assert not (tmp_path / "runs").exists()


def test_a_collapse_without_nan_is_divergence_too():
    """lr=1e6 on the built-in model in fp32 saturates it to a uniform output: eval loss ln(49152) = 10.8, zero
    gradients, no NaN. The rule: a loss above twice the starting loss plus one nat."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from loralab.guards import DivergenceGuard

    args = TrainingArguments(output_dir="unused", learning_rate=1e6, use_cpu=True, report_to="none")
    guard, control = DivergenceGuard(), TrainerControl()
    state = TrainerState(global_step=4, log_history=[{"step": 0, "eval_loss": 3.875}, {"step": 1, "loss": 3.58},
                                                      {"step": 4, "eval_loss": 7.0}])
    guard.on_evaluate(args, state, control, metrics={"eval_loss": 7.0})  # worse, not exploded: goes on
    state.log_history.append({"step": 4, "eval_loss": 10.80})
    with pytest.raises(TrainingDiverged, match=r"at step 4: the eval loss rose from 3.875 \(the model before "
                                               r"training\) to 10.8\. Likely causes: train.learning_rate=1e\+06"):
        guard.on_evaluate(args, state, control, metrics={"eval_loss": 10.80})
    state = TrainerState(global_step=10, log_history=[{"loss": 3.58}, {"loss": 8.96}])
    guard.on_log(args, state, control, logs={"loss": 8.96})  # one spike: goes on
    state.log_history.append({"loss": 10.80})
    with pytest.raises(TrainingDiverged, match="the training loss rose from 3.58 to 10.8"):
        guard.on_log(args, state, control, logs={"loss": 10.80})
    # saturated below the starting loss (a random model can be worse than uniform): the gradients are exactly 0
    state = TrainerState(global_step=3, log_history=[{"loss": 7.6}, {"loss": 5.99, "grad_norm": 0.0}])
    guard.on_log(args, state, control, logs={"loss": 0.0, "grad_norm": 0.0})  # memorised: goes on
    with pytest.raises(TrainingDiverged, match=r"at step 3: the gradients vanished \(norm 0 at a loss of 5.99\)"):
        guard.on_log(args, state, control, logs={"loss": 5.99, "grad_norm": 0.0})


def test_a_run_folder_cannot_switch_remote_code_on(tiny_llama_dir, data_file, tmp_path):
    train(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="run",
                                                **{"train.max_steps": 1})), progress=False)
    run_dir = tmp_path / "run"
    config = run_dir / "config.yaml"  # someone hands you a run whose config asks for remote code
    config.write_text(config.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    for command in (["eval", str(run_dir), "--limit", "1", "--max-new-tokens", "2"],
                    ["generate", str(run_dir), "--prompt", "hi", "--max-new-tokens", "2"],
                    ["export", str(run_dir), "--output", str(tmp_path / "merged")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "pass --trust-remote-code" in result.output, command
    assert not (tmp_path / "merged").exists()
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- found by trying to break the above


def test_resume_rules_a_user_runs_into(killed_run, reference_run, tmp_path, monkeypatch):
    run_dir = _copy(killed_run[0], tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--overwrite"])
    assert result.exit_code == 1 and "give one of them" in result.output
    # --set of a value the run already has changes nothing: accepted
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "lora.r=8", "--skip-checks"])
    assert result.exit_code == 0, result.output
    _assert_same_run(run_dir, reference_run)
    before = (run_dir / "summary.json").read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(run_dir)])  # a finished run is not trained again
    assert result.exit_code == 1 and "already finished" in result.output
    assert (run_dir / "summary.json").read_bytes() == before
    monkeypatch.chdir(run_dir)  # `--resume .` from inside the folder
    result = runner.invoke(app, ["train", "--resume", "."])
    assert result.exit_code == 1 and "already finished" in result.output


def test_killed_after_the_last_checkpoint_of_max_steps_trains_no_extra_step(tiny_llama_dir, data_file, tmp_path,
                                                                          monkeypatch):
    overrides = _overrides(tiny_llama_dir, data_file, tmp_path, "ms", **{"train.max_steps": 3, "train.save_steps": 3})
    train(build_config(overrides=overrides), progress=False)
    run_dir = tmp_path / "ms"
    finished = _adapter(run_dir)
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "summary.json").unlink()  # = killed after its last checkpoint
    monkeypatch.chdir(tmp_path)  # the path spelled differently from the first run's
    result = runner.invoke(app, ["train", "--resume", "ms", "--skip-checks"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["best_checkpoint"] == "checkpoints/checkpoint-3"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-3"]
    assert all(torch.equal(finished[k], t) for k, t in _adapter(run_dir).items())


def test_overwrite_and_plain_runs_leave_a_users_dotfiles_and_backups_alone(tiny_llama_dir, data_file, tmp_path):
    base = _overrides(tiny_llama_dir, data_file, tmp_path, "run", **{"train.max_steps": 1})
    assert runner.invoke(app, ["train", "--skip-checks", *_sets(base)]).exit_code == 0
    (tmp_path / "run" / ".notes.md").write_text("mine")
    result = runner.invoke(app, ["train", "--overwrite", "--skip-checks", *_sets(base)])
    assert result.exit_code == 1 and ".notes.md" in result.output
    assert (tmp_path / "run" / ".notes.md").read_text() == "mine"
    # a run set aside by a killed --overwrite is not deleted by an unrelated plain run in its place
    shutil.move(tmp_path / "run", tmp_path / ".fresh.replaced")
    assert runner.invoke(app, ["train", "--skip-checks", *_sets(base + ["name=fresh"])]).exit_code == 0
    assert (tmp_path / ".fresh.replaced" / ".notes.md").is_file()


def test_export_overwrite_keeps_files_added_to_an_export_and_follows_links(tiny_llama_dir, data_file, tmp_path):
    from loralab.export import export_merged

    train(build_config(overrides=_overrides(tiny_llama_dir, data_file, tmp_path, "run", **{"train.max_steps": 1})),
          progress=False)
    out = export_merged(tmp_path / "run", tmp_path / "exported")
    link = tmp_path / "link"
    link.symlink_to(out)
    export_merged(tmp_path / "run", link, overwrite=True)  # replaces what the link points to
    assert link.is_symlink() and (out / "loralab_export.json").is_file()
    (out / "weights.bin").write_bytes(b"precious")
    with pytest.raises(LoralabError, match=r"files loralab did not export \(weights.bin\)"):
        export_merged(tmp_path / "run", out, overwrite=True)
    assert (out / "weights.bin").read_bytes() == b"precious"


def test_eval_of_a_run_with_an_eval_file_needs_only_that_file(tiny_llama_dir, tmp_path):
    records = opposite_records()
    train_file, eval_file = tmp_path / "train.json", tmp_path / "eval.json"
    train_file.write_text(json.dumps(records[:20]))
    eval_file.write_text(json.dumps(records[20:]))
    overrides = tiny_overrides(tiny_llama_dir, train_file, tmp_path, name="run",
                               **{"data.eval_path": str(eval_file), "train.max_steps": 1})
    train(build_config(overrides=overrides), progress=False)
    train_file.rename(tmp_path / "moved.json")
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_remote_code_runs_nowhere_before_the_refusal(tiny_llama_dir, data_file, tmp_path):
    train(build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, name="run",
                                                **{"train.max_steps": 1})), progress=False)
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_llama_dir, evil)
    marker = tmp_path / "PWNED"
    (evil / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n")
    config_json = json.loads((evil / "config.json").read_text())
    (evil / "config.json").write_text(json.dumps({**config_json, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    run_config = tmp_path / "run" / "config.yaml"
    run_config.write_text(run_config.read_text().replace(str(tiny_llama_dir), str(evil))
                          .replace("trust_remote_code: false", "trust_remote_code: true"))
    for command in (["export", str(tmp_path / "run"), "--output", str(tmp_path / "x")],
                    ["eval", str(tmp_path / "run"), "--limit", "1"], ["train", "--resume", str(tmp_path / "run")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "pass --trust-remote-code" in result.output, command
        assert not marker.exists(), command


def test_weight_check_names_the_non_finite_lora_weight_and_passes_huge_finite_ones():
    """The per-step weight check (a sum first, the element-wise check only when the sum is not finite)."""
    from loralab.guards import non_finite_parameter, trainable_parameters

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert non_finite_parameter(model) is None
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen: not watched
        assert non_finite_parameter(model) is None
        model[1].weight.fill_(3e38)  # finite, but the sum overflows: the exact check clears it
        assert non_finite_parameter(model) is None
        model[1].weight.fill_(0.5)
        for value in (float("nan"), float("inf"), float("-inf")):
            model[2].bias[1] = value
            assert non_finite_parameter(model) == "2.bias"
            assert non_finite_parameter(model, trainable_parameters(model)) == "2.bias"
        model[2].bias[1] = 0.0
        model[1].weight[2, 3] = float("inf")
        model[2].weight[0, 0] = float("-inf")  # inf + -inf: a NaN sum, still the first bad weight named
        assert non_finite_parameter(model) == "1.weight"
