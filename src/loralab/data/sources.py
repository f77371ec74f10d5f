"""Where examples come from: data files and folders, Hub datasets (``hub:ID``) and mixtures of them (``data.sources``).

A ``hub:ID`` is read with ``datasets.load_dataset`` (a Hub id, or a local dataset folder of data files: the same code
path, which is how it is tested offline); only such a source ever touches the network. A mixture takes from each
source all its rows, ``count`` rows, or a ``weight``-proportional share (seeded by ``data.seed``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs

from loralab.config import DataConfig
from loralab.errors import DataError, LoralabError
from loralab.readers import _one_line, iter_dataset, iter_rows

HUB = "hub:"
CHUNK = 1 << 20
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def demo_dataset_path() -> Path:
    """The bundled demo dataset (instruction/response pairs written for loralab)."""
    return Path(str(resources.files("loralab") / "resources" / "demo_dataset.json"))


@dataclass(frozen=True)
class Source:
    """One place rows come from, and how many of its rows a mixture takes (``weight`` / ``count``; neither: all)."""

    path: str
    split: str | None = None
    subset: str | None = None
    weight: float | None = None
    count: int | None = None

    @property
    def is_hub(self) -> bool:
        return self.path.startswith(HUB)

    @property
    def hub_id(self) -> str:
        return self.path[len(HUB) :]

    @property
    def spec(self) -> str:
        """The source as one string (``parse_source`` reads it back): the path, or ``hub:ID?split=..&subset=..``."""
        options = [f"{k}={v}" for k, v in (("split", self.split), ("subset", self.subset)) if v]
        return self.path + ("?" + "&".join(options) if options else "")

    @property
    def label(self) -> str:
        """How errors name it: the path, or ``hub:ID (split train)``."""
        if not self.is_hub:
            return self.path
        return f"{self.path} (split {self.split or 'train'}" + (f", subset {self.subset})" if self.subset else ")")


def parse_source(text: str) -> Source:
    """A path or ``hub:ID``, where a Hub id may end in ``?split=NAME&subset=NAME``."""
    if not text.startswith(HUB) or "?" not in text:
        return Source(text)
    path, _, query = text.partition("?")
    options = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - {"split", "subset"})
    if unknown:
        raise DataError(f"dataset {text}: unknown option {unknown[0]!r} after '?'; expected split=NAME and/or subset=NAME")
    return Source(path, split=options.get("split") or None, subset=options.get("subset") or None)


def main_sources(cfg: DataConfig) -> list[Source]:
    """What ``data.path`` (or the bundled demo) or ``data.sources`` names."""
    if cfg.sources:
        return [Source(s.path, s.split, s.subset, s.weight, s.count) for s in cfg.sources]
    return [parse_source(cfg.path or str(demo_dataset_path()))]


# ---------------------------------------------------------------- rows


def load_hub(source: Source) -> Any:
    """The split of a Hub dataset (or local dataset folder) as a memory-mapped ``datasets.Dataset``."""
    import datasets

    if not source.hub_id.strip():
        raise DataError(f"dataset {source.path!r}: no dataset id after 'hub:'")
    try:
        loaded = datasets.load_dataset(os.path.expanduser(source.hub_id), source.subset, split=source.split or "train")
    except Exception as exc:  # noqa: BLE001 - load_dataset raises many kinds; each becomes one message
        raise DataError(_hub_error(source, exc)) from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"dataset {source.label}: expected one split, got {type(loaded).__name__}; set split")
    return loaded


def _hub_error(source: Source, exc: Exception) -> str:
    text = _one_line(exc) or type(exc).__name__
    offline = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    names = " ".join(type(e).__name__ for e in _causes(exc))
    local = source.hub_id.startswith(("/", ".", "~")) or Path(source.hub_id).exists()
    if local and not Path(source.hub_id).expanduser().exists():
        return f"dataset {source.label}: no such folder; expected a Hub dataset id (hub:org/name) or a dataset folder"
    if not local and (offline or any(word in names for word in ("Connection", "Offline", "Timeout", "HTTP"))):
        why = f"{' / '.join(offline)} is set" if offline else "the network cannot be reached"
        return (f"dataset {source.label}: needs the network to download from the Hugging Face Hub and {why}; it is not "
                f"in the datasets cache either. Connect (and unset {' / '.join(offline) or 'the offline variables'}) "
                f"to download it once, or point the path at a local copy ({text})")
    if "split" in text.lower() and ("unknown" in text.lower() or "should be one of" in text.lower()):
        return f"dataset {source.label}: {text.rstrip('.')}; set the split (hub:ID?split=NAME, or split: in data.sources)"
    if "DatasetNotFound" in names or "FileNotFound" in names or "doesn't exist" in text:
        return (f"dataset {source.label}: not found ({text}); expected a Hub dataset id such as hub:org/name, or a "
                "local folder of data files")
    return f"dataset {source.label}: cannot be loaded with datasets.load_dataset ({type(exc).__name__}: {text})"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def first_local_record(cfg: DataConfig) -> Any:
    """The first row of the (first) data file when it is a local file, else None: what task detection looks at
    (a Hub dataset is never downloaded just to guess its task; a file that cannot be read gives None here and its
    own error later)."""
    path = cfg.path or (cfg.sources[0].path if cfg.sources else None)
    if not path or path.startswith("hub:") or not Path(path).is_file():
        return None
    try:
        return next(iter(source_rows(parse_source(path))))[1]
    except (StopIteration, LoralabError, OSError, ValueError, TypeError):
        return None


def source_rows(source: Source) -> Iterator[tuple[int, Any]]:
    """(row, record) pairs of a source, read as they are consumed."""
    if source.is_hub:
        return iter_dataset(load_hub(source))
    return iter_rows(source.path)


# ---------------------------------------------------------------- fingerprints


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
    state = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) for f in files)
    sha, size = _hashed(state)
    return {"path": str(path), "sha256": sha, "bytes": size}


@functools.lru_cache(maxsize=64)
def _hashed(state: tuple) -> tuple[str, int]:
    """Files hashed once per state (path, size, modification time, inode) in a process."""
    return _digest([Path(entry[0]) for entry in state])


def source_fingerprint(source: Source) -> dict[str, Any]:
    """What identifies a source's content: sha256 of its file(s); for a Hub split, of the Arrow files ``datasets``
    wrote for that split (byte for byte the same while its rows are; in-memory: the dataset's fingerprint)."""
    if source.is_hub:
        loaded = load_hub(source)
        files = [Path(f["filename"]) for f in loaded.cache_files]
        state = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) for f in files)
        sha, size = _hashed(state) if files else (loaded._fingerprint, 0)
        return {"path": source.path, "split": source.split or "train", "subset": source.subset, "sha256": sha,
                "bytes": size, "rows": len(loaded)}
    if not Path(source.path).exists():
        raise DataError(f"data file not found: {source.path}")
    return file_fingerprint(source.path)


# ---------------------------------------------------------------- mixtures


def mixture_counts(sources: Sequence[Source], sizes: Sequence[int]) -> list[int]:
    """How many rows each source gives: ``count``, all of them, or for the weighted sources the largest mix in their
    proportions that repeats no row (the scarcest source, relative to its weight, is taken whole)."""
    counts: list[int] = []
    for source, size in zip(sources, sizes):
        if source.count is not None and source.count > size:
            raise DataError(f"data.sources: {source.label} has {size} rows, fewer than its count {source.count}; "
                            "lower count, or use weight")
        counts.append(source.count if source.count is not None else size)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted:
        total_weight = sum(sources[i].weight for i in weighted)
        total = min(sizes[i] * total_weight / sources[i].weight for i in weighted)
        for i in weighted:
            counts[i] = min(sizes[i], int(total * sources[i].weight / total_weight + 1e-9))
    return counts


def pick_rows(size: int, count: int, seed: int, index: int) -> list[int]:
    """``count`` of ``range(size)``, sampled by the seed and the source's place in the list, in file order."""
    if count >= size:
        return list(range(size))
    return sorted(random.Random(f"{seed}:{index}").sample(range(size), count))
