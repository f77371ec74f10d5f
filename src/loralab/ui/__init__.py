"""``loralab ui``: a local web dashboard over run and sweep folders (FastAPI, server-rendered pages).

Needs the ``ui`` extra (``pip install 'loralab[ui]'``); importing this package does not import the web stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The dashboard app (``loralab.ui.app.create_app``)."""
    from loralab.ui.server import require_web_packages

    require_web_packages()
    from loralab.ui.app import create_app as create

    return create(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """Serve the dashboard until Ctrl-C (``loralab.ui.server.serve``)."""
    from loralab.ui.server import serve as run

    run(*args, **kwargs)
