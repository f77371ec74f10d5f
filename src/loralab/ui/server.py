"""Serving the dashboard with uvicorn: localhost unless told otherwise, a clear message when the port is taken."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import socket
from pathlib import Path
from typing import Callable

from loralab.errors import LoralabError

WEB_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "jinja2": "jinja2", "multipart": "python-multipart"}
DEFAULT_PORT = 8765


def require_web_packages() -> None:
    missing = [package for module, package in WEB_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise LoralabError(f"loralab ui needs {', '.join(missing)}: pip install 'loralab[ui]'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a clear error saying why not."""
    if not 0 <= port <= 65535:
        raise LoralabError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LoralabError(f"--host {host}: not an address or name of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed server's port, not a live one's
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LoralabError(f"port {port} on {host} is already in use (another loralab ui or server?); choose "
                               "another with --port N, or --port 0 for any free port") from None
        if exc.errno == errno.EACCES:
            raise LoralabError(f"not allowed to listen on port {port} (ports below 1024 need root); choose --port "
                               f"{DEFAULT_PORT} or another above 1024") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise LoralabError(f"--host {host} is not an address of this machine") from None
        raise LoralabError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve(runs_dir: str | Path = "runs", sweeps_dir: str | Path = "sweeps", host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, allow_remote: bool = False, say: Callable[[str], None] = print) -> None:
    """Serve the dashboard until interrupted. Another interface than loopback needs ``allow_remote``: the dashboard
    has no authentication, and whoever reaches it can read every run and load models on this machine."""
    require_web_packages()
    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise LoralabError(f"--host {host} would serve the dashboard to other machines, and it has no authentication: "
                           "anyone who reaches it can read every run and start comparisons here. Pass --allow-remote "
                           "to do it anyway, or keep the default 127.0.0.1 (e.g. behind an SSH tunnel: ssh -L "
                           f"{port}:127.0.0.1:{port} THIS_MACHINE)")
    import uvicorn

    from loralab.ui.app import create_app

    sock = open_socket(host, port)
    app = create_app(runs_dir, sweeps_dir, allowed_hosts=None if remote else _loopback_hosts())
    url = url_of(sock)
    if remote:
        say(f"warning: serving on {url} to every machine that can reach it, with NO authentication: anyone there can "
            "read every run and start comparisons on this machine")
    say(f"loralab ui: {url}  (runs: {runs_dir}, sweeps: {sweeps_dir}); Ctrl-C stops it")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _loopback_hosts() -> frozenset[str]:
    from loralab.ui.app import LOOPBACK_HOSTS

    return LOOPBACK_HOSTS
