"""The ASGI application: Quart for HTTP, a thin ASGI pump for the WebSocket paths.

WebSocket scopes for our protocol paths go straight to the edge (no framework layer
on the per-frame path); everything else is the Quart app, whose serving hooks
start and stop the runtime.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from quart import Quart, Response, request

from adapters.auth.jwt import TokenError
from legacy.session import LegacySession, legacy_token
from legacy.translate import BroadcastError, parse_broadcast
from shim import __version__
from shim.centrifuge import codes
from shim.centrifuge.session import CentrifugeSession
from shim.edge import ASGIReceive, ASGISend, SocketPump, reject_http
from shim.outbox import Outbox, drain_each, drain_joined
from shim.runtime import Runtime

log = logging.getLogger("shim.app")

CENTRIFUGE_PATH = "/connection/websocket"
LEGACY_PATH = "/api/v1/ws"
# The Go hub's (Echo's) rejection bodies: one JSON object and a newline.
LEGACY_MISSING = b'{"message":"missing authorization header"}\n'
LEGACY_EXPIRED = b'{"message":"token expired"}\n'
LEGACY_INVALID = b'{"message":"invalid token"}\n'


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


class ShimApp:
    """ASGI entry point."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.quart = _build_quart(runtime)

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "websocket":
            if scope["path"] == CENTRIFUGE_PATH:
                await serve_centrifuge(self.runtime, receive, send)
                return
            if scope["path"] == LEGACY_PATH:
                await serve_legacy(self.runtime, scope, receive, send)
                return
        await self.quart(scope, receive, send)  # type: ignore[arg-type]


async def serve_centrifuge(runtime: Runtime, receive: ASGIReceive, send: ASGISend) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    # No subprotocol is selected: JSON is the default, and the Python SDK's empty
    # Sec-WebSocket-Protocol header must not be answered with one it did not offer.
    await send({"type": "websocket.accept"})
    settings = runtime.settings
    outbox = Outbox(settings.client_queue_max_size_bytes)
    pump = SocketPump(send, outbox)
    session = CentrifugeSession(runtime.node, runtime.verifier, runtime.authorizer, pump, outbox)
    try:
        await pump.run(
            receive,
            session.handle_frame,
            drain_joined(outbox, pump.send_text, settings.websocket_max_frame_bytes),
            flush_timeout=settings.websocket_write_timeout_seconds,
            discard_on=frozenset({codes.SLOW.code}),
        )
    finally:
        session.transport_closed()


def legacy_rejection(runtime: Runtime, scope: dict[str, Any]) -> tuple[bytes, str]:
    """(401 body, "") when the legacy token is missing or bad, else (b"", user)."""
    token = legacy_token(scope["headers"], scope.get("query_string", b""))
    if not token:
        return LEGACY_MISSING, ""
    try:
        credentials = runtime.verifier.verify_connection(token)
    except TokenError as exc:
        return (LEGACY_EXPIRED if exc.expired else LEGACY_INVALID), ""
    return b"", credentials.user


async def serve_legacy(
    runtime: Runtime, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    # The Go hub authenticated before looking at the handshake: a 401 before any
    # upgrade gives the browser hook its bounded retries.
    rejection, user = legacy_rejection(runtime, scope)
    if rejection:
        await reject_http(send, 401, rejection, b"application/json")
        return
    await send({"type": "websocket.accept"})
    settings = runtime.settings
    outbox = Outbox(settings.client_queue_max_size_bytes)
    pump = SocketPump(send, outbox)
    session = LegacySession(
        runtime.node,
        pump,
        outbox,
        runtime.legacy_stats,
        user=user,
        strict_matching=settings.legacy_strict_matching,
    )
    try:
        await pump.run(
            receive,
            session.handle_frame,
            drain_each(outbox, pump.send_text),
            flush_timeout=settings.websocket_write_timeout_seconds,
            discard_on=frozenset({3008}),
        )
    finally:
        session.transport_closed()


def _build_quart(runtime: Runtime) -> Quart:
    app = Quart("dex-shim")
    settings = runtime.settings
    app.config["MAX_CONTENT_LENGTH"] = settings.ingest_max_body_bytes

    @app.before_serving
    async def _start() -> None:
        await runtime.start()

    @app.after_serving
    async def _stop() -> None:
        await runtime.close()

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "version": __version__})

    @app.post("/api/v1/broadcast")
    async def broadcast() -> Response:
        key = request.headers.get("X-API-Key", "")
        if not key or not hmac.compare_digest(key.encode(), runtime.api_key.encode()):
            return json_response({"error": "missing or invalid X-API-Key"}, 401)
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        assert isinstance(body, bytes)
        try:
            items = parse_broadcast(body, max_item_bytes=settings.ingest_max_item_bytes)
        except BroadcastError as exc:
            return json_response({"error": str(exc)}, 400)
        results = await runtime.ingestor.ingest(items)
        counts = {"accepted": 0, "refused": 0, "failed": 0}
        for result in results:
            counts[result.status] += 1
        status = 503 if counts["failed"] else 200
        return json_response({**counts, "results": [r.as_dict() for r in results]}, status)

    @app.get(LEGACY_PATH)
    async def legacy_without_upgrade() -> Response:
        # Same order as the Go hub: authentication first, then the handshake check.
        rejection, _user = legacy_rejection(runtime, request.scope)  # type: ignore[arg-type]
        if rejection:
            return Response(rejection, status=401, content_type="application/json")
        return Response(
            "Bad Request\n",
            status=400,
            content_type="text/plain; charset=utf-8",
            headers={"Sec-WebSocket-Version": "13"},
        )

    @app.errorhandler(413)
    async def too_large(_error: Exception) -> Response:
        return json_response({"error": f"body exceeds {settings.ingest_max_body_bytes} bytes"}, 413)

    @app.errorhandler(404)
    async def not_found(_error: Exception) -> Response:
        return json_response({"error": "not found"}, 404)

    @app.errorhandler(405)
    async def not_allowed(_error: Exception) -> Response:
        return json_response({"error": "method not allowed"}, 405)

    return app


def create_app(runtime: Runtime) -> ShimApp:
    return ShimApp(runtime)
