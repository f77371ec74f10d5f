"""The on-disk data cache: validated examples and tokenized splits as Arrow files, keyed by a fingerprint.

An entry is a folder ``$LORALAB_DATA_CACHE`` (default ``$LORALAB_CACHE/data``, i.e. ``~/.cache/loralab/data``) /
``<kind>-<key>``, built in a staging folder beside it and renamed into place when complete (``meta.json`` written
last), under a file lock so that processes preparing the same data (ranks of one run) build it once. A key covers
everything the entry's content depends on: the sources' contents (sha256 of the files, or of a Hub split's Arrow
files), the data config, the task type, the tokenizer (vocabulary, normalisation, special tokens, chat template),
loralab's version and its data code, so a changed file, setting, tokenizer or loralab misses the cache and is
prepared again. Entries are never deleted by loralab; remove the folder to reclaim the space.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from loralab.errors import LoralabError

CACHE_VERSION = 1  # bump when what an entry holds, or how it is computed, changes
META = "meta.json"
SMALL = 5000  # rows under which tokenizing runs in this process


def data_cache_dir() -> Path:
    """``$LORALAB_DATA_CACHE``, else ``data`` inside loralab's cache folder (``$LORALAB_CACHE``)."""
    if os.environ.get("LORALAB_DATA_CACHE"):
        return Path(os.environ["LORALAB_DATA_CACHE"])
    from loralab.models import cache_dir

    return cache_dir() / "data"


CODE = ("data/*.py", "formats.py", "readers.py", "templates.py", "turns.py")  # what turns rows into examples and ids


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of loralab's modules that turn rows into examples and token ids: changed code misses the cache."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for pattern in CODE for p in root.glob(pattern)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_of(*parts: Any) -> str:
    """A short sha256 of JSON-serialisable parts, loralab's version and the data code."""
    from loralab import __version__

    text = json.dumps([CACHE_VERSION, __version__, code_fingerprint(), *parts], sort_keys=True, default=str,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: its full definition (fast tokenizers) or vocabulary, its special and
    added tokens, its chat template and its options."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    options = {key: value for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
               if not any(word in key for word in ("file", "path", "dir", "commit", "auto_map"))}
    digest.update(json.dumps({
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": getattr(tokenizer, "special_tokens_map", None),
        "added": {str(i): str(t) for i, t in sorted((getattr(tokenizer, "added_tokens_decoder", None) or {}).items())},
        "options": options,
    }, sort_keys=True, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()


def default_num_proc(rows: int, setting: int | None) -> int:
    """``data.num_proc``, else 1 under ``SMALL`` rows and up to 4 processes (the CPU count) above; never more processes
    than thousands of rows."""
    if setting:
        return max(1, min(setting, rows))
    if rows < SMALL:
        return 1
    return max(1, min(4, os.cpu_count() or 1, rows // 1000))


def cached(name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """The cache folder ``name``, built by ``build(staging)`` (which writes its files and returns the meta) when it is
    not there yet."""
    from filelock import FileLock

    root = data_cache_dir()
    target = root / name
    if (target / META).is_file():
        return target
    try:
        (root / ".locks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoralabError(f"cannot write the data cache in {root} ({exc.strerror or exc}); set LORALAB_DATA_CACHE to "
                           "a writable folder") from None
    with FileLock(str(root / ".locks" / f"{name}.lock")):
        if (target / META).is_file():  # another process built it while this one waited
            return target
        if target.exists():  # an entry left incomplete by hand: it is the cache's own folder
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            meta = build(staging)
            (staging / META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text(encoding="utf-8"))
