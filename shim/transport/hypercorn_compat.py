"""The one place we reach into hypercorn, for two things ASGI cannot express.

1. permessage-deflate on or off. hypercorn 0.18 negotiates it whenever a client
   offers it and has no setting for it. Compression costs memory per connection
   and CPU per client per message (it defeats encode-once), so we want it off by
   default. hypercorn builds a `Handshake` from the request headers; ours forgets
   the offered extensions unless compression is enabled.
2. Direct frame writes: a connection whose scope carries a `DirectWrite` gets its
   transport there, so the edge can write pre-built frames (see DirectWrite).
3. Lean per-connection primitives: hypercorn gives every connection an
   asyncio.Queue (the app's receive queue) and an asyncio.Event, about 4 KiB of
   eagerly allocated deques per idle socket; ours (shim.transport.lean) allocate on wait.
4. WebSocket-level pings with pong tracking, per connection. The legacy hub pinged
   every 30 s and dropped clients that did not pong within 60 s; ASGI has no ping
   or pong messages. A connection whose scope carries a `Liveness` under
   LIVENESS_EXTENSION before it is accepted gets pings at its interval, and every
   pong it answers is recorded there for the app to read.
5. The connection of an HTTP request (see HttpWiring), so the fallback transports'
   streaming responses can write chunks straight to an idle socket, as WebSocket
   frames are, and drop a stalled peer.

All are process-wide (one node per process) and checked against the hypercorn
version they were written for.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import h11 as h11_lib
from hypercorn.asyncio import task_group, worker_context
from hypercorn.protocol import h2, h11, ws_stream
from wsproto.events import Event as WSEvent
from wsproto.events import Ping, Pong

from shim.transport.lean import LeanEvent, LeanQueue

log = logging.getLogger("shim.hypercorn_compat")

SUPPORTED_HYPERCORN = ("0.18.",)
LIVENESS_EXTENSION = "dex.liveness"
DIRECT_WRITE_EXTENSION = "dex.direct_write"
# The scope extension holding the connection's receive queue (a LeanQueue), and the
# message the app puts in it to wake its own parked reader.
RECEIVE_QUEUE_EXTENSION = "dex.receive_queue"
CLOSE_REQUESTED: dict[str, Any] = {"type": "dex.close_requested"}
# The scope extension of an HTTP request holding its HttpWiring.
HTTP_WIRING_EXTENSION = "dex.http_wiring"

_ORIGINAL_HANDSHAKE = ws_stream.Handshake


def _chunked_writer_class() -> type | None:
    """h11's writer of chunked bodies (a private class: with an h11 that lacks it,
    stream chunks simply go through hypercorn)."""
    try:
        from h11._writers import ChunkedWriter
    except ImportError:
        return None
    return ChunkedWriter


_CHUNKED_WRITER = _chunked_writer_class()


class Liveness:
    """Shared by the app and the protocol layer for one connection."""

    __slots__ = ("last_pong", "ping_interval", "pinger", "timer")

    def __init__(self, ping_interval: float) -> None:
        self.ping_interval = ping_interval
        self.last_pong = asyncio.get_running_loop().time()
        # A timer between pings (no task per idle connection); a task only while a
        # ping is being written.
        self.timer: asyncio.TimerHandle | None = None
        self.pinger: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """No more pings. A ping stuck writing to a stalled peer holds hypercorn's send
        lock; cancelling it lets the close frame be queued behind what was sent."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pinger is not None:
            self.pinger.cancel()
            self.pinger = None


class DirectWrite:
    """The connection's own transport, for writing pre-built frames without the
    per-frame chain (ASGI send -> wsproto -> h11 protocol -> locked write + drain).

    Safe because server frames are unmasked and complete (FIN), so wsproto keeps no
    state about them, and writes are whole frames appended to the same transport
    in order; hypercorn's own writes (pings, close) hold `lock` while they drain,
    and a frame is only written directly when that lock is free.
    """

    __slots__ = ("frames", "lock", "transport", "writer")

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.transport: asyncio.WriteTransport | None = None
        self.lock: asyncio.Lock | None = None
        # False when an extension (permessage-deflate) is in effect: then frames must
        # go through wsproto, and the transport is kept only to abort it.
        self.frames = False

    def attach(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, *, frames: bool) -> None:
        self.writer, self.transport, self.lock = writer, writer.transport, lock
        self.frames = frames

    def usable(self) -> bool:
        transport, lock = self.transport, self.lock
        return (
            self.frames
            and transport is not None
            and lock is not None
            and not lock.locked()
            and not transport.is_closing()
        )

    def idle(self) -> bool:
        """Usable, and nothing waiting in the transport: a write now goes to the
        socket at once, so it needs no drain."""
        transport, lock = self.transport, self.lock
        return (
            self.frames
            and transport is not None
            and lock is not None
            and not lock.locked()
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        )

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def _tcp_server_of(stream: ws_stream.WSStream) -> Any:
    """hypercorn 0.18 wiring: WSStream.send is H11Protocol.stream_send, whose `send`
    is TCPServer.protocol_send. None when the stream is served some other way."""
    protocol = getattr(stream.send, "__self__", None)
    return getattr(getattr(protocol, "send", None), "__self__", None)


def _extensions_in_effect(connection: Any) -> bool:
    """Whether the connection negotiated an extension (permessage-deflate); frames
    are only written directly when none is in effect. Unknown counts as yes."""
    extensions = getattr(getattr(connection, "_proto", None), "extensions", None)
    return extensions is None or bool(extensions)


class _PendingEvents(list[WSEvent]):
    """What wsproto's Connection keeps in `_events` (only a lost connection's close
    ever goes there): a list with the one deque method it calls, without the
    deque's eager ~0.7 KiB block per idle socket."""

    __slots__ = ()

    def popleft(self) -> WSEvent:
        return self.pop(0)


class _SpentHTTP:
    """Stands in for a connection's h11 state machine once the 101 has been sent:
    from then on hypercorn writes WebSocket frames as raw bytes and never asks h11
    for anything, and the machine (about 1 KiB with its buffers) would stay with
    every idle socket."""

    __slots__ = ()

    def send(self, event: object) -> bytes:
        raise h11_lib.LocalProtocolError(f"no HTTP after the WebSocket upgrade: {event!r}")


_SPENT_HTTP = _SpentHTTP()


_UNAPPLIED: set[str] = set()


def _unapplied(hook: str) -> None:
    """A memory hook found hypercorn, wsproto or asyncio not as it expects: the socket
    works, it only keeps what the hook would have dropped. Said once per hook."""
    if hook not in _UNAPPLIED:
        _UNAPPLIED.add(hook)
        log.warning(
            "memory hook %s cannot apply (hypercorn %s): idle sockets keep more memory",
            hook,
            version("hypercorn"),
        )


def _lighten(stream: ws_stream.WSStream, connection: Any, writer: Any) -> None:
    """Drop per-socket state an accepted WebSocket no longer needs: the h11 machine,
    and two empty deques swapped for lists (wsproto's pending events; asyncio's
    drain waiters of the stream, appended, removed and iterated only)."""
    protocol_of_stream = getattr(stream.send, "__self__", None)
    upgraded = getattr(protocol_of_stream, "connection", None)
    if isinstance(upgraded, h11.H11WSConnection):
        upgraded.h11_connection = _SPENT_HTTP  # type: ignore[assignment]
    elif isinstance(protocol_of_stream, h11.H11Protocol):  # HTTP/2 streams have no h11 machine
        _unapplied("h11_connection")
    pending = getattr(connection, "_events", None)
    if isinstance(pending, collections.deque):
        if not pending:
            connection._events = _PendingEvents()
    else:
        _unapplied("wsproto_events")
    protocol = getattr(writer, "_protocol", None)
    waiters = getattr(protocol, "_drain_waiters", None)
    if isinstance(waiters, collections.deque):
        if not waiters:
            protocol._drain_waiters = []  # type: ignore[union-attr]
    elif writer is not None:
        _unapplied("drain_waiters")


class _NoCompressionHandshake(ws_stream.Handshake):
    def __init__(self, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
        super().__init__(headers, http_version)
        self.extensions = None  # as if the client had offered none


class _PingingWSStream(ws_stream.WSStream):
    _liveness: Liveness | None = None

    async def handle(self, event: Any) -> None:
        await super().handle(event)
        if self.closed and self._liveness is not None:
            self._liveness.stop()  # no ping is due to a stream that has ended

    async def _accept(self, message: Any) -> None:
        await super()._accept(message)
        server = _tcp_server_of(self)
        writer, lock = getattr(server, "writer", None), getattr(server, "send_lock", None)
        _lighten(self, self.connection, writer)
        direct = self.scope["extensions"].get(DIRECT_WRITE_EXTENSION)
        if (
            isinstance(direct, DirectWrite)
            and isinstance(writer, asyncio.StreamWriter)
            and isinstance(lock, asyncio.Lock)
        ):
            direct.attach(writer, lock, frames=not _extensions_in_effect(self.connection))
        liveness = self.scope["extensions"].get(LIVENESS_EXTENSION)
        if not isinstance(liveness, Liveness):
            return
        connection = self.connection
        read_events = connection.events

        def events_noting_pongs() -> Iterator[WSEvent]:
            for event in read_events():
                if isinstance(event, Pong):
                    liveness.last_pong = asyncio.get_running_loop().time()
                yield event

        connection.events = events_noting_pongs  # type: ignore[method-assign, unused-ignore]
        self._liveness = liveness
        self._arm_ping(liveness)

    def _arm_ping(self, liveness: Liveness) -> None:
        loop = asyncio.get_running_loop()
        liveness.timer = loop.call_later(liveness.ping_interval, self._ping_due, liveness)

    def _ping_due(self, liveness: Liveness) -> None:
        liveness.timer = None
        if self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._ping(liveness))
        liveness.pinger = task

    async def _ping(self, liveness: Liveness) -> None:
        """One ping through hypercorn's locked send; the next one is armed only after
        it was written, so a peer that stopped reading never piles pings up."""
        try:
            await self._send_wsproto_event(Ping())
        except Exception:
            return  # the socket is gone; the stream's close ends the connection
        finally:
            if liveness.pinger is asyncio.current_task():
                liveness.pinger = None
        if not self.closed:
            self._arm_ping(liveness)


class HttpWiring:
    """What a streaming HTTP/1.1 response may reach of its connection (nothing over
    HTTP/2, where the connection is shared by other requests). hypercorn 0.18: the
    app's send is HTTPStream.app_send, whose `send` is H11Protocol.stream_send, whose
    `send` is TCPServer.protocol_send."""

    __slots__ = ("_send",)

    def __init__(self, send: Any) -> None:
        self._send = send

    def _protocol(self) -> h11.H11Protocol | None:
        stream = getattr(self._send, "__self__", None)
        protocol = getattr(getattr(stream, "send", None), "__self__", None)
        return protocol if isinstance(protocol, h11.H11Protocol) else None

    def _server(self) -> tuple[asyncio.StreamWriter, asyncio.Lock] | None:
        server = getattr(getattr(self._protocol(), "send", None), "__self__", None)
        writer, lock = getattr(server, "writer", None), getattr(server, "send_lock", None)
        if isinstance(writer, asyncio.StreamWriter) and isinstance(lock, asyncio.Lock):
            return writer, lock
        return None

    def transport(self) -> asyncio.Transport | None:
        """The TCP transport, to drop a peer that stopped reading (closing would wait
        for its unsent bytes forever)."""
        server = self._server()
        transport = server[0].transport if server is not None else None
        return transport if isinstance(transport, asyncio.Transport) else None

    def attach_chunked(self, direct: DirectWrite) -> bool:
        """Let `direct` write body chunks straight to the socket, once the response
        has started with a chunked body: h11 keeps no count of chunks (only its
        writer's kind), so chunks it did not write leave it in a state it accepts,
        and the end of the body still goes through it."""
        connection = getattr(self._protocol(), "connection", None)
        body_writer = getattr(connection, "_writer", None)
        if _CHUNKED_WRITER is None or not isinstance(body_writer, _CHUNKED_WRITER):
            return False  # HTTP/1.0 (no chunking), not started, or an unknown h11
        server = self._server()
        if server is None:
            return False
        direct.attach(server[0], server[1], frames=True)
        return True


async def _spawn_app_with_lean_queue(
    self: task_group.TaskGroup, app: Any, config: Any, scope: Any, send: Any
) -> Any:
    """TaskGroup.spawn_app with a LeanQueue as the app's receive queue; the other
    arguments of hypercorn's app runner stay what hypercorn passes."""
    queue: LeanQueue[Any] = LeanQueue(config.max_app_queue_size)
    extensions = scope.get("extensions")
    if isinstance(extensions, dict):
        extensions[RECEIVE_QUEUE_EXTENSION] = queue
        if scope.get("type") == "http":
            extensions[HTTP_WIRING_EXTENSION] = HttpWiring(send)
    loop = self._loop

    def call_soon(func: Any, *args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(func(*args), loop).result()

    run_sync = functools.partial(loop.run_in_executor, None)
    self.spawn(task_group._handle, app, config, scope, queue.get, send, run_sync, call_soon)
    return queue.put


def install_hypercorn_hooks(*, compression: bool) -> None:
    installed = version("hypercorn")
    if not installed.startswith(SUPPORTED_HYPERCORN):
        raise RuntimeError(
            f"hypercorn {installed} is not one we checked our hooks against; "
            f"supported: {SUPPORTED_HYPERCORN}"
        )
    ws_stream.Handshake = _ORIGINAL_HANDSHAKE if compression else _NoCompressionHandshake  # type: ignore[misc]
    task_group.TaskGroup.spawn_app = _spawn_app_with_lean_queue  # type: ignore[method-assign]
    worker_context.WorkerContext.event_class = LeanEvent
    # The HTTP/1.1 and HTTP/2 protocols build their streams from these names.
    setattr(h11, "WSStream", _PingingWSStream)  # noqa: B010
    setattr(h2, "WSStream", _PingingWSStream)  # noqa: B010
