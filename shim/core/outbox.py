"""A connection's outbound queue: capped in bytes, filled without awaiting, drained
by one writer task.

The publish path calls `push` for every subscriber; it appends and returns, never
touching a socket. Going over the cap makes `push` return False and the caller
disconnects that client (3008) -- the queue is then dropped, so a stalled client
holds at most `cap` bytes of our memory and never delays anyone else.

Messages are UTF-8 bytes, shared by every subscriber of a publication. The queue is
kept small on purpose (idle connections are the common case): one plain list, and
no writer task at all while the socket keeps up. The flusher writes to idle sockets
directly; only when a socket is busy (its buffer not empty, or hypercorn holding it)
does the outbox start a writer task, which awaits the socket until the queue is
empty and then ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shim.core.transport import FrameSink
from shim.core.wsframe import binary_frame_header, text_frame_header


class Flusher:
    """Runs once per event-loop iteration in which any outbox got messages, after
    the publish path is done: each such outbox without a running writer whose
    socket has nothing pending gets its messages written straight away, as frames
    built from the shared bytes, with no task switch; the others get (or keep)
    their writer task. Everything queued in the same iteration (a burst) leaves in
    one write.

    With a `delay` (client_write_delay_seconds) the flush runs that long after the
    first message instead: single publications arriving at a sustained rate then
    share writes too. One timer per node, none per connection.

    Without one, the flusher still paces itself under load: after a flush that took
    `spent` seconds (at least ADAPTIVE_MIN_SECONDS, capped at ADAPTIVE_MAX_SECONDS),
    the next one starts no sooner than `spent` after it ended. Writing is then at
    most about half of the loop's time, and what publications arrive meanwhile
    leave together, one write per client instead of one per publication (as a
    Go write loop per connection batches whatever queued while it was writing).
    A lightly loaded node flushes at once, as before."""

    __slots__ = ("_delay", "_dirty", "_loop", "_next_at", "_scheduled")

    def __init__(self, delay: float = 0.0) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delay = delay
        # Monotonic time before which an adaptive flush waits (0.0: no wait).
        self._next_at = 0.0

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            if self._delay > 0:
                loop.call_later(self._delay, self._flush)
                return
            wait = self._next_at - time.monotonic() if self._next_at else 0.0
            if wait > 0:
                loop.call_later(wait, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        # The monotonic clock: uvloop's loop.time() stands still within an iteration.
        started = time.monotonic()
        for outbox in dirty:
            outbox.flush()
        if not self._delay:
            ended = time.monotonic()
            spent = ended - started
            self._next_at = (
                ended + min(spent, ADAPTIVE_MAX_SECONDS) if spent >= ADAPTIVE_MIN_SECONDS else 0.0
            )


# A flush shorter than this schedules the next one at once (uvloop's timers count
# whole milliseconds: a shorter wait would be a millisecond anyway).
ADAPTIVE_MIN_SECONDS = 0.001
# The most an adaptive flush waits: what a flush adds to latency under load.
ADAPTIVE_MAX_SECONDS = 0.02


SendFrame = Callable[[bytes], Awaitable[None]]


class Outbox:
    __slots__ = (
        "_cap",
        "_closed",
        "_direct",
        "_dirty",
        "_flusher",
        "_frame",
        "_header",
        "_held",
        "_items",
        "_joined",
        "_max_frame",
        "_send",
        "_separator",
        "_size",
        "_writer",
        "frames_sent",
        "write_started",
    )

    def __init__(
        self,
        cap_bytes: int,
        send: SendFrame,
        *,
        flusher: Flusher | None = None,
        direct: FrameSink | None = None,
        joined: bool = True,
        binary: bool = False,
        max_frame_bytes: int = 512 * 1024,
        frame: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self._cap = cap_bytes
        # Writes one frame to the socket, awaiting it (the edge's send_frame).
        self._send = send
        self._items: list[bytes] = []
        self._size = 0
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # Without a flusher every push starts (or feeds) the writer task.
        self._flusher = flusher
        self._direct = direct
        self._dirty = False
        # Several messages per frame (Centrifuge) or one each (legacy hub).
        self._joined = joined
        # Centrifuge Protobuf: binary frames of length-prefixed messages, put side by
        # side; JSON: text frames of messages separated by newlines.
        self._header = binary_frame_header if binary else text_frame_header
        self._separator = b"" if binary else b"\n"
        self._max_frame = max_frame_bytes
        # How a payload goes to the socket when written directly, when it is not a
        # WebSocket frame (an HTTP stream's chunk).
        self._frame = frame
        # Loop time until which flushes wait (see hold), 0.0 when not held.
        self._held = 0.0
        # Loop time when the writer began its current socket write, 0.0 when idle;
        # the node's ticker compares it with the write timeout.
        self.write_started = 0.0
        self.frames_sent = 0

    @property
    def size(self) -> int:
        """Bytes waiting to be written."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, message: bytes) -> bool:
        """Queue one message. False when it would take the queue over its cap."""
        if self._closed:
            return True
        size = self._size + len(message)
        if size > self._cap:
            return False
        self._items.append(message)
        self._size = size
        if self._flusher is None:
            self._start_writer()
        elif not self._dirty:
            self._dirty = True
            self._flusher.mark(self)
        return True

    def hold(self, seconds: float) -> None:
        """Queue without writing until `release`, or for `seconds` at most: the replies
        to one frame of commands then leave in one write instead of one each (a frame
        of 40 subscribes made 40 writes). Publications wait too, `seconds` at most.
        Holding again before the release moves the deadline to `seconds` from now."""
        if self._flusher is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._held = loop.time() + seconds
        # Marked dirty, pushes do not schedule a flush while held.
        if not self._dirty:
            self._dirty = True
            self._flusher.mark(self)
        loop.call_later(seconds, self._expire_hold)

    def release(self) -> None:
        if self._held:
            self._held = 0.0
            self.flush()

    def _expire_hold(self) -> None:
        if self._held and asyncio.get_running_loop().time() >= self._held:
            self.release()

    def flush(self) -> None:
        """Write what is queued now if no writer is running and the socket is idle;
        otherwise leave it to the writer task (which handles waiting on the socket)."""
        if self._held:
            return  # release() flushes
        self._dirty = False
        if not self._items or self._closed or self._writer is not None:
            return
        direct = self._direct
        if direct is None or not direct.idle():
            self._start_writer()
            return
        items = self._items
        if len(items) == 1 and len(items[0]) <= self._max_frame:
            # The common case at a steady rate: one message, one frame.
            message = items[0]
            self._items, self._size = [], 0
            frame = self._frame
            direct.write(self._header(len(message)) + message if frame is None else frame(message))
            self.frames_sent += 1
            return
        frames: list[bytes] = []
        while self._items:
            for payload in self._next_payloads():
                if self._frame is None:
                    frames += (self._header(len(payload)), payload)
                else:
                    frames += (self._frame(payload), b"")
        direct.write(b"".join(frames))
        self.frames_sent += len(frames) // 2

    def close(self, *, discard: bool) -> None:
        """No more pushes. With `discard`, forget what is queued (slow client) and
        stop a writer stuck on the socket; otherwise what is queued still goes out."""
        self._closed = True
        if discard:
            self._items = []
            self._size = 0
            if self._writer is not None:
                self._writer.cancel()
        elif self._items:
            self._start_writer()

    async def flushed(self, timeout: float) -> None:
        """Until everything queued is written (or `timeout` seconds passed)."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait({writer}, timeout=timeout)

    def take(self, max_bytes: int) -> list[bytes]:
        """Remove and return queued messages that fit in `max_bytes` once joined with
        newlines (always at least one)."""
        items = self._items
        if not items:
            return []
        if self._size + len(items) - 1 <= max_bytes:
            # The common case: everything queued goes in one frame.
            self._items, self._size = [], 0
            return items
        count, total = 1, len(items[0])
        while count < len(items) and total + len(items[count]) + 1 <= max_bytes:
            total += len(items[count]) + 1
            count += 1
        taken = items[:count]
        del items[:count]
        self._size -= sum(map(len, taken))
        return taken

    def _next_payloads(self) -> list[bytes]:
        """The frame payloads for the next batch: one joined payload (Centrifuge
        JSON, newline-separated) or one per message (legacy hub)."""
        batch = self.take(self._max_frame)
        if not self._joined:
            return batch
        return [batch[0] if len(batch) == 1 else self._separator.join(batch)]

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_all())

    async def _write_all(self) -> None:
        """The writer task: await the socket until the queue is empty, then end.
        Everything queued while a write was in flight goes out in the next batch,
        which is what keeps per-message cost low under fan-out."""
        loop = asyncio.get_running_loop()
        try:
            while self._items:
                for payload in self._next_payloads():
                    self.write_started = loop.time()
                    await self._send(payload)
                    self.write_started = 0.0
                    self.frames_sent += 1
        except Exception:
            # The socket is gone; the reader sees the disconnect and ends the session.
            self._closed = True
            self._items, self._size = [], 0
        finally:
            self.write_started = 0.0
            self._writer = None
