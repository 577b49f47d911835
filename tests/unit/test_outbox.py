from __future__ import annotations

import asyncio
import time

import pytest

from shim.core.outbox import ADAPTIVE_MAX_SECONDS, Flusher, Outbox


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


class RecordingSocket:
    """The direct-write side of an idle socket: every write() is one syscall's bytes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def idle(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def _frames(data: bytes) -> list[bytes]:
    """Payloads of the unmasked server text frames in `data` (short payloads only)."""
    out = []
    while data:
        assert data[0] == 0x81 and data[1] < 126
        size = data[1]
        out.append(data[2 : 2 + size])
        data = data[2 + size :]
    return out


async def _paced_pushes(outbox: Outbox, messages: list[bytes], gap: float) -> None:
    for message in messages:
        assert outbox.push(message)
        await asyncio.sleep(gap)


@pytest.mark.parametrize("joined", [True, False])
async def test_a_write_delay_sends_publications_of_the_window_in_one_write(joined: bool) -> None:
    socket = RecordingSocket()
    flusher = Flusher(delay=0.2)
    outbox = Outbox(1 << 20, _never_send, flusher=flusher, direct=socket, joined=joined)  # type: ignore[arg-type]

    await _paced_pushes(outbox, [b'{"n":1}', b'{"n":2}', b'{"n":3}'], gap=0.01)
    assert socket.writes == []  # still inside the window
    await asyncio.sleep(0.3)

    assert len(socket.writes) == 1
    if joined:  # the channel protocol: one frame, newline-separated replies
        assert _frames(socket.writes[0]) == [b'{"n":1}\n{"n":2}\n{"n":3}']
    else:  # the legacy protocol: one JSON object per frame, all frames in one write
        assert _frames(socket.writes[0]) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']


async def test_without_a_write_delay_each_paced_publication_is_its_own_write() -> None:
    socket = RecordingSocket()
    outbox = Outbox(1 << 20, _never_send, flusher=Flusher(), direct=socket)  # type: ignore[arg-type]

    await _paced_pushes(outbox, [b'{"n":1}', b'{"n":2}'], gap=0.01)

    assert [_frames(w) for w in socket.writes] == [[b'{"n":1}'], [b'{"n":2}']]


async def _never_send(_payload: bytes) -> None:
    raise AssertionError("an idle socket is written directly, not through the writer")


class SlowSocket(RecordingSocket):
    """Each write takes `seconds` of CPU, as a flush to many sockets does."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.times: list[float] = []

    def write(self, data: bytes) -> None:
        self.times.append(time.monotonic())
        super().write(data)
        time.sleep(self.seconds)


async def test_after_a_long_flush_what_arrives_meanwhile_leaves_together() -> None:
    # The flush took 30 ms: the next one waits (at most ADAPTIVE_MAX_SECONDS), and
    # everything queued by then goes out in one write.
    socket = SlowSocket(0.03)
    outbox = Outbox(1 << 20, _never_send, flusher=Flusher(), direct=socket)  # type: ignore[arg-type]

    outbox.push(b'{"n":1}')
    await asyncio.sleep(0.035)  # the first flush ran (and took 30 ms)
    assert len(socket.writes) == 1
    await _paced_pushes(outbox, [b'{"n":2}', b'{"n":3}'], gap=0.002)
    await asyncio.sleep(ADAPTIVE_MAX_SECONDS + 0.04)

    assert [_frames(w) for w in socket.writes] == [[b'{"n":1}'], [b'{"n":2}\n{"n":3}']]
    assert socket.times[1] - socket.times[0] >= ADAPTIVE_MAX_SECONDS + 0.03 - 0.002
