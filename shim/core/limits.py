"""Rate limits as pure state machines over an injected clock: a token bucket per
connection (commands) and a bounded table of buckets per channel (publications);
the Pacer that slices a large request's work, and the WorkPacer that spreads the
commands of all connections over loop iterations.

No I/O here: the sessions, the ingest path and the server API ask and act on the
answer (Centrifugo's codes: error 111 "too many requests", disconnect 3013).
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


class Verdict(enum.Enum):
    ALLOW = "allow"
    # Over the limit: refuse this one (error 111 / a dropped legacy frame).
    REFUSE = "refuse"
    # Still sending after as many refusals as the burst: disconnect (3013).
    DISCONNECT = "disconnect"


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up. Each command takes one; a
    command finding the bucket empty is refused but still counted as debt, so a
    client that keeps sending into an empty bucket reaches -burst and is dropped,
    while one that only overshoots briefly pays the debt back by waiting."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = now

    def take(self, now: float) -> Verdict:
        elapsed = now - self._at
        self._at = now
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._tokens -= 1.0
        if self._tokens >= 0:
            return Verdict.ALLOW
        if self._tokens >= -self.burst:
            return Verdict.REFUSE
        return Verdict.DISCONNECT


class ChannelRates:
    """Publications per second per channel, one bucket per channel that published
    lately. A bucket that has refilled completely is the same as no bucket, so
    buckets idle for longer than `burst / rate` seconds are dropped (the oldest
    first, a few per call) and the table never holds more than `max_channels`."""

    __slots__ = ("_buckets", "_refill_seconds", "burst", "exempt", "max_channels", "rate")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        exempt: Iterable[str] = (),
        max_channels: int = 100_000,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.exempt = frozenset(exempt)
        self.max_channels = max_channels
        self._refill_seconds = self.burst / rate if rate > 0 else 0.0
        # channel -> (tokens, last update), ordered by last update (oldest first).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, channels: Iterable[str], now: float) -> str | None:
        """Take one token from every channel's bucket, or none: None when taken, else
        the first channel over its limit (nothing is taken then)."""
        if self.rate <= 0:
            return None
        wanted = [c for c in dict.fromkeys(channels) if c not in self.exempt]
        levels = []
        for channel in wanted:
            tokens = self._level(channel, now)
            if tokens < 1.0:
                return channel
            levels.append(tokens)
        for channel, tokens in zip(wanted, levels, strict=True):
            self._buckets.pop(channel, None)
            self._buckets[channel] = (tokens - 1.0, now)
        self._prune(now)
        return None

    def _level(self, channel: str, now: float) -> float:
        entry = self._buckets.get(channel)
        if entry is None:
            return float(self.burst)
        tokens, at = entry
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate)

    def _prune(self, now: float) -> None:
        buckets = self._buckets
        while len(buckets) > self.max_channels:
            buckets.popitem(last=False)
        # A few idle ones per call keep pace with the new buckets of one ingest item.
        for _ in range(4):
            if not buckets:
                return
            channel, (_tokens, at) = next(iter(buckets.items()))
            if now - at < self._refill_seconds:
                return
            del buckets[channel]


class Pacer:
    """Cooperative slicing of one request's long work (a 1,000-item ingest, a large
    server API batch): after `budget` seconds of work it pauses `pause` seconds, or
    as long as the work was if that is longer. A bare yield per chunk is not enough:
    another request needs a dozen loop iterations to get through (parse, route,
    handler, publish, flush), and it would get one per chunk; during a pause it gets
    all of them. The budget bounds what a bystander's event waits behind (issue 10's
    abuse scenario: a 4 ms budget over 100-event chunks made 9 ms steps, about
    doubling a bystander's p99)."""

    __slots__ = ("_since", "budget", "pause")

    def __init__(self, budget: float = 0.002, pause: float = 0.002) -> None:
        self.budget = budget
        self.pause = pause
        self._since = time.perf_counter()

    def due(self) -> bool:
        """The budget is spent: the next `tick` pauses. Checked without awaiting, for
        loops too short per step to pay for a coroutine each."""
        return time.perf_counter() - self._since >= self.budget

    async def tick(self) -> None:
        worked = time.perf_counter() - self._since
        if worked >= self.budget:
            # One step may run past the budget (a chunk of events is not cut), and on a
            # slower machine a bystander's request needs more loop time to get through
            # too: pausing at least as long as the step keeps this work to half the loop.
            await asyncio.sleep(max(self.pause, worked))
            self._since = time.perf_counter()


class WorkPacer:
    """One budget of loop time shared by the commands of every connection. Twenty
    clients each sending a frame of forty subscribes at the same instant hold the
    loop for about 10 ms in one go, and a bystander's delivery waits behind all of
    it although the process is mostly idle (issue 10's churn probe). After `budget`
    seconds of command work with no `gap` of quiet in between (or as long as that
    work, if longer), commands wait in steps of `pause` seconds before they start,
    so deliveries go out in between.

    Commands that overlap in time (one awaiting the engine while another runs) are
    charged once for the overlap. A waiter checks again after its pause: those
    resuming together start one by one until the budget is spent again."""

    __slots__ = ("_clock", "_counted_until", "_spent", "budget", "gap", "pause")

    def __init__(
        self,
        budget: float = 0.002,
        pause: float = 0.002,
        gap: float = 0.002,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget = budget
        self.pause = pause
        self.gap = gap
        self._clock = clock
        self._spent = 0.0
        self._counted_until = -math.inf

    def must_wait(self) -> bool:
        # The quiet that gives the budget back is at least as long as the work done
        # since the last one (a command may run past the budget): at most half the loop.
        if self._clock() - self._counted_until >= max(self.gap, self._spent):
            self._spent = 0.0
            return False
        return self._spent >= self.budget

    async def wait(self) -> None:
        """Called when `must_wait`: pauses until the next command may start. (Not an
        Event: the budget comes back with time passing, nobody sets it.)"""
        while True:
            await asyncio.sleep(self.pause)
            if not self.must_wait():
                return

    def charge(self, started: float, ended: float) -> None:
        """A command ran from `started` to `ended` (on this pacer's clock)."""
        started = max(started, self._counted_until)
        if ended > started:
            self._spent += ended - started
            self._counted_until = ended

    def now(self) -> float:
        return self._clock()
