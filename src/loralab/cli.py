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
from rich.console import Console
from rich.table import Table

from loralab.config import RunConfig, build_config, read_yaml
from loralab.errors import LoralabError

app = typer.Typer(help="LoRA / QLoRA fine-tuning workbench: config, check, train, eval, compare, sweep, export.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Show and validate configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)
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
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("loralab").setLevel(logging.INFO)
    logging.getLogger("peft").setLevel(logging.ERROR)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one clear line and a non-zero exit (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LoralabError as exc:
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}\n(run with --debug for the traceback)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def resolve_config(config: Optional[Path], data: Optional[str], model: Optional[str], sets: Optional[list[str]],
                   extra: Optional[list[str]] = None) -> RunConfig:
    """A config file plus the shortcut options and --set overrides (later wins)."""
    overrides = []
    if model:
        overrides.append(f"model.name_or_path={model}")
    if data:
        overrides.append(f"data.path={data}")
    overrides.extend(extra or [])
    overrides.extend(sets or [])
    raw = read_yaml(config) if config else {}
    # Quote string shortcuts so YAML never reinterprets paths such as "yes" or "1.0".
    return build_config(raw, [_quote_path(o) for o in overrides], source=str(config) if config else "defaults")


def _quote_path(override: str) -> str:
    key, _, value = override.partition("=")
    if key in ("model.name_or_path", "data.path", "data.eval_path") and value and not value.startswith(("'", '"')):
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
    resolved = resolve_config(config, data, model, sets)
    typer.echo(resolved.to_yaml(), nl=False)


@app.command()
@handle_errors
def train(config: Optional[Path] = ConfigArg, data: Optional[str] = DataOpt, model: Optional[str] = ModelOpt,
          output: Optional[Path] = OutputOpt, sets: Optional[list[str]] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
          skip_checks: bool = typer.Option(False, "--skip-checks", help="Do not run the preflight checks.")) -> None:
    """Fine-tune a LoRA adapter (no arguments: the built-in model on the bundled demo data)."""
    from loralab.training import train as run_training

    resolved = resolve_config(config, data, model, sets)
    preflight = None if skip_checks else _preflight()
    summary = run_training(resolved, run_dir=output, overwrite=overwrite, resume=resume or None, preflight=preflight)
    print_summary(summary)


def _preflight() -> Any:
    try:
        from loralab.checks import fast_preflight
    except ImportError:
        return None
    return fast_preflight


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run']}", show_header=False)
    rows = [
        ("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,} ({summary['trainable_percent']:.3f}%)"),
        ("examples", f"{summary['n_train']} train / {summary['n_eval']} eval; {summary['truncated_examples']} truncated"),
        ("steps / epochs", f"{summary['steps']} / {summary['epochs']}"),
        ("train time", f"{summary['train_time_s']:.1f} s ({summary['precision']})"),
        ("train loss (final)", _fmt(summary.get("final_train_loss"))),
        ("eval loss base -> final", f"{_fmt(summary.get('base_eval_loss'))} -> {_fmt(summary.get('final_eval_loss'))}"),
        ("best checkpoint", f"{summary.get('best_checkpoint')} (eval loss {_fmt(summary.get('best_eval_loss'))})"),
        ("adapter", f"{summary['run']}/adapter"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def main() -> None:
    """Console entry point."""
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
