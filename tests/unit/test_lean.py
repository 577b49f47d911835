from __future__ import annotations

import asyncio

import pytest

from shim.transport.lean import LeanEvent, LeanQueue


async def test_queue_hands_items_out_in_order_and_wakes_a_parked_getter() -> None:
    queue: LeanQueue[int] = LeanQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await queue.put(1)
    await queue.put(2)
    assert await asyncio.wait_for(getter, 1) == 1
    assert await queue.get() == 2


async def test_put_waits_while_the_queue_is_full() -> None:
    queue: LeanQueue[int] = LeanQueue(maxsize=2)
    await queue.put(1)
    await queue.put(2)
    putter = asyncio.create_task(queue.put(3))
    await asyncio.sleep(0.01)
    assert not putter.done() and queue.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(4)
    assert await queue.get() == 1
    await asyncio.wait_for(putter, 1)
    assert [await queue.get(), await queue.get()] == [2, 3]


async def test_interrupt_goes_in_even_when_full() -> None:
    queue: LeanQueue[str] = LeanQueue(maxsize=1)
    await queue.put("frame")
    queue.interrupt("close")
    assert [await queue.get(), await queue.get()] == ["frame", "close"]


async def test_a_getter_cancelled_after_its_wake_up_passes_it_on() -> None:
    queue: LeanQueue[int] = LeanQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(7)  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == 7
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_event_wakes_every_waiter_and_stays_set_until_cleared() -> None:
    event = LeanEvent()
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not event.is_set() and not any(w.done() for w in waiters)
    await event.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    await asyncio.wait_for(event.wait(), 1)  # already set: returns at once
    await event.clear()
    late = asyncio.create_task(event.wait())
    await asyncio.sleep(0.01)
    assert not late.done()
    late.cancel()
