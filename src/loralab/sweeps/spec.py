"""What a sweep is: a base config, a grid of values per dotted key, optional seeds, and how runs are judged.

Read from a sweep file (a YAML file with a top-level ``grid:`` and/or ``seeds:``), a plain config file, and the
command line (``--grid``, ``--seeds``, ``--set``); everything is checked here, before any run is planned.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from loralab.config import KEY_ALIASES, build_config, config_keys, parse_override, read_yaml, set_dotted
from loralab.errors import ConfigError, LoralabError

METRICS: tuple[str, ...] = ("eval_loss", "rouge_l", "chrf", "exact_match", "bleu")
SWEEP_FILE_KEYS: tuple[str, ...] = ("name", "base", "grid", "seeds", "metric", "eval_limit", "test_limit", "max_new_tokens",
                                    "prompts", "prompts_file", "sweeps_dir")
RESERVED_KEYS: tuple[str, ...] = ("name", "output_dir")  # set by the sweep for every run
SEED_KEY = "train.seed"


@dataclass
class SweepSpec:
    """What to sweep: a base config mapping, a grid of values per dotted key, the seeds every grid cell is trained
    with (``train.seed``; None: once, with the base config's seed), and how to judge the runs."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    name: str = "sweep"
    metric: str = "eval_loss"
    eval_limit: int | None = None
    max_new_tokens: int = 64
    prompts: list[str] | None = None  # None: the first few prompts of the eval split
    sweeps_dir: Path = Path("sweeps")
    seeds: list[int] | None = None
    test_limit: int | None = None  # the test split (when the data holds one out): first N examples; None: all

    @property
    def sweep_dir(self) -> Path:
        return Path(self.sweeps_dir) / self.name

    def to_yaml(self) -> str:
        data = {"name": self.name, "metric": self.metric, "eval_limit": self.eval_limit,
                "max_new_tokens": self.max_new_tokens, "prompts": self.prompts, "grid": self.grid}
        if self.test_limit is not None:
            data["test_limit"] = self.test_limit
        if self.seeds is not None:
            data["seeds"] = self.seeds
        data["base"] = self.base
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None)


def split_values(raw: str) -> list[str]:
    """Split ``v1,v2`` on commas outside brackets and quotes, so ``[q,v],[q,k,v,o]`` gives two lists."""
    items, depth, quote, current = [], 0, "", ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    items.append(current.strip())
    return items


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` with each value parsed as YAML (``[q_proj,v_proj]`` is one list value)."""
    if "=" not in item:
        raise ConfigError(f"--grid {item!r} is not key=v1,v2,... (e.g. --grid train.learning_rate=1e-4,3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = split_values(raw)
    if any(part == "" for part in parts):
        raise ConfigError(f"--grid {item!r}: empty value (values are separated by commas)")
    return key, [parse_override(f"{key}={part}")[1] for part in parts]


def parse_seeds(raw: str | Iterable[Any] | None, source: str = "--seeds") -> list[int] | None:
    """``1,2,3`` (or a list) as distinct integer seeds; None stays None."""
    if raw is None:
        return None
    items = ([part.strip() for part in raw.split(",")] if raw.strip() else []) if isinstance(raw, str) else list(raw)
    seeds = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not re.fullmatch(r"-?\d+", text):
            raise ConfigError(f"{source}: {item!r} is not an integer seed; give distinct integers, e.g. 1,2,3")
        seeds.append(int(text))
    if not seeds:
        raise ConfigError(f"{source} is empty; give distinct integers, e.g. 1,2,3")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source} lists a seed twice: {seeds}")
    return seeds


def read_prompts_file(path: str | Path, base: dict[str, Any]) -> list[str]:
    """The prompts of a ``--prompts-file`` (one per line, or a JSON / JSONL / CSV data file), as ``loralab compare`` reads it."""
    from loralab.evaluation import read_prompts

    config = build_config(base, source="the sweep's base config")
    task_type = config.model.task_type or config.lora.task_type or "CAUSAL_LM"
    return [example.prompt for example in read_prompts(path, config.data, task_type)]


def _resolve_relative(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def load_sweep(path: str | Path | None = None, grid_args: Iterable[str] = (), overrides: Iterable[str] = (), *,
               name: str | None = None, metric: str | None = None, eval_limit: int | None = None,
               max_new_tokens: int | None = None, prompts_file: str | Path | None = None,
               sweeps_dir: str | Path | None = None, seeds: str | Iterable[int] | None = None) -> SweepSpec:
    """A sweep from a sweep file (top-level ``grid:`` and/or ``seeds:``) or a base config file, plus ``--grid``,
    ``--seeds`` and ``--set``. Command-line values win over the file's. The grid is expanded by
    :func:`loralab.sweeps.grid.expand_grid`."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    is_sweep_file = "grid" in data or "seeds" in data
    file_grid: dict[str, list[Any]] = {}
    if is_sweep_file:
        unknown = sorted(set(data) - set(SWEEP_FILE_KEYS))
        if unknown:
            raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SWEEP_FILE_KEYS)}")
        folder = Path(path).parent
        base = data.get("base") or {}
        if isinstance(base, str):
            base = read_yaml(_resolve_relative(base, folder))
        if not isinstance(base, dict):
            raise ConfigError(f"sweep file {path}: 'base' must be a config mapping or the path of a config file")
        grid = data.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"sweep file {path}: 'grid' must map config keys to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list):
                raise ConfigError(f"sweep file {path}: grid key {key!r} must have a list of values, got {values!r}")
            file_grid[str(key)] = values
        if prompts_file is None and data.get("prompts_file"):
            prompts_file = _resolve_relative(str(data["prompts_file"]), folder)
        if seeds is None and data.get("seeds") is not None:
            if not isinstance(data["seeds"], list):
                raise ConfigError(f"sweep file {path}: 'seeds' must be a list of distinct integers, e.g. [1, 2, 3]; "
                                  f"got {data['seeds']!r}")
            seeds = data["seeds"]
    else:
        base = data
    base = copy.deepcopy(base)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(base, key, value)

    grid = dict(file_grid)
    for item in grid_args:
        key, values = parse_grid_arg(item)
        grid[key] = values

    prompts = read_prompts_file(prompts_file, base) if prompts_file else None
    if prompts is None and is_sweep_file and data.get("prompts") is not None:
        prompts = data["prompts"]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"sweep file {path}: 'prompts' must be a non-empty list of strings")

    default_name = Path(path).stem if path else "sweep"
    spec = SweepSpec(
        base=base, grid=grid,
        name=name or (data.get("name") if is_sweep_file else None) or default_name,
        metric=metric or (data.get("metric") if is_sweep_file else None) or "eval_loss",
        eval_limit=eval_limit if eval_limit is not None else (data.get("eval_limit") if is_sweep_file else None),
        test_limit=data.get("test_limit") if is_sweep_file else None,
        max_new_tokens=max_new_tokens or (data.get("max_new_tokens") if is_sweep_file else None) or 64,
        prompts=prompts,
        sweeps_dir=Path(sweeps_dir or (data.get("sweeps_dir") if is_sweep_file else None) or "sweeps"),
        seeds=parse_seeds(seeds, "--seeds" if isinstance(seeds, str) else f"sweep file {path}: 'seeds'"),
    )
    validate_spec(spec, source=str(path) if path else "command line")
    return spec


def load_saved_sweep(sweep_dir: str | Path) -> SweepSpec:
    """The spec a sweep folder was made with (its ``sweep.yaml``), for ``--report-only``."""
    sweep_dir = Path(sweep_dir)
    spec_file = sweep_dir / "sweep.yaml"
    if not spec_file.is_file():
        raise LoralabError(f"{sweep_dir} holds no sweep (no sweep.yaml); give the sweep file or --grid options")
    spec = load_sweep(spec_file, sweeps_dir=sweep_dir.parent)
    spec.name = sweep_dir.name
    return spec


def validate_spec(spec: SweepSpec, source: str = "sweep") -> None:
    """Check the name, metric, limits, seeds and grid keys (values are checked per run when the grid is expanded)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", str(spec.name)):
        raise ConfigError(f"sweep name {spec.name!r} must be a plain folder name (letters, digits, . _ + = -)")
    if spec.metric not in METRICS:
        raise ConfigError(f"--metric {spec.metric!r} is not a sweep metric; choose one of: {', '.join(METRICS)}")
    for key in ("eval_limit", "test_limit"):
        value = getattr(spec, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key} must be a positive number of examples, got {value!r}")
    if not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {spec.max_new_tokens!r}")
    if spec.seeds is not None:
        spec.seeds = parse_seeds(spec.seeds, "seeds")
    if not spec.grid and spec.seeds is None:
        raise ConfigError(f"the sweep grid is empty ({source}): give --grid key=v1,v2 or a 'grid:' mapping in a sweep "
                          "file (or --seeds 1,2,3 to repeat the base config with several seeds)")
    spec.grid = {KEY_ALIASES.get(key, key): values for key, values in spec.grid.items()}  # PEFT's lora_alpha, ...
    known = config_keys()
    for key, values in spec.grid.items():
        if key in RESERVED_KEYS:
            raise ConfigError(f"grid key {key!r} cannot be varied: the sweep sets each run's {key}")
        if key == SEED_KEY and spec.seeds is not None:
            raise ConfigError(f"grid key {SEED_KEY!r} and seeds both set the seed; give the seeds once, as seeds "
                              "(then every grid cell is reported as mean ± sd over them)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            valid = ", ".join(k for k in known if k not in RESERVED_KEYS)
            raise ConfigError(f"grid key {key!r} is not a config key{hint}; valid keys: {valid}")
        if not values:
            raise ConfigError(f"grid key {key!r} has no values")
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"grid key {key!r} lists a value twice: {values!r}")
