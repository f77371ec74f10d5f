"""After the search, the honest comparison: the tuned config (best.yaml) trained once per seed, with ``baselines``
also loralab's defaults (the tune's base config) and the usual recipe (r 16, alpha 32, lr 2e-4, 3 epochs), each
scored on the test split the data holds out (``data.test_split`` / ``data.test_path``): no trial trained on it,
chose a checkpoint by it, or was ranked by it. The runs are an ordinary seeded sweep in ``DIR/final`` (its
comparison.md / report.html: mean ± sd over the seeds); finished runs are kept when the tune runs again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from loralab.config import RunConfig, build_config
from loralab.errors import ConfigError, LoralabError
from loralab.sweeps import PlannedRun, SweepResult, SweepSpec, has_test_split, run_planned, seeded_name
from loralab.tune.spec import TuneSpec

log = logging.getLogger(__name__)

FINAL_DIR = "final"
TUNED, DEFAULTS, USUAL = "tuned", "defaults", "usual-recipe"
USUAL_RECIPE: dict[str, Any] = {"lora.r": 16, "lora.alpha": 32, "train.learning_rate": 2e-4, "train.epochs": 3,
                                "train.max_steps": None}
LABELS = {TUNED: "tuned (best.yaml)", DEFAULTS: "loralab defaults (the base config)",
          USUAL: "usual recipe (r 16, alpha 32, lr 2e-4, 3 epochs)"}


def absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping with its existing relative data / model paths made absolute (it may train from elsewhere)."""
    for section, key in (("data", "path"), ("data", "eval_path"), ("data", "test_path"), ("model", "name_or_path")):
        value = data.get(section, {}).get(key)
        if value and not Path(value).is_absolute() and Path(value).exists():
            data[section][key] = str(Path(value).resolve())
    return data


def usual_recipe(base: RunConfig) -> RunConfig:
    """The recipe most LoRA tutorials copy, on the tune's model and data: the base config with r 16, alpha 32,
    learning rate 2e-4 and 3 epochs."""
    data = base.model_dump(mode="json")
    for dotted, value in USUAL_RECIPE.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return build_config(data, source="the usual recipe")


def final_configs(spec: TuneSpec, tuned: RunConfig, baselines: bool) -> dict[str, RunConfig]:
    configs = {TUNED: tuned}
    if baselines:
        configs[DEFAULTS] = spec.base
        configs[USUAL] = usual_recipe(spec.base)
    return configs


def final_sweep(spec: TuneSpec, configs: dict[str, RunConfig], seeds: list[int]) -> tuple[SweepSpec, list[PlannedRun]]:
    """The comparison as a seeded sweep in DIR/final: one cell per config, one run per seed (``train.seed``)."""
    sweep = SweepSpec(base={}, grid={}, name=FINAL_DIR, metric=spec.metric, eval_limit=spec.eval_limit,
                      sweeps_dir=spec.output, seeds=list(seeds))
    planned = []
    for cell, config in configs.items():
        for seed in seeds:
            data = absolute_paths(config.model_dump(mode="json"))
            name = seeded_name(cell, seed)
            data["name"], data["output_dir"] = name, str(sweep.sweep_dir)
            data["train"]["seed"] = seed
            data["train"]["resume"] = False
            planned.append(PlannedRun(name, {}, build_config(data, source=f"{LABELS[cell]}, seed {seed}"), cell=cell,
                                      seed=seed))
    return sweep, planned


def run_final(spec: TuneSpec, tuned: RunConfig, seeds: list[int], *, baselines: bool = False, progress: bool = False,
              preflight: Callable[..., None] | None = None) -> SweepResult:
    """Train (or keep) every config of the comparison once per seed, score it on the eval and the test split,
    and write DIR/final's reports; returns the sweep result (``result.cells()``: mean ± sd per config)."""
    if not seeds:
        raise ConfigError("--seeds needs at least one seed, e.g. --seeds 1,2,3")
    if not has_test_split(spec.base):
        log.warning("the data holds out no test split (data.test_split / data.test_path): the final comparison is "
                    "on the eval split, which the search chose by; its numbers are optimistic for the tuned config")
    sweep, planned = final_sweep(spec, final_configs(spec, tuned, baselines), seeds)
    log.info("final comparison: %s x seeds %s into %s", ", ".join(LABELS[c] for c in dict.fromkeys(r.cell for r in planned)),
             ", ".join(map(str, seeds)), sweep.sweep_dir)
    result = run_planned(sweep, planned, progress=progress, preflight=preflight)
    failed = [o.run.name for o in result.runs if o.status == "failed"]
    if failed and len(failed) == len(result.runs):
        raise LoralabError(f"every run of the final comparison failed ({', '.join(failed)}); see "
                           f"{sweep.sweep_dir / 'comparison.md'}")
    return result


def score_on_test(run_dir: Path) -> dict[str, Any] | None:
    """The run's base and adapter scores on all of its held-out test split (``eval_test.json``, computed once), or
    None when its data holds none out."""
    import json

    from loralab.evaluation import evaluate_run
    from loralab.runs import RunPaths, load_run_config

    paths = RunPaths(run_dir)
    if not has_test_split(load_run_config(run_dir)):
        return None
    if paths.test_eval_report.is_file():
        return json.loads(paths.test_eval_report.read_text(encoding="utf-8"))
    return evaluate_run(run_dir, progress=False, split="test", general_text=False)


# ---------------------------------------------------------------- what the report shows

TEST_KEYS: tuple[tuple[str, str, int], ...] = (("exact_match", "exact match", 3), ("rouge_l", "ROUGE-L", 3),
                                               ("chrf", "chrF", 1), ("bleu", "BLEU", 1))


def _score(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def best_test_table(best_test: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The best trial on the held-out test split: the base model's row and the adapter's."""
    header = ["model", *(name for _, name, _ in TEST_KEYS), "examples"]
    rows = []
    for who, key in (("base model", "base"), ("best trial", "adapter")):
        scores = best_test.get(key) or {}
        rows.append([who, *(_score(scores.get(k), d) for k, _, d in TEST_KEYS), str(scores.get("n", best_test.get("n")))])
    return header, rows


def final_table(final: SweepResult, metric: str) -> tuple[list[str], list[list[str]], list[str]]:
    """The comparison: one row per config (mean ± sd over its finished seeds), the base model first; and notes."""
    from loralab.sweeps.cells import base_values, has_test

    tested = has_test(final.runs)
    prefix = "test_" if tested else ""
    where = "test split" if tested else "eval split"
    header = ["config", "seeds done", f"eval split {metric}", *(f"{where} {name}" for _, name, _ in TEST_KEYS),
              "train time"]
    rows = []
    base = base_values(final.runs)
    if base:
        rows.append(["base model", "", base["eval_loss" if metric == "eval_loss" else metric].text(4),
                     *(base[f"{prefix}{k}"].text(d) for k, _, d in TEST_KEYS), "-"])
    for cell in final.cells():
        time_s = cell.stat("train_time_s")
        rows.append([LABELS.get(cell.name, cell.name), f"{len(cell.done)} of {len(cell.runs)}", cell.stat(metric).text(4),
                     *(cell.stat(f"{prefix}{k}").text(d) for k, _, d in TEST_KEYS),
                     f"{time_s.text(1)} s" if time_s.mean is not None else "-"])
    notes = [f"Each config trained with seeds {', '.join(map(str, final.spec.seeds or []))} (train.seed), mean ± sample "
             f"sd over the finished ones; runs and their own reports in {final.sweep_dir}."]
    if tested:
        notes.append("The test split is held out of every trial, checkpoint choice and the ranking of the search.")
    else:
        notes.append("The data holds out no test split (data.test_split / data.test_path): these are eval-split "
                     "numbers, the ones the search chose by, so the tuned row is optimistic.")
    if len(final.spec.seeds or []) < 3:
        notes.append("Fewer than 3 seeds: the spread is not measured well enough to call one config better.")
    return header, rows, notes
