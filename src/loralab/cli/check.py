"""``loralab check``: the preflight checks on the same config as ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralab.cli.common import STATE, ConfigArg, DataOpt, ModelOpt, SetOpt, TrustOpt, app, handle_errors, resolve_config
from loralab.cli.output import console, print_checks

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
