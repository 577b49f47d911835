"""Serving an ASGI app on hypercorn: one listening socket we bind ourselves (so port 0
works and the real port is known), our hooks installed first, and the internal
metrics listener. The app and its runtime are built by shim.app.server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from shim.core.config import Settings
from shim.transport.edge import ASGIReceive, ASGISend
from shim.transport.hypercorn_compat import install_hypercorn_hooks

log = logging.getLogger("shim.server")

# The legacy protocol reads at most 4096 bytes per frame and checks that itself;
# hypercorn's own limit is the larger of the two protocols' limits.
LEGACY_READ_LIMIT_BYTES = 4096


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def hypercorn_config(settings: Settings, sock: socket.socket) -> Config:
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.websocket_max_message_size = max(
        settings.websocket_read_limit_bytes, LEGACY_READ_LIMIT_BYTES
    )
    # Our own app-level pings drive liveness; hypercorn's are off.
    config.websocket_ping_interval = None
    config.accesslog = logging.getLogger("hypercorn.access") if settings.access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    # After our own drain (Runtime.shutdown), hypercorn's wait is only a backstop.
    config.graceful_timeout = 2.0
    return config


ASGIApp = Callable[[dict[str, Any], ASGIReceive, ASGISend], Awaitable[None]]


async def serve_asgi(
    app: ASGIApp,
    settings: Settings,
    sock: socket.socket,
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    """Serve `app` on `sock` until `shutdown` returns (it drains the app first)."""
    install_hypercorn_hooks(compression=settings.websocket_compression)
    config = hypercorn_config(settings, sock)
    try:
        await serve(app, config, shutdown_trigger=shutdown)  # type: ignore[arg-type]
    finally:
        # hypercorn took the descriptor over (fd://) and closed it.
        sock.detach()


def metrics_listener(
    address: tuple[str, int],
    render: Callable[[], bytes],
    content_type: str,
    stopped: asyncio.Event,
) -> tuple[int, asyncio.Task[None]]:
    """GET /metrics on its own (internal) address until `stopped`; (port, task)."""
    sock = bind_socket(*address)
    port: int = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0

    async def metrics_app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        found = scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD")
        body = render() if found else b'{"error":"not found"}'
        kind = content_type if found else "application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 200 if found else 404,
                "headers": [(b"content-type", kind.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def run() -> None:
        try:
            await serve(metrics_app, config, shutdown_trigger=stopped.wait)  # type: ignore[arg-type]
        finally:
            sock.detach()

    log.info("metrics served on %s:%d", address[0], port)
    return port, asyncio.get_running_loop().create_task(run(), name="metrics-listener")
