"""Several `loralab tune` workers on one study in a real PostgreSQL server (started here on a temporary port and
socket folder): no trial runs twice, the trial of a SIGKILLed worker is queued again and finished by another worker,
and the trial of a worker that went silent on "another machine" is failed by its missing heartbeats and re-run.

Skipped, saying why, where PostgreSQL (Debian: apt-get install postgresql) or its driver (pip install
'loralab[postgres]') is missing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from conftest import opposite_records, tiny_overrides

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2", reason="the PostgreSQL driver is not installed: pip install 'loralab[postgres]'")

HEARTBEAT_S = 1  # LORALAB_HEARTBEAT_S of the workers: a trial is stale after 3 s without a heartbeat
SPACE = ["train.learning_rate=3e-2", "lora.r=4,8", "train.max_steps=8,12", "lora.dropout=0.0",
         "lora.alpha_ratio=2", "lora.coverage=attention"]
QUEUED = [{"lora.r": r, "train.max_steps": steps} for r in (4, 8) for steps in (8, 12)]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server: its own data folder, a free port, unix socket only; stopped afterwards."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="loralab-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60)

    made = pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    assert made.returncode == 0, made.stderr
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
    started = pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o", options, "start")
    assert started.returncode == 0, started.stdout + started.stderr + (root / "server.log").read_text()
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}&port={port}"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _worker(out: Path, trials: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "LORALAB_HEARTBEAT_S": str(HEARTBEAT_S), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "loralab", "tune", "--output", str(out), "--trials", str(trials),
                             "--skip-checks"], stdout=handle, stderr=subprocess.STDOUT, env=env)


def _wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _chain_end(trials: dict, number: int) -> object:
    """Follow a trial's re-runs (``requeued_from``) to the one that finished; every link queued exactly once."""
    trial = trials[number]
    while trial.state != optuna.trial.TrialState.COMPLETE:
        assert trial.state == optuna.trial.TrialState.FAIL and "outcome" not in trial.user_attrs, trial
        again = [t for t in trials.values() if t.user_attrs.get("requeued_from") == trial.number
                 and t.user_attrs.get("outcome") != "duplicate"]
        assert len(again) == 1, [(t.number, t.state, t.user_attrs) for t in again]
        assert again[0].params == trial.params
        trial = again[0]
    return trial


def test_two_workers_share_one_study_and_dead_workers_trials_run_again(postgres_url, tiny_llama_dir, tmp_path):
    from loralab.config import build_config
    from loralab.tune import load_tune, run_tune
    from loralab.tune.search import space_summary
    from loralab.tune.study import open_study

    data = tmp_path / "opposites.json"
    data.write_text(json.dumps(opposite_records()), encoding="utf-8")
    out = tmp_path / "tune"
    base = build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path / "unused"))
    spec = load_tune(out, base, space_args=SPACE, pruner="none", lr_steps=5, storage=postgres_url)
    test = run_tune(spec, lr_only=True).range_test  # the folder records the study's storage: workers need no options
    study, _, summary = open_study(spec, space_summary(spec, test, n_train=19))

    # trial 0: a worker on another machine went silent in the middle of it; only its missing heartbeats tell
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ask() outside optimize() on a storage with heartbeats
        silent = optuna.load_study(study_name=study.study_name, storage=storage).ask()
    for param in summary.params.values():
        param.suggest(silent)
    for key, value in (("host", "another-machine"), ("pid", 1), ("planned_steps", 8)):
        silent.set_user_attr(key, value)
    storage.record_heartbeat(silent._trial_id)
    for values in QUEUED:  # trials 1-4: known values, so that what the workers ran can be checked
        study.enqueue_trial(values)

    # two workers at once; one is killed (SIGKILL) in the middle of its first trial
    a = _worker(out, 5, tmp_path / "a.log")
    b = _worker(out, 5, tmp_path / "b.log")

    def running_in_a():
        return next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                     if t.user_attrs.get("pid") == a.pid and "planned_steps" in t.user_attrs), None)

    killed = _wait_for(running_in_a, "worker A to start training a trial")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    assert b.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()
    workers = {b.pid}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if any(t.state == optuna.trial.TrialState.WAITING for t in trials.values()):  # A was much slower to start than B
        c = _worker(out, 1, tmp_path / "c.log")  # a restarted worker finishes what is left
        assert c.wait(timeout=120) == 0, (tmp_path / "c.log").read_text()
        workers.add(c.pid)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    logs = {p.stem: p.read_text() for p in tmp_path.glob("*.log")}
    assert a.returncode == -signal.SIGKILL and all("Traceback" not in text for text in logs.values()), logs

    # the silent trial and the killed one: failed, queued again exactly once, and finished by a living worker
    for gone in (silent.number, killed.number):
        end = _chain_end(trials, gone)
        assert end.number != gone and end.params == trials[gone].params and end.user_attrs["pid"] in workers
    assert "stopped sending heartbeats" in logs["a"] + logs["b"] + logs.get("c", "")

    # no trial ran twice: every queued trial finished exactly once, each trial folder was trained once
    finished = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    origins = []
    for trial in finished:
        origin = trial
        while "requeued_from" in origin.user_attrs:
            origin = trials[origin.user_attrs["requeued_from"]]
        origins.append(origin.number)
    assert sorted(origins) == list(range(1 + len(QUEUED))), origins
    assert {t.user_attrs["pid"] for t in finished} <= workers
    for trial in finished:
        folder = out / "trials" / str(trial.number)
        summary_file = json.loads((folder / "summary.json").read_text())
        assert summary_file["tune"]["trial"] == trial.number and summary_file["steps"] == trial.params["train.max_steps"]
        steps = [record["step"] for record in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                 if "loss" in record]
        assert len(steps) == len(set(steps)), f"trial {trial.number} was trained twice into {folder}"
    report = (out / "report.md").read_text()
    interrupted = [t for t in trials.values() if t.state == optuna.trial.TrialState.FAIL and "outcome" not in t.user_attrs]
    assert len(interrupted) >= 2 and report.count("| interrupted |") == len(interrupted) and "★ best" in report
