"""A connection's outbound queue: capped in bytes, filled without awaiting, drained
by one writer task.

The publish path calls `push` for every subscriber; it appends and returns, never
touching a socket. Going over the cap makes `push` return False and the caller
disconnects that client (3008) -- the queue is then dropped, so a stalled client
holds at most `cap` bytes of our memory and never delays anyone else.

Messages are UTF-8 bytes, shared by every subscriber of a publication. The queue is
kept small on purpose (idle connections are the common case): one plain list the
writer swaps out whole, and a future that exists only while the writer waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shim.hypercorn_compat import DirectWrite
from shim.wsframe import text_frame_header


class Flusher:
    """Runs once per event-loop iteration in which any outbox got messages, after
    the publish path is done: each such outbox whose writer is parked and whose
    socket has nothing pending gets its messages written straight away, as frames
    built from the shared bytes, with no task switch; the others wake their writer.
    Everything queued in the same iteration (a burst) leaves in one write."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()


class Outbox:
    __slots__ = (
        "_cap",
        "_closed",
        "_direct",
        "_dirty",
        "_flusher",
        "_items",
        "_joined",
        "_max_frame",
        "_size",
        "_waiter",
        "frames_sent",
        "write_started",
    )

    def __init__(
        self,
        cap_bytes: int,
        *,
        flusher: Flusher | None = None,
        direct: DirectWrite | None = None,
        joined: bool = True,
        max_frame_bytes: int = 512 * 1024,
    ) -> None:
        self._cap = cap_bytes
        self._items: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        # Without a flusher every push wakes the writer task (unit tests, fallbacks).
        self._flusher = flusher
        self._direct = direct
        self._dirty = False
        # Several messages per frame (Centrifuge JSON) or one each (legacy hub).
        self._joined = joined
        self._max_frame = max_frame_bytes
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
            self._wake()
        elif not self._dirty:
            self._dirty = True
            self._flusher.mark(self)
        return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def flush(self) -> None:
        """Write what is queued now if the writer is parked and the socket idle;
        otherwise leave it to the writer task (which handles waiting on the socket)."""
        self._dirty = False
        direct = self._direct
        if (
            not self._items
            or self._closed
            or self._waiter is None
            or direct is None
            or not direct.idle()
        ):
            self._wake()
            return
        items = self._items
        if len(items) == 1 and len(items[0]) <= self._max_frame:
            # The common case at a steady rate: one message, one frame.
            message = items[0]
            self._items, self._size = [], 0
            direct.write(text_frame_header(len(message)) + message)
            self.frames_sent += 1
            return
        frames: list[bytes] = []
        while self._items:
            batch = self.take(self._max_frame)
            if self._joined:
                payload = batch[0] if len(batch) == 1 else b"\n".join(batch)
                frames += (text_frame_header(len(payload)), payload)
            else:
                for message in batch:
                    frames += (text_frame_header(len(message)), message)
        direct.write(b"".join(frames))
        self.frames_sent += len(frames) // 2

    def close(self, *, discard: bool) -> None:
        """No more pushes. With `discard`, forget what is queued (slow client)."""
        self._closed = True
        if discard:
            self._items = []
            self._size = 0
        self._wake()

    async def wait(self) -> None:
        """Until there is something to write or the outbox is closed."""
        if self._items or self._closed:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

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


SendFrame = Callable[[bytes], Awaitable[None]]


async def drain_joined(outbox: Outbox, send: SendFrame, max_frame_bytes: int) -> None:
    """Writer loop for protocols that allow several messages per frame (Centrifuge
    JSON: newline-separated). Everything queued while a write was in flight goes out
    in the next frame, which is what keeps per-message cost low under fan-out."""
    loop = asyncio.get_running_loop()
    while True:
        await outbox.wait()
        batch = outbox.take(max_frame_bytes)
        if not batch:
            if outbox.closed:
                return
            continue
        outbox.write_started = loop.time()
        await send(batch[0] if len(batch) == 1 else b"\n".join(batch))
        outbox.write_started = 0.0
        outbox.frames_sent += 1


async def drain_each(outbox: Outbox, send: SendFrame, max_batch_bytes: int) -> None:
    """Writer loop for protocols that need one message per frame (legacy hub). It
    takes a batch at a time, so the queue costs one swap per batch, not per message."""
    loop = asyncio.get_running_loop()
    while True:
        await outbox.wait()
        batch = outbox.take(max_batch_bytes)
        if not batch:
            if outbox.closed:
                return
            continue
        for message in batch:
            outbox.write_started = loop.time()
            await send(message)
            outbox.write_started = 0.0
            outbox.frames_sent += 1
