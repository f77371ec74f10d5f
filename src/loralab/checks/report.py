"""Check results and the report that gathers them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "warn", "fail"]
_ORDER = {"pass": 0, "warn": 1, "fail": 2}


@dataclass
class CheckResult:
    """One check's verdict, a one-line reason, and the numbers behind it."""

    name: str
    status: Status
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "details": self.details,
                "seconds": self.seconds}


def verdict(name: str, problems: list[tuple[Status, str]], ok: str, details: dict[str, Any]) -> CheckResult:
    """A result from (status, message) problems: the worst status wins, the messages joined; ``ok`` when none."""
    if not problems:
        return CheckResult(name, "pass", ok, details)
    worst = max((s for s, _ in problems), key=_ORDER.__getitem__)
    ordered = sorted(problems, key=lambda p: -_ORDER[p[0]])
    return CheckResult(name, worst, "; ".join(m for _, m in ordered), details)


@dataclass
class CheckReport:
    """All results of one ``loralab check`` (or preflight) run."""

    results: list[CheckResult]
    examples: list[str] = field(default_factory=list)  # ``--show``: tokenized examples, plain text with markers
    seconds: float = 0.0
    session: Any = field(default=None, repr=False)  # the loaded session, for rendering; not serialised

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "warn"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def get(self, name: str) -> CheckResult:
        """The result of the check called ``name`` (KeyError when it did not run)."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r}; ran: {[r.name for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": [r.name for r in self.failed], "warnings": [r.name for r in self.warnings],
                "seconds": round(self.seconds, 3), "checks": [r.to_dict() for r in self.results],
                "examples": self.examples}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)
