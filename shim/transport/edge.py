"""The WebSocket edge: moves frames between an ASGI websocket and a session.

This is the only place that awaits a client's socket. A connection's frames are
read in the task hypercorn runs the app in and handed to the session one at a
time; the outbox writes (see shim.core.outbox). Closing is asked for by the session
through `close`, which wakes the parked reader; the pump then drops the queue (a
slow client) or lets it flush within the write timeout, sends the close frame with
a deadline and waits a bounded time for the client's side of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shim.core.close_codes import WS_MESSAGE_TOO_BIG
from shim.core.outbox import Outbox
from shim.core.wsframe import binary_frame_header, text_frame_header
from shim.transport import sockets
from shim.transport.hypercorn_compat import CLOSE_REQUESTED, DirectWrite
from shim.transport.lean import LeanQueue

log = logging.getLogger("shim.edge")

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

# Bytes buffered in a transport above which a direct write waits for the socket
# (asyncio's own default high-water mark).
DIRECT_WRITE_HIGH_WATER = 64 * 1024
# Seconds to wait for the client's close frame after ours, as Go's library does.
CLOSE_HANDSHAKE_TIMEOUT = 5.0
# Seconds a dropped flooder's close frame gets to arrive before its connection goes.
CLOSE_LINGER_SECONDS = 0.3
# How often a closing connection looks whether its close frame has left our buffer.
DRAIN_POLL_SECONDS = 0.02


class SocketPump:
    """One connection's reads, in the task hypercorn runs the app in (no reader
    task of its own), and its close. Writes belong to the outbox."""

    __slots__ = ("_closing", "_queue", "_send", "binary", "close_code", "close_reason", "direct")
    transport_name = "websocket"

    def __init__(
        self,
        send: ASGISend,
        receive_queue: LeanQueue[dict[str, Any]],
        direct: DirectWrite | None = None,
        *,
        binary: bool = False,
    ) -> None:
        self._send = send
        # Frames are binary (Centrifuge Protobuf) rather than text.
        self.binary = binary
        # Filled in by hypercorn at accept when direct writes are possible.
        self.direct = direct or DirectWrite()
        # hypercorn's receive queue for this connection (our hook puts it in the
        # scope), so a close decided elsewhere can wake the parked reader.
        self._queue = receive_queue
        self.close_code = 0
        self.close_reason = ""
        self._closing = False

    def abort(self, *, reset: bool = False) -> None:
        """Drop the connection at once, the bytes still in our buffer included. With
        `reset`, the kernel's unsent bytes too (RST instead of FIN)."""
        sockets.drop(self.direct.transport, reset=reset)

    async def _close_frame_flushed(self, timeout: float) -> bool:
        """Whether everything written, the close frame last, left our buffer for the
        kernel within `timeout` seconds (True when there is no transport to watch)."""
        transport = self.direct.transport
        if transport is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while transport.get_write_buffer_size() and not transport.is_closing():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        return True

    # Transport (what sessions see).

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self.close_code, self.close_reason = code, reason
            self._queue.interrupt(CLOSE_REQUESTED)

    async def send_frame(self, payload: bytes) -> None:
        """One text (or binary) frame. Straight to the transport when hypercorn lets
        us (one write, plus a drain only when the socket's buffer is full), else
        through ASGI, which wants text as str."""
        direct = self.direct
        if direct.usable():
            header = binary_frame_header if self.binary else text_frame_header
            direct.write(header(len(payload)) + payload)
            writer = direct.writer
            assert writer is not None
            if writer.transport.get_write_buffer_size() > DIRECT_WRITE_HIGH_WATER:
                await writer.drain()
            return
        if self.binary:
            await self._send({"type": "websocket.send", "bytes": payload})
            return
        await self._send({"type": "websocket.send", "text": payload.decode()})

    async def run(
        self,
        receive: ASGIReceive,
        on_frame: Callable[[str | bytes], Awaitable[None]],
        outbox: Outbox,
        *,
        flush_timeout: float,
        read_limit_bytes: int,
        discard_on: frozenset[int] = frozenset(),
        linger_on: frozenset[int] = frozenset(),
    ) -> None:
        """Pump until the client leaves or a close is asked for; returns when done.
        Codes in `discard_on` drop what is queued and the connection right after the
        close frame; for `linger_on` codes nothing more is read, what is queued and
        the close frame go out, and the connection is dropped CLOSE_LINGER_SECONDS
        later (no close handshake is waited for)."""
        try:
            await self._read(receive, on_frame, read_limit_bytes)
            if not self._closing:
                return  # the client went away
            linger = self.close_code in linger_on
            if linger:
                self._stop_reading()  # a flood is not read or parsed any further
            # Nothing more is queued once a close is decided, whoever decided it.
            discard = self.close_code in discard_on
            outbox.close(discard=discard)
            if not discard:
                # What is queued (e.g. the error explaining the close) goes out
                # first, within the write timeout.
                await outbox.flushed(flush_timeout)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + flush_timeout
            await sockets.within(
                self._send(
                    {
                        "type": "websocket.close",
                        "code": self.close_code,
                        "reason": self.close_reason,
                    }
                ),
                flush_timeout,
            )
            # The close frame gets what is left of one write timeout to reach the kernel.
            flushed = await self._close_frame_flushed(max(0.0, deadline - loop.time()))
            if linger and flushed:
                # The close frame gets a moment to reach the client before the drop.
                await asyncio.sleep(CLOSE_LINGER_SECONDS)
            if discard or not flushed or linger:
                # A slow client is not waited for: once its close frame is with the
                # kernel (which still delivers it), the descriptor goes; a frame that
                # never got there takes the kernel's queue with it.
                self.abort(reset=not flushed)
                return
            await sockets.within(_until_disconnect(receive), CLOSE_HANDSHAKE_TIMEOUT)
        finally:
            outbox.close(discard=True)

    async def _read(
        self,
        receive: ASGIReceive,
        on_frame: Callable[[str | bytes], Awaitable[None]],
        limit: int,
    ) -> None:
        while not self._closing:
            message = await receive()
            if self._closing:
                return  # a frame that came after the close was decided is not served
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                frame: str | bytes = text if text is not None else (message.get("bytes") or b"")
                # hypercorn's own limit counts characters of text frames; ours counts bytes.
                if len(frame) > limit // 4 and frame_size(frame) > limit:
                    self.close(WS_MESSAGE_TOO_BIG, "")
                    return
                await on_frame(frame)
            elif kind == "websocket.disconnect":
                return

    def _stop_reading(self) -> None:
        pause = getattr(self.direct.transport, "pause_reading", None)
        if pause is not None:
            with contextlib.suppress(Exception):
                pause()


async def _until_disconnect(receive: ASGIReceive) -> None:
    """Read (and drop) until the client's side of the close handshake arrives."""
    while (await receive())["type"] != "websocket.disconnect":
        pass


def frame_size(frame: str | bytes) -> int:
    if isinstance(frame, bytes) or frame.isascii():
        return len(frame)
    return len(frame.encode())


async def reject_http(send: ASGISend, status: int, body: bytes, content_type: bytes) -> None:
    """Answer a websocket request with a plain HTTP response instead of upgrading."""
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})
