"""A legacy hub client that behaves like the product's browser hook (useWebSocket.ts).

The hook opens `ws://<host>/api/v1/ws?token=<raw jwt>` (no URL encoding, no
Authorization header, no subprotocol, no compression), sends
`{"action":"subscribe_all"}` once the socket is open and `JSON.parse`s every frame.
`LegacyClient` does the same, keeps each frame's raw text beside the parsed object,
and bounds every wait. `RawSocket` is a hand-written WebSocket client over a bare
TCP stream for what a library client hides: seeing each ping, and never answering.

    async with legacy_client(server.port, server.token()) as client:
        frame = await client.next_frame()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

LEGACY_PATH = "/api/v1/ws"
SUBSCRIBE_ALL = '{"action":"subscribe_all"}'
# Every wait of these helpers is bounded by this many seconds unless told otherwise.
TIMEOUT = 5.0
# Server overrides for legacy tests: hypercorn_compat's ping loop outlives its socket
# by up to one ping interval and holds up server shutdown (graceful_timeout, 10 s)
# meanwhile (see test_server_stops_promptly_after_legacy_clients_leave), so tests
# that do not test pings use a short interval.
SHORT_PINGS: dict[str, Any] = {"legacy_ping_interval_seconds": 1.0}


@dataclass(slots=True, frozen=True)
class Frame:
    raw: str
    message: dict[str, Any]


def legacy_url(port: int, token: str | None = None) -> str:
    """The hook's URL: the raw token appended as is (base64url needs no encoding)."""
    base = f"ws://127.0.0.1:{port}{LEGACY_PATH}"
    return base if token is None else f"{base}?token={token}"


class LegacyClient:
    """One connected legacy socket with a background reader collecting its frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._changed = asyncio.Event()
        self._consumed = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in self.ws:
                # The hook only ever sees text frames; JSON.parse of anything else throws.
                assert isinstance(data, str), f"binary frame from the server: {data!r}"
                message = orjson.loads(data)
                assert isinstance(message, dict), f"not one JSON object: {data!r}"
                self.frames.append(Frame(data, message))
                self._changed.set()
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._reader.done()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    async def send(self, command: str | bytes | dict[str, Any]) -> None:
        if isinstance(command, dict):
            command = orjson.dumps(command).decode()
        await self.ws.send(command)

    async def _until(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.frames) < count:
                if self._reader.done():
                    raise ConnectionError(
                        f"closed ({self.close_code} {self.close_reason!r}) after "
                        f"{len(self.frames)} of {count} frames"
                    )
                self._changed.clear()
                await self._changed.wait()

    async def next_frame(self, timeout: float = TIMEOUT) -> Frame:
        """The next frame not yet returned by next_frame/take."""
        await self._until(self._consumed + 1, timeout)
        self._consumed += 1
        return self.frames[self._consumed - 1]

    async def take(self, count: int, timeout: float = TIMEOUT) -> list[Frame]:
        """The next `count` frames, in arrival order."""
        await self._until(self._consumed + count, timeout)
        start, self._consumed = self._consumed, self._consumed + count
        return self.frames[start : self._consumed]

    async def skip_until(self, match: Callable[[Frame], bool], timeout: float = TIMEOUT) -> Frame:
        """Take frames until one matches; return it (the others are dropped)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_frame(timeout)
                if match(frame):
                    return frame

    async def expect_silence(self, within: float) -> None:
        """Fail if any frame beyond those already taken arrives within `within` seconds."""
        await asyncio.sleep(within)
        extra = self.frames[self._consumed :]
        assert not extra, f"unexpected frames: {[f.raw for f in extra]}"

    async def wait_closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str | None]:
        """(close code, reason) once the server has closed the socket."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
        return self.close_code, self.close_reason

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def open_legacy(
    port: int,
    token: str | None = None,
    *,
    first_commands: Sequence[str] = (SUBSCRIBE_ALL,),
    bearer: str | None = None,
    headers: dict[str, str] | None = None,
    **options: Any,
) -> LegacyClient:
    """Connect as the hook does, then send `first_commands` (the hook's one command).

    `bearer` sends `Authorization: Bearer <bearer>` (the hook never does; other
    consumers may). `options` go to websockets' connect (e.g. origin, max_queue)."""
    extra = dict(headers or {})
    if bearer is not None:
        extra["Authorization"] = f"Bearer {bearer}"
    options.setdefault("compression", None)
    options.setdefault("proxy", None)
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("close_timeout", 2)
    ws = await connect(legacy_url(port, token), additional_headers=extra, **options)
    client = LegacyClient(ws)
    # A browser drops what is sent on a socket the server already closed, silently.
    with contextlib.suppress(ConnectionClosed):
        for command in first_commands:
            await client.send(command)
    return client


@contextlib.asynccontextmanager
async def legacy_client(
    port: int,
    token: str | None = None,
    *,
    first_commands: Sequence[str] = (SUBSCRIBE_ALL,),
    bearer: str | None = None,
    **options: Any,
) -> AsyncIterator[LegacyClient]:
    client = await open_legacy(port, token, first_commands=first_commands, bearer=bearer, **options)
    try:
        yield client
    finally:
        await client.aclose()


# --- a WebSocket client written by hand ------------------------------------------------

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


@dataclass(slots=True, frozen=True)
class RawFrame:
    opcode: int
    payload: bytes
    at: float  # loop time of arrival

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code


class RawSocket:
    """RFC 6455 over asyncio streams: masked frames out, every frame in recorded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames: list[RawFrame] = []
        self.answer_pings = False

    @classmethod
    async def open(cls, port: int, token: str, *, timeout: float = TIMEOUT) -> RawSocket:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    f"GET {LEGACY_PATH}?token={token} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1] != b"101":
            writer.close()
            raise ConnectionError(f"handshake refused: {head!r}")
        return cls(reader, writer)

    async def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send(OP_TEXT, text.encode())

    async def read_frame(self) -> RawFrame:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        assert not second & 0x80, "the server masked a frame"
        payload = await self.reader.readexactly(length)
        frame = RawFrame(first & 0x0F, payload, asyncio.get_running_loop().time())
        self.frames.append(frame)
        if frame.opcode == OP_PING and self.answer_pings:
            await self.send(OP_PONG, frame.payload)
        return frame

    async def read_until_close(self, timeout: float) -> RawFrame | None:
        """Read (answering pings if asked) until a Close frame or EOF; None on EOF."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    frame = await self.read_frame()
                except asyncio.IncompleteReadError:
                    return None
                if frame.opcode == OP_CLOSE:
                    return frame

    def pings(self) -> list[RawFrame]:
        return [f for f in self.frames if f.opcode == OP_PING]

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# --- making every client's commands so far take effect ---------------------------------


# Probe numbers are unique in the process, so probes of an earlier settle never match.
_NONCES = itertools.count(1)


def probe_event(scope: str, nonce: int) -> dict[str, Any]:
    """An event every holder of `*` or of `scope` (`task:<id>` or `project:<id>`)
    receives, with strict matching or not: the id is both top-level and in the payload."""
    kind, _, ident = scope.partition(":")
    key = f"{kind}_id"
    return {"type": f"{kind}.updated", key: ident, "payload": {key: ident, "probe": nonce}}


def is_probe(frame: Frame, nonce: int | None = None) -> bool:
    probe = frame.message.get("payload", {}).get("probe")
    return probe is not None and (nonce is None or probe == nonce)


def probe_matcher(nonce: int) -> Callable[[Frame], bool]:
    return lambda frame: is_probe(frame, nonce)


async def settle(
    publish: Callable[[Any], Awaitable[Any]],
    clients: Sequence[LegacyClient],
    scope: str,
    *,
    timeout: float = TIMEOUT,
) -> None:
    """Return once every client's commands sent so far are in effect.

    The hub never answers a command, so this publishes probes to `scope` (a
    `task:<id>` or `project:<id>`, or a bare task id) until each client -- holding
    `*` or `scope` -- has seen one: its commands are handled in order, so the
    earlier ones are in effect too. Then one last probe all clients read up to,
    which leaves no probe behind in any client's stream.
    """
    if ":" not in scope:
        scope = f"task:{scope}"
    pending = list(clients)
    async with asyncio.timeout(timeout):
        while pending:
            nonce = next(_NONCES)
            await publish(probe_event(scope, nonce))
            waiting = []
            for client in pending:
                try:
                    await client.skip_until(probe_matcher(nonce), 0.3)
                except TimeoutError:
                    waiting.append(client)
            pending = waiting
        nonce = next(_NONCES)
        await publish(probe_event(scope, nonce))
        for client in clients:
            await client.skip_until(probe_matcher(nonce), timeout)
