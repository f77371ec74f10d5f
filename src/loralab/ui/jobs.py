"""`compare` started from the page: base vs adapter answers, one job at a time, in a worker thread.

The last loaded run stays in memory, so a second question to the same adapter does not load the model again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

MAX_PROMPTS = 20
MAX_NEW_TOKENS = 512
KEPT_JOBS = 50


class Busy(LoralabError):
    """Another comparison is running."""


@dataclass
class CompareJob:
    id: str
    run_id: str
    run_dir: Path
    prompts: list[str]
    checkpoint: str
    max_new_tokens: int
    status: str = "queued"  # queued, running, done, failed
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "run": self.run_id, "status": self.status, "prompts": self.prompts,
                "checkpoint": self.checkpoint, "max_new_tokens": self.max_new_tokens, "rows": self.rows,
                "error": self.error, "seconds": round(self.seconds, 2)}


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; at least one, at most MAX_PROMPTS."""
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LoralabError("no prompt given: write one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise LoralabError(f"{len(prompts)} prompts given; at most {MAX_PROMPTS} at a time from the page "
                           "(use `loralab compare RUN --prompts-file FILE` for more)")
    return prompts


class CompareJobs:
    """Runs ``loralab.evaluation.compare_prompts`` jobs one at a time; refuses a second while one runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, CompareJob] = OrderedDict()
        self._loaded: tuple[tuple[str, str, float], Any] | None = None

    def get(self, job_id: str) -> CompareJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running(self) -> CompareJob | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.active), None)

    def start(self, run_id: str, run_dir: Path, prompts: list[str], checkpoint: str = "best",
              max_new_tokens: int = 64) -> CompareJob:
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise LoralabError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
        if checkpoint not in ("best", "latest") and not checkpoint.isdigit():
            raise LoralabError(f"checkpoint must be best, latest or a step number, got {checkpoint!r}")
        with self._lock:
            busy = next((j for j in self._jobs.values() if j.active), None)
            if busy is not None:
                raise Busy(f"a comparison on {busy.run_id} is still running ({busy.seconds:.0f} s so far); "
                           "one runs at a time: wait for it to finish")
            job = CompareJob(uuid.uuid4().hex[:12], run_id, run_dir, prompts, checkpoint, max_new_tokens)
            self._jobs[job.id] = job
            while len(self._jobs) > KEPT_JOBS:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._work, args=(job,), name=f"loralab-compare-{job.id}", daemon=True).start()
        return job

    def _load(self, job: CompareJob) -> Any:
        from loralab.generation import load_run_model
        from loralab.runs import resolve_adapter

        adapter = resolve_adapter(job.run_dir, job.checkpoint)
        weights = adapter / "adapter_model.safetensors"
        key = (str(adapter.resolve()), job.checkpoint, weights.stat().st_mtime if weights.is_file() else 0.0)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None  # free the previous model before loading the next
        loaded = load_run_model(job.run_dir, job.checkpoint, allow_classifier=True)
        self._loaded = (key, loaded)
        return loaded

    def _work(self, job: CompareJob) -> None:
        from loralab.evaluation import compare_prompts
        from loralab.generation import GenerationSettings

        job.status = "running"
        try:
            loaded = self._load(job)
            rows = compare_prompts(job.run_dir, job.prompts, GenerationSettings(max_new_tokens=job.max_new_tokens),
                                   loaded=loaded)
            job.rows = [{k: v for k, v in row.items()} for row in rows]
            job.status = "done"
        except LoralabError as exc:
            job.error, job.status = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - shown on the page; the server keeps serving
            job.error, job.status = f"{type(exc).__name__}: {exc}", "failed"
        finally:
            job.finished = time.time()
