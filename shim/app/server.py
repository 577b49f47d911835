"""Running the service: the runtime and ASGI app built here, served on hypercorn by
shim.transport.server; uvloop when available."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Awaitable, Callable

from shim.app.asgi import ShimApp, create_app
from shim.app.logs import Redactor
from shim.app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from shim.app.runtime import Runtime
from shim.core.config import Settings, metrics_address
from shim.transport.server import bind_socket, metrics_listener, serve_asgi

# (young, middle, full) collection thresholds; Python's defaults are (700, 10, 10).
GC_THRESHOLDS = (5_000, 10, 100)


async def serve_app(
    app: ShimApp,
    sock: socket.socket,
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    runtime = app.runtime
    stopped = asyncio.Event()

    async def drain_then_stop() -> None:
        await shutdown()
        await runtime.shutdown()
        stopped.set()

    metrics: asyncio.Task[None] | None = None
    address = metrics_address(runtime.settings)
    if address is not None:
        # GET /metrics on its own (internal) address when metrics_listen is set.
        runtime.metrics_port, metrics = metrics_listener(
            address, runtime.metrics.render, METRICS_CONTENT_TYPE, stopped
        )
    try:
        await serve_asgi(app, runtime.settings, sock, drain_then_stop)
    finally:
        if metrics is not None:
            stopped.set()
            await metrics


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
        # History keeps every publication (a few objects each) for minutes, so the
        # old generation grows by thousands of objects a second under ingest, and
        # the default thresholds ran a full pass every few thousand events: about a
        # third of ingest CPU. Rarer young passes and far rarer full ones (measured,
        # issue 14); cycles are rare here, memory is still freed by refcounting.
        gc.set_threshold(*GC_THRESHOLDS)
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
