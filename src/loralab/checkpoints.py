"""Trainer checkpoints of a run: which exist, which are complete, and where a resume starts.

transformers writes a checkpoint in place, file after file, ``trainer_state.json`` last; a process killed mid-save
leaves a torn folder. A checkpoint counts only when every file it needs is there and reads back whole: the JSON
parses, each safetensors file holds every byte its header declares, each torch file is an intact zip archive.
Torn checkpoints are set aside (renamed ``torn-checkpoint-N``, which the Trainer ignores), never resumed from.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, complete or not, ordered by step."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable (truncated, bad header), or None."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"{path.name} is truncated (header of {header_len} bytes, file of {size})"
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name} has a damaged header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + header_len + max(ends, default=0) > size:
        return f"{path.name} is truncated ({size} bytes, {8 + header_len + max(ends)} declared)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file (a zip archive) is unreadable, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{path.name} is damaged or truncated ({exc})"
    return f"{path.name} has a damaged entry {bad}" if bad else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or torn files), or None when it is complete."""
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    weights = [folder / name for name in WEIGHTS if (folder / name).is_file()]
    if not weights:
        missing.append(WEIGHTS[0])
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is truncated"
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = torch_file_problem(path)
        else:
            continue
        if problem:
            return problem
    return None


def set_aside_torn(run_dir: str | Path) -> list[str]:
    """Rename every torn checkpoint to ``torn-checkpoint-N`` (ignored by the Trainer); returns warnings."""
    warnings = []
    for folder in list_checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            continue
        target = folder.with_name(f"torn-{folder.name}")
        suffix = 1
        while target.exists():
            suffix += 1
            target = folder.with_name(f"torn-{folder.name}.{suffix}")
        folder.rename(target)
        warnings.append(f"checkpoint {folder.name} is incomplete ({problem}), probably cut off while it was saved; "
                        f"set aside as {target.name}, not resumed from")
    for message in warnings:
        log.warning(message)
    return warnings


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints that are whole, ordered by step (torn ones are skipped, not touched)."""
    return [folder for folder in list_checkpoints(run_dir) if checkpoint_problem(folder) is None]


def resume_point(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint after setting torn ones aside, or None."""
    set_aside_torn(run_dir)
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
