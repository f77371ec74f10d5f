"""The remote-code guard: a config's ``model.trust_remote_code`` loads only where the caller allowed it."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from loralab.config.run import RunConfig
from loralab.errors import ConfigError

_REMOTE_CODE = contextvars.ContextVar("loralab_remote_code_allowed", default=False)


@contextlib.contextmanager
def remote_code_allowed(allowed: bool = True) -> Iterator[None]:
    """Within this block, run folders whose config sets ``model.trust_remote_code`` may load (the CLI's
    ``--trust-remote-code``); outside it a run folder's config.yaml alone never switches remote code on."""
    token = _REMOTE_CODE.set(allowed)
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def check_remote_code(config: RunConfig, where: str) -> None:
    """Refuse a saved config that asks for the model's own Python code unless the caller allowed it."""
    if config.model.trust_remote_code and not _REMOTE_CODE.get():
        raise ConfigError(f"{where} sets model.trust_remote_code: true, which runs Python code shipped with the model "
                          f"{config.model.name_or_path!r}; pass --trust-remote-code on the command line to allow it "
                          "(from Python: with loralab.config.remote_code_allowed(): ...)")
