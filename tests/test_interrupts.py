"""Ctrl-C (a real SIGINT to a real `loralab` process): a sweep stops with its resume message, records no failure and
never goes on to the next stage or run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import tiny_overrides

# `loralab ARGS`, with a Ctrl-C arriving during the last training step (sent by the process to itself, so that the
# moment is exact: the training loop is over before any later output could tell a test when to send it)
LAST_STEP_CTRL_C = """
import os, signal, sys
from loralab import guards
original = guards.GracefulInterrupt.on_step_end
def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == state.max_steps:
        os.kill(os.getpid(), signal.SIGINT)
    return original(self, args, state, control, **kwargs)
guards.GracefulInterrupt.on_step_end = on_step_end
from loralab.cli import main
sys.argv = ["loralab", *sys.argv[1:]]
main()
"""


def sweep_args(model_dir: Path, data_file: Path, tmp_path: Path) -> list[str]:
    sets = tiny_overrides(model_dir, data_file, tmp_path / "runs", **{"train.max_steps": 2})
    return ["sweep", "--grid", "lora.r=4", "--name", "s", "--sweeps-dir", str(tmp_path / "sw"), "--max-new-tokens",
            "200", "--skip-checks", *[arg for s in sets for arg in ("--set", s)]]


def start(args: list[str], script: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "loralab", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def collect(process: subprocess.Popen, lines: list[str], seen: threading.Event, marker: str | None) -> threading.Thread:
    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if marker and marker in line:
                seen.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def finish(process: subprocess.Popen, timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def test_ctrl_c_while_a_sweep_evaluates_stops_with_the_resume_message(tiny_llama_dir, opposites_file, tmp_path):
    lines: list[str] = []
    seen = threading.Event()
    process = start(sweep_args(tiny_llama_dir, opposites_file, tmp_path))
    reader = collect(process, lines, seen, "evaluating base model and adapter")
    assert seen.wait(120), "".join(lines)
    time.sleep(0.5)  # loading the run, then 200-token answers: the eval stage lasts far longer than this
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = finish(process, 30)
    reader.join(5)
    out = "".join(lines)
    assert code is not None, f"still running 30 s after Ctrl-C:\n{out}"
    assert time.monotonic() - sent < 30
    assert code != 0
    assert "sweep interrupted during run r-4; run the same command again to resume" in out, out
    assert "Traceback" not in out
    run_dir = tmp_path / "sw" / "s" / "r-4"
    assert not (run_dir.parent / "failed").exists()  # Ctrl-C is no failure
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and not (run_dir / "eval.json").exists()


def test_ctrl_c_in_the_last_training_step_stops_the_sweep(tiny_llama_dir, opposites_file, tmp_path):
    lines: list[str] = []
    went_on = threading.Event()
    process = start(sweep_args(tiny_llama_dir, opposites_file, tmp_path), script=LAST_STEP_CTRL_C)
    reader = collect(process, lines, went_on, "evaluating base model and adapter")
    deadline = time.monotonic() + 120
    while process.poll() is None and not went_on.is_set() and time.monotonic() < deadline:
        time.sleep(0.2)
    code = finish(process, 0.1 if went_on.is_set() else 30)
    reader.join(5)
    out = "".join(lines)
    assert "stopping after this step" in out, out  # the Ctrl-C was received in the last step
    # the run is complete, but the sweep stops there instead of going on to evaluate it (and to the next runs)
    assert not went_on.is_set(), f"the sweep went on after Ctrl-C:\n{out}"
    assert code is not None, out
    assert code != 0
    assert "sweep interrupted during run r-4; run the same command again to resume" in out, out
    assert "Traceback" not in out
    run_dir = tmp_path / "sw" / "s" / "r-4"
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "summary.json").is_file()
    assert not (run_dir / "eval.json").exists() and not (run_dir.parent / "failed").exists()
