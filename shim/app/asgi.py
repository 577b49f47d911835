"""The ASGI application: Quart for HTTP, a thin ASGI pump for the WebSocket paths.

WebSocket scopes for our protocol paths go straight to the edge (no framework layer
on the per-frame path); everything else is the Quart app, whose serving hooks
start and stop the runtime.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from quart import Quart, Response, request

from legacy.session import legacy_token
from shim import __version__
from shim.app.console import console_blueprint
from shim.app.fallback import FallbackEndpoints
from shim.app.http import json_response, key_matches
from shim.app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from shim.app.runtime import Runtime
from shim.app.server_api import server_api_blueprint
from shim.app.ws_endpoints import (
    CENTRIFUGE_PATH,
    LEGACY_PATH,
    legacy_rejection,
    serve_centrifuge,
    serve_legacy,
    upgrade_refusal,
)
from shim.core.auth import TokenError
from shim.core.broadcast import BroadcastError, ParsedItem, TooManyItems, iter_broadcast
from shim.core.broker import BrokerUnavailable
from shim.core.cutover import ClientProtocol, CutoverError
from shim.core.limits import Pacer
from shim.transport.edge import ASGIReceive, ASGISend, reject_http

log = logging.getLogger("shim.app")


class ShimApp:
    """ASGI entry point."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.fallback = FallbackEndpoints(runtime)
        self.quart = _build_quart(runtime, self.fallback)

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "websocket":
            path = scope["path"]
            if path in (CENTRIFUGE_PATH, LEGACY_PATH) or self.fallback.websocket_route(path):
                refusal = upgrade_refusal(self.runtime, scope)
                if refusal is not None:
                    if (await receive())["type"] == "websocket.connect":
                        await reject_http(send, refusal[0], refusal[1], b"application/json")
                    return
            if scope["path"] == CENTRIFUGE_PATH:
                await serve_centrifuge(self.runtime, scope, receive, send)
                return
            if scope["path"] == LEGACY_PATH:
                await serve_legacy(self.runtime, scope, receive, send)
                return
            uni = self.fallback.websocket_route(scope["path"])
            if uni is not None:
                await uni(scope, receive, send)
                return
        elif scope["type"] == "http":
            if ambiguous_length(scope["headers"]):
                await refuse_ambiguous_length(send)
                return
            streaming = self.fallback.http_route(scope["path"])
            if streaming is not None:
                await streaming(scope, receive, send)
                return
        await self.quart(scope, receive, send)  # type: ignore[arg-type]


async def _read_items(body: bytes, max_item_bytes: int, max_items: int) -> list[ParsedItem]:
    """The request's items, read in slices so deliveries go on meanwhile."""
    items: list[ParsedItem] = []
    pacer = Pacer()
    for item in iter_broadcast(body, max_item_bytes=max_item_bytes, max_items=max_items):
        items.append(item)
        if pacer.due():
            await pacer.tick()
    return items


def ambiguous_length(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both Content-Length and Transfer-Encoding: RFC 9112 6.1 lets a server refuse
    the request, and a proxy in front may have framed the body the other way
    (request smuggling), so it is refused and the connection closed."""
    names = {name.lower() for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


async def refuse_ambiguous_length(send: ASGISend) -> None:
    body = orjson.dumps({"error": "both Content-Length and Transfer-Encoding given"})
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The body's framing is in doubt: nothing more is read on this connection.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _build_quart(runtime: Runtime, fallback: FallbackEndpoints) -> Quart:
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

    @app.get("/metrics")
    async def metrics() -> Response:
        if settings.metrics_listen:
            # Served only on the internal listener then (shim.app.server).
            return json_response({"error": "not found"}, 404)
        return Response(runtime.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/ready")
    async def ready() -> Response:
        """Ready to take traffic: started and not draining (a load balancer stops sending
        clients during a SIGTERM drain), and the engine reachable (Redis pub/sub up)."""
        engine_ok = bool(getattr(runtime.broker, "healthy", True))
        consumer = runtime.stream_consumer
        ingest_ok = consumer is None or consumer.running
        body = {
            "ready": runtime.started and not runtime.shutting_down and engine_ok and ingest_ok,
            "engine": settings.engine,
            "engine_reachable": engine_ok,
            "ingest_stream": None if consumer is None else consumer.running,
        }
        return json_response(body, 200 if body["ready"] else 503)

    @app.post("/api/v1/broadcast")
    async def broadcast() -> Response:
        key = request.headers.get("X-API-Key", "")
        if not key_matches(key, runtime.api_key):
            return json_response({"error": "missing or invalid X-API-Key"}, 401)
        if runtime.shutting_down:
            # Clients are being let go: an event accepted now could reach none of them
            # (and, on the memory engine, no history would keep it). The producer
            # retries on another node or after the restart.
            return json_response({"error": "server shutting down"}, 503)
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        assert isinstance(body, bytes)
        try:
            items = await _read_items(
                body, settings.ingest_max_item_bytes, settings.ingest_max_items
            )
        except TooManyItems as exc:
            return json_response({"error": str(exc), "max_items": settings.ingest_max_items}, 413)
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

    routing_table = {
        "global_channel": settings.global_channel,
        "default_channel": settings.default_channel,
        "routes": [
            {
                "match": rule.match,
                "channels": list(rule.channels),
                "optional": list(rule.optional),
                "fallback": rule.fallback,
            }
            for rule in settings.routes
        ],
    }

    @app.get("/api/v1/realtime/config")
    async def realtime_config() -> Response:
        """Which protocol and URL the calling user should use now."""
        token = legacy_token(list(request.scope["headers"]), request.scope["query_string"])
        if not token:
            return json_response({"error": "missing token"}, 401)
        try:
            user = runtime.verifier.verify_connection(token).user
        except TokenError as exc:
            return json_response(
                {"error": "token expired" if exc.expired else "invalid token"}, 401
            )
        if not user and not settings.client_anonymous:
            return json_response({"error": "token has no user id"}, 401)
        cutover = runtime.cutover
        protocol = cutover.protocol_for(user)
        return json_response(
            {
                "user": user,
                "protocol": protocol.value,
                "url": CENTRIFUGE_PATH if protocol is ClientProtocol.CENTRIFUGE else LEGACY_PATH,
                # For centrifuge-js's transport list: WebSocket first, then the
                # fallbacks this node serves (commands of those go to /emulation).
                "transports": (
                    [
                        {"transport": "websocket", "endpoint": CENTRIFUGE_PATH},
                        *fallback.transports(),
                    ]
                    if protocol is ClientProtocol.CENTRIFUGE
                    else []
                ),
                "mode": cutover.mode.value,
                "cutover_version": cutover.version,
                # The route table, so a client kit shows a page the events of one channel
                # whichever protocol brings them (docs/client-kit.md).
                "routing": routing_table,
            }
        )

    def admin_allowed() -> bool:
        key = request.headers.get("X-Admin-Key", "")
        return key_matches(key, settings.admin_api_key)

    async def cutover_report() -> dict[str, Any]:
        stats = runtime.legacy_stats
        nodes = await runtime.nodes()
        totals = {"legacy": 0, "channels": 0}
        for counts in nodes.values():
            for protocol in totals:
                totals[protocol] += counts.get(protocol, 0)
        return {
            "cutover": runtime.cutover.as_dict(),
            "node": runtime.node.name,
            "connections": runtime.connection_counts(),
            "nodes": nodes,
            "totals": totals,
            "legacy": {
                "malformed_commands": stats.malformed_commands,
                "unknown_actions": stats.unknown_actions,
                "slow_disconnects": stats.slow_disconnects,
                "refused_subscriptions": stats.refused_subscriptions,
                "unreadable_events": stats.unreadable_events,
            },
        }

    @app.get("/api/v1/admin/cutover")
    async def show_cutover() -> Response:
        if not admin_allowed():
            return json_response({"error": "missing or invalid X-Admin-Key"}, 401)
        return json_response(await cutover_report())

    @app.post("/api/v1/admin/cutover")
    async def change_cutover() -> Response:
        if not admin_allowed():
            return json_response({"error": "missing or invalid X-Admin-Key"}, 401)
        try:
            changes = orjson.loads(await request.get_data(as_text=False))
        except orjson.JSONDecodeError:
            return json_response({"error": "body must be a JSON object"}, 400)
        if not isinstance(changes, dict):
            return json_response({"error": "body must be a JSON object"}, 400)
        try:
            await runtime.change_cutover(changes)
        except CutoverError as exc:
            return json_response({"error": str(exc)}, 400)
        except BrokerUnavailable:
            return json_response({"error": "cutover state store (Redis) unavailable"}, 503)
        return json_response(await cutover_report())

    app.register_blueprint(server_api_blueprint(runtime))
    app.register_blueprint(console_blueprint(runtime))

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
