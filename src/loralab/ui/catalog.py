"""Which runs and sweeps the dashboard serves: the folders under ``--runs`` and ``--sweeps``, by id.

A run's id is its folder name (``runs/<name>``), or ``<sweep>/<name>`` for a run of a sweep; only names found in
those two folders resolve, so no request can reach a path outside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loralab.ui.scan import RunView, looks_like_run, read_run, subfolders
from loralab.ui.sweep_folders import SweepView, read_sweep


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not name.startswith(".") and not any(c in name for c in "/\\\0")


@dataclass
class Catalog:
    runs_dir: Path
    sweeps_dir: Path

    def notes(self) -> list[str]:
        """What the front page says about the folders themselves (missing, not folders)."""
        notes = []
        for flag, folder, hint in (("--runs", self.runs_dir, "loralab train writes runs there"),
                                   ("--sweeps", self.sweeps_dir, "loralab sweep writes sweeps there")):
            if not folder.exists():
                notes.append(f"{folder} ({flag}) does not exist yet; {hint}")
            elif not folder.is_dir():
                notes.append(f"{folder} ({flag}) is a file, not a folder")
        return notes

    def run_folders(self) -> list[Path]:
        if looks_like_run(self.runs_dir) and (self.runs_dir / "config.yaml").exists():
            return [self.runs_dir]  # --runs pointed at one run
        return [p for p in subfolders(self.runs_dir) if looks_like_run(p)]

    def runs(self) -> list[RunView]:
        """Every plain run, newest first."""
        views = [read_run(p, p.name) for p in self.run_folders()]
        return sorted(views, key=lambda v: -v.updated)

    def sweeps(self) -> list[SweepView]:
        found = [read_sweep(p) for p in subfolders(self.sweeps_dir) if (p / "sweep.yaml").is_file()]
        return sorted(found, key=lambda s: -max([r.updated for r in s.runs] or [0.0]))

    def all_runs(self) -> list[RunView]:
        """Plain runs, then every sweep's runs (each id once)."""
        return self.runs() + [run for sweep in self.sweeps() for run in sweep.runs]

    def run_path(self, run_id: str) -> Path | None:
        """The folder of a run id, or None when the id names nothing the dashboard serves."""
        parts = run_id.split("/")
        if len(parts) == 1 and _plain_name(parts[0]):
            if self.run_folders() == [self.runs_dir] and parts[0] == self.runs_dir.name:
                return self.runs_dir
            path = self.runs_dir / parts[0]
        elif len(parts) == 2 and all(_plain_name(p) for p in parts) and (self.sweeps_dir / parts[0] / "sweep.yaml").is_file():
            path = self.sweeps_dir / parts[0] / parts[1]
        else:
            return None
        return path if looks_like_run(path) else None

    def run(self, run_id: str) -> RunView | None:
        path = self.run_path(run_id)
        if path is None:
            if "/" in run_id:  # a sweep run that failed before its folder was made
                sweep = self.sweep(run_id.split("/")[0])
                return next((r for r in sweep.runs if r.id == run_id), None) if sweep else None
            return None
        if "/" in run_id:
            sweep = read_sweep(path.parent)
            return next((r for r in sweep.runs if r.id == run_id), None)
        return read_run(path, run_id)

    def sweep(self, name: str) -> SweepView | None:
        if not _plain_name(name) or not (self.sweeps_dir / name / "sweep.yaml").is_file():
            return None
        return read_sweep(self.sweeps_dir / name)
