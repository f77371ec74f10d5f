"""What a tune is (``DIR/tune.yaml``): the base config, the data it trains on, the metric, the ``--space`` given, the
range test's settings; and the checks made before anything is written: the options, the folder (another study or
foreign files are refused with nothing changed) and the data (it must have what the metric needs).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from loralab.config import RunConfig, build_config, check_remote_code, read_yaml
from loralab.errors import ConfigError, LoralabError
from loralab.metrics import HIGHER_IS_BETTER
from loralab.runs import comparable_config, config_differences, write_text_atomic
from loralab.tune.range_test import LR_MAX, LR_MIN, STEPS
from loralab.tune.space import Param, check_space, parse_space

METRICS: tuple[str, ...] = ("eval_loss", "exact_match", "chrf", "rouge_l", "bleu")
PRUNERS: tuple[str, ...] = ("hyperband", "halving", "median", "none")
TUNE_FILE = "tune.yaml"


@dataclass
class TuneSpec:
    """What to tune: the base config, the folder, the metric and the space given on top of the default one."""

    base: RunConfig
    output: Path
    metric: str = "eval_loss"
    space: dict[str, Param] = field(default_factory=dict)  # --space only; the resolved space adds the defaults
    seed: int = 0
    pruner: str = "hyperband"
    eval_limit: int | None = None  # a generation metric: eval examples answered at each evaluation
    lr_min: float = LR_MIN
    lr_max: float = LR_MAX
    lr_steps: int = STEPS
    storage: str | None = None  # None: DIR/optuna.journal

    def record(self) -> dict[str, Any]:
        """What defines the study (tune.yaml without the fingerprint): two runs of the same study agree on all of it."""

        from loralab.data.sources import parse_source, source_fingerprint
        from loralab.fingerprints import data_sources

        base = comparable_config(self.base)
        base.pop("name", None)
        data = {}
        for role, path in data_sources(self.base.data).items():
            source = parse_source(path)
            if source.is_hub:  # a Hub split: the Arrow files datasets keeps of it (loaded from its cache)
                found = source_fingerprint(source)
                data[role] = {"sha256": found["sha256"], "rows": found["rows"]}
                continue
            if not Path(path).exists():
                raise LoralabError(f"data file not found: {path}")
            data[role] = _data_digest(path)
        return {"metric": self.metric, "space": {name: p.to_dict() for name, p in self.space.items()},
                "eval_limit": self.eval_limit,
                "range_test": {"lr_min": self.lr_min, "lr_max": self.lr_max, "steps": self.lr_steps},
                "data": data, "base": base}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def direction(self) -> str:
        return "maximize" if HIGHER_IS_BETTER[self.metric] else "minimize"

    @property
    def metric_key(self) -> str:
        return self.metric if self.metric == "eval_loss" else f"eval_{self.metric}"


def _data_digest(path: str) -> dict[str, Any]:
    """sha256 and size of a data file or folder; hashed once per content state (path, size, modification time)."""
    target = Path(path)
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return dict(_digest_of(str(target.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)))


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, state: tuple) -> tuple[tuple[str, Any], ...]:
    from loralab.fingerprints import file_fingerprint

    found = file_fingerprint(path)
    return (("sha256", found["sha256"]), ("bytes", found["bytes"]))


# ---------------------------------------------------------------- the spec


def _saved(output: Path) -> dict[str, Any] | None:
    path = Path(output) / TUNE_FILE
    return read_yaml(path) if path.is_file() else None


def load_tune(output: str | Path, base: RunConfig | None = None, *, metric: str | None = None,
              space_args: Iterable[str] = (), space: dict[str, Any] | None = None, seed: int | None = None,
              pruner: str | None = None, eval_limit: int | None = None, lr_min: float | None = None,
              lr_max: float | None = None, lr_steps: int | None = None, storage: str | None = None) -> TuneSpec:
    """A tune spec. What is not given comes from the folder's tune.yaml when it holds a tune (``base`` None: its base
    config; no ``--space``: its space), so that ``loralab tune --output DIR --budget 10m`` continues a study. Checked: the metric, the
    pruner, every ``--space`` key and value (the base config itself validated when it was built)."""
    output = Path(output)
    saved = _saved(output) or {}
    user_space = parse_space(space_args, space)
    if base is None:
        if saved.get("base"):
            base = build_config(saved["base"], source=f"{output / TUNE_FILE} (base)")
            check_remote_code(base, f"{output / TUNE_FILE}")
        else:
            base = build_config(source="defaults")
    if not user_space and saved.get("space"):  # no --space: the folder's
        user_space = parse_space(mapping=saved["space"])
    stored_range = saved.get("range_test") or {}
    spec = TuneSpec(
        base=base, output=output,
        metric=metric or saved.get("metric") or "eval_loss",
        space=user_space,
        seed=seed if seed is not None else int(saved.get("seed", 0)),
        pruner=pruner or saved.get("pruner") or "hyperband",
        eval_limit=eval_limit if eval_limit is not None else saved.get("eval_limit"),
        lr_min=lr_min if lr_min is not None else stored_range.get("lr_min", LR_MIN),
        lr_max=lr_max if lr_max is not None else stored_range.get("lr_max", LR_MAX),
        lr_steps=lr_steps if lr_steps is not None else stored_range.get("steps", STEPS),
        storage=storage if storage is not None else saved.get("storage"),
    )
    validate_spec(spec)
    return spec


def validate_spec(spec: TuneSpec) -> None:
    if spec.metric not in METRICS:
        raise ConfigError(f"--metric {spec.metric!r} is not a tune metric; choose one of: {', '.join(METRICS)}")
    if spec.pruner not in PRUNERS:
        raise ConfigError(f"--pruner {spec.pruner!r}; choose one of: {', '.join(PRUNERS)}")
    if spec.eval_limit is not None and (not isinstance(spec.eval_limit, int) or spec.eval_limit <= 0):
        raise ConfigError(f"--eval-limit must be a positive number of examples, got {spec.eval_limit!r}")
    if not (0 < spec.lr_min < spec.lr_max):
        raise ConfigError(f"the range test needs 0 < lr_min < lr_max, got {spec.lr_min} and {spec.lr_max}")
    if not isinstance(spec.lr_steps, int) or spec.lr_steps < 5:
        raise ConfigError(f"--lr-steps must be at least 5, got {spec.lr_steps!r}")
    check_space(spec.space, spec.base)


def _differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What differs between a folder's study and this one, in words."""
    out = []
    if saved.get("base") != record["base"]:
        try:
            before = build_config(saved.get("base") or {}, source="the saved base config")
            keys = config_differences(before, build_config(record["base"], source="the base config"))
        except ConfigError:
            keys = []
        out.append(f"base config ({', '.join(keys[:8]) or 'its content'})")
    if saved.get("data") != record["data"]:
        out.append("data (the data file's content or the eval file)")
    def space_text(space: dict[str, Any] | None) -> str:
        return "; ".join(f"{k}={Param.from_dict(k, v).describe()}" for k, v in (space or {}).items()) or "none"

    if saved.get("space") != record["space"]:
        out.append(f"--space ({space_text(saved.get('space'))} there, {space_text(record['space'])} here)")
    for key, label in (("metric", "metric"), ("eval_limit", "--eval-limit"), ("range_test", "range test settings")):
        if saved.get(key) != record[key]:
            out.append(f"{label} ({saved.get(key)!r} there, {record[key]!r} here)")
    return out


def check_output(spec: TuneSpec) -> dict[str, Any] | None:
    """Refuse a folder that is a file, holds something else than a tune, or holds another study; changes nothing.
    Returns the folder's tune.yaml (None for a new or empty folder)."""
    output = spec.output
    if output.exists() and not output.is_dir():
        raise LoralabError(f"--output {output} is a file, not a folder; choose another --output")
    if not output.exists() or not any(p for p in output.iterdir() if not p.name.startswith(".")):
        return None
    saved = _saved(output)
    if saved is None:
        names = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
        raise LoralabError(f"--output {output} is not empty and holds no loralab tune (no {TUNE_FILE}; it has "
                           f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); nothing was changed. "
                           "Choose another --output")
    record = spec.record()
    only_space = all(saved.get(key) == value for key, value in record.items() if key != "space")
    if only_space and not (output / "trials").exists():
        return saved  # only the range test ran (--lr-only): the space may still be chosen
    if saved.get("fingerprint") != spec.fingerprint():
        differing = _differences(saved, record)
        raise LoralabError(f"--output {output} holds another study (it differs in: {'; '.join(differing) or 'its record'}); "
                           f"nothing was changed. Use another --output for a different study, or run "
                           f"`loralab tune --output {output}` without a config to continue that one")
    if spec.storage and saved.get("storage") and spec.storage != saved["storage"]:
        raise LoralabError(f"the study of {output} lives in {saved['storage']}, not in {spec.storage}; pass the same "
                           "--storage (or none)")
    spec.storage = spec.storage or saved.get("storage")  # where the study lives, whoever calls
    return saved


def write_tune_file(spec: TuneSpec) -> None:
    record = spec.record()
    data = {"study": study_name(spec), "fingerprint": spec.fingerprint(), "seed": spec.seed, "pruner": spec.pruner,
            "storage": spec.storage, **record}
    text = ("# loralab tune: what this study is. Re-run `loralab tune --output DIR` to continue it.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None))
    write_text_atomic(spec.output / TUNE_FILE, text)


def study_name(spec: TuneSpec) -> str:
    return f"loralab-tune-{spec.fingerprint()}"


# ---------------------------------------------------------------- inputs


def check_metric_data(spec: TuneSpec, task_type: str, data: Any) -> None:
    """The metric needs an eval split; a generation metric also needs reference answers and a generative model."""
    eval_examples = list(data.eval_examples or [])
    if not eval_examples:
        raise ConfigError(f"tune measures {spec.metric} on the eval split, and this data has none (data.eval_split="
                          f"{spec.base.data.eval_split}, no data.eval_path); set data.eval_split (e.g. 0.2) or "
                          "data.eval_path")
    if spec.metric == "eval_loss":
        return
    if task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ConfigError(f"--metric {spec.metric} scores generated answers, and a {task_type} model generates none; "
                          "use --metric eval_loss")
    if not any(str(e.response or "").strip() for e in eval_examples):
        raise ConfigError(f"--metric {spec.metric} compares answers with the eval split's reference answers, and "
                          f"its {len(eval_examples)} examples have none (empty responses); use --metric eval_loss or "
                          "give data with answers")
