"""The two WebSocket endpoints: who gets which protocol, and the pump around it.

`/connection/websocket` serves the Centrifuge protocol. `/api/v1/ws` serves the
legacy hub protocol -- authenticated before the upgrade as the Go hub did -- and,
while the cutover allows it, also a Centrifuge SDK pointed at that URL,
recognised by its first frame (a `connect` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from typing import Any, Protocol

import orjson

from legacy.reads import LegacyReads
from legacy.session import READ_LIMIT_BYTES as LEGACY_READ_LIMIT_BYTES
from legacy.session import RETIRED, LegacySession, legacy_token
from shim.app.runtime import Runtime
from shim.centrifuge import codec, codes, wire
from shim.centrifuge.session import CentrifugeSession
from shim.core import console_credential
from shim.core.auth import Credentials, TokenError
from shim.core.outbox import Outbox
from shim.transport.edge import ASGIReceive, ASGISend, SocketPump, reject_http
from shim.transport.hypercorn_compat import (
    DIRECT_WRITE_EXTENSION,
    LIVENESS_EXTENSION,
    RECEIVE_QUEUE_EXTENSION,
    DirectWrite,
    Liveness,
)
from shim.transport.lean import LeanQueue

CENTRIFUGE_PATH = "/connection/websocket"
LEGACY_PATH = "/api/v1/ws"
# The Go hub's (Echo's) rejection bodies: one JSON object and a newline.
LEGACY_MISSING = b'{"message":"missing authorization header"}\n'
LEGACY_EXPIRED = b'{"message":"token expired"}\n'
LEGACY_INVALID = b'{"message":"invalid token"}\n'
# A socket on the legacy path without a token that turned out not to be a
# Centrifuge SDK: the legacy answer would have been a 401 before the upgrade.
LEGACY_MISSING_CLOSE = (4401, "missing authorization header")
SLOW_CODE = codes.SLOW.code
# A client flooding commands is no longer read once its close is decided, and is
# dropped shortly after its close frame: waiting for its side of the close handshake
# would mean reading and parsing its flood for up to 5 s.
FLOODING = frozenset({codes.TOO_MANY_REQUESTS_DISCONNECT.code})
SHUTTING_DOWN = b'{"message":"server shutting down"}\n'
NO_CREDENTIALS = Credentials(user="")


ORIGIN_REFUSED = b'{"message":"origin not allowed"}\n'
CONNECTION_LIMIT = b'{"message":"connection limit"}\n'
AMBIGUOUS_LENGTH = b'{"message":"both Content-Length and Transfer-Encoding given"}\n'


def upgrade_refusal(runtime: Runtime, scope: dict[str, Any]) -> tuple[int, bytes] | None:
    """(status, body) when an upgrade on either path is refused before anything else:
    both Content-Length and Transfer-Encoding (400, as for any request), an Origin
    outside allowed_origins (403), or the node's connection limit (503)."""
    names = {name.lower() for name, _ in scope["headers"]}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, AMBIGUOUS_LENGTH
    patterns = runtime.origin_patterns
    if patterns:
        origin = next((v for k, v in scope["headers"] if k.lower() == b"origin"), None)
        if origin is not None and not origin_allowed(origin.decode("latin-1"), patterns):
            return 403, ORIGIN_REFUSED
    limit = runtime.settings.client_connection_limit
    if limit and len(runtime.node.sessions) >= limit:
        runtime.node.counters.refused("connection_limit")
        return 503, CONNECTION_LIMIT
    return None


def origin_allowed(origin: str, patterns: tuple[str, ...]) -> bool:
    """Origin (scheme://host[:port]) matched against shell-style patterns, case-blind."""
    origin = origin.strip().lower()
    return any(fnmatch.fnmatchcase(origin, pattern) for pattern in patterns)


def legacy_rejection(runtime: Runtime, scope: dict[str, Any]) -> tuple[bytes, Credentials]:
    """(401 body, anonymous credentials) when the legacy token is missing or bad,
    else (b"", the token's credentials)."""
    token = legacy_token(scope["headers"], scope.get("query_string", b""))
    if not token:
        return LEGACY_MISSING, NO_CREDENTIALS
    try:
        credentials = runtime.verifier.verify_connection(token)
    except TokenError as exc:
        return (LEGACY_EXPIRED if exc.expired else LEGACY_INVALID), NO_CREDENTIALS
    if credentials.anonymous and not runtime.settings.client_anonymous:
        # What the channel protocol refuses (3501) is not a user here either.
        return LEGACY_INVALID, NO_CREDENTIALS
    return b"", credentials


async def serve_centrifuge(
    runtime: Runtime, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    direct = _offer_direct_write(scope)
    # JSON unless Protobuf is asked for; a subprotocol is answered only when offered
    # (the Python SDK's empty Sec-WebSocket-Protocol header gets none).
    chosen, subprotocol = wire.select(
        scope.get("query_string", b""), scope.get("subprotocols") or ()
    )
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if subprotocol is not None:
        accept["subprotocol"] = subprotocol
    await send(accept)
    _forget_request_headers(scope)
    if runtime.shutting_down:
        await _close(send, codes.SHUTDOWN.code, codes.SHUTDOWN.reason)
        return
    first_frame: str | bytes | None = None
    if not runtime.cutover.centrifuge_served:
        # Only the operator console (its credential in the connect) is served in `legacy`.
        first_frame = await _first_frame(receive, runtime.settings.client_stale_close_delay_seconds)
        if first_frame is None or not _is_console_connect(runtime, first_frame, chosen):
            await _close(send, codes.CENTRIFUGE_DISABLED.code, codes.CENTRIFUGE_DISABLED.reason)
            return
    await _run_centrifuge(
        runtime, scope, receive, send, direct, first_frame=first_frame, wire_format=chosen
    )


def _offer_direct_write(scope: dict[str, Any]) -> DirectWrite:
    """Ask hypercorn (at accept) for the transport, for pre-built frame writes."""
    direct = DirectWrite()
    scope["extensions"][DIRECT_WRITE_EXTENSION] = direct
    return direct


def _forget_request_headers(scope: dict[str, Any]) -> None:
    """Everything the handshake headers were needed for (the token, hypercorn's
    access log line) is done once the upgrade is accepted; a browser's headers,
    cookies included, would otherwise stay with every idle socket."""
    scope["headers"] = []


def _is_console_connect(runtime: Runtime, frame: str | bytes, chosen: wire.Wire) -> bool:
    try:
        commands = chosen.decode_frame(frame)
    except codec.ProtocolError:
        return False
    request = commands[0].request if commands else None
    return isinstance(request, codec.ConnectRequest) and console_credential.valid(
        request.token, runtime.settings.admin_api_key
    )


async def _run_centrifuge(
    runtime: Runtime,
    scope: dict[str, Any],
    receive: ASGIReceive,
    send: ASGISend,
    direct: DirectWrite,
    *,
    first_frame: str | bytes | None,
    wire_format: wire.Wire = wire.JSON,
) -> None:
    settings = runtime.settings
    pump = SocketPump(send, _receive_queue(scope), direct, binary=wire_format.binary)
    outbox = Outbox(
        settings.client_queue_max_size_bytes,
        pump.send_frame,
        flusher=runtime.node.flusher,
        direct=direct,
        joined=True,
        binary=wire_format.binary,
        max_frame_bytes=settings.websocket_max_frame_bytes,
    )
    session = CentrifugeSession(
        runtime.node, runtime.verifier, runtime.authorizer, pump, outbox, wire_format
    )
    await _pump(
        runtime, session, pump, receive, outbox, settings.websocket_read_limit_bytes, first_frame
    )


def _receive_queue(scope: dict[str, Any]) -> LeanQueue[dict[str, Any]]:
    """The connection's receive queue, which our hypercorn hook hands over (the
    WebSocket paths need the hooks: pings, direct writes, waking a parked read)."""
    queue = scope["extensions"].get(RECEIVE_QUEUE_EXTENSION)
    if not isinstance(queue, LeanQueue):
        raise RuntimeError("served without shim.transport.hypercorn_compat's hooks installed")
    return queue


async def serve_legacy(
    runtime: Runtime, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    cutover = runtime.cutover
    has_token = bool(legacy_token(scope["headers"], scope.get("query_string", b"")))
    # Only a socket without any token may be a Centrifuge SDK (its token travels in
    # the connect command); one with a token is a legacy client, which may well stay
    # silent, so it is never kept waiting for a first frame.
    detect = (
        not has_token and cutover.detect_centrifuge_on_legacy_path and cutover.centrifuge_served
    )
    credentials = NO_CREDENTIALS
    # The Go hub authenticated before looking at the handshake: a 401 before any
    # upgrade gives the browser hook its bounded retries.
    if not detect:
        rejection, credentials = legacy_rejection(runtime, scope)
        if rejection:
            await reject_http(send, 401, rejection, b"application/json")
            return
        if runtime.node.user_at_limit(credentials.user):
            # Before the upgrade, so the browser hook's retries stay bounded.
            await reject_http(send, 503, CONNECTION_LIMIT, b"application/json")
            return
    if runtime.shutting_down:
        await reject_http(send, 503, SHUTTING_DOWN, b"application/json")
        return
    settings = runtime.settings
    liveness = Liveness(settings.legacy_ping_interval_seconds)
    scope["extensions"][LIVENESS_EXTENSION] = liveness
    direct = _offer_direct_write(scope)
    # A Centrifuge SDK in Protobuf mode says so in the handshake (the legacy hub never).
    chosen, subprotocol = (
        wire.select(scope.get("query_string", b""), scope.get("subprotocols") or ())
        if detect
        else (wire.JSON, None)
    )
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if subprotocol is not None:
        accept["subprotocol"] = subprotocol
    await send(accept)
    _forget_request_headers(scope)

    first_frame: str | bytes | None = None
    if detect:
        first_frame = await _first_frame(receive, settings.client_stale_close_delay_seconds)
        if first_frame is None:
            await _close(send, codes.STALE.code, codes.STALE.reason)
            return
        if chosen.binary or looks_like_centrifuge(first_frame):
            await _run_centrifuge(
                runtime, scope, receive, send, direct, first_frame=first_frame, wire_format=chosen
            )
            return
        await _close(send, *LEGACY_MISSING_CLOSE)
        return
    if not runtime.cutover.legacy_served:
        await _close(send, *RETIRED)
        return

    pump = SocketPump(send, _receive_queue(scope), direct)
    outbox = Outbox(
        settings.client_queue_max_size_bytes,
        pump.send_frame,
        flusher=runtime.node.flusher,
        direct=direct,
        joined=False,
        max_frame_bytes=settings.websocket_max_frame_bytes,
    )
    authorizer = runtime.authorizer
    session = LegacySession(
        runtime.node,
        pump,
        outbox,
        runtime.legacy_stats,
        user=credentials.user,
        strict_matching=settings.legacy_strict_matching,
        liveness=liveness,
        personal_channels=tuple(authorizer.personal_channels(credentials.user)),
        # Under "any" a user reads every shared channel: nothing to ask, bytes unchanged.
        reads=None
        if authorizer.reads_everything_shared(credentials)
        else LegacyReads(
            authorizer, credentials, cache_seconds=settings.channel_policy_cache_seconds
        ),
    )
    await _pump(runtime, session, pump, receive, outbox, LEGACY_READ_LIMIT_BYTES, first_frame)


class _Session(Protocol):
    async def handle_frame(self, frame: str | bytes) -> None: ...

    def transport_closed(self) -> None: ...


async def _pump(
    runtime: Runtime,
    session: _Session,
    pump: SocketPump,
    receive: ASGIReceive,
    outbox: Outbox,
    read_limit_bytes: int,
    first_frame: str | bytes | None,
) -> None:
    """Run one connection of either protocol until it ends, counted for shutdown."""
    runtime.open_sockets.add(pump)
    try:
        if first_frame is not None:
            await session.handle_frame(first_frame)
        await pump.run(
            receive,
            session.handle_frame,
            outbox,
            flush_timeout=runtime.settings.websocket_write_timeout_seconds,
            read_limit_bytes=read_limit_bytes,
            discard_on=frozenset({SLOW_CODE}),
            linger_on=FLOODING,
        )
    finally:
        runtime.open_sockets.discard(pump)
        session.transport_closed()


def looks_like_centrifuge(frame: str | bytes) -> bool:
    """A Centrifuge SDK's first frame starts with a connect command; a legacy
    client's holds an `action`."""
    first_line = frame.split(b"\n", 1)[0] if isinstance(frame, bytes) else frame.split("\n", 1)[0]
    try:
        command = orjson.loads(first_line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(command, dict) and isinstance(command.get("connect"), dict)


async def _first_frame(receive: ASGIReceive, timeout: float) -> str | bytes | None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return None
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    return text if text is not None else (message.get("bytes") or b"")
    return None


async def _close(send: ASGISend, code: int, reason: str) -> None:
    await send({"type": "websocket.close", "code": code, "reason": reason})
