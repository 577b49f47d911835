from __future__ import annotations

import asyncio

from shim.outbox import Outbox, drain_each, drain_joined


async def test_push_respects_the_byte_cap() -> None:
    outbox = Outbox(cap_bytes=10)
    assert outbox.push("aaaa", 4)
    assert outbox.push("bbbb", 4)
    assert not outbox.push("cc", 3)  # 11 > 10: the caller disconnects the client
    assert outbox.size == 8
    assert outbox.push("cc", 2)
    assert outbox.size == 10


async def test_take_returns_everything_that_fits_and_keeps_the_rest() -> None:
    outbox = Outbox(cap_bytes=1000)
    for text in ("aaa", "bbb", "ccc", "ddd"):
        outbox.push(text, len(text))
    assert outbox.take(max_chars=7) == ["aaa", "bbb"]  # "aaa\nbbb" is 7 characters
    assert outbox.size == 6
    assert outbox.take(max_chars=100) == ["ccc", "ddd"]
    assert outbox.size == 0
    assert outbox.take(max_chars=100) == []


async def test_one_oversized_message_still_goes_out_alone() -> None:
    outbox = Outbox(cap_bytes=1000)
    outbox.push("x" * 50, 50)
    outbox.push("y", 1)
    assert outbox.take(max_chars=10) == ["x" * 50]
    assert outbox.take(max_chars=10) == ["y"]


async def test_close_with_discard_frees_the_queue() -> None:
    outbox = Outbox(cap_bytes=1000)
    outbox.push("queued", 6)
    outbox.close(discard=True)
    assert outbox.size == 0
    assert outbox.take(max_chars=100) == []
    assert outbox.push("late", 4)  # ignored, not an overflow
    assert outbox.take(max_chars=100) == []


async def test_joined_writer_batches_what_queued_during_a_write() -> None:
    outbox = Outbox(cap_bytes=1000)
    frames: list[str] = []
    first_write = asyncio.Event()
    release = asyncio.Event()

    async def send(frame: str) -> None:
        frames.append(frame)
        first_write.set()
        await release.wait()

    writer = asyncio.create_task(drain_joined(outbox, send, max_frame_chars=1000))
    outbox.push("{1}", 3)
    await first_write.wait()
    for n in (2, 3, 4):
        outbox.push(f"{{{n}}}", 3)  # queued while the first write is in flight
    release.set()
    while len(frames) < 2:
        await asyncio.sleep(0)
    outbox.close(discard=False)
    await asyncio.wait_for(writer, 1)
    assert frames == ["{1}", "{2}\n{3}\n{4}"]
    assert outbox.frames_sent == 2


async def test_each_writer_sends_one_frame_per_message_then_stops_when_closed() -> None:
    outbox = Outbox(cap_bytes=1000)
    frames: list[str] = []

    async def send(frame: str) -> None:
        frames.append(frame)

    for n in range(3):
        outbox.push(str(n), 1)
    outbox.close(discard=False)  # what is queued is still written
    await asyncio.wait_for(drain_each(outbox, send, max_batch_chars=1000), 1)
    assert frames == ["0", "1", "2"]


async def test_writer_records_when_a_write_started() -> None:
    outbox = Outbox(cap_bytes=1000)
    stuck = asyncio.Event()

    async def send(_frame: str) -> None:
        stuck.set()
        await asyncio.sleep(3600)

    writer = asyncio.create_task(drain_joined(outbox, send, max_frame_chars=1000))
    outbox.push("x", 1)
    await stuck.wait()
    assert outbox.write_started > 0  # what the ticker compares with the write timeout
    writer.cancel()
