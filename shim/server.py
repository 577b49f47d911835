"""Running the app on hypercorn: one listening socket we bind ourselves (so port 0
works and the real port is known), uvloop when available."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config

from shim.app import ShimApp, create_app
from shim.config import Settings
from shim.hypercorn_compat import install_hypercorn_hooks
from shim.logs import Redactor
from shim.runtime import Runtime

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

    async def drain_then_stop() -> None:
        await shutdown()
        await app.runtime.shutdown()

    try:
        await serve(app, config, shutdown_trigger=drain_then_stop)  # type: ignore[arg-type]
    finally:
        # hypercorn took the descriptor over (fd://) and closed it.
        sock.detach()


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
