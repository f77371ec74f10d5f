"""The run folder: its layout, atomic writes, and reading a finished run back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from loralab.checkpoints import complete_checkpoints, list_checkpoints
from loralab.config import RunConfig, build_config, read_yaml
from loralab.config import check_remote_code as refuse_remote_code
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

    @property
    def test_eval_report(self) -> Path:
        return self.root / "eval_test.json"  # `loralab eval --split test`: apart, so nothing ranks runs by it

    @property
    def test_predictions(self) -> Path:
        return self.root / "predictions_test.jsonl"

    @property
    def data_fingerprint(self) -> Path:
        return self.root / "data.json"

    @property
    def checks_report(self) -> Path:
        return self.root / "checks.json"  # the preflight checks' report, written when training starts

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"  # event files of train.report_to: [tensorboard]


# Everything loralab writes in a run folder (plus dot-files: its own atomic-write temporaries).
RUN_ENTRIES = {"config.yaml", "adapter", "checkpoints", "metrics.jsonl", "summary.json", "eval.json", "predictions.jsonl",
               "eval_test.json", "predictions_test.jsonl",
               "data.json", "answers.json",  # answers.json: a sweep's side-by-side answers
               "checks.json", "tensorboard",
               "adapter_init.safetensors"}  # the initial adapter of a PiSSA / OLoRA / CorDA run (loralab.lora_init)

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def make_shareable(folder: Path) -> None:
    """Give a folder loralab wrote, and all inside it, the permissions the umask gives (``mkdtemp``/``mkstemp``
    create 0700/0600, which a serving process running as another user cannot read)."""
    os.chmod(folder, DIR_MODE)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), DIR_MODE)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def staging_dir(target: Path) -> Path:
    """A fresh hidden folder next to ``target`` to write into before ``replace_dir_atomic``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))


@contextlib.contextmanager
def written_into_place(target: Path) -> Iterator[Path]:
    """Yield a staging folder next to ``target``; when the block ends without an error the folder replaces
    ``target`` atomically (the old one is kept until then). The staging folder never outlives the block."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir_atomic(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move a fully written folder into place, replacing an older one (kept until the new one is there)."""
    make_shareable(staging)
    if target.is_symlink():
        target = target.resolve()  # replace what the link points to, keep the link
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
    data["train"].pop("report_to", None)  # where the curves are also sent, not what is trained
    data.pop("output_dir", None)
    return data


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """The dotted keys whose values differ between two runs' configs (resume-neutral keys left out)."""
    def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    left, right = flat(comparable_config(a)), flat(comparable_config(b))
    return sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def is_loralab_temporary(name: str) -> bool:
    """loralab's own hidden files in a run folder: atomic-write temporaries (``.summary.json.x1y2``), staging and
    backup folders (``.adapter-x1y2``, ``.adapter.old``). A user's dotfiles (``.git``, ``.notes``) are not."""
    return name.startswith(".") and any(name[1:].startswith(entry) and name[1 + len(entry):][:1] in (".", "-")
                                        for entry in RUN_ENTRIES)


def foreign_entries(folder: Path) -> list[str]:
    """Names in a folder that loralab does not write into a run folder."""
    return sorted(p.name for p in folder.iterdir() if p.name not in RUN_ENTRIES and not is_loralab_temporary(p.name))


def is_run_folder(folder: Path) -> bool:
    """A folder holding a loralab run: a config.yaml that reads as a mapping and nothing loralab did not write."""
    config = RunPaths(folder).config
    if not config.is_file() or foreign_entries(folder):
        return False
    try:
        read_yaml(config)
    except LoralabError:
        return False
    return True


def _never_started(paths: RunPaths) -> bool:
    return paths.config.is_file() and {p.name for p in paths.root.iterdir() if not is_loralab_temporary(p.name)} \
        <= {"config.yaml", "checkpoints", "data.json", "metrics.jsonl", "checks.json", "tensorboard",
            "adapter_init.safetensors"} \
        and not list_checkpoints(paths.root)


def run_is_finished(root: Path) -> bool:
    """A run whose training ended: its adapter is written and summary.json says finished."""
    paths = RunPaths(root)
    if not (paths.adapter / "adapter_config.json").is_file() or not paths.summary.is_file():
        return False
    try:
        return json.loads(paths.summary.read_text(encoding="utf-8")).get("status", "finished") == "finished"
    except (OSError, json.JSONDecodeError):
        return False


def _listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


class RunFolder:
    """The life of one run folder: checked first, changed only once the new run is ready, restored on failure.

    ``plan`` checks everything and changes nothing. ``open`` (called after data, model and preflight checks) sets
    an overwritten run aside as ``.<name>.replaced``, creates the folder and writes config.yaml. ``finished``
    deletes what was set aside; ``failed`` restores it when the new run left nothing to resume from.
    A symlinked run folder is followed: the run lives where the link points.
    """

    def __init__(self, config: RunConfig, root: Path, *, overwrite: bool, resume: bool):
        root = Path(os.path.abspath(root))
        if root.is_symlink():
            root = root.resolve()
        self.config, self.paths = config, RunPaths(root)
        self.overwrite, self.resume = overwrite, resume
        self.backup = root.with_name(f".{root.name}.replaced")
        self.mode = "new"

    @classmethod
    def plan(cls, config: RunConfig, root: Path, *, overwrite: bool, resume: bool) -> "RunFolder":
        folder = cls(config, root, overwrite=overwrite, resume=resume)
        folder._check()
        return folder

    def _check(self) -> None:
        root = self.paths.root
        if self.overwrite and self.resume:
            raise LoralabError("--resume continues a run and --overwrite replaces it; give one of them")
        for parent in root.parents:
            if parent.exists() and not parent.is_dir():
                raise LoralabError(f"cannot create the run folder {root}: {parent} is a file")
        if root.exists() and not root.is_dir():
            raise LoralabError(f"output {root} is a file, not a folder; choose another --output")
        if not root.exists() or not any(p for p in root.iterdir() if not is_loralab_temporary(p.name)):
            return
        foreign = foreign_entries(root)
        if not self.paths.config.is_file() or foreign:
            what = f"files loralab did not write ({_listing(foreign, 5)})" if self.paths.config.is_file() \
                else "no loralab run (no config.yaml)"
            raise LoralabError(f"output folder {root} holds {what}; nothing was changed. Choose another --output "
                               "(or --set name=...), or move those files away: --overwrite only replaces a loralab run")
        if _never_started(self.paths):
            self.mode = "replace"  # only a config.yaml from a run that failed before its first checkpoint
            return
        if self.overwrite:
            self.mode = "replace"
            return
        kept = f" (the run it replaced is kept in {self.backup})" if self.backup.exists() else ""
        if not self.resume:
            raise LoralabError(f"output folder {root} already holds a run{kept}; pass --resume to continue it, "
                               "--overwrite to replace it, or choose another --output / --set name=...")
        saved = load_run_config(root, check_remote_code=False)  # compared only, nothing loaded
        differing = config_differences(saved, self.config)
        if differing:
            raise LoralabError(f"output folder {root} holds a different run (its config.yaml differs in "
                               f"{_listing(differing)}); resume with `loralab train --resume {root}` "
                               "(its own config), use another --output, or pass --overwrite")
        if run_is_finished(root):
            raise LoralabError(f"run {root} has already finished (its adapter and summary.json are written); nothing "
                               "to resume. Evaluate it with `loralab eval`, or train it again with --overwrite")
        self.mode = "resume"

    def open(self) -> RunPaths:
        """Make the folder ready for training; the only step that changes anything."""
        root = self.paths.root
        if self.mode == "replace":
            if self.backup.exists():
                shutil.rmtree(root)  # a replacement that never finished; the run it replaced stays set aside
            else:
                root.rename(self.backup)
        if self.mode != "resume":
            root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.paths.config, self.config.to_yaml())
        return self.paths

    def finished(self) -> None:
        """The new run is complete: the run it replaced (now or in an interrupted attempt) goes."""
        if self.mode in ("replace", "resume") and self.backup.is_dir() and not self.backup.is_symlink():
            shutil.rmtree(self.backup)

    def failed(self) -> str | None:
        """After a failed attempt: restore the replaced run when the new one has nothing to resume from."""
        if not self.backup.exists() or self.mode != "replace":
            return None
        if complete_checkpoints(self.paths.root):
            return f"the run it replaces is kept in {self.backup} until this one finishes"
        shutil.rmtree(self.paths.root, ignore_errors=True)
        self.backup.rename(self.paths.root)
        return f"the previous run in {self.paths.root} was restored"


def prepare_run_dir(config: RunConfig, run_dir: Path, *, overwrite: bool, resume: bool) -> RunPaths:
    """Check and open a run folder at once (for callers that have nothing to load in between)."""
    return RunFolder.plan(config, run_dir, overwrite=overwrite, resume=resume).open()


def load_run_config(run_dir: str | Path, check_remote_code: bool = True) -> RunConfig:
    """The resolved config saved with a run. A config that sets ``model.trust_remote_code`` is refused unless the
    caller allowed remote code (``--trust-remote-code`` / ``remote_code_allowed()``): before anything loads it."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise LoralabError(f"{run_dir} is not a loralab run folder (no config.yaml)")
    config = build_config(read_yaml(paths.config), source=str(paths.config))
    if check_remote_code:
        refuse_remote_code(config, f"run {run_dir}: its config.yaml")
    return config


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
    checkpoints = complete_checkpoints(run_dir)
    if checkpoint == "latest":
        if not checkpoints:
            raise LoralabError(f"run {run_dir} has no checkpoints")
        return checkpoints[-1]
    if not checkpoint.isdigit():
        raise LoralabError(f"--checkpoint must be best, latest or a step number, got {checkpoint!r}")
    wanted = paths.checkpoints / f"checkpoint-{int(checkpoint)}"
    if wanted not in checkpoints:
        if wanted.is_dir():
            raise LoralabError(f"checkpoint {wanted} is incomplete (cut off while it was saved); pick another step")
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


def trim_metrics(run_dir: str | Path, last_step: int) -> int:
    """Drop metrics.jsonl lines logged after ``last_step`` (the checkpoint a resume starts from), so that a resumed
    run logs each step once; returns how many lines were dropped."""
    path = RunPaths(Path(run_dir)).metrics
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            # an interrupted attempt's closing line (train_runtime, train_loss) is not a step of the run
            if record.get("step", 0) <= last_step and "train_runtime" not in record:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by the interruption
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
