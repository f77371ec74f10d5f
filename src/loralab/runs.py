"""The run folder: its layout, atomic writes, and reading a finished run back."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.config import RunConfig, build_config, read_yaml
from loralab.errors import LoralabError


@dataclass(frozen=True)
class RunPaths:
    """Where everything of one run lives."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def eval_report(self) -> Path:
        return self.root / "eval.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move a fully written folder into place, replacing an older one."""
    backup = target.with_name(f".{target.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        target.rename(backup)
    staging.rename(target)
    if backup.exists():
        shutil.rmtree(backup)


def comparable_config(config: RunConfig) -> dict[str, Any]:
    """A run's config without the keys that may differ between attempts at the same run."""
    data = config.model_dump(mode="json")
    data["train"].pop("resume", None)
    data.pop("output_dir", None)
    return data


def _never_started(paths: RunPaths) -> bool:
    return paths.config.is_file() and {p.name for p in paths.root.iterdir()} <= {"config.yaml", "checkpoints"} \
        and not list_checkpoints(paths.root)


def prepare_run_dir(config: RunConfig, run_dir: Path, *, overwrite: bool, resume: bool) -> RunPaths:
    """Create (or reopen for resume) a run folder; refuse to clobber a different run or foreign files."""
    paths = RunPaths(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if _never_started(paths):
            shutil.rmtree(run_dir)  # only a config.yaml from a run that failed before its first step
        elif overwrite:
            shutil.rmtree(run_dir)
        elif not paths.config.is_file():
            raise LoralabError(f"output folder {run_dir} is not empty and holds no loralab run; choose another --output or pass --overwrite")
        elif resume:
            saved = load_run_config(run_dir)
            if comparable_config(saved) != comparable_config(config):
                raise LoralabError(f"output folder {run_dir} holds a different run (its config.yaml differs); "
                                   "resume with the same config, use another --output, or pass --overwrite")
            return paths
        else:
            raise LoralabError(f"output folder {run_dir} already holds a run; pass --resume to continue it, "
                               "--overwrite to replace it, or choose another --output / --set name=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.config, config.to_yaml())
    return paths


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved with a run."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise LoralabError(f"{run_dir} is not a loralab run folder (no config.yaml)")
    return build_config(read_yaml(paths.config), source=str(paths.config))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders ordered by step."""
    folder = RunPaths(Path(run_dir)).checkpoints
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_adapter(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """The adapter folder for ``best`` (the run's adapter), ``latest``, or a step number."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise LoralabError(f"{run_dir} is not a loralab run folder (no config.yaml)")
    if checkpoint == "best":
        if not (paths.adapter / "adapter_config.json").is_file():
            raise LoralabError(f"run {run_dir} has no trained adapter yet (no adapter/adapter_config.json); "
                               "finish it with `loralab train --resume`")
        return paths.adapter
    checkpoints = list_checkpoints(run_dir)
    if checkpoint == "latest":
        if not checkpoints:
            raise LoralabError(f"run {run_dir} has no checkpoints")
        return checkpoints[-1]
    if not checkpoint.isdigit():
        raise LoralabError(f"--checkpoint must be best, latest or a step number, got {checkpoint!r}")
    wanted = paths.checkpoints / f"checkpoint-{int(checkpoint)}"
    if not wanted.is_dir():
        steps = [p.name.split("-")[1] for p in checkpoints] or ["none"]
        raise LoralabError(f"run {run_dir} has no checkpoint at step {checkpoint}; available steps: {', '.join(steps)}")
    return wanted


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = RunPaths(Path(run_dir)).summary
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl (a torn last line from a crash is skipped)."""
    path = RunPaths(Path(run_dir)).metrics
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
