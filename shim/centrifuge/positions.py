"""The periodic position check of positioned subscriptions (Centrifuge's
ClientChannelPositionCheckDelay).

A publication can reach the engine's history and never reach this node (a Redis
pub/sub message lost while the node's PUB/SUB connection reconnected). A later
publication in the channel shows the gap to `Subscription.deliver`; when nothing
follows it, only asking the engine for the stream top can. Every
`client_channel_position_check_delay_seconds` each channel with positioned
subscribers here gets one stream-top read, shared by all of them. A subscription
found behind is given until the next check to receive what was missing (it may have
been in flight to this node); still missing it then, its client is told its state is
insufficient (unsubscribe push 2500, or disconnect 3010 for a server-side
subscription) and resubscribes, recovering from history.

Checks run on a task of their own, a bounded batch of channels per event-loop
iteration, and never on the publish path.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from collections import deque
from typing import TYPE_CHECKING

from shim.core.broker import StreamPosition
from shim.core.node import Node
from shim.core.session import SessionState

if TYPE_CHECKING:
    from shim.centrifuge.subscriptions import Subscription

log = logging.getLogger(__name__)

# Channels whose stream tops are read together, then compared, before the checker
# lets the loop run other work.
CHANNELS_PER_BATCH = 64
# Subscriptions of one channel compared per loop iteration.
SUBSCRIPTIONS_PER_STEP = 512
# What a subscription misses when its stream's epoch changed: more than any offset.
RESET = 1 << 62


class Verdict(enum.Enum):
    IN_SYNC = "in_sync"
    BEHIND = "behind"  # seen behind now: given until the next check
    INSUFFICIENT = "insufficient"


def check_position(sub: Subscription, top: StreamPosition) -> Verdict:
    """Compare the position delivered to `sub` with the stream top read from the
    engine, and remember what it was behind on; called once per check."""
    if sub.offset and top.epoch != sub.epoch:
        # The stream was reset: no publication can bring the client back to it.
        missing_until = RESET
    else:
        # A subscription that saw the stream empty holds no epoch until its first
        # publication (the engine makes the stream on the first publish).
        missing_until = top.offset if top.offset > sub.offset else 0
    if not missing_until:
        sub.missing_until = 0
        return Verdict.IN_SYNC
    if sub.missing_until and sub.offset < sub.missing_until:
        # Still without what was already missing one whole check ago.
        return Verdict.INSUFFICIENT
    # Newly behind (or behind only on what came since the last check): what the top
    # shows may be on its way to this node right now.
    sub.missing_until = missing_until
    return Verdict.BEHIND


class PositionChecker:
    """One per node: the live positioned subscriptions by channel, and the check
    schedule. Its task runs while there is anything to check."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # A channel's one subscription itself, or a dict of them once there are two:
        # most positioned channels are personal ones with a single subscriber, and a
        # dict per connection would cost about 0.2 KiB.
        self._subscribers: dict[str, Subscription | dict[Subscription, None]] = {}
        # (due time, channel) in due order: the delay is the same for every channel.
        self._schedule: deque[tuple[float, str]] = deque()
        self._due: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def delay(self) -> float:
        return self.node.settings.client_channel_position_check_delay_seconds

    def add(self, sub: Subscription) -> None:
        if self.delay <= 0:
            return
        held = self._subscribers.get(sub.channel)
        if held is None:
            self._subscribers[sub.channel] = sub
            self._plan(sub.channel, asyncio.get_running_loop().time() + self.delay)
        elif isinstance(held, dict):
            held[sub] = None
        elif held is not sub:
            self._subscribers[sub.channel] = {held: None, sub: None}
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="shim-position-check"
            )

    def discard(self, sub: Subscription) -> None:
        held = self._subscribers.get(sub.channel)
        if held is None:
            return
        if isinstance(held, dict):
            if held.pop(sub, False) is not None or held:
                return
        elif held is not sub:
            return
        del self._subscribers[sub.channel]
        self._due.pop(sub.channel, None)
        if not self._subscribers:
            self._stop()

    def _stop(self) -> None:
        # Nothing left to check: no task outlives the node's last subscriber.
        self._schedule.clear()
        if self._task is not None:
            if self._task is not asyncio.current_task():
                self._task.cancel()
            self._task = None

    def _plan(self, channel: str, due: float) -> None:
        self._due[channel] = due
        self._schedule.append((due, channel))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # A checker stopped (and maybe restarted by a new subscriber) ends its old task.
        while self._subscribers and self._task is asyncio.current_task():
            now = loop.time()
            batch: list[str] = []
            while self._schedule and len(batch) < CHANNELS_PER_BATCH:
                due, channel = self._schedule[0]
                if self._due.get(channel) != due:
                    self._schedule.popleft()  # left since, or planned again later
                    continue
                if due > now:
                    break
                self._schedule.popleft()
                batch.append(channel)
            if not batch:
                wait = self._schedule[0][0] - now if self._schedule else self.delay
                await asyncio.sleep(max(wait, 0.01))
                continue
            for channel in batch:
                self._plan(channel, now + self.delay)
            tops = await asyncio.gather(
                *(self._stream_top(channel) for channel in batch), return_exceptions=True
            )
            for channel, top in zip(batch, tops, strict=True):
                if isinstance(top, StreamPosition):
                    await self._compare(channel, top)
                # An engine error: checked again at the next due time.

    def _subscribed(self, channel: str) -> list[Subscription]:
        held = self._subscribers.get(channel)
        if held is None:
            return []
        return list(held) if isinstance(held, dict) else [held]

    def _holds(self, channel: str, sub: Subscription) -> bool:
        held = self._subscribers.get(channel)
        return sub in held if isinstance(held, dict) else held is sub

    async def _stream_top(self, channel: str) -> StreamPosition:
        node = self.node
        result = await node.broker.history(channel, limit=0, options=node.publish_options(channel))
        return result.position

    async def _compare(self, channel: str, top: StreamPosition) -> None:
        subscribers = self._subscribed(channel)
        for start in range(0, len(subscribers), SUBSCRIPTIONS_PER_STEP):
            if start:
                await asyncio.sleep(0)
            for sub in subscribers[start : start + SUBSCRIPTIONS_PER_STEP]:
                session = sub.session
                if sub.buffer is not None or session.state is SessionState.CLOSED:
                    continue
                if not self._holds(channel, sub):
                    continue  # unsubscribed while an earlier step yielded
                if check_position(sub, top) is Verdict.INSUFFICIENT:
                    log.info(
                        "position check failed: insufficient state",
                        extra={"client": session.client_id, "channel": channel},
                    )
                    session.lost_position(sub)


_checkers: weakref.WeakKeyDictionary[Node, PositionChecker] = weakref.WeakKeyDictionary()


def position_checker(node: Node) -> PositionChecker:
    checker = _checkers.get(node)
    if checker is None:
        checker = _checkers[node] = PositionChecker(node)
    return checker
