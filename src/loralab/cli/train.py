"""``loralab train`` and ``loralab config show``: resolve a run's config (or a run to resume) and train it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from loralab.cli.common import (ConfigArg, DataOpt, ModelOpt, OutputOpt, SetOpt, TrustOpt, _preflight, app, config_app,
                                handle_errors, resolve_config)
from loralab.cli.output import print_summary
from loralab.config import RunConfig
from loralab.errors import LoralabError

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
