"""Hyperparameter sweeps: a base config times a grid of values (each cell once per seed, with ``seeds``), one
ordinary run folder per run.

A sweep lives in ``<sweeps_dir>/<name>/``: the run folders, ``sweep.yaml`` (the resolved spec), failure records
under ``failed/``, and the reports. Everything is checked before any training starts; a run that fails is recorded
with its reason and the sweep goes on. Re-running a sweep skips finished runs and resumes half-finished ones.

- :mod:`~loralab.sweeps.spec`: the spec (sweep file, ``--grid``, ``--seeds``) and its checks
- :mod:`~loralab.sweeps.grid`: expanding the grid into runs, run names
- :mod:`~loralab.sweeps.execute`: running, resuming and evaluating runs; the whole sweep
- :mod:`~loralab.sweeps.cells`: a cell's runs over its seeds as mean ± sd; the best cell
- :mod:`~loralab.sweeps.report` / :mod:`~loralab.sweeps.page`: comparison.csv / .md, answers.md, curves.png, report.html
- :mod:`~loralab.sweeps.distributed`: the Optuna backend (runs as trials of a study in shared storage)
"""

from loralab.runs import comparable_config
from loralab.sweeps.cells import Cell, Stat, best_cell, group_cells
from loralab.sweeps.execute import (DEFAULT_PROMPTS, RUN_FAILURES, RunOutcome, SweepResult, check_inputs, check_run_folder,
                                    default_prompts, ensure_answers, execute_run, failure_path, has_test_split,
                                    is_trained, plan, read_answers, read_failure, read_outcome, record_failure,
                                    resolve_prompts, run_planned, run_state, run_sweep, write_reports)
from loralab.sweeps.grid import PlannedRun, display_value, expand_grid, format_number, get_dotted, run_name, seeded_name
from loralab.sweeps.spec import (METRICS, RESERVED_KEYS, SEED_KEY, SWEEP_FILE_KEYS, SweepSpec, load_saved_sweep, load_sweep,
                                 parse_grid_arg, parse_seeds, read_prompts_file, split_values, validate_spec)

__all__ = [
    "Cell", "DEFAULT_PROMPTS", "METRICS", "PlannedRun", "RESERVED_KEYS", "RUN_FAILURES", "RunOutcome", "SEED_KEY",
    "SWEEP_FILE_KEYS", "Stat", "SweepResult", "SweepSpec", "best_cell", "check_inputs", "check_run_folder",
    "comparable_config", "default_prompts", "display_value", "ensure_answers", "execute_run", "expand_grid",
    "failure_path", "format_number", "has_test_split", "get_dotted", "group_cells", "is_trained", "load_saved_sweep", "load_sweep",
    "parse_grid_arg", "parse_seeds", "plan", "read_answers", "read_failure", "read_outcome", "read_prompts_file",
    "record_failure", "resolve_prompts", "run_name", "run_planned", "run_state", "run_sweep", "seeded_name", "split_values",
    "validate_spec", "write_reports",
]
