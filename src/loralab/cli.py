"""The ``loralab`` command line: a thin layer over the Python API.

Every command prints a one-line ``error: ...`` and exits non-zero on bad input; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from loralab.config import RunConfig, build_config, check_remote_code, read_yaml, remote_code_allowed
from loralab.cli_output import console, err_console, print_checks, print_eval, print_summary, print_sweep, print_tune
from loralab.errors import LoralabError

app = typer.Typer(help="LoRA / QLoRA fine-tuning workbench: config, check, train, eval, compare, sweep, tune, export.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Show and validate configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

STATE = {"debug": False}

ConfigArg = typer.Argument(None, help="YAML config file (optional: every key has a default).")
DataOpt = typer.Option(None, "--data", help="Dataset file or folder (sets data.path).")
ModelOpt = typer.Option(None, "--model", help="Model alias, folder or hub id (sets model.name_or_path).")
OutputOpt = typer.Option(None, "--output", help="Run folder (default: runs/<name>).")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set lora.r=8 (repeatable).")


def quiet_libraries() -> None:
    """Keep third-party chatter out of the way; loralab's own messages stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from rich.logging import RichHandler

    # Levels first: bitsandbytes warns about optional CPU kernels as soon as transformers imports it.
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    # under torchrun / accelerate launch only the writing process (global rank 0) tells what it does
    logging.getLogger("loralab").setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    for noisy in ("peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the Trainer's own bar stays
    except ImportError:
        pass


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one clear line and a non-zero exit (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            with remote_code_allowed(bool(kwargs.get("trust_remote_code"))):  # the command line's word only
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LoralabError as exc:
            if STATE["debug"]:
                raise
            if os.environ.get("RANK", "0") != "0":  # the same input error on every process: rank 0 says it
                raise typer.Exit(1) from None
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}\n(run with --debug for the traceback)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code from its repository "
                        "(model.trust_remote_code in a config file alone is refused).")


def require_trust(config: RunConfig, trust_remote_code: bool, where: str) -> RunConfig:
    """Remote model code runs only when the command line says so, whatever a config file asks."""
    with remote_code_allowed(trust_remote_code):
        check_remote_code(config, where)
    if trust_remote_code and not config.model.trust_remote_code:
        config = config.model_copy(update={"model": config.model.model_copy(update={"trust_remote_code": True})})
    return config


def resolve_config(config: Optional[Path], data: Optional[str], model: Optional[str], sets: Optional[list[str]],
                   extra: Optional[list[str]] = None, trust_remote_code: bool = False) -> RunConfig:
    """A config file plus the shortcut options and --set overrides (later wins); remote code needs the flag."""
    overrides = []
    if model:
        overrides.append(f"model.name_or_path={model}")
    if data:
        overrides.append(f"data.path={data}")
    overrides.extend(extra or [])
    overrides.extend(sets or [])
    raw = read_yaml(config) if config else {}
    # Quote string shortcuts so YAML never reinterprets paths such as "yes" or "1.0".
    resolved = build_config(raw, [_quote_path(o) for o in overrides], source=str(config) if config else "defaults")
    return require_trust(resolved, trust_remote_code, "the config" if config is None else f"config file {config}")


def _quote_path(override: str) -> str:
    key, _, value = override.partition("=")
    if key in ("model.name_or_path", "data.path", "data.eval_path", "data.test_path") and value \
            and not value.startswith(("'", '"')):
        return f"{key}='{value}'" if "'" not in value else override
    return override


@app.callback()
def main_callback(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    STATE["debug"] = debug


@config_app.command("show")
@handle_errors
def config_show(config: Optional[Path] = ConfigArg, data: Optional[str] = DataOpt, model: Optional[str] = ModelOpt,
                sets: Optional[list[str]] = SetOpt) -> None:
    """Print the fully resolved config as YAML."""
    resolved = resolve_config(config, data, model, sets, trust_remote_code=True)  # shown, never loaded
    typer.echo(resolved.to_yaml(), nl=False)


@app.command()
@handle_errors
def train(config: Optional[Path] = typer.Argument(None, help="YAML config file (optional: every key has a default), "
                                                   "or with --resume a run folder."),
          data: Optional[str] = DataOpt, model: Optional[str] = ModelOpt,
          output: Optional[Path] = OutputOpt, sets: Optional[list[str]] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last complete "
                                      "checkpoint: loralab train --resume RUN_DIR (its own config.yaml)."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing loralab run folder (kept "
                                         "until the new run has loaded and passed its checks)."),
          skip_checks: bool = typer.Option(False, "--skip-checks", help="Do not run the preflight checks."),
          trust_remote_code: bool = TrustOpt,
          nproc: Optional[int] = typer.Option(None, "--nproc", help="Train with N processes on this machine: starts "
                                              "torchrun itself (one process per GPU, or CPU processes with gloo).")) -> None:
    """Fine-tune a LoRA adapter (no arguments: the built-in model on the bundled demo data)."""
    from loralab import distributed
    from loralab.engines import check_engines
    from loralab.training import train as run_training

    if resume and config is not None and not config.exists():
        raise LoralabError(f"nothing to resume: {config} does not exist (give a run folder: loralab train --resume RUN_DIR)")
    if resume and config is not None and config.is_dir():  # loralab train --resume RUN_DIR
        if output is not None and output.resolve() != config.resolve():
            raise LoralabError(f"--resume {config} and --output {output} name two different run folders; give one")
        config, output = None, config
    resolved = resolve_run_config(config, data, model, sets, output, resume, trust_remote_code)
    if nproc is not None:  # a bad config or an engine the model cannot use fails here, before torchrun starts
        check_engines(resolved)
        code = distributed.launch(nproc, _without_option(sys.argv[1:], "--nproc"))
        if code:
            raise typer.Exit(code)
        return
    preflight = None if skip_checks else _preflight()
    summary = run_training(resolved, run_dir=output, overwrite=overwrite, resume=resume or None, preflight=preflight)
    if distributed.is_main_process():
        print_summary(summary)


def _without_option(argv: list[str], name: str) -> list[str]:
    """The command line without ``name VALUE`` / ``name=VALUE`` (what torchrun's processes get)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def resolve_run_config(config: Optional[Path], data: Optional[str], model: Optional[str], sets: Optional[list[str]],
                       output: Optional[Path], resume: bool, trust_remote_code: bool) -> RunConfig:
    """The config to train: resuming a run with nothing else given reloads the run's own config.yaml; otherwise the
    given config (which must match the run's when resuming; the run folder checks that)."""
    saved = output / "config.yaml" if output is not None else None
    if resume and output is not None and not (saved and saved.is_file()):
        what = "does not exist" if not output.exists() else "holds no loralab run (no config.yaml)"
        raise LoralabError(f"nothing to resume: {output} {what}")
    if resume and saved is not None and config is None:
        # the run's own config, with what the command line gives on top (it must not change anything)
        return resolve_config(saved, data, model, sets, trust_remote_code=trust_remote_code)
    return resolve_config(config, data, model, sets, trust_remote_code=trust_remote_code)


def _preflight() -> Any:
    try:
        from loralab.checks import fast_preflight
    except ImportError:
        return None
    return fast_preflight


# ---------------------------------------------------------------- eval, compare, generate, chat

RunArg = typer.Argument(..., help="A run folder (runs/<name>).")
RunOrAdapterArg = typer.Argument(None, help="A run folder (runs/<name>); or give --adapter PATH --model BASE.")
AdapterOpt = typer.Option(None, "--adapter", help="Any PEFT adapter folder (made with loralab or not), instead of a "
                          "run folder; with --model BASE.")
BaseModelOpt = typer.Option(None, "--model", help="The base model of --adapter: alias, folder or hub id (default: "
                            "the adapter's base_model_name_or_path).")
CheckpointOpt = typer.Option("best", "--checkpoint", help="Adapter: best (the run's adapter), latest, or a step number.")
PromptOpt = typer.Option(None, "--prompt", help="A prompt (repeatable).")
PromptsFileOpt = typer.Option(None, "--prompts-file", help="One prompt per line, or a JSON / JSONL / CSV data file.")
MaxNewTokensOpt = typer.Option(64, "--max-new-tokens", help="Most tokens per answer.")
DoSampleOpt = typer.Option(False, "--do-sample", help="Sample instead of greedy decoding.")
TemperatureOpt = typer.Option(None, "--temperature", help="Sampling temperature (needs --do-sample).")
TopKOpt = typer.Option(None, "--top-k", help="Sample from the k most likely tokens (needs --do-sample).")
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling threshold (needs --do-sample).")
NumBeamsOpt = typer.Option(1, "--num-beams", help="Beam search width (1: no beam search).")
BatchSizeOpt = typer.Option(8, "--batch-size", help="Prompts generated together.")
SeedOpt = typer.Option(None, "--seed", help="Random seed, for reproducible sampling.")
def _settings(max_new_tokens: int, do_sample: bool, temperature: Optional[float], top_k: Optional[int],
              top_p: Optional[float], num_beams: int, batch_size: int, seed: Optional[int]) -> Any:
    from loralab.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, num_beams=num_beams, batch_size=batch_size, seed=seed)


def _load_run(run_dir: Optional[Path], checkpoint: str, adapter: Optional[Path] = None, model: Optional[str] = None,
              allow_classifier: bool = False) -> Any:
    """The run's model with its adapter (or any PEFT adapter on its base model)."""
    from loralab.adapters import load_model_with_adapter
    return load_model_with_adapter(run_dir, checkpoint, adapter=adapter, base_model=model,
                                   allow_classifier=allow_classifier)


def _prompts(run: Any, prompt: Optional[list[str]], prompts_file: Optional[Path]) -> list[Any]:
    from loralab.evaluation import read_prompts

    found: list[Any] = list(prompt or [])
    if prompts_file:
        found.extend(read_prompts(prompts_file, run.config.data, run.task_type))
    return found


def _need_prompts(prompt: Optional[list[str]], prompts_file: Optional[Path]) -> None:
    if not prompt and not prompts_file:
        raise LoralabError("no prompts given; pass --prompt TEXT (repeatable) or --prompts-file FILE")


@app.command("eval")
@handle_errors
def eval_command(run_dir: Optional[Path] = RunOrAdapterArg,
                 data: Optional[Path] = typer.Option(None, "--data", help="Every row of this file instead of the eval split."),
                 split: str = typer.Option("eval", "--split", help="eval (default) or test: the split held out by "
                                           "data.test_split / data.test_path (writes eval_test.json)."),
                 limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N examples (a quick look)."),
                 checkpoint: str = CheckpointOpt, show: int = typer.Option(3, "--show", min=0, help="Example answers to print."),
                 max_new_tokens: int = MaxNewTokensOpt, do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt,
                 top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt,
                 batch_size: int = BatchSizeOpt, seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt,
                 adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt,
                 output: Optional[Path] = typer.Option(None, "--output", help="With --adapter: the folder for eval.json "
                                                       "and predictions.jsonl (default: eval-<adapter folder name>)."),
                 general_text: Optional[Path] = typer.Option(None, "--general-text", help="Perplexity change on this "
                                                             "text file ({text, lang} rows) instead of the bundled sample."),
                 no_general_text: bool = typer.Option(False, "--no-general-text", help="Skip the general-text "
                                                      "perplexity (what the adapter cost elsewhere).")) -> None:
    """Score base vs adapter answers on the run's eval split (or --split test); writes eval.json and predictions.jsonl."""
    from loralab.evaluation import evaluate_run

    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, batch_size, seed)
    loaded = None
    if adapter is not None or model is not None:  # any PEFT adapter: scored on --data, written to --output
        if data is None:
            raise LoralabError("--adapter has no run and no eval split: pass --data FILE (rows with reference answers)")
        loaded = _load_run(run_dir, checkpoint, adapter, model)
        run_dir = output or Path(f"eval-{Path(adapter or '.').resolve().name}")
    report = evaluate_run(run_dir, data_path=data, limit=limit, checkpoint=checkpoint, settings=settings, progress=True,
                          split=split, loaded=loaded, general_text=False if no_general_text else general_text or True)
    print_eval(report, run_dir, show)


@app.command()
@handle_errors
def compare(run_dir: Optional[Path] = RunOrAdapterArg, prompt: Optional[list[str]] = PromptOpt, prompts_file: Optional[Path] = PromptsFileOpt,
            checkpoint: str = CheckpointOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
            max_new_tokens: int = MaxNewTokensOpt, do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt,
            top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt,
            batch_size: int = BatchSizeOpt, seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt,
            adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt) -> None:
    """Base and adapter answers side by side for the given prompts."""
    import json

    from loralab.evaluation import compare_prompts

    _need_prompts(prompt, prompts_file)
    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, batch_size, seed)
    run = _load_run(run_dir, checkpoint, adapter, model, allow_classifier=True)  # a classifier compares labels
    rows = compare_prompts(run_dir or adapter, _prompts(run, prompt, prompts_file), settings, loaded=run)
    run_dir = run_dir or adapter
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if run.task_type == "SEQ_CLS":  # label (probability) from the base head and the trained head
        table = Table("text", "base head", "trained head", title=f"{run_dir} (adapter {checkpoint})", show_lines=True)
        for row in rows:
            table.add_row(row["prompt"], f"{row['base']} ({row['base_probability']:.2f})",
                          f"{row['adapter']} ({row['adapter_probability']:.2f})")
        console.print(table, markup=False)
        return
    table = Table("prompt", "base", "adapter", title=f"{run_dir} (adapter {checkpoint})", show_lines=True)
    for row in rows:
        table.add_row(row["prompt"], row["base"], row["adapter"])
    console.print(table, markup=False)


@app.command()
@handle_errors
def generate(run_dir: Optional[Path] = RunOrAdapterArg, prompt: Optional[list[str]] = PromptOpt, prompts_file: Optional[Path] = PromptsFileOpt,
             checkpoint: str = CheckpointOpt, base: bool = typer.Option(False, "--base", help="Answer with the base model."),
             max_new_tokens: int = MaxNewTokensOpt, do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt,
             top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt,
             batch_size: int = BatchSizeOpt, seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt,
             adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt) -> None:
    """Answer prompts with the adapter (one prompt: just the answer; several: each prompt, then its answer)."""
    from loralab.generation import generate_answers

    _need_prompts(prompt, prompts_file)
    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, batch_size, seed)
    run = _load_run(run_dir, checkpoint, adapter, model)
    prompts = _prompts(run, prompt, prompts_file)
    answers = generate_answers(run, prompts, settings, use_adapter=not base, progress=len(prompts) > batch_size)
    if len(prompts) == 1:
        typer.echo(answers[0])
        return
    for item, answer in zip(prompts, answers):
        typer.echo(f"> {getattr(item, 'prompt', item)}\n{answer}\n")


@app.command()
@handle_errors
def chat(run_dir: Path = RunArg, checkpoint: str = CheckpointOpt,
         base: bool = typer.Option(False, "--base", help="Chat with the base model."),
         max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens per answer."),
         do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt, top_k: Optional[int] = TopKOpt,
         top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt, seed: Optional[int] = SeedOpt,
         trust_remote_code: bool = TrustOpt) -> None:
    """Chat with the adapter: one message per line; '/reset' starts over, 'exit' or Ctrl-D quits."""
    from loralab.generation import chat_reply

    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, 1, seed)
    run = _load_run(run_dir, checkpoint)
    who = "base model" if base else f"adapter {checkpoint}"
    err_console.print(f"chatting with {run_dir} ({who}); '/reset' starts over, 'exit' or Ctrl-D quits", highlight=False)
    history: list[dict[str, str]] = []
    while True:
        typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            typer.echo("")
            break
        text = line.strip()
        if text.lower() in ("exit", "quit", "/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            continue
        if text:
            typer.echo(f"bot> {chat_reply(run, history, text, settings, use_adapter=not base)}")


# ---------------------------------------------------------------- sweep


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


# ---------------------------------------------------------------- check

@app.command()
@handle_errors
def check(config: Optional[Path] = ConfigArg, data: Optional[str] = DataOpt, model: Optional[str] = ModelOpt,
          sets: Optional[list[str]] = SetOpt,
          show: int = typer.Option(0, "--show", min=0, help="Render N tokenized train examples, supervised tokens marked."),
          as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON on stdout (and nothing else)."),
          fast: bool = typer.Option(False, "--fast", help="Only the quick checks `train` runs first (no cost estimate)."),
          trust_remote_code: bool = TrustOpt) -> None:
    """Preflight checks on the same config as `train`: pass / warn / fail with a reason each; exit 1 when one fails."""
    import transformers

    from loralab.checks import render_examples, run_checks
    from loralab.checks.show import COLOR_LEGEND, LEGEND

    transformers.utils.logging.disable_progress_bar()
    resolved = resolve_config(config, data, model, sets, trust_remote_code=trust_remote_code)
    report = run_checks(resolved, show=show, include_cost=not fast, debug=STATE["debug"])
    if as_json:
        typer.echo(report.to_json())
    else:
        if report.examples:
            colored = console.is_terminal and report.session is not None
            examples = render_examples(report.session, show, color=True) if colored else report.examples
            console.print(COLOR_LEGEND if colored else LEGEND, markup=False, highlight=False)
            for example in examples:
                console.print(example, markup=False, highlight=False, soft_wrap=True)
        print_checks(report)
    if report.failed:
        raise typer.Exit(1)


@app.command("export")
@handle_errors
def export(run_dir: Optional[Path] = typer.Argument(None, help="A run folder made by loralab train (or --adapter)."),
           output: Path = typer.Option(..., "--output", help="hf: the folder for the merged model; gguf: FILE.gguf "
                                       "(FILE.Modelfile and FILE.export_report.json go next to it)."),
           fmt: str = typer.Option("hf", "--format", help="hf (safetensors model folder) or gguf (one file for "
                                   "llama.cpp, Ollama, LM Studio)."),
           quant: Optional[str] = typer.Option(None, "--quant", help="gguf: f16 (default), bf16, q8_0, q5_0 or q4_0."),
           checkpoint: str = typer.Option("best", "--checkpoint", help="best, latest or a step number."),
           dtype: str = typer.Option("float32", "--dtype", help="hf: float32, bfloat16 or float16."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier loralab export in --output "
                                          "(never files loralab did not export)."),
           llamacpp_check: Optional[bool] = typer.Option(None, "--llamacpp-check/--no-llamacpp-check", help="gguf: run "
                                                         "the file with llama.cpp to check it (default: when "
                                                         "llama-cpp-python is installed)."),
           adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt,
           trust_remote_code: bool = TrustOpt) -> None:
    """Merge the adapter into its base, check the merged model against the adapter, and save it (safetensors or GGUF)."""
    from loralab.cli_output import print_export, tensor_progress
    from loralab.export import export_merged, read_report

    if fmt not in ("hf", "gguf"):
        raise LoralabError(f"--format must be hf or gguf, got {fmt!r}")
    if fmt == "hf" and quant is not None:
        raise LoralabError("--quant is for --format gguf; a safetensors export takes --dtype")
    if fmt == "gguf" and dtype != "float32":
        raise LoralabError("--dtype is for --format hf; a GGUF export takes --quant (f16, bf16, q8_0, q5_0, q4_0)")
    if fmt == "hf":
        folder = export_merged(run_dir, output, checkpoint=checkpoint, dtype=dtype, overwrite=overwrite,
                               adapter=adapter, base_model=model)
        report_path = folder / "export_report.json"
        print_export(read_report(report_path) if report_path.is_file() else None, folder)
        return
    from loralab.export.gguf_export import export_gguf, sidecars

    with tensor_progress() as on_tensor:
        path = export_gguf(run_dir, output, quant=quant or "f16", checkpoint=checkpoint, overwrite=overwrite,
                           adapter=adapter, base_model=model, llamacpp_check=llamacpp_check, on_tensor=on_tensor)
    print_export(read_report(sidecars(path)["report"]), path)


@app.command()
@handle_errors
def ui(runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of run folders (or one run folder)."),
       sweeps: Path = typer.Option(Path("sweeps"), "--sweeps", help="Folder of sweep folders."),
       host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (default: this machine only)."),
       port: int = typer.Option(8765, "--port", help="Port (0: any free one)."),
       allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a --host other machines can reach; "
                                         "the dashboard has no authentication.")) -> None:
    """A local web dashboard: every run and sweep, loss curves, eval tables, predictions, compare on your prompts."""
    from loralab.ui import serve

    serve(runs, sweeps, host=host, port=port, allow_remote=allow_remote,
          say=lambda text: err_console.print(escape(text), highlight=False, soft_wrap=True))


def main() -> None:
    """Console entry point."""
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
