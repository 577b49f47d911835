"""The WebSocket edge: moves frames between an ASGI websocket and a session.

This is the only place that awaits a client's socket. Each connection has a reader
(frames in, handed to the session one at a time) and one writer task (the outbox
out). Closing is asked for by the session through `close`; the pump then stops
the writer (at once for a slow client, after flushing otherwise), sends the close
frame with a deadline and waits a bounded time for the client's side of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shim.centrifuge.codes import WS_MESSAGE_TOO_BIG
from shim.hypercorn_compat import DirectWrite
from shim.outbox import Outbox
from shim.wsframe import text_frame_header

log = logging.getLogger("shim.edge")

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

# Bytes buffered in a transport above which a direct write waits for the socket
# (asyncio's own default high-water mark).
DIRECT_WRITE_HIGH_WATER = 64 * 1024
# Seconds to wait for the client's close frame after ours, as Go's library does.
CLOSE_HANDSHAKE_TIMEOUT = 5.0


class SocketPump:
    __slots__ = ("_close_requested", "_send", "close_code", "close_reason", "direct", "outbox")

    def __init__(self, send: ASGISend, outbox: Outbox, direct: DirectWrite | None = None) -> None:
        self._send = send
        self.outbox = outbox
        # Filled in by hypercorn at accept when direct writes are possible.
        self.direct = direct or DirectWrite()
        self.close_code = 0
        self.close_reason = ""
        self._close_requested = asyncio.get_running_loop().create_future()

    # Transport (what sessions see).

    def close(self, code: int, reason: str) -> None:
        if not self._close_requested.done():
            self.close_code, self.close_reason = code, reason
            self._close_requested.set_result(None)

    async def send_frame(self, payload: bytes) -> None:
        """One text frame. Straight to the transport when hypercorn lets us (one
        write, plus a drain only when the socket's buffer is full), else through
        ASGI, which wants the text as str."""
        direct = self.direct
        if direct.usable():
            direct.write(text_frame_header(len(payload)) + payload)
            writer = direct.writer
            assert writer is not None
            if writer.transport.get_write_buffer_size() > DIRECT_WRITE_HIGH_WATER:
                await writer.drain()
            return
        await self._send({"type": "websocket.send", "text": payload.decode()})

    async def run(
        self,
        receive: ASGIReceive,
        on_frame: Callable[[str | bytes], Awaitable[None]],
        writer: Awaitable[None],
        *,
        flush_timeout: float,
        read_limit_bytes: int,
        discard_on: frozenset[int] = frozenset(),
    ) -> None:
        """Pump until the client leaves or a close is asked for; returns when done."""
        reader_task = asyncio.ensure_future(self._read(receive, on_frame, read_limit_bytes))
        writer_task = asyncio.ensure_future(writer)
        try:
            await asyncio.wait(
                {reader_task, self._close_requested}, return_when=asyncio.FIRST_COMPLETED
            )
            if not self._close_requested.done():
                return  # the client went away
            # Nothing more is queued once a close is decided, whoever decided it.
            self.outbox.close(discard=self.close_code in discard_on)
            if self.close_code in discard_on:
                writer_task.cancel()
            else:
                # Let the writer flush what is queued (the outbox is closed, so it
                # returns once empty), within the write timeout.
                await asyncio.wait({writer_task}, timeout=flush_timeout)
            await _bounded(
                self._send(
                    {
                        "type": "websocket.close",
                        "code": self.close_code,
                        "reason": self.close_reason,
                    }
                ),
                flush_timeout,
            )
            await asyncio.wait({reader_task}, timeout=CLOSE_HANDSHAKE_TIMEOUT)
        finally:
            for task in (reader_task, writer_task):
                task.cancel()
            for task in (reader_task, writer_task):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _read(
        self,
        receive: ASGIReceive,
        on_frame: Callable[[str | bytes], Awaitable[None]],
        limit: int,
    ) -> None:
        while True:
            message = await receive()
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


def frame_size(frame: str | bytes) -> int:
    if isinstance(frame, bytes) or frame.isascii():
        return len(frame)
    return len(frame.encode())


async def _bounded(awaitable: Awaitable[None], timeout: float) -> None:
    with contextlib.suppress(TimeoutError, Exception):
        async with asyncio.timeout(timeout):
            await awaitable


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
