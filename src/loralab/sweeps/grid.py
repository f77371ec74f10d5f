"""Expanding a sweep: every combination of the grid (a *cell*), once per seed, as a validated run config with a
folder name that shows its values: ``tm-q+v_lr-3e-4``, and ``tm-q+v_lr-3e-4_seed-1`` with seeds."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.config import RunConfig, build_config, check_remote_code, set_dotted
from loralab.errors import ConfigError
from loralab.sweeps.spec import SEED_KEY, SweepSpec, validate_spec

_ABBREVIATIONS = {
    "train.learning_rate": "lr", "lora.target_modules": "tm", "train.batch_size": "bs", "train.epochs": "ep",
    "train.max_steps": "steps", "train.gradient_accumulation": "ga", "train.weight_decay": "wd",
    "train.scheduler": "sched", "model.name_or_path": "model", "data.path": "data",
}
_MAX_NAME = 80
SINGLE_CELL = "config"  # the cell's name when a sweep has seeds and no grid


@dataclass
class PlannedRun:
    """One run: its folder name, the grid values (as validated), the full config, and its cell and seed (the cell
    is the run's name without the seed; ``seed`` is None in a sweep without seeds)."""

    name: str
    values: dict[str, Any]
    config: RunConfig
    cell: str = ""
    seed: int | None = None

    def __post_init__(self) -> None:
        self.cell = self.cell or self.name

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def overrides(self) -> list[str]:
        seed = [f"{SEED_KEY}={self.seed}"] if self.seed is not None else []
        return [f"{key}={display_value(value)}" for key, value in self.values.items()] + seed


def get_dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def format_number(value: float | int) -> str:
    """Short text for a number: 3e-4, 9.65e-7, 0.03, 8, 2.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e5:
        return str(int(value))
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.6g}"


def display_value(value: Any) -> str:
    """A grid value as a user would write it: numbers short, lists as ``[a, b]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, list):
        return "[" + ", ".join(display_value(v) for v in value) + "]"
    return str(value)


def _name_part(value: Any) -> str:
    if isinstance(value, list):
        items = [str(v) for v in value]
        suffix = _common_suffix(items)
        return "+".join(item[: len(item) - len(suffix)] if suffix else item for item in items) or "none"
    if isinstance(value, str) and "/" in value:
        value = Path(value.rstrip("/")).name
    return display_value(value)


def _common_suffix(items: list[str]) -> str:
    """A shared ``_xxx`` suffix such as ``_proj`` (kept out of run names), when every item has more before it."""
    if len(items) < 2:
        return ""
    match = re.search(r"_[A-Za-z0-9]+$", items[0])
    suffix = match.group(0) if match else ""
    return suffix if suffix and all(i.endswith(suffix) and len(i) > len(suffix) for i in items) else ""


def _key_labels(keys: list[str]) -> dict[str, str]:
    labels = {key: _ABBREVIATIONS.get(key, key.split(".")[-1]) for key in keys}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: label if counts[label] == 1 else key.replace(".", "-") for key, label in labels.items()}


def _sanitize(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+=_-]", "_", text)).strip("._") or "run"


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(values: dict[str, Any], labels: dict[str, str]) -> str:
    """``tm-q+v_lr-3e-4`` for ``{lora.target_modules: [q_proj, v_proj], train.learning_rate: 3e-4}``."""
    name = _sanitize("_".join(f"{labels[key]}-{_name_part(value)}" for key, value in values.items()))
    if len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 9].rstrip('._-')}-{_digest(values)}"
    return name


def seeded_name(cell: str, seed: int) -> str:
    """The folder of one seed of a cell: ``<cell>_seed-<seed>`` (``seed-<seed>`` for a sweep without a grid)."""
    return f"seed-{seed}" if cell == SINGLE_CELL else f"{cell}_seed-{seed}"


def _cells(spec: SweepSpec) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, values as validated, config mapping) of every grid combination, in grid order; raises on the first
    combination that does not validate."""
    keys = list(spec.grid)
    labels = _key_labels(keys)
    combinations = list(itertools.product(*(spec.grid[key] for key in keys)))
    cells = []
    for number, combination in enumerate(combinations, 1):
        merged = copy.deepcopy(spec.base)
        label = ", ".join(f"{key}={display_value(value)}" for key, value in zip(keys, combination))
        for key, value in zip(keys, combination):
            set_dotted(merged, key, copy.deepcopy(value))
        config = build_config(merged, source=f"sweep run {number} of {len(combinations)} [{label}]")
        check_remote_code(config, f"sweep run {number} [{label}]")  # the config alone never enables remote code
        dumped = config.model_dump(mode="json")
        values = {key: get_dotted(dumped, key) for key in keys}
        cells.append((run_name(values, labels) if keys else SINGLE_CELL, values, merged))
    names = [name for name, _, _ in cells]
    cells = [(f"{name}-{_digest(values)}" if names.count(name) > 1 else name, values, merged)
             for name, values, merged in cells]
    seen: set[str] = set()
    for name, _, _ in cells:
        if name in seen:
            raise ConfigError(f"two grid combinations give the same run config ({name}); remove the duplicate value")
        seen.add(name)
    return cells


def expand_grid(spec: SweepSpec) -> list[PlannedRun]:
    """Every run of the sweep as a validated config: each grid cell in grid order, and with ``seeds`` each cell once
    per seed (``train.seed`` set, the seeds of a cell next to each other)."""
    validate_spec(spec)
    build_config(spec.base, source="the sweep's base config")
    planned: list[PlannedRun] = []
    for cell, values, merged in _cells(spec):
        for seed in spec.seeds if spec.seeds is not None else [None]:
            data = copy.deepcopy(merged)
            if seed is not None:
                set_dotted(data, SEED_KEY, seed)
            name = cell if seed is None else seeded_name(cell, seed)
            config = build_config(data, source=f"sweep run {name}")
            config.name, config.output_dir = name, str(spec.sweep_dir)
            planned.append(PlannedRun(name, values, config, cell=cell, seed=seed))
    return planned
