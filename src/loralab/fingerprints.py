"""What a run was trained on: a fingerprint of its data files and the rows of its splits, kept in ``data.json``.

``eval`` (of the eval or the test split) and ``--resume`` compare the files with the fingerprint: a data file edited
after training would make a re-split put training rows in the "eval split" or the "test split" (or resume on other
data), so a change is refused, never silent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from loralab.config import DataConfig
from loralab.data.sources import file_fingerprint, main_sources, parse_source, source_fingerprint
from loralab.data.tables import row_ids
from loralab.errors import LoralabError
from loralab.formats import Example

__all__ = ["file_fingerprint", "data_sources", "data_record", "changed_files", "verify_data", "verify_split"]


def rows_digest(examples: Sequence[Example]) -> str:
    return hashlib.sha256(json.dumps(row_ids(examples)).encode()).hexdigest()


def data_sources(cfg: DataConfig) -> dict[str, str]:
    """What a run reads, by role: ``train`` (the data file; with ``data.sources`` ``train``, ``train.2``, ... one per
    source), ``eval`` (``data.eval_path``) and ``test`` (``data.test_path``) when set. Paths, or ``hub:ID?split=..``."""
    sources = {("train" if i == 0 else f"train.{i + 1}"): s.spec for i, s in enumerate(main_sources(cfg))}
    if cfg.eval_path:
        sources["eval"] = cfg.eval_path
    if cfg.test_path:
        sources["test"] = cfg.test_path
    return sources


def data_record(cfg: DataConfig, train: Sequence[Example], eval_part: Sequence[Example],
                test_part: Sequence[Example] = ()) -> dict[str, Any]:
    """The content of ``data.json``: file fingerprints and which rows went into each split."""
    return {
        "files": {role: source_fingerprint(parse_source(path)) for role, path in data_sources(cfg).items()},
        "split": {"seed": cfg.seed, "eval_split": cfg.eval_split, "test_split": cfg.test_split, "n_train": len(train),
                  "n_eval": len(eval_part), "n_test": len(test_part), "eval_rows": row_ids(eval_part),
                  "test_rows": row_ids(test_part), "train_rows_sha256": rows_digest(train)},
    }


def split_files(cfg: DataConfig, split: str) -> tuple[str, ...]:
    """The roles of the files a split is rebuilt from: its own file when configured, else the data file(s)."""
    own = cfg.eval_path if split == "eval" else cfg.test_path
    return (split,) if own else tuple(r for r in data_sources(cfg) if r.split(".")[0] == "train")


def changed_files(record: dict[str, Any], cfg: DataConfig, roles: Sequence[str] | None = None) -> list[str]:
    """The data files (of these roles; default all) that differ from the fingerprint, named with what changed; empty
    when all match."""
    changes = []
    for role, path in data_sources(cfg).items():
        saved = record.get("files", {}).get(role) if roles is None or role in roles else None
        if saved is None:
            continue
        source = parse_source(path)
        if not source.is_hub and not Path(path).exists():
            changes.append(f"{path} no longer exists")
            continue
        now = source_fingerprint(source)
        if now["sha256"] != saved.get("sha256"):
            what = f"{saved.get('rows')} -> {now['rows']} rows" if source.is_hub else \
                f"{saved.get('bytes')} -> {now['bytes']} bytes"
            changes.append(f"{source.label if source.is_hub else path} changed since training ({what}, sha256 differs)")
    return changes


def verify_data(record_path: Path, cfg: DataConfig, doing: str, for_eval: bool = False, split: str | None = None) -> None:
    """Refuse to ``doing`` when the run's data files changed since training. ``split`` ("eval" or "test"; ``for_eval``
    is ``split="eval"``): only what that split is rebuilt from matters (its own file when set, else the data file it
    was split from)."""
    split = split or ("eval" if for_eval else None)
    if not record_path.is_file():
        return  # a run made before loralab kept fingerprints
    record = json.loads(record_path.read_text(encoding="utf-8"))
    roles = split_files(cfg, split) if split else None
    changes = changed_files(record, cfg, roles)
    if not changes:
        return
    if split:
        raise LoralabError(f"cannot {doing}: {'; '.join(changes)}. The {split} split training held out can no longer "
                           "be rebuilt faithfully (training rows could land in it); restore the file, or name the "
                           "file to evaluate on (loralab eval RUN --data FILE)")
    raise LoralabError(f"cannot {doing}: {'; '.join(changes)}. Resuming on other data would mix two trainings; "
                       "restore the file, or start a new run (--overwrite, or another --output)")


def verify_split(record_path: Path, part: Sequence[Example], split: str = "eval") -> None:
    """Check that a rebuilt eval (or test) split holds exactly the rows the run held out."""
    if not record_path.is_file():
        return
    saved = json.loads(record_path.read_text(encoding="utf-8")).get("split", {}).get(f"{split}_rows")
    if saved is not None and saved != row_ids(part):
        raise LoralabError(f"the rebuilt {split} split differs from the one training held out ({record_path}); "
                           "evaluate on an explicit file with --data FILE")
