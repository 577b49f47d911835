"""The fallback transports' endpoints, served straight from ASGI like the WebSocket
paths (no framework on the per-message path).

Bidirectional emulation, as centrifuge-js speaks it:
- POST /connection/http_stream: the body holds the connect command; the response
  streams replies and pushes as newline-delimited JSON, or as length-prefixed
  Protobuf messages when the POST is `application/octet-stream` (the SDK's
  Protobuf build; the emulation requests then are Protobuf too).
- GET /connection/sse?cf_connect=<connect command> (or POST with it as the body):
  the response is an EventSource stream, one event per message.
- POST /emulation {"session", "node", "data"}: the client's further commands
  (subscribe, RPC, pongs, ...), for the session named, on whichever node holds it.
The connect reply tells the client its `session` and `node`; a close sends a
disconnect push before the response ends (a stream has no close code).

Unidirectional, for clients without an SDK: a ConnectRequest object (token, ...)
in the POST body or the `cf_connect` parameter, then pushes only: the connect
push, publications of the token's `channels` and the personal channel (server-side
subscriptions), subscribe/unsubscribe pushes from the server API, `{}` pings.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from shim.app.runtime import Runtime
from shim.app.ws_endpoints import (
    _close,
    _first_frame,
    _forget_request_headers,
    _offer_direct_write,
    _receive_queue,
    origin_allowed,
    upgrade_refusal,
)
from shim.centrifuge import codes, framing
from shim.centrifuge.emulation import EmulatedConnection
from shim.centrifuge.framing import RequestError
from shim.centrifuge.outboxes import EmulationOutbox, UniOutbox
from shim.centrifuge.session import CentrifugeSession
from shim.centrifuge.wire import JSON as JSON_WIRE
from shim.centrifuge.wire import Wire
from shim.core.outbox import Outbox
from shim.transport.edge import ASGIReceive, ASGISend, SocketPump
from shim.transport.stream import FinalMessage, Frame, StreamPump

HTTP_STREAM_PATH = "/connection/http_stream"
SSE_PATH = "/connection/sse"
EMULATION_PATH = "/emulation"
UNI_WEBSOCKET_PATH = "/connection/uni_websocket"
UNI_HTTP_STREAM_PATH = "/connection/uni_http_stream"
UNI_SSE_PATH = "/connection/uni_sse"

NDJSON = b"application/x-ndjson"
EVENT_STREAM = b"text/event-stream; charset=utf-8"
JSON = b"application/json"
PROTOBUF_CONTENT = b"application/octet-stream"

T = TypeVar("T")
Handler = Callable[[dict[str, Any], ASGIReceive, ASGISend], Awaitable[None]]


class UnidirectionalSession(CentrifugeSession):
    """A session whose client never answers: pings keep proxies from timing the
    stream out, and no pong is expected back."""

    __slots__ = ()

    def tick(self, now: float, wall: float) -> None:
        super().tick(now, wall)
        self.pong_deadline = 0.0


class UniSocketPump(SocketPump):
    """A unidirectional WebSocket: the WebSocket edge, named for metrics."""

    __slots__ = ()
    transport_name = "uni_websocket"


class FallbackEndpoints:
    """Which fallback paths this node serves (by settings), and serving them."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        routes: dict[str, Handler] = {}
        if settings.http_stream_enabled:
            routes[HTTP_STREAM_PATH] = self.http_stream
        if settings.sse_enabled:
            routes[SSE_PATH] = self.sse
        if settings.http_stream_enabled or settings.sse_enabled:
            routes[EMULATION_PATH] = self.emulation
        if settings.uni_http_stream_enabled:
            routes[UNI_HTTP_STREAM_PATH] = self.uni_http_stream
        if settings.uni_sse_enabled:
            routes[UNI_SSE_PATH] = self.uni_sse
        self._http = routes
        self._websocket: dict[str, Handler] = {}
        if settings.uni_websocket_enabled:
            self._websocket[UNI_WEBSOCKET_PATH] = self.uni_websocket

    def http_route(self, path: str) -> Handler | None:
        return self._http.get(path)

    def websocket_route(self, path: str) -> Handler | None:
        return self._websocket.get(path)

    def transports(self) -> list[dict[str, str]]:
        """The bidirectional transports a centrifuge-js client may try after WebSocket,
        in Centrifugo's order of preference (for /api/v1/realtime/config)."""
        found = []
        if HTTP_STREAM_PATH in self._http:
            found.append({"transport": "http_stream", "endpoint": HTTP_STREAM_PATH})
        if SSE_PATH in self._http:
            found.append({"transport": "sse", "endpoint": SSE_PATH})
        return found

    # -- who may come in -----------------------------------------------------------------

    def _cors(self, scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        """CORS headers for a page of an allowed origin (as Centrifugo's middleware
        adds them); none without allowed_origins, so browsers keep same-origin."""
        patterns = self.runtime.origin_patterns
        origin = _header(scope, b"origin")
        if not patterns or not origin or not origin_allowed(origin.decode("latin-1"), patterns):
            return []
        headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
        ]
        requested = _header(scope, b"access-control-request-headers")
        if requested and requested != b"null":
            headers.append((b"access-control-allow-headers", requested))
        return headers

    async def _refused(
        self,
        scope: dict[str, Any],
        send: ASGISend,
        *,
        allowed: tuple[str, ...],
        new_connection: bool,
    ) -> bool:
        """Answer what is not served: a foreign Origin (403, as for WebSocket), a new
        stream past the node's connection limit (503), a CORS preflight, a method the
        endpoint does not take. True when answered."""
        refusal = upgrade_refusal(self.runtime, scope)
        if refusal is not None and (new_connection or refusal[0] == 403):
            await _respond(send, refusal[0], refusal[1])
            return True
        return await _preflight_or_wrong_method(scope, send, allowed, self._cors(scope))

    # -- bidirectional emulation -------------------------------------------------------

    async def http_stream(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        if await self._refused(scope, send, allowed=("POST",), new_connection=True):
            return
        # The SDK's Protobuf build says so in the content type, as Centrifugo reads it.
        protobuf = _content_type(scope) == PROTOBUF_CONTENT
        limit = self.runtime.settings.http_stream_max_request_body_size

        async def commands() -> str | bytes:
            body = await _read_body(scope, receive, limit)
            if protobuf:
                if not body:
                    raise RequestError(400, "no connect command")
                return body
            return framing.commands_text(body)

        initial = await self._input(scope, send, commands())
        if initial is not None:
            codec = framing.PROTOBUF_HTTP_STREAM if protobuf else framing.JSON_HTTP_STREAM
            await self._emulated(scope, receive, send, initial, codec)

    async def sse(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if await self._refused(scope, send, allowed=("GET", "POST"), new_connection=True):
            return
        limit = self.runtime.settings.sse_max_request_body_size

        async def commands() -> str:
            raw = await _connect_data(scope, receive, limit)
            if not raw:
                raise RequestError(400, "no connect command (cf_connect)")
            return raw if isinstance(raw, str) else framing.commands_text(raw)

        initial = await self._input(scope, send, commands())
        if initial is not None:
            await self._emulated(scope, receive, send, initial, framing.SSE)

    async def _input(
        self, scope: dict[str, Any], send: ASGISend, reading: Awaitable[T]
    ) -> T | None:
        """What `reading` makes of the request, or None when the request was answered
        with its error instead (or the client left before it was read)."""
        try:
            return await reading
        except RequestError as exc:
            await _reply(send, exc, self._cors(scope))
        except _ClientGone:
            pass
        return None

    async def _emulated(
        self,
        scope: dict[str, Any],
        receive: ASGIReceive,
        send: ASGISend,
        commands: str | bytes,
        codec: framing.StreamCodec,
    ) -> None:
        runtime = self.runtime
        pump = StreamPump(scope, send, codec.frame, codec.final, transport_name=codec.name)
        session_id = str(uuid.uuid4())
        outbox = EmulationOutbox(
            runtime.settings.client_queue_max_size_bytes,
            pump.send_frame,
            flusher=runtime.node.flusher,
            direct=pump.direct,
            frame=pump.chunk,
            joined=True,
            binary=codec.wire.binary,
            max_frame_bytes=runtime.settings.websocket_max_frame_bytes,
            session_id=session_id,
            node_name=runtime.node.name,
            patch=codec.patch_connect,
        )
        await self._serve_stream(
            scope,
            receive,
            pump,
            outbox,
            commands,
            codec.content_type,
            codec.preamble,
            session_id=session_id,
            wire_format=codec.wire,
        )

    async def emulation(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if await self._refused(scope, send, allowed=("POST",), new_connection=False):
            return
        limit = self.runtime.settings.emulation_max_request_body_size

        async def deliver() -> bool:
            body = await _read_body(scope, receive, limit)
            if _content_type(scope) == PROTOBUF_CONTENT:
                await self.runtime.emulation.deliver(framing.pb_emulation_request(body))
            else:
                await self.runtime.emulation.deliver(framing.emulation_request(body))
            return True

        if await self._input(scope, send, deliver()):
            await _respond(send, 204, b"", self._cors(scope))

    # -- unidirectional ----------------------------------------------------------------

    async def uni_http_stream(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        if await self._refused(scope, send, allowed=("POST",), new_connection=True):
            return
        limit = self.runtime.settings.uni_http_stream_max_request_body_size

        async def command() -> str:
            return framing.uni_connect_command(await _read_body(scope, receive, limit))

        initial = await self._input(scope, send, command())
        if initial is not None:
            await self._unidirectional(
                scope, receive, send, initial, "uni_http_stream", NDJSON, framing.http_stream_chunk
            )

    async def uni_sse(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if await self._refused(scope, send, allowed=("GET", "POST"), new_connection=True):
            return
        limit = self.runtime.settings.uni_sse_max_request_body_size

        async def command() -> str:
            return framing.uni_connect_command(await _connect_data(scope, receive, limit))

        initial = await self._input(scope, send, command())
        if initial is not None:
            await self._unidirectional(
                scope,
                receive,
                send,
                initial,
                "uni_sse",
                EVENT_STREAM,
                framing.sse_chunk,
                framing.SSE_PREAMBLE,
            )

    async def _unidirectional(
        self,
        scope: dict[str, Any],
        receive: ASGIReceive,
        send: ASGISend,
        command: str,
        name: str,
        content_type: bytes,
        frame: Frame,
        preamble: bytes = b"",
    ) -> None:
        runtime = self.runtime
        final: FinalMessage = lambda code, reason: frame(framing.uni_disconnect_push(code, reason))  # noqa: E731
        pump = StreamPump(scope, send, frame, final, transport_name=name)
        outbox = UniOutbox(
            runtime.settings.client_queue_max_size_bytes,
            pump.send_frame,
            flusher=runtime.node.flusher,
            direct=pump.direct,
            frame=pump.chunk,
            joined=True,
            max_frame_bytes=runtime.settings.websocket_max_frame_bytes,
            session_id=str(uuid.uuid4()),
        )
        await self._serve_stream(
            scope, receive, pump, outbox, command, content_type, preamble, session_id=None
        )

    async def _serve_stream(
        self,
        scope: dict[str, Any],
        receive: ASGIReceive,
        pump: StreamPump,
        outbox: Outbox,
        commands: str | bytes,
        content_type: bytes,
        preamble: bytes,
        *,
        session_id: str | None,
        wire_format: Wire = JSON_WIRE,
    ) -> None:
        """Run one streaming client, bidirectional (`session_id` set: its commands
        come through /emulation) or unidirectional."""
        runtime = self.runtime
        settings = runtime.settings
        await pump.start(content_type, preamble, self._cors(scope))
        _forget_request_headers(scope)
        refusal = _refusal(runtime)
        if refusal is not None:
            # As on WebSocket: shutdown makes SDKs reconnect elsewhere, a `legacy`
            # cutover turns them away for good.
            await pump.end(refusal.code, refusal.reason)
            return
        session_class = CentrifugeSession if session_id is not None else UnidirectionalSession
        session = session_class(
            runtime.node, runtime.verifier, runtime.authorizer, pump, outbox, wire_format
        )
        if session_id is not None:
            runtime.emulation.add(
                session_id,
                EmulatedConnection(session, 4 * settings.emulation_max_request_body_size),
            )
        runtime.open_sockets.add(pump)
        try:
            await session.handle_frame(commands)
            if isinstance(outbox, UniOutbox) and outbox.connect_error:
                session.disconnect(framing.uni_connect_disconnect(outbox.connect_error))
            await pump.run(receive, outbox, flush_timeout=settings.websocket_write_timeout_seconds)
        finally:
            runtime.open_sockets.discard(pump)
            if session_id is not None:
                runtime.emulation.remove(session_id)
            session.transport_closed()

    async def uni_websocket(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        runtime = self.runtime
        settings = runtime.settings
        raw: str | bytes | None = framing.query_param(
            scope.get("query_string", b""), framing.CONNECT_PARAM
        )
        direct = _offer_direct_write(scope)
        await send({"type": "websocket.accept"})
        _forget_request_headers(scope)
        refusal = _refusal(runtime)
        if refusal is not None:
            await _close(send, refusal.code, refusal.reason)
            return
        if raw is None:
            # No cf_connect: the connect request is the client's first message.
            message = await _first_frame(receive, settings.client_stale_close_delay_seconds)
            if message is None:
                await _close(send, codes.STALE.code, codes.STALE.reason)
                return
            raw = message
        try:
            command = framing.uni_connect_command(raw)
        except RequestError:
            await _close(send, codes.BAD_PROTOCOL.code, codes.BAD_PROTOCOL.reason)
            return
        pump = UniSocketPump(send, _receive_queue(scope), direct)
        outbox = UniOutbox(
            settings.client_queue_max_size_bytes,
            pump.send_frame,
            flusher=runtime.node.flusher,
            direct=direct,
            joined=False,  # one push per frame: what a client without an SDK expects
            max_frame_bytes=settings.websocket_max_frame_bytes,
            session_id=str(uuid.uuid4()),
        )
        session = UnidirectionalSession(
            runtime.node, runtime.verifier, runtime.authorizer, pump, outbox
        )
        runtime.open_sockets.add(pump)
        try:
            await session.handle_frame(command)
            if outbox.connect_error:
                session.disconnect(framing.uni_connect_disconnect(outbox.connect_error))
            await pump.run(
                receive,
                _ignore_frame,  # pushes only: what the client sends is read and dropped
                outbox,
                flush_timeout=settings.websocket_write_timeout_seconds,
                read_limit_bytes=settings.uni_websocket_message_size_limit,
                discard_on=frozenset({codes.SLOW.code}),
            )
        finally:
            runtime.open_sockets.discard(pump)
            session.transport_closed()


def _refusal(runtime: Runtime) -> codes.DisconnectCode | None:
    if runtime.shutting_down:
        return codes.SHUTDOWN
    if not runtime.cutover.centrifuge_served:
        return codes.CENTRIFUGE_DISABLED
    return None


async def _ignore_frame(_frame: str | bytes) -> None:
    return None


# -- plain HTTP helpers ------------------------------------------------------------------


class _ClientGone(Exception):
    """The client left before its request was read."""


def _header(scope: dict[str, Any], name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return b""


def _content_type(scope: dict[str, Any]) -> bytes:
    return _header(scope, b"content-type").split(b";", 1)[0].strip().lower()


async def _connect_data(
    scope: dict[str, Any], receive: ASGIReceive, limit: int
) -> str | bytes | None:
    """An SSE request's connect data: `cf_connect` of a GET (what an EventSource can
    send), else the POST body."""
    if scope["method"] == "GET":
        return framing.query_param(scope.get("query_string", b""), framing.CONNECT_PARAM)
    return await _read_body(scope, receive, limit)


async def _read_body(scope: dict[str, Any], receive: ASGIReceive, limit: int) -> bytes:
    declared = _header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: ASGISend, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    if body:
        all_headers.append((b"content-type", JSON))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _reply(
    send: ASGISend, error: RequestError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _respond(send, error.status, error.body(), headers)


async def _preflight_or_wrong_method(
    scope: dict[str, Any],
    send: ASGISend,
    allowed: tuple[str, ...],
    cors: list[tuple[bytes, bytes]],
) -> bool:
    """Answer a CORS preflight or a method this endpoint does not take; True when answered."""
    method = scope["method"]
    if method == "OPTIONS":
        methods = ", ".join((*allowed, "OPTIONS")).encode()
        preflight = [
            (b"access-control-max-age", b"300"),
            (b"access-control-allow-methods", methods),
        ]
        await _respond(send, 204, b"", [*preflight, *cors])
        return True
    if method not in allowed:
        await _respond(
            send,
            405,
            RequestError(405, "method not allowed").body(),
            [(b"allow", ", ".join(allowed).encode())],
        )
        return True
    return False
