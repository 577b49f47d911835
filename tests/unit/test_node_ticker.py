"""The node's ticker visits sessions in slices, yielding to the event loop between
them, so thousands of sessions never tick in one loop iteration (issue 14: a
publication arriving meanwhile waited for all of them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest

from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from shim.centrifuge.fanout import CentrifugeFanout
from shim.core.config import Settings
from shim.core.node import TICK_SLICE, Node
from shim.core.session import Session, SessionState


class IterationCounter:
    """Counts event-loop iterations: a callback that schedules itself again runs
    once per iteration."""

    def __init__(self) -> None:
        self.iteration = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._step)

    def _step(self) -> None:
        self.iteration += 1
        self._handle = self._loop.call_soon(self._step)

    def stop(self) -> None:
        self._handle.cancel()


class RecordingSession(Session):
    """Records the loop iteration of each tick; no socket, no protocol."""

    protocol = "channels"
    __slots__ = ("counter", "on_tick", "ticks")

    def __init__(self, node: Node, counter: IterationCounter) -> None:
        super().__init__(node, None, None, SessionState.CONNECTED)  # type: ignore[arg-type]
        self.counter = counter
        self.ticks: list[int] = []
        self.on_tick: list[Session] = []

    def tick(self, now: float, wall: float) -> None:
        self.ticks.append(self.counter.iteration)
        for other in self.on_tick:
            self.node.remove_session(other)


class BrokenSession(RecordingSession):
    __slots__ = ()

    def tick(self, now: float, wall: float) -> None:
        super().tick(now, wall)
        raise RuntimeError("broken")


@pytest.fixture
def node() -> Node:
    return Node(Settings(), MemoryBroker(), MemoryPresenceManager(), fanouts=(CentrifugeFanout(),))


def open_sessions(node: Node, counter: IterationCounter, count: int) -> list[RecordingSession]:
    sessions = [RecordingSession(node, counter) for _ in range(count)]
    for session in sessions:
        node.add_session(session)
    return sessions


async def test_a_round_ticks_every_session_once_a_slice_per_loop_iteration(node: Node) -> None:
    counter = IterationCounter()
    count = 10 * TICK_SLICE + 7
    sessions = open_sessions(node, counter, count)
    await node.tick_round()
    counter.stop()

    assert all(len(s.ticks) == 1 for s in sessions)
    per_iteration = Counter(s.ticks[0] for s in sessions)
    assert max(per_iteration.values()) <= TICK_SLICE
    # The round yielded between slices: one loop iteration per slice.
    assert len(per_iteration) == 11
    # In the order they were added, so each session's place in the round is stable.
    assert [s.ticks[0] for s in sessions] == sorted(s.ticks[0] for s in sessions)


async def test_other_work_gets_through_between_two_slices(node: Node) -> None:
    """What arrives while a round runs (a request needs a dozen loop iterations from
    its socket to its subscribers) finishes within a slice or two, not one step per
    slice: the ticker pauses between slices instead of merely yielding."""
    counter = IterationCounter()
    sessions = open_sessions(node, counter, 20 * TICK_SLICE)
    finished_at: list[int] = []

    async def request() -> None:
        for _ in range(12):
            await asyncio.sleep(0)
        finished_at.append(sum(1 for s in sessions if s.ticks))

    round_ = asyncio.ensure_future(node.tick_round())
    await asyncio.sleep(0)  # the round's first slice ran
    await request()
    await round_
    counter.stop()
    # Sessions ticked by the time the request was done: far from all 20 slices.
    assert finished_at[0] <= 5 * TICK_SLICE


async def test_a_session_removed_during_the_round_is_not_ticked(node: Node) -> None:
    counter = IterationCounter()
    sessions = open_sessions(node, counter, 3 * TICK_SLICE)
    removed = [sessions[TICK_SLICE + 1], sessions[-1]]
    sessions[0].on_tick = removed  # closes two sessions later in the round
    await node.tick_round()
    counter.stop()

    assert [s.ticks for s in removed] == [[], []]
    assert all(len(s.ticks) == 1 for s in sessions if s not in removed)


async def test_a_session_added_during_the_round_waits_for_the_next(node: Node) -> None:
    counter = IterationCounter()
    open_sessions(node, counter, 2 * TICK_SLICE)
    round_ = asyncio.ensure_future(node.tick_round())
    await asyncio.sleep(0)  # the round's first slice ran
    late = open_sessions(node, counter, 1)[0]
    await round_
    counter.stop()
    assert late.ticks == []


async def test_a_failing_tick_does_not_stop_the_round(node: Node) -> None:
    counter = IterationCounter()
    broken = BrokenSession(node, counter)
    node.add_session(broken)
    sessions = open_sessions(node, counter, TICK_SLICE + 1)
    await node.tick_round()
    counter.stop()
    assert broken.ticks and all(len(s.ticks) == 1 for s in sessions)


async def test_the_ticker_ticks_each_session_once_per_round() -> None:
    node = Node(
        Settings(),
        MemoryBroker(),
        MemoryPresenceManager(),
        fanouts=(CentrifugeFanout(),),
        tick_interval=0.001,
    )
    counter = IterationCounter()
    sessions = open_sessions(node, counter, 3 * TICK_SLICE)
    ticker = asyncio.create_task(node._tick_forever())
    try:
        async with asyncio.timeout(30):
            while len(sessions[-1].ticks) < 3:
                await asyncio.sleep(0.001)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        counter.stop()
    # Rounds never overlap: however far the ticker got, no session is more than one
    # round ahead of another, and no loop iteration ticked more than a slice.
    counts = {len(s.ticks) for s in sessions}
    assert max(counts) - min(counts) <= 1 and min(counts) >= 3
    per_iteration = Counter(i for s in sessions for i in s.ticks)
    assert max(per_iteration.values()) <= TICK_SLICE
