"""Start `audiosearch serve`: check where it may listen, bind, load once, print the URL, serve until stopped."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from ..errors import AudiosearchError
from .service import Limits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, insecure: bool) -> str | None:
    """Refuse to listen beyond this machine without a token unless told so; the warning to print, if any."""
    if is_loopback(host):
        return None
    if token:
        return None
    if not insecure:
        raise AudiosearchError(f"--host {host} lets other machines connect: give --token SECRET (requests without "
                               "it get 401), or --insecure to serve anyone who can reach the port")
    return (f"WARNING: --insecure: serving {host} with no token. Anyone who can reach this port can search the "
            "library and download every indexed file.")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow happens, so a taken port is said at once."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP, and with it on, every answer after the first on a kept-alive
    # connection waited 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        hint = "; pick another with --port" if e.errno in (98, 48) else ""
        raise AudiosearchError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int, token: str | None) -> str:
    shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    if shown in ("0.0.0.0", "[::]"):
        shown = socket.gethostname()
    return f"http://{shown}:{port}/" + (f"?token={quote(token)}" if token else "")


def serve(index_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          insecure: bool = False, model: str | None = None, device: str = "auto", precision: str = "auto",
          limits: Limits = Limits(), announce: Callable[[str], None] = print) -> None:
    """Serve the index until interrupted. `announce` gets the warning (if any) and then the URL to open."""
    warning = check_bind(host, token, insecure)
    if warning:
        announce(warning)
    sock = bind(host, port)
    try:
        import uvicorn

        from .app import create_app
        from .service import Service

        service = Service(index_dir, model=model, device=device, precision=precision, limits=limits)
        try:
            app = create_app(service, token=token, loopback_only=is_loopback(host) and not token)
            config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
            server = uvicorn.Server(config)
            announce(f"Serving {service.info()['files'].get('ok', 0)} files from {index_dir} at "
                     f"{url_for(host, sock.getsockname()[1], token)}  (Ctrl-C stops)")
            server.run(sockets=[sock])
        finally:
            service.close()
    finally:
        sock.close()
