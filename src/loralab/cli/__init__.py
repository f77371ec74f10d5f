"""The ``loralab`` command line: a thin layer over the Python API.

Every command prints a one-line ``error: ...`` and exits non-zero on bad input; ``--debug`` shows the traceback.

The typer ``app`` and the shared options live in :mod:`.common`; the commands, one module per workflow stage, are
registered on it when their modules are imported below (in the order ``loralab --help`` lists them); what they print
is in :mod:`.output`.
"""

from __future__ import annotations

import sys

from loralab.cli.common import (STATE, ConfigArg, DataOpt, ModelOpt, OutputOpt, SetOpt, TrustOpt, app, config_app,
                                handle_errors, main_callback, quiet_libraries, require_trust, resolve_config)
# importing the command modules registers their commands on app, in this order (the order of `loralab --help`)
from loralab.cli import train, evaluate, sweep, check, export  # noqa: F401,I001

__all__ = ["app", "config_app", "main", "STATE", "handle_errors", "quiet_libraries", "require_trust", "resolve_config",
           "main_callback", "ConfigArg", "DataOpt", "ModelOpt", "OutputOpt", "SetOpt", "TrustOpt"]


def main() -> None:
    """Console entry point."""
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)
