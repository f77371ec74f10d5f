"""``loralab tune``: which learning rate, r, alpha, dropout, coverage and length for *this* data, within a budget.

First a learning-rate range test (:func:`run_range_test`, :func:`suggest_lr_range`), then an Optuna study (TPE,
multivariate; Hyperband / successive-halving pruning on the metric reported at each evaluation) whose trials are
ordinary run folders, then ``best.yaml`` and a report. From Python::

    from loralab.config import build_config
    from loralab.tune import load_tune, run_tune

    spec = load_tune("tunes/demo", build_config(overrides=["data.path=my.json"]), metric="eval_loss",
                     space_args=["lora.r=4,8,16"])
    result = run_tune(spec, budget_s=20 * 60)          # or trials=N; lr_only=True; train_best=True; seeds=[1, 2, 3]
    print(result.best, result.files["best"])           # result.trials: every trial's state, values, metric, time

Optuna is needed for the search (``pip install 'loralab[optuna]'``), not for the range test.
"""

from loralab.tune.budget import Budget, CostModel, TuneProgress, format_duration, parse_duration, progress_line
from loralab.tune.range_test import LrSuggestion, RangeTest, render_range_test_png, run_range_test, smooth_losses, \
    suggest_lr_range
from loralab.tune.final import run_final, usual_recipe
from loralab.tune.results import TuneResult, train_best_config
from loralab.tune.search import lr_range_test, run_tune
from loralab.tune.spec import METRICS, PRUNERS, TuneSpec, check_output, load_tune
from loralab.tune.study import PruningCallback, TrialRecord
from loralab.tune.space import DERIVED_KEYS, Param, check_space, parse_space, parse_space_arg, trial_config

__all__ = [
    "Budget", "CostModel", "DERIVED_KEYS", "LrSuggestion", "METRICS", "PRUNERS", "Param", "PruningCallback", "RangeTest",
    "TrialRecord", "TuneProgress", "TuneResult", "TuneSpec", "check_output", "check_space", "format_duration",
    "load_tune", "lr_range_test", "parse_duration", "parse_space", "parse_space_arg", "progress_line",
    "render_range_test_png", "run_final", "run_range_test", "run_tune", "smooth_losses", "suggest_lr_range", "train_best_config",
    "trial_config", "usual_recipe",
]
