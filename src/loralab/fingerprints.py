"""What a run was trained on: a fingerprint of its data files and the rows of its split, kept in ``data.json``.

``eval`` and ``--resume`` compare the files with the fingerprint: a data file edited after training would make a
re-split put training rows in the "eval split" (or resume on other data), so a change is refused, never silent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from loralab.config import DataConfig
from loralab.data import Example, demo_dataset_path
from loralab.errors import LoralabError

CHUNK = 1 << 20


def _digest(paths: Sequence[Path]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
                size += len(block)
    return digest.hexdigest(), size


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """sha256 and size of a data file, or of every file of a dataset folder (in name order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    sha, size = _digest(files)
    return {"path": str(path), "sha256": sha, "bytes": size}


def rows_digest(examples: Sequence[Example]) -> str:
    return hashlib.sha256(json.dumps([e.row for e in examples]).encode()).hexdigest()


def data_sources(cfg: DataConfig) -> dict[str, str]:
    """The files a run reads: ``train`` (the data file) and ``eval`` (``data.eval_path``) when set."""
    sources = {"train": cfg.path or str(demo_dataset_path())}
    if cfg.eval_path:
        sources["eval"] = cfg.eval_path
    return sources


def data_record(cfg: DataConfig, train: Sequence[Example], eval_part: Sequence[Example]) -> dict[str, Any]:
    """The content of ``data.json``: file fingerprints and which rows went into each split."""
    return {
        "files": {role: file_fingerprint(path) for role, path in data_sources(cfg).items()},
        "split": {"seed": cfg.seed, "eval_split": cfg.eval_split, "n_train": len(train), "n_eval": len(eval_part),
                  "eval_rows": [e.row for e in eval_part], "train_rows_sha256": rows_digest(train)},
    }


def changed_files(record: dict[str, Any], cfg: DataConfig, roles: Sequence[str] = ("train", "eval")) -> list[str]:
    """The data files (of these roles) that differ from the fingerprint, named with what changed; empty when all match."""
    changes = []
    for role, path in data_sources(cfg).items():
        saved = record.get("files", {}).get(role) if role in roles else None
        if saved is None:
            continue
        if not Path(path).exists():
            changes.append(f"{path} no longer exists")
            continue
        now = file_fingerprint(path)
        if now["sha256"] != saved["sha256"]:
            changes.append(f"{path} changed since training ({saved['bytes']} -> {now['bytes']} bytes, sha256 differs)")
    return changes


def verify_data(record_path: Path, cfg: DataConfig, doing: str, for_eval: bool = False) -> None:
    """Refuse to ``doing`` when the run's data files changed since training. ``for_eval``: only what the eval split
    is built from matters (``data.eval_path`` when set, else the data file it was split from)."""
    if not record_path.is_file():
        return  # a run made before loralab kept fingerprints
    record = json.loads(record_path.read_text(encoding="utf-8"))
    roles = (("eval",) if cfg.eval_path else ("train",)) if for_eval else ("train", "eval")
    changes = changed_files(record, cfg, roles)
    if not changes:
        return
    if for_eval:
        raise LoralabError(f"cannot {doing}: {'; '.join(changes)}. The eval split training held out can no longer "
                           "be rebuilt faithfully (training rows could land in it); restore the file, or name the "
                           "file to evaluate on (loralab eval RUN --data FILE)")
    raise LoralabError(f"cannot {doing}: {'; '.join(changes)}. Resuming on other data would mix two trainings; "
                       "restore the file, or start a new run (--overwrite, or another --output)")


def verify_split(record_path: Path, eval_part: Sequence[Example]) -> None:
    """Check that a rebuilt eval split holds exactly the rows the run held out."""
    if not record_path.is_file():
        return
    saved = json.loads(record_path.read_text(encoding="utf-8")).get("split", {}).get("eval_rows")
    if saved is not None and saved != [e.row for e in eval_part]:
        raise LoralabError(f"the rebuilt eval split differs from the one training held out ({record_path}); "
                           "evaluate on an explicit file with --data FILE")
