"""The typer app and what every command shares: common options, error handling, config resolution."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from loralab.cli.output import err_console
from loralab.config import RunConfig, build_config, check_remote_code, read_yaml, remote_code_allowed
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
AdapterOpt = typer.Option(None, "--adapter", help="Any PEFT adapter folder (made with loralab or not), instead of a "
                          "run folder; with --model BASE.")
BaseModelOpt = typer.Option(None, "--model", help="The base model of --adapter: alias, folder or hub id (default: "
                            "the adapter's base_model_name_or_path).")


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


def _preflight() -> Any:
    try:
        from loralab.checks import fast_preflight
    except ImportError:
        return None
    return fast_preflight
