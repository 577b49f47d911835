"""Running the app on hypercorn: one listening socket we bind ourselves (so port 0
works and the real port is known), uvloop when available."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from shim.app.asgi import ShimApp, create_app
from shim.app.logs import Redactor
from shim.app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from shim.app.runtime import Runtime
from shim.core.config import Settings, metrics_address
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


async def serve_app(
    app: ShimApp,
    sock: socket.socket,
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    install_hypercorn_hooks(compression=app.runtime.settings.websocket_compression)
    config = hypercorn_config(app.runtime.settings, sock)
    stopped = asyncio.Event()

    async def drain_then_stop() -> None:
        await shutdown()
        await app.runtime.shutdown()
        stopped.set()

    metrics = _metrics_listener(app.runtime, stopped)
    try:
        await serve(app, config, shutdown_trigger=drain_then_stop)  # type: ignore[arg-type]
    finally:
        # hypercorn took the descriptor over (fd://) and closed it.
        sock.detach()
        if metrics is not None:
            stopped.set()
            await metrics


def _metrics_listener(runtime: Runtime, stopped: asyncio.Event) -> asyncio.Task[None] | None:
    """GET /metrics on its own (internal) address when metrics_listen is set."""
    address = metrics_address(runtime.settings)
    if address is None:
        return None
    sock = bind_socket(*address)
    runtime.metrics_port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0

    async def metrics_app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        found = scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD")
        body = runtime.metrics.render() if found else b'{"error":"not found"}'
        content_type = METRICS_CONTENT_TYPE if found else "application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 200 if found else 404,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def run() -> None:
        try:
            await serve(metrics_app, config, shutdown_trigger=stopped.wait)  # type: ignore[arg-type]
        finally:
            sock.detach()

    log.info("metrics served on %s:%d", address[0], runtime.metrics_port)
    return asyncio.get_running_loop().create_task(run(), name="metrics-listener")


def run(
    settings: Settings,
    *,
    on_ready: Callable[[int], None] | None = None,
    redactor: Redactor | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, on `sock` when given (a worker of `--workers`)."""
    if sock is None:
        sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        runtime = Runtime(settings)
        if redactor is not None:
            redactor.add(runtime.secrets())
        app = create_app(runtime)
        # Everything built so far (modules, settings, the app) lives as long as the
        # process: kept out of the collector's full passes, which otherwise walk it
        # all and stalled the loop for 50-100 ms under ingest (measured, issue 10).
        gc.collect()
        gc.freeze()
        if on_ready is not None:
            loop.call_soon(on_ready, port)

        async def stopped() -> None:
            await stop.wait()

        await serve_app(app, sock, stopped)

    if settings.use_uvloop:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    else:
        asyncio.run(main())
