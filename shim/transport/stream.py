"""The HTTP streaming edge: one long response per client (HTTP-streaming or SSE),
written by the connection's outbox like a WebSocket.

The request's task parks on `receive` until the client goes away (hypercorn keeps
reading the socket after the request and reports EOF as `http.disconnect`) or the
session asks for a close. A close sends what is queued within the write timeout,
then the transport's last message (the disconnect push) and the end of the
response; a slow client, or one whose writes do not finish in time, has its TCP
connection dropped at once, so a stalled peer never holds a socket or a task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shim.core import close_codes
from shim.core.outbox import Outbox
from shim.transport import sockets
from shim.transport.edge import DIRECT_WRITE_HIGH_WATER, ASGIReceive, ASGISend
from shim.transport.hypercorn_compat import (
    CLOSE_REQUESTED,
    HTTP_WIRING_EXTENSION,
    RECEIVE_QUEUE_EXTENSION,
    DirectWrite,
    HttpWiring,
)
from shim.transport.lean import LeanQueue

Frame = Callable[[bytes], bytes]
FinalMessage = Callable[[int, str], bytes]

STREAM_HEADERS = [
    (b"cache-control", b"private, no-cache, no-store, must-revalidate, max-age=0"),
    (b"pragma", b"no-cache"),
    (b"expires", b"0"),
    # nginx would otherwise buffer the stream.
    (b"x-accel-buffering", b"no"),
]


class StreamPump:
    """One streaming response: its writes (for the outbox), its close (for the
    session) and its end."""

    __slots__ = (
        "_closing",
        "_final",
        "_frame",
        "_queue",
        "_send",
        "_wiring",
        "close_code",
        "close_reason",
        "direct",
        "transport_name",
    )

    def __init__(
        self,
        scope: dict[str, Any],
        send: ASGISend,
        frame: Frame,
        final: FinalMessage,
        *,
        transport_name: str,
    ) -> None:
        # Centrifugo's name of the transport ("http_stream", "uni_sse", ...), for metrics.
        self.transport_name = transport_name
        self._send = send
        self._frame = frame
        self._final = final
        extensions = scope.get("extensions") or {}
        queue = extensions.get(RECEIVE_QUEUE_EXTENSION)
        # hypercorn's receive queue (our hook), to wake the parked request task.
        self._queue: LeanQueue[dict[str, Any]] | None = (
            queue if isinstance(queue, LeanQueue) else None
        )
        wiring = extensions.get(HTTP_WIRING_EXTENSION)
        self._wiring = wiring if isinstance(wiring, HttpWiring) else None
        # Body chunks go straight to an idle socket once the response has started (as
        # WebSocket frames do); through hypercorn otherwise.
        self.direct = DirectWrite()
        self._closing = False
        self.close_code = 0
        self.close_reason = ""

    # Transport (what sessions see).

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self.close_code, self.close_reason = code, reason
            if self._queue is not None:
                self._queue.interrupt(CLOSE_REQUESTED)

    def abort(self) -> None:
        """Drop the TCP connection at once with a reset: our unsent bytes and the
        kernel's go with it (a peer with a zero window would hold those for minutes)."""
        sockets.drop(self._wiring.transport() if self._wiring is not None else None, reset=True)

    # Writes.

    async def start(
        self, content_type: bytes, preamble: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type), *STREAM_HEADERS, *headers],
            }
        )
        if preamble:
            await self.write(preamble)
        if self._wiring is not None:
            self._wiring.attach_chunked(self.direct)

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    def chunk(self, payload: bytes) -> bytes:
        """One batch of joined messages as a chunk of the chunked body, for direct
        writes (a batch is never empty: an empty chunk would end the body)."""
        data = self._frame(payload)
        return b"%x\r\n" % len(data) + data + b"\r\n"

    async def send_frame(self, payload: bytes) -> None:
        """The outbox's writer: one batch of joined messages, framed for the stream;
        straight to the socket when hypercorn is not writing (a drain only when the
        socket's buffer is full), else through ASGI."""
        direct = self.direct
        if direct.usable():
            direct.write(self.chunk(payload))
            writer = direct.writer
            assert writer is not None
            if writer.transport.get_write_buffer_size() > DIRECT_WRITE_HIGH_WATER:
                await writer.drain()
            return
        await self.write(self._frame(payload))

    async def end(self, code: int, reason: str) -> None:
        await self._send(
            {"type": "http.response.body", "body": self._final(code, reason), "more_body": False}
        )

    async def run(self, receive: ASGIReceive, outbox: Outbox, *, flush_timeout: float) -> None:
        """Until the client leaves or a close is asked for; returns when done."""
        try:
            while not self._closing:
                if (await receive())["type"] == "http.disconnect":
                    return
            if self.close_code == close_codes.SLOW:
                self.abort()  # its queue is already dropped; nothing more is written
                return
            outbox.close(discard=False)
            await outbox.flushed(flush_timeout)
            if outbox.size or outbox.write_started:
                self.abort()  # the queue did not go out in time
                return
            if not await sockets.within(
                self.end(self.close_code, self.close_reason), flush_timeout
            ):
                self.abort()
        finally:
            outbox.close(discard=True)
