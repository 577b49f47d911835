from __future__ import annotations

import asyncio

from shim.outbox import Outbox


async def _discard(_frame: bytes) -> None:
    """For tests that only look at the queue (they never yield to its writer)."""


async def test_push_respects_the_byte_cap() -> None:
    outbox = Outbox(10, _discard)
    assert outbox.push(b"aaaa")
    assert outbox.push(b"bbbb")
    assert not outbox.push(b"ccc")  # 11 > 10: the caller disconnects the client
    assert outbox.size == 8
    assert outbox.push(b"cc")
    assert outbox.size == 10


async def test_take_returns_everything_that_fits_and_keeps_the_rest() -> None:
    outbox = Outbox(1000, _discard)
    for text in (b"aaa", b"bbb", b"ccc", b"ddd"):
        outbox.push(text)
    assert outbox.take(max_bytes=7) == [b"aaa", b"bbb"]  # b"aaa\nbbb" is 7 bytes
    assert outbox.size == 6
    assert outbox.take(max_bytes=100) == [b"ccc", b"ddd"]
    assert outbox.size == 0
    assert outbox.take(max_bytes=100) == []


async def test_one_oversized_message_still_goes_out_alone() -> None:
    outbox = Outbox(1000, _discard)
    outbox.push(b"x" * 50)
    outbox.push(b"y")
    assert outbox.take(max_bytes=10) == [b"x" * 50]
    assert outbox.take(max_bytes=10) == [b"y"]


async def test_close_with_discard_frees_the_queue() -> None:
    outbox = Outbox(1000, _discard)
    outbox.push(b"queued")
    outbox.close(discard=True)
    assert outbox.size == 0
    assert outbox.take(max_bytes=100) == []
    assert outbox.push(b"late")  # ignored, not an overflow
    assert outbox.take(max_bytes=100) == []


async def test_joined_writer_batches_what_queued_during_a_write() -> None:
    frames: list[bytes] = []
    first_write = asyncio.Event()
    release = asyncio.Event()

    async def send(frame: bytes) -> None:
        frames.append(frame)
        first_write.set()
        await release.wait()

    outbox = Outbox(1000, send, max_frame_bytes=1000)
    outbox.push(b"{1}")  # no flusher: the writer task starts at once
    await first_write.wait()
    for n in (2, 3, 4):
        outbox.push(b"{%d}" % n)  # queued while the first write is in flight
    release.set()
    await asyncio.wait_for(outbox.flushed(timeout=1), 1)
    assert frames == [b"{1}", b"{2}\n{3}\n{4}"]
    assert outbox.frames_sent == 2


async def test_each_writer_sends_one_frame_per_message_and_close_still_flushes() -> None:
    frames: list[bytes] = []

    async def send(frame: bytes) -> None:
        frames.append(frame)
        await asyncio.sleep(0)

    outbox = Outbox(1000, send, joined=False)
    for n in range(3):
        outbox.push(str(n).encode())
    outbox.close(discard=False)  # what is queued is still written
    await asyncio.wait_for(outbox.flushed(timeout=1), 1)
    assert frames == [b"0", b"1", b"2"]


async def test_writer_records_when_a_write_started_and_discard_stops_it() -> None:
    stuck = asyncio.Event()

    async def send(_frame: bytes) -> None:
        stuck.set()
        await asyncio.sleep(3600)

    outbox = Outbox(1000, send)
    outbox.push(b"x")
    await stuck.wait()
    assert outbox.write_started > 0  # what the ticker compares with the write timeout
    outbox.close(discard=True)  # a slow client: the stuck write is abandoned
    await asyncio.wait_for(outbox.flushed(timeout=1), 1)
    assert outbox.write_started == 0.0 and outbox.size == 0


async def test_a_failed_socket_write_ends_the_queue() -> None:
    async def send(_frame: bytes) -> None:
        raise ConnectionResetError

    outbox = Outbox(1000, send)
    outbox.push(b"x")
    await asyncio.wait_for(outbox.flushed(timeout=1), 1)
    assert outbox.closed and outbox.size == 0
