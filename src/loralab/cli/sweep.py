"""``loralab sweep`` (a grid of runs, compared) and ``loralab tune`` (range test, then a budgeted search)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralab.cli.common import (ConfigArg, DataOpt, ModelOpt, SetOpt, TrustOpt, _preflight, _quote_path, app,
                                handle_errors, resolve_config)
from loralab.cli.output import console, print_sweep, print_tune
from loralab.errors import LoralabError

@app.command()
@handle_errors
def sweep(source: Optional[Path] = typer.Argument(None, help="A sweep file (top-level grid:) or a base config file."),
          grid: Optional[list[str]] = typer.Option(None, "--grid", help="key=v1,v2,... (repeatable); list values as "
                                                   "'lora.target_modules=\\[q_proj,v_proj],\\[q_proj,k_proj,v_proj,o_proj]'."),
          name: Optional[str] = typer.Option(None, "--name", help="Sweep folder: <sweeps-dir>/<name> (default: the file's name)."),
          seeds: Optional[str] = typer.Option(None, "--seeds", help="Train every grid cell once per train.seed, e.g. 1,2,3; "
                                              "the comparison shows mean ± sd over them."),
          sets: Optional[list[str]] = SetOpt, data: Optional[str] = DataOpt, model: Optional[str] = ModelOpt,
          metric: Optional[str] = typer.Option(None, "--metric", help="Picks the best run: eval_loss (default), rouge_l, chrf, exact_match, bleu."),
          prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Prompts for the side-by-side answers (default: 3 from the eval split)."),
          eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Generation metrics on the first N eval examples."),
          max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per generated answer (default 64)."),
          sweeps_dir: Optional[Path] = typer.Option(None, "--sweeps-dir", help="Where sweep folders go (default: sweeps)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="List the runs that would be made; train nothing."),
          report_only: bool = typer.Option(False, "--report-only", help="Only rebuild the reports from the run folders."),
          backend: str = typer.Option("local", "--backend", help="local (one run after another) or optuna (distributed workers)."),
          storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage: a database URL or a journal file path "
                                                "(default: <sweep folder>/optuna.journal)."),
          retry_failed: bool = typer.Option(False, "--retry-failed", help="Train runs recorded as failed again, from scratch."),
          skip_checks: bool = typer.Option(False, "--skip-checks", help="Do not run the preflight checks."),
          trust_remote_code: bool = TrustOpt) -> None:
    """Train and evaluate every combination of a grid; compare them in sweeps/<name>/ (CSV, Markdown, PNG, HTML)."""
    from loralab.sweeps import load_saved_sweep, load_sweep, run_sweep

    if report_only and source is None and not grid:
        spec = load_saved_sweep(Path(sweeps_dir or "sweeps") / (name or "sweep"))
        spec.metric = metric or spec.metric
    else:
        shortcuts = ([f"model.name_or_path={model}"] if model else []) + ([f"data.path={data}"] if data else [])
        spec = load_sweep(source, grid or [], [_quote_path(o) for o in shortcuts + list(sets or [])], name=name,
                          metric=metric, eval_limit=eval_limit, max_new_tokens=max_new_tokens, prompts_file=prompts_file,
                          sweeps_dir=sweeps_dir, seeds=seeds)
    result = run_sweep(spec, dry_run=dry_run, report_only=report_only, backend=backend, storage=storage,
                       retry_failed=retry_failed, progress=True, preflight=None if skip_checks else _preflight())
    print_sweep(result, retry_failed)
    if not dry_run and result.runs and all(o.status == "failed" for o in result.runs):
        raise LoralabError(f"every run of sweep {spec.name} failed; see {result.sweep_dir / 'comparison.md'}")


# ---------------------------------------------------------------- tune


@app.command()
@handle_errors
def tune(config: Optional[Path] = ConfigArg, data: Optional[str] = DataOpt, model: Optional[str] = ModelOpt,
         sets: Optional[list[str]] = SetOpt,
         output: Path = typer.Option(..., "--output", help="The tune folder: trials/, best.yaml, report.md/.html, the "
                                     "Optuna journal. Running tune again on it continues the study."),
         budget: Optional[str] = typer.Option(None, "--budget", help="Wall-clock budget of this run: 20m, 1h30m, 90s "
                                              "(a trial that cannot finish inside what is left is not started)."),
         trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Run at most N more trials."),
         metric: Optional[str] = typer.Option(None, "--metric", help="What trials are judged by: eval_loss (default), "
                                              "exact_match, chrf, rouge_l, bleu (greedy answers on the eval split)."),
         space: Optional[list[str]] = typer.Option(None, "--space", help="Search key (repeatable): key=v1,v2,... or "
                                                   "key=lo..hi[:log]; derived keys lora.alpha_ratio, lora.coverage."),
         lr_only: bool = typer.Option(False, "--lr-only", help="Only the learning-rate range test: plot and suggestion."),
         train_best: bool = typer.Option(False, "--train-best", help="Then train best.yaml into <output>/best."),
         seeds: Optional[str] = typer.Option(None, "--seeds", help="Then train best.yaml once per seed (e.g. 1,2,3) into "
                                             "<output>/final and report mean ± sd on the held-out test split."),
         baselines: bool = typer.Option(False, "--baselines", help="With --seeds: also train loralab's defaults (the "
                                        "base config) and the usual recipe (r 16, alpha 32, lr 2e-4, 3 epochs)."),
         storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage: a database URL or a journal "
                                               "file (default: <output>/optuna.journal)."),
         pruner: Optional[str] = typer.Option(None, "--pruner", help="hyperband (default), halving, median or none."),
         seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sampler (default 0)."),
         eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="A generation metric: eval examples "
                                                  "answered at each evaluation (default train.eval_generate_limit)."),
         lr_steps: Optional[int] = typer.Option(None, "--lr-steps", help="Steps of the range test (default 50)."),
         keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep every trial's checkpoints "
                                               "(default: removed after the trial; its adapter stays)."),
         skip_checks: bool = typer.Option(False, "--skip-checks", help="Do not run the preflight checks."),
         trust_remote_code: bool = TrustOpt) -> None:
    """Find r, alpha, learning rate, dropout, coverage and length for your data: range test, then a budgeted search."""
    from loralab.sweeps import parse_seeds
    from loralab.tune import load_tune, parse_duration, progress_line, run_tune

    base = None
    if config is not None or data or model or sets:
        base = resolve_config(config, data, model, sets, trust_remote_code=trust_remote_code)
    spec = load_tune(output, base, metric=metric, space_args=space or [], seed=seed, pruner=pruner,
                     eval_limit=eval_limit, lr_steps=lr_steps, storage=storage)
    seconds = parse_duration(budget) if budget is not None else None
    result = run_tune(spec, budget_s=seconds, trials=trials, lr_only=lr_only, train_best=train_best,
                      seeds=parse_seeds(seeds), baselines=baselines, progress=True,
                      on_progress=lambda p: console.print(progress_line(p), highlight=False, markup=False),
                      preflight=None if skip_checks else _preflight(), keep_checkpoints=keep_checkpoints)
    print_tune(result)
