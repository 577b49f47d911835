"""The node: local sessions, which channels they hold, and the publish path.

Publishing goes through the Broker (which stores history and reaches every node);
the broker hands each publication back to `on_publication`, which hands it to each
protocol's Fanout (injected by the composition root) with that protocol's local
subscribers; the fanout encodes it once and appends the same bytes to every one of
their outboxes. The node knows no protocol. No socket is ever awaited here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from shim.core.broker import (
    Broker,
    BrokerUnavailable,
    ClientInfo,
    Fence,
    LegacyFrame,
    PresenceManager,
    Publication,
    PublishOptions,
    StreamPosition,
    Superseded,
)
from shim.core.config import NamespaceOptions, Settings
from shim.core.limits import ChannelRates, WorkPacer
from shim.core.outbox import Flusher
from shim.core.session import Session

log = logging.getLogger("shim.node")


class Subscriber(Protocol):
    """One client's hold on one channel (a Centrifuge subscription, a legacy session)."""

    @property
    def protocol(self) -> str:
        """The protocol whose Fanout delivers to it (Fanout.protocol)."""
        ...

    # Wants deltas: the channel then keeps its last publication as the next one's base.
    delta: bool


class Fanout(Protocol):
    """One protocol's share of the publish path: it turns a publication into what
    its subscribers take, encoding once however many they are, and appends it to
    each of them. Never awaits."""

    # Counter label and the Subscriber.protocol it serves ("channels", "legacy").
    protocol: str

    def publish(
        self,
        channel: str,
        pub: Publication,
        epoch: str,
        *,
        moved: bool,
        missed: bool,
        base: Publication | None,
        subscribers: Sequence[Any],
    ) -> bool:
        """Deliver `pub` (made in `epoch`; `moved`: not the offset after the last one
        dispatched here; `missed`: offsets of this epoch before it never reached this
        node; `base`: the channel's previous publication, kept while a subscriber
        wants deltas). True when it counts as a publication for them."""
        ...

    def control(
        self, channel: str, info: ClientInfo, join: bool, subscribers: Sequence[Any]
    ) -> None:
        """A join or leave of `channel` (for subscribers that asked for them)."""
        ...


class NodeCounters:
    """Plain integers bumped on hot paths (a Prometheus counter per delivery would
    take a lock per subscriber); /metrics reads them at scrape time."""

    __slots__ = ("broker_errors", "deliveries", "disconnects", "limited", "publications")

    def __init__(self, protocols: Iterable[str] = ()) -> None:
        # Messages appended to client queues, by protocol ("channels" / "legacy").
        self.deliveries = dict.fromkeys(protocols, 0)
        # Publications the broker handed to this node that reached at least one local
        # subscriber of that protocol (one reaching both counts once in each).
        self.publications = dict.fromkeys(self.deliveries, 0)
        # (protocol, close code) -> server-initiated disconnects.
        self.disconnects: dict[tuple[str, int], int] = {}
        # Broker operation -> failures.
        self.broker_errors: dict[str, int] = {}
        # Limit -> requests, commands or items refused by it (see shim.core.limits).
        self.limited: dict[str, int] = {}

    def refused(self, limit: str) -> None:
        self.limited[limit] = self.limited.get(limit, 0) + 1

    def disconnected(self, protocol: str, code: int) -> None:
        key = (protocol, code)
        self.disconnects[key] = self.disconnects.get(key, 0) + 1

    def broker_failed(self, operation: str) -> None:
        self.broker_errors[operation] = self.broker_errors.get(operation, 0) + 1


class Observer(Protocol):
    """Where timings go (Prometheus histograms in production, nothing in unit tests)."""

    def command(self, method: str, seconds: float) -> None: ...

    def publish_to_enqueue(self, seconds: float) -> None: ...


class _NoObserver:
    def command(self, method: str, seconds: float) -> None:
        pass

    def publish_to_enqueue(self, seconds: float) -> None:
        pass


class _Channel:
    __slots__ = ("delta_subscribers", "epoch", "groups", "last", "offset", "ready")

    def __init__(self, protocols: int) -> None:
        # The broker subscribe, until it has succeeded (then None: a finished task
        # kept per channel would cost every personal channel ~0.5 KiB).
        self.ready: asyncio.Task[None] | None = None
        # Subscribers by protocol, in the node's fanout order; a protocol's dict is
        # made by its first subscriber (most channels only ever have one protocol).
        self.groups: list[dict[Subscriber, None] | None] = [None] * protocols
        # The last publication, kept (as the next one's delta base) only while a
        # subscriber wants deltas.
        self.delta_subscribers = 0
        self.last: Publication | None = None
        # Stream position of the last publication dispatched here (offset 0: none yet,
        # or the channel keeps no history).
        self.offset = 0
        self.epoch = ""

    def empty(self) -> bool:
        return not any(self.groups)

    def count(self) -> int:
        return sum(len(group) for group in self.groups if group)


def _forget_when_subscribed(entry: _Channel, task: asyncio.Task[None]) -> None:
    if entry.ready is task and not task.cancelled() and task.exception() is None:
        entry.ready = None


# Sessions ticked in one go: a quiet session's tick is a few microseconds, one
# renewing presence or sending a ping a few more, so a slice is well under a
# millisecond. The slices of a round are spread over half the tick_interval, at
# least TICK_PAUSE apart (5,000 sessions: 100 slices 5 ms apart).
TICK_SLICE = 50
TICK_PAUSE = 0.001
TICK_SPREAD = 0.5


class Node:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        presence: PresenceManager,
        *,
        fanouts: Sequence[Fanout],
        tick_interval: float = 1.0,
    ) -> None:
        self.settings = settings
        # One per protocol served, in delivery order.
        self.fanouts = tuple(fanouts)
        self._group_of = {fanout.protocol: index for index, fanout in enumerate(self.fanouts)}
        self.broker = broker
        self.presence = presence
        self.name = settings.node_name or f"{socket.gethostname()}:{os.getpid()}"
        self.tick_interval = tick_interval
        # Every open session; the ticker visits each about once per tick_interval.
        self.sessions: dict[Session, None] = {}
        self._channels: dict[str, _Channel] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.counters = NodeCounters(self._group_of)
        # Writes queued messages straight to idle sockets once per loop iteration.
        self.flusher = Flusher(settings.client_write_delay_seconds)
        self.observer: Observer = _NoObserver()
        # Connections per user id on this node (client_user_connection_limit).
        self.user_connections: dict[str, int] = {}
        self._publish_options: dict[str, PublishOptions] = {}
        # Commands of all connections share one work budget (see WorkPacer).
        self.command_pacer = WorkPacer()
        self.publish_rates = ChannelRates(
            settings.channel_publish_rate_limit,
            settings.channel_publish_burst,
            exempt=(settings.global_channel,),
        )

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        self._ticker = asyncio.create_task(self._tick_forever(), name="shim-ticker")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.broker.close()

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.tick_interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            # The next round is due an interval after this one began, however many
            # loop iterations its slices take: each session is ticked about once per
            # tick_interval still.
            due = loop.time() + self.tick_interval
            await self.tick_round(self.tick_interval * TICK_SPREAD)

    async def tick_round(self, spread: float = 0.0) -> None:
        """Tick every session open now, TICK_SLICE at a time, the slices spread over
        `spread` seconds and at least TICK_PAUSE apart: 5,000 sessions ticked in one
        loop iteration held every publication arriving meanwhile behind them. A
        session gone by its turn is skipped."""
        loop = asyncio.get_running_loop()
        sessions = list(self.sessions)
        pause = max(TICK_PAUSE, spread * TICK_SLICE / len(sessions)) if sessions else 0.0
        for start in range(0, len(sessions), TICK_SLICE):
            if start:
                # A pause, not a bare yield: a request needs a dozen loop iterations to
                # get from its socket to its subscribers, and got one per slice
                # (measured: publications arriving during a round waited 30-40 ms
                # with 200-session slices 1 ms apart; 6 ms p99 without ticks).
                await asyncio.sleep(pause)
            now, wall = loop.time(), time.time()
            live = self.sessions
            for session in sessions[start : start + TICK_SLICE]:
                if session not in live:
                    continue
                try:
                    session.tick(now, wall)
                except Exception:  # one broken session must not stop the ticker
                    log.exception("tick failed")

    # -- sessions and channels ---------------------------------------------------

    def add_session(self, session: Session) -> None:
        self.sessions[session] = None

    def remove_session(self, session: Session) -> None:
        self.sessions.pop(session, None)

    def user_at_limit(self, user: str) -> bool:
        """True when `user` already holds client_user_connection_limit connections
        here (anonymous connections are not limited, as in Centrifugo)."""
        limit = self.settings.client_user_connection_limit
        if limit and user and self.user_connections.get(user, 0) >= limit:
            self.counters.refused("user_connection_limit")
            return True
        return False

    def user_connected(self, user: str) -> None:
        if user:
            self.user_connections[user] = self.user_connections.get(user, 0) + 1

    def user_disconnected(self, user: str) -> None:
        count = self.user_connections.get(user, 0) - 1
        if count > 0:
            self.user_connections[user] = count
        else:
            self.user_connections.pop(user, None)

    def over_publish_rate(self, channels: Iterable[str]) -> str | None:
        """Take a publication from each channel's rate budget: None when taken, else
        the first channel over channel_publish_rate_limit (nothing taken then)."""
        if not self.publish_rates.enabled:
            return None
        over = self.publish_rates.take(channels, time.monotonic())
        if over is not None:
            self.counters.refused("channel_publish_rate")
        return over

    def namespace(self, channel: str) -> NamespaceOptions | None:
        return self.settings.namespace_for(channel)

    def publish_options(self, channel: str) -> PublishOptions:
        # One shared PublishOptions per namespace: this runs for every channel of
        # every published event.
        name, sep, _ = channel.partition(":")
        key = name if sep else ""
        cached = self._publish_options.get(key)
        if cached is None:
            options = self.namespace(channel)
            if options is None or not options.history_enabled:
                cached = PublishOptions()
            else:
                cached = PublishOptions(
                    history_size=options.history_size,
                    history_ttl_seconds=options.history_ttl_seconds,
                )
            self._publish_options[key] = cached
        return cached

    async def attach(self, channel: str, subscriber: Subscriber) -> None:
        """Deliver `channel` to `subscriber` (through its protocol's fanout) from now on."""
        index = self._group_of[subscriber.protocol]
        entry = await self._acquire(channel)
        group = entry.groups[index]
        if group is None:
            group = entry.groups[index] = {}
        if subscriber not in group and subscriber.delta:
            entry.delta_subscribers += 1
        group[subscriber] = None

    async def _acquire(self, channel: str) -> _Channel:
        entry = self._channels.get(channel)
        if entry is None:
            # Registered before the broker subscribe is awaited, so concurrent attaches
            # share it; they all wait for the same subscribe to finish.
            entry = self._channels[channel] = _Channel(len(self.fanouts))
            entry.ready = asyncio.get_running_loop().create_task(self.broker.subscribe(channel))
            entry.ready.add_done_callback(functools.partial(_forget_when_subscribed, entry))
        if entry.ready is None:
            return entry
        try:
            await asyncio.shield(entry.ready)
        except Exception:
            if self._channels.get(channel) is entry and entry.empty():
                del self._channels[channel]
            raise
        return entry

    def seed_delta_base(self, channel: str, pub: Publication) -> None:
        """A delta subscriber recovered up to `pub`: when nothing was published here
        since it attached, `pub` is the channel's latest, so the next publication can
        go to it as a delta too (the channel may be new on this node)."""
        entry = self._channels.get(channel)
        if entry is not None and entry.delta_subscribers and entry.last is None:
            entry.last = pub

    def detach(self, channel: str, subscriber: Subscriber) -> None:
        """Stop delivering; the broker unsubscribe of an emptied channel runs in the background."""
        entry = self._channels.get(channel)
        if entry is not None:
            group = entry.groups[self._group_of[subscriber.protocol]]
            if group is not None and group.pop(subscriber, False) is None and subscriber.delta:
                entry.delta_subscribers -= 1
                if not entry.delta_subscribers:
                    entry.last = None
            self._release_if_empty(channel, entry)

    def _release_if_empty(self, channel: str, entry: _Channel) -> None:
        if entry.empty() and self._channels.get(channel) is entry:
            # The broker sees unsubscribe and any later subscribe in call order.
            del self._channels[channel]
            task = asyncio.get_running_loop().create_task(self._release(channel))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release(self, channel: str) -> None:
        try:
            await self.broker.unsubscribe(channel)
        except Exception:
            log.warning("broker unsubscribe failed", extra={"channel": channel})

    def dispatched_position(self, channel: str) -> StreamPosition | None:
        """Where `channel`'s stream stands for this node's local clients: the position
        of the last publication dispatched to them (None before the first one, or
        without history). Every later publication is dispatched after this call."""
        entry = self._channels.get(channel)
        if entry is None or not entry.offset:
            return None
        return StreamPosition(entry.offset, entry.epoch)

    def channels(self) -> Iterable[str]:
        return self._channels.keys()

    def subscriber_count(self, channel: str) -> int:
        entry = self._channels.get(channel)
        return 0 if entry is None else entry.count()

    # -- publishing --------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        legacy: LegacyFrame | None = None,
    ) -> StreamPosition:
        pub = Publication(data=data, info=info, time_ms=time.time_ns() // 1_000_000, legacy=legacy)
        try:
            return await self.broker.publish(channel, pub, self.publish_options(channel))
        except BrokerUnavailable:
            self.counters.broker_failed("publish")
            raise

    async def publish_many(
        self,
        items: Sequence[tuple[str, bytes, LegacyFrame | None]],
        fences: Sequence[Fence | None] = (),
    ) -> list[StreamPosition | Superseded | BrokerUnavailable]:
        """Publish (channel, data, legacy tag) items in order, in as few round trips as
        the engine allows; a result per item. `fences`: one per item, or none (see
        Broker.publish_many)."""
        time_ms = time.time_ns() // 1_000_000
        options = self.publish_options
        results = await self.broker.publish_many(
            [
                (channel, Publication(data, 0, None, time_ms, legacy), options(channel))
                for channel, data, legacy in items
            ],
            fences,
        )
        for result in results:
            if isinstance(result, BrokerUnavailable):
                self.counters.broker_failed("publish")
        return results

    # BrokerEventHandler: called on the loop, never awaits.

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return
        counters = self.counters
        previous = entry.offset
        moved = bool(pub.offset) and (pub.offset != previous + 1 or epoch != entry.epoch)
        # Lost between the broker and here (e.g. during a pub/sub reconnect).
        missed = moved and bool(previous) and epoch == entry.epoch and pub.offset > previous + 1
        if pub.offset:
            entry.offset, entry.epoch = pub.offset, epoch
        base = entry.last
        if entry.delta_subscribers:
            entry.last = pub
        for fanout, group in zip(self.fanouts, entry.groups, strict=True):
            if group:
                subscribers = list(group)
                if fanout.publish(
                    channel,
                    pub,
                    epoch,
                    moved=moved,
                    missed=missed,
                    base=base,
                    subscribers=subscribers,
                ):
                    counters.publications[fanout.protocol] += 1
                    counters.deliveries[fanout.protocol] += len(subscribers)
        if pub.time_ms:
            self.observer.publish_to_enqueue(max(0.0, time.time() - pub.time_ms / 1000))

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self._control(channel, info, join=True)

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self._control(channel, info, join=False)

    def _control(self, channel: str, info: ClientInfo, *, join: bool) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return
        for fanout, group in zip(self.fanouts, entry.groups, strict=True):
            if group:
                fanout.control(channel, info, join, list(group))
