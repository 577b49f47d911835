"""The embedded single-node engine: history streams and presence in process memory.

Publish never awaits, so offsets are assigned atomically in call order and the
handler hears publications of one channel in offset order. Memory stays bounded:
a stream exists only once something was published to its channel (subscribing to
or reading a fresh channel costs nothing), a channel keeps at most `history_size`
publications, a stream whose meta TTL passed is dropped when touched or by a small
sweep run on every publish, and at most `max_streams` streams are kept (the least
recently published goes first).

A channel without a stream reads as offset 0 in the broker's current "blank" epoch.
Its first publish makes a stream with an epoch of its own, remembering the blank
epoch it was born from, so a subscriber positioned on the blank epoch can still
recover from it. Dropping a stream born from the current blank epoch starts a new
one: a position in an old blank epoch can then never be taken for a later stream.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from shim.core.broker import (
    BrokerEventHandler,
    BrokerUnavailable,
    ClientInfo,
    Fence,
    HistoryResult,
    PresenceStats,
    Publication,
    PublishOptions,
    StreamPosition,
    Superseded,
    UnrecoverablePosition,
)

# Streams examined from the oldest end on every publish; each creates at most one, so
# dropping up to two keeps pace.
_SWEEP_BATCH = 2


def new_epoch() -> str:
    """12 URL-safe characters (72 bits) from the OS CSPRNG, so a reset stream's epoch
    differs from the old one with overwhelming probability."""
    return secrets.token_urlsafe(9)


# A history entry: (monotonic expiry, offset, the publication as published). A plain
# tuple, not a class: one is made per channel per event, and a tuple costs a fraction
# of an object to make. The publication with its offset is made for a reader only (a
# local subscriber, a history read): most publications of most channels have none.
_Entry = tuple[float, int, Publication]


@dataclass(slots=True)
class _Stream:
    epoch: str
    meta_expires_at: float
    # The broker's blank epoch when the stream was made: positions taken before it.
    born: str = ""
    top: int = 0
    # Made on the first publish: most streams (e.g. every user's personal channel,
    # looked at by its subscribe) never hold anything, and an empty deque is ~0.7 KiB.
    entries: deque[_Entry] | None = None


class MemoryBroker:
    """Broker for one node. `clock` is monotonic seconds, injectable for tests."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_streams: int = 100_000
    ) -> None:
        self._clock = clock
        self.max_streams = max_streams
        # The epoch channels without a stream read in (see the module docstring).
        self._blank = new_epoch()
        self._handler: BrokerEventHandler | None = None
        self._closed = False
        self._subscribed: set[str] = set()
        # Ordered by last publish (re-inserted on each), so the oldest are in front.
        # An OrderedDict, not a dict: streams are popped and re-inserted on every
        # publish, and a dict's iteration from the front walks the holes that leaves
        # (the sweep looks at the front on every publish).
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        # Streams holding publications: channel -> when its newest one expires, in
        # order of last publish. The sweep empties those whose newest expired, so an
        # idle channel's history goes after its TTL, not with its meta (7 days).
        self._held: OrderedDict[str, float] = OrderedDict()
        # (channel, fence source) -> (last position, expiry), oldest refresh first.
        self._fences: OrderedDict[tuple[str, str], tuple[tuple[int, int, int], float]] = (
            OrderedDict()
        )

    async def start(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._closed = True
        self._handler = None
        self._subscribed.clear()
        self._streams.clear()
        self._held.clear()
        self._fences.clear()

    async def publish(
        self, channel: str, pub: Publication, options: PublishOptions
    ) -> StreamPosition:
        self._check_open()
        now = self._clock()
        self._sweep(now, _SWEEP_BATCH)
        return self._publish(channel, pub, options, now)

    def _publish(
        self, channel: str, pub: Publication, options: PublishOptions, now: float
    ) -> StreamPosition:
        if options.history_size <= 0 or options.history_ttl_seconds <= 0:
            self._deliver(channel, pub, "")
            return StreamPosition(0, "")
        streams = self._streams
        stream = streams.get(channel)
        if stream is not None and stream.meta_expires_at <= now:
            del streams[channel]
            self._dropped(stream)
            stream = None
        if stream is None:
            stream = streams[channel] = _Stream(
                epoch=new_epoch(), meta_expires_at=0.0, born=self._blank
            )
            while len(streams) > self.max_streams:
                _channel, oldest = streams.popitem(last=False)
                self._dropped(oldest)
        else:
            streams.move_to_end(channel)
        top = stream.top = stream.top + 1
        stream.meta_expires_at = now + options.history_meta_ttl_seconds
        entries = stream.entries
        if entries is None:
            entries = stream.entries = deque()
        expires_at = now + options.history_ttl_seconds
        entries.append((expires_at, top, pub))
        held = self._held
        held[channel] = expires_at
        held.move_to_end(channel)
        while len(entries) > options.history_size:
            entries.popleft()
        if entries[0][0] <= now:
            _drop_expired_front(entries, now)
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_publication(channel, _at(pub, top), stream.epoch)
        return StreamPosition(top, stream.epoch)

    async def publish_many(
        self,
        items: Sequence[tuple[str, Publication, PublishOptions]],
        fences: Sequence[Fence | None] = (),
    ) -> list[StreamPosition | Superseded | BrokerUnavailable]:
        # Nothing here awaits, so the batch runs in one go: one clock read, and one
        # sweep that keeps pace with the streams the batch may make.
        try:
            self._check_open()
        except BrokerUnavailable as error:
            return [error] * len(items)
        now = self._clock()
        self._sweep(now, _SWEEP_BATCH * len(items))
        results: list[StreamPosition | Superseded | BrokerUnavailable] = []
        append = results.append
        publish = self._publish
        for index, (channel, pub, options) in enumerate(items):
            if fences:
                fence = fences[index]
                if fence is not None and not self._pass_fence(channel, fence):
                    append(Superseded())
                    continue
            append(publish(channel, pub, options, now))
        return results

    def _pass_fence(self, channel: str, fence: Fence) -> bool:
        """Record the fence's position for the channel unless it has it or a later one."""
        self._check_open()
        now = self._clock()
        key = (channel, fence.source)
        known = self._fences.pop(key, None)
        # Oldest first, like _streams: drop up to two whose time passed.
        for old_key, (_position, expires_at) in list(islice(self._fences.items(), _SWEEP_BATCH)):
            if expires_at > now:
                break
            del self._fences[old_key]
        if known is not None and known[1] > now and known[0] >= fence.position:
            self._fences[key] = known
            return False
        self._fences[key] = (fence.position, now + fence.ttl_seconds)
        if len(self._fences) > self.max_streams:  # bounded like the streams
            self._fences.popitem(last=False)
        return True

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        self._check_open()
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_join(channel, info)

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        self._check_open()
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_leave(channel, info)

    async def subscribe(self, channel: str) -> None:
        self._check_open()
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
        options: PublishOptions | None = None,
    ) -> HistoryResult:
        self._check_open()
        now = self._clock()
        stream = self._streams.get(channel)
        if stream is not None and stream.meta_expires_at <= now:
            del self._streams[channel]
            self._dropped(stream)
            stream = None
        if stream is None:
            # Nothing is made for a read: the channel is at 0 in the blank epoch.
            if since is not None and since.offset and since.epoch != self._blank:
                raise UnrecoverablePosition(channel)
            return HistoryResult([], StreamPosition(0, self._blank))
        position = StreamPosition(stream.top, stream.epoch)
        if (
            since is not None
            and since.epoch
            and since.epoch not in (stream.epoch, stream.born)
            and since.offset
        ):
            # (At offset 0 nothing was seen yet, so any epoch is a position before the
            # first publication.)
            raise UnrecoverablePosition(channel)
        if limit == 0:
            return HistoryResult([], position)
        stored = stream.entries or ()
        entries = reversed(stored) if reverse else iter(stored)
        # TTLs may differ between publishes, so expiry is not monotonic: check every entry.
        live = ((offset, pub) for expires_at, offset, pub in entries if expires_at > now)
        if since is not None:
            bound = since.offset
            live = ((o, p) for o, p in live if (o < bound if reverse else o > bound))
        selected = [
            _at(pub, offset) for offset, pub in (live if limit < 0 else islice(live, limit))
        ]
        return HistoryResult(selected, position)

    async def remove_history(self, channel: str) -> None:
        self._check_open()
        stream = self._streams.pop(channel, None)
        if stream is not None:
            self._dropped(stream)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def _dropped(self, stream: _Stream) -> None:
        if stream.born == self._blank:
            # Its channel reads as blank again: a position it gave out under the blank
            # epoch must not be taken for a later stream of the same channel.
            self._blank = new_epoch()

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("memory broker is closed")

    def _deliver(self, channel: str, pub: Publication, epoch: str) -> None:
        if self._handler is not None and channel in self._subscribed:
            self._handler.on_publication(channel, pub, epoch)

    def _sweep(self, now: float, batch: int) -> None:
        """Drop up to `batch` streams whose meta TTL passed, and empty up to `batch`
        whose publications all expired, least recently published first."""
        held = self._held
        for _ in range(batch):
            if not held:
                break
            channel, expires_at = next(iter(held.items()))
            if expires_at > now:
                break
            del held[channel]
            stream = self._streams.get(channel)
            if stream is not None:
                stream.entries = None
        streams = self._streams
        for _ in range(batch):
            if not streams:
                return
            channel = next(iter(streams))
            stream = streams[channel]
            if stream.meta_expires_at > now:
                return
            del streams[channel]
            self._dropped(stream)


def _at(pub: Publication, offset: int) -> Publication:
    return Publication(pub.data, offset, pub.info, pub.time_ms, pub.legacy)


def _drop_expired_front(entries: deque[_Entry], now: float) -> None:
    while entries and entries[0][0] <= now:
        entries.popleft()


class MemoryPresenceManager:
    """Presence for one node: channel -> client id -> ClientInfo. No TTL: the node
    removes an entry when its client leaves, and the process holds no other nodes'."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, ClientInfo]] = {}

    async def add_presence(self, channel: str, client_id: str, info: ClientInfo) -> None:
        self._channels.setdefault(channel, {})[client_id] = info

    async def remove_presence(self, channel: str, client_id: str, user: str) -> None:
        clients = self._channels.get(channel)
        if clients is None:
            return
        clients.pop(client_id, None)
        if not clients:
            del self._channels[channel]

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return dict(self._channels.get(channel, {}))

    async def presence_stats(self, channel: str) -> PresenceStats:
        clients = self._channels.get(channel, {})
        return PresenceStats(
            num_clients=len(clients),
            num_users=len({info.user for info in clients.values()}),
        )
