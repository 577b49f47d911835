"""Small stand-ins for asyncio.Queue and asyncio.Event, for objects every idle
connection holds.

asyncio's versions allocate their waiter deques up front: a Queue holds four
(getters, putters, items, and its Event's waiters), about 3 KiB, and hypercorn
makes one Queue and one Event per connection. These keep plain lists and create
a future only while someone actually waits, which is rare for an idle socket.
Same semantics for what hypercorn and ASGI apps use: FIFO items, `put` waits
while `maxsize` items are queued (maxsize <= 0: unbounded), waiters woken in
order, cancellation-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def _wake_first(waiters: list[asyncio.Future[None]] | None) -> None:
    if waiters:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
                return


class LeanQueue(Generic[T]):
    __slots__ = ("_getters", "_items", "_maxsize", "_putters")

    def __init__(self, maxsize: int = 0) -> None:
        self._maxsize = maxsize
        self._items: list[T] = []
        self._getters: list[asyncio.Future[None]] | None = None
        self._putters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def _full(self) -> bool:
        return 0 < self._maxsize <= len(self._items)

    async def put(self, item: T) -> None:
        while self._full():
            if self._putters is None:
                self._putters = []
            await _wait_in(self._putters, lambda: not self._full())
        self._items.append(item)
        _wake_first(self._getters)

    def put_nowait(self, item: T) -> None:
        if self._full():
            raise asyncio.QueueFull
        self._items.append(item)
        _wake_first(self._getters)

    def interrupt(self, item: T) -> None:
        """Queue `item` even when full: the consumer's own wake-up call."""
        self._items.append(item)
        _wake_first(self._getters)

    async def get(self) -> T:
        while not self._items:
            if self._getters is None:
                self._getters = []
            await _wait_in(self._getters, lambda: bool(self._items))
        item = self._items.pop(0)
        _wake_first(self._putters)
        return item


class LeanEvent:
    """hypercorn's Event protocol (async set/clear/wait, is_set)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    async def set(self) -> None:
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def clear(self) -> None:
        self._value = False

    async def wait(self) -> None:
        if self._value:
            return
        if self._waiters is None:
            self._waiters = []
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


async def _wait_in(waiters: list[asyncio.Future[None]], still_wanted: Callable[[], bool]) -> None:
    """Park in `waiters` until woken. A waiter cancelled after being woken passes
    the wake-up on, so no other waiter is left asleep with work to do."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled() and still_wanted():
            _wake_first(waiters)
        raise
    waiters.remove(waiter)
