"""LegacySession's delivery: each event once, however its copies interleave.

The node hands a session one copy of an event per attached channel the event was
routed to. With Redis shards each channel's copies come through that shard's own
connection, so the copies of one event can arrive far apart; these tests play the
broker's part (Node.on_publication per channel) with such interleavings, on a real
Node and a real Outbox, and read what the outbox writes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import orjson
import pytest

from adapters.auth.jwt import Credentials
from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from legacy import session as legacy_session
from legacy.fanout import LegacyFanout
from legacy.reads import LegacyReads
from legacy.session import LegacySession, LegacyStats, RecentEvents
from shim.core.broker import LegacyFrame, Publication
from shim.core.config import Settings
from shim.core.node import Node
from shim.core.outbox import Outbox
from shim.core.policy import ChannelAuthorizer, Decision
from shim.core.routing import PERSONAL_FANOUT_CHANNEL

WINDOW = legacy_session.DEDUP_WINDOW_SECONDS
LIMIT = legacy_session.DEDUP_MAX_EVENTS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(LegacySession, "clock", staticmethod(fake))
    yield fake


class Transport:
    def __init__(self) -> None:
        self.closes: list[tuple[int, str]] = []

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


class Client:
    """A session with an outbox whose writes are collected."""

    def __init__(
        self,
        node: Node,
        *,
        strict: bool = False,
        personal: str = "",
        reads: LegacyReads | None = None,
    ) -> None:
        self.written: list[bytes] = []
        self.outbox = Outbox(1 << 30, self._send, joined=False)
        self.transport = Transport()
        self.session = LegacySession(
            node,
            self.transport,
            self.outbox,
            LegacyStats(),
            user="u",
            strict_matching=strict,
            personal_channels=(personal,) if personal else (),
            reads=reads,
        )

    async def _send(self, frame: bytes) -> None:
        self.written.append(frame)

    async def command(self, **fields: str) -> None:
        await self.session.handle_frame(orjson.dumps(fields))

    async def frames(self) -> list[str]:
        await asyncio.sleep(0)
        await self.outbox.flushed(5)
        return [frame.decode() for frame in self.written]


def frame(n: int) -> str:
    return f'{{"n":{n}}}'


def tag(n: int, **top: str) -> LegacyFrame:
    return LegacyFrame(event_id=f"event-{n}", frame=frame(n).encode(), **top)


def copy(node: Node, channel: str, n: int) -> None:
    """The broker handing the node event n's publication in `channel`."""
    node.on_publication(channel, Publication(data=b"{}", legacy=tag(n)), "")


def legacy_node(settings: Settings, broker: MemoryBroker) -> Node:
    """A node serving legacy sessions only, as the runtime wires it."""
    return Node(
        settings,
        broker,
        MemoryPresenceManager(),
        fanouts=(LegacyFanout(settings.global_channel),),
    )


@pytest.fixture
def node() -> Node:
    return legacy_node(Settings(), MemoryBroker())


async def task_and_project_client(node: Node) -> Client:
    client = Client(node)
    await client.command(action="subscribe", task_id="T", project_id="P")
    assert node.subscriber_count("task:T") == node.subscriber_count("project:P") == 1
    return client


# --- copies far apart ----------------------------------------------------------------


@pytest.mark.parametrize("lag", [1, 65, 1000, LIMIT - 1])
async def test_copies_many_events_apart_are_delivered_once(
    node: Node, clock: Clock, lag: int
) -> None:
    client = await task_and_project_client(node)
    total = lag + 300
    # Shard A (task:T) runs `lag` events ahead of shard B (project:P), which carries
    # the same events (task events of project P go to both channels).
    for i in range(total + lag):
        if i < total:
            copy(node, "task:T", i)
        if i >= lag:
            copy(node, "project:P", i - lag)
    assert await client.frames() == [frame(n) for n in range(total)]


async def test_the_lagging_shard_may_be_either_one(node: Node, clock: Clock) -> None:
    client = await task_and_project_client(node)
    for n in range(200):
        copy(node, "project:P", n)
    for n in range(200):
        copy(node, "task:T", n)
    # Events of T only (not of P) in between, then late copies of the first ones.
    for n in range(200, 400):
        copy(node, "task:T", n)
    for n in range(100):
        copy(node, "project:P", n)
    assert await client.frames() == [frame(n) for n in range(400)]


async def test_random_interleavings_of_three_channels_deliver_each_event_once(
    node: Node, clock: Clock
) -> None:
    rng = random.Random(20260204)
    for _round in range(20):
        client = Client(node)
        await client.command(action="subscribe", task_id="T", project_id="P")
        await client.command(action="subscribe", task_id="U")
        channels = ["task:T", "project:P", "task:U"]
        # Each event goes to a non-empty subset of the channels; each channel keeps
        # publish order, and the channels' streams are merged at random.
        streams: dict[str, list[int]] = {c: [] for c in channels}
        for n in range(600):
            for channel in rng.sample(channels, rng.randint(1, 3)):
                streams[channel].append(n)
        arrivals: list[tuple[str, int]] = []
        positions = dict.fromkeys(channels, 0)
        while any(positions[c] < len(streams[c]) for c in channels):
            pending = [c for c in channels if positions[c] < len(streams[c])]
            # Bursts from one shard at a time, up to 200 events long.
            channel = rng.choice(pending)
            burst = rng.randint(1, 200)
            for n in streams[channel][positions[channel] : positions[channel] + burst]:
                arrivals.append((channel, n))
            positions[channel] += burst
            clock.now += 0.01
        for channel, n in arrivals:
            copy(node, channel, n)
        first_seen = list(dict.fromkeys(n for _c, n in arrivals))
        assert await client.frames() == [frame(n) for n in first_seen]
        client.session.close(1000, "")


# --- bounds ----------------------------------------------------------------------------


async def test_memory_stays_bounded_under_a_flood(node: Node, clock: Clock) -> None:
    client = await task_and_project_client(node)
    for n in range(5 * LIMIT):
        copy(node, "task:T", n)
        assert client.session.remembered_events <= 2 * LIMIT
    # The bound is what it costs: a copy more than 2 x LIMIT events late gets through
    # (MIGRATION.md), one within LIMIT events does not.
    copy(node, "project:P", 0)
    copy(node, "project:P", 5 * LIMIT - LIMIT)
    assert await client.frames() == [frame(n) for n in range(5 * LIMIT)] + [frame(0)]


async def test_ids_are_forgotten_after_the_window_and_idle_sessions_hold_nothing(
    node: Node, clock: Clock
) -> None:
    client = await task_and_project_client(node)
    copy(node, "task:T", 1)
    clock.now += WINDOW * 0.9
    copy(node, "project:P", 1)  # within the window: a copy
    assert client.session.remembered_events == 1
    client.session.tick(clock.now, 0.0)
    assert client.session.remembered_events == 1
    clock.now += 2 * WINDOW
    client.session.tick(clock.now, 0.0)
    assert client.session.remembered_events == 0
    copy(node, "project:P", 1)  # far outside the window: delivered again
    assert await client.frames() == [frame(1), frame(1)]


async def test_a_wildcard_client_is_sent_each_event_once_and_remembers_nothing(
    node: Node, clock: Clock
) -> None:
    client = Client(node)
    await client.command(action="subscribe_all")
    await client.command(action="subscribe", task_id="T", project_id="P")
    # `*` is the global channel, which every event is routed to: nothing else is held.
    assert node.subscriber_count("global") == 1
    assert node.subscriber_count("task:T") == node.subscriber_count("project:P") == 0
    for n in range(300):
        copy(node, "task:T", n)
        copy(node, "global", n)
        copy(node, "project:P", n)
    assert client.session.remembered_events == 0
    assert await client.frames() == [frame(n) for n in range(300)]


async def test_late_copies_are_still_dropped_after_subscribe_all(node: Node, clock: Clock) -> None:
    client = await task_and_project_client(node)
    for n in range(100):
        copy(node, "task:T", n)
    await client.command(action="subscribe_all")
    assert node.subscriber_count("task:T") == 0
    # The global shard lags: its copies of events already sent come after the switch.
    for n in range(150):
        copy(node, "global", n)
    assert await client.frames() == [frame(n) for n in range(150)]


async def test_strict_matching_reads_only_global_and_filters_top_level_fields(
    node: Node, clock: Clock
) -> None:
    client = Client(node, strict=True)
    await client.command(action="subscribe", task_id="T", project_id="P")
    assert node.subscriber_count("global") == 1
    assert node.subscriber_count("task:T") == 0
    events = [tag(1, task_id="T"), tag(2), tag(3, project_id="P"), tag(4, task_id="U")]
    for event in events:
        node.on_publication("global", Publication(data=b"{}", legacy=event), "")
    assert await client.frames() == [frame(1), frame(3)]
    assert client.session.remembered_events == 0


async def test_a_wildcard_client_also_reads_its_personal_channel_and_remembers_nothing(
    node: Node, clock: Clock
) -> None:
    # Personal events never go to the global channel: the two carry disjoint events.
    client = Client(node, personal="user:u")
    await client.command(action="subscribe_all")
    assert node.subscriber_count("global") == node.subscriber_count("user:u") == 1
    for n in range(300):
        copy(node, "user:u" if n % 7 == 0 else "global", n)
    assert client.session.remembered_events == 0
    assert await client.frames() == [frame(n) for n in range(300)]


async def test_with_personal_events_to_all_a_wildcard_client_reads_the_fan_out_channel() -> None:
    node = legacy_node(Settings(legacy_personal_events_to_all=True), MemoryBroker())
    client = Client(node, personal="user:u")
    await client.command(action="subscribe_all")
    assert node.subscriber_count(PERSONAL_FANOUT_CHANNEL) == 1
    # Its own personal events come through the fan-out channel too: not read twice.
    assert node.subscriber_count("user:u") == 0


class GatedPolicy:
    """A policy answering only once `gate` is set: task:ok* yes, anything else no."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.asked: list[str] = []

    async def can_subscribe(
        self, credentials: Credentials, channel: str, client_id: str
    ) -> Decision:
        self.asked.append(channel)
        await self.gate.wait()
        return Decision.allow("ok") if channel.startswith("task:ok") else Decision.deny("no")


async def test_events_waiting_for_the_policy_are_passed_on_in_order(
    node: Node, clock: Clock
) -> None:
    policy = GatedPolicy()
    reads = LegacyReads(ChannelAuthorizer(policy), Credentials(user="u"), cache_seconds=60)
    client = Client(node, reads=reads)
    await client.command(action="subscribe_all")
    for n in range(10):
        routed = ("task:ok" if n % 2 == 0 else "task:no", "global")
        event = LegacyFrame(event_id=f"e-{n}", frame=frame(n).encode(), channels=routed)
        node.on_publication("global", Publication(data=b"{}", legacy=event), "")
    assert await client.frames() == []  # all held behind the first question
    policy.gate.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert await client.frames() == [frame(n) for n in range(0, 10, 2)]
    # One question per channel, not per event.
    assert policy.asked == ["task:ok", "task:no", "global"]
    assert client.session.stats.unreadable_events == 5


async def test_events_held_for_the_policy_count_against_the_queue_cap() -> None:
    node = legacy_node(Settings(client_queue_max_size_bytes=1024), MemoryBroker())
    policy = GatedPolicy()  # never answers
    reads = LegacyReads(ChannelAuthorizer(policy), Credentials(user="u"), cache_seconds=60)
    client = Client(node, reads=reads)
    await client.command(action="subscribe_all")
    big = b'{"pad":"' + b"x" * 300 + b'"}'
    for n in range(4):
        event = LegacyFrame(event_id=f"e-{n}", frame=big, channels=("task:wait", "global"))
        node.on_publication("global", Publication(data=b"{}", legacy=event), "")
    # A client whose events wait for an answer is as slow as one that does not read.
    assert client.transport.closes == [(3008, "slow")]
    assert client.session.stats.slow_disconnects == 1
    await asyncio.sleep(0)
    assert await client.frames() == []
    assert node.subscriber_count("global") == 0


async def test_a_refused_named_subscription_is_ignored_and_counted(node: Node) -> None:
    policy = GatedPolicy()
    policy.gate.set()
    reads = LegacyReads(ChannelAuthorizer(policy), Credentials(user="u"), cache_seconds=60)
    client = Client(node, reads=reads)
    await client.command(action="subscribe", task_id="secret")
    await client.command(action="subscribe", task_id="ok-1")
    assert client.session.subscriptions == {"task:ok-1"}
    assert node.subscriber_count("task:secret") == 0
    assert client.session.stats.refused_subscriptions == 1


# --- RecentEvents on its own -------------------------------------------------------------


def test_recent_events_remember_for_a_window_or_a_count() -> None:
    recent = RecentEvents(0.0, window=10.0, limit=3)
    recent.add("a", 0.0)
    recent.add("b", 9.9)
    assert "a" in recent and "b" in recent
    recent.add("c", 12.0)  # a new generation: a and b are in the previous one
    assert "a" in recent and "b" in recent and "c" in recent
    recent.add("d", 25.0)  # a and b are now more than one window old: gone
    assert "a" not in recent and "b" not in recent
    assert "c" in recent and "d" in recent
    assert not recent.forgotten(25.0)
    assert recent.forgotten(50.0)
    assert len(recent) == 0


def test_recent_events_keep_at_least_limit_ids_however_fast() -> None:
    recent = RecentEvents(0.0, window=10.0, limit=3)
    for n in range(10):
        recent.add(str(n), 0.0)
        assert len(recent) <= 6
        # The `limit` latest ids are always remembered.
        assert all(str(m) in recent for m in range(max(0, n - 2), n + 1))


# --- a session closed while it subscribes ------------------------------------------------


class GatedBroker(MemoryBroker):
    """A broker whose subscribe waits to be let through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def subscribe(self, channel: str) -> None:
        await self.gate.wait()
        await super().subscribe(channel)


async def test_a_client_gone_during_the_broker_subscribe_costs_no_one_their_subscription() -> None:
    broker = GatedBroker()
    node = legacy_node(Settings(), broker)
    staying, leaving = Client(node), Client(node)
    # Both wait on the same broker subscribe of task:T; one socket goes away meanwhile.
    commands = [
        asyncio.create_task(c.command(action="subscribe", task_id="T")) for c in (staying, leaving)
    ]
    await asyncio.sleep(0.01)
    leaving.session.transport_closed()
    broker.gate.set()
    await asyncio.gather(*commands)
    assert node.subscriber_count("task:T") == 1
    copy(node, "task:T", 1)
    assert await staying.frames() == [frame(1)]
    assert await leaving.frames() == []


async def test_a_kit_client_is_told_which_offsets_never_reached_the_node(
    node: Node, clock: Clock
) -> None:
    """Offsets the node skipped because they were not legacy events are announced
    plainly; offsets it never received (lost between the broker and the node) are
    announced as `missed`, so the kit recovers them instead of skipping them."""
    client = Client(node)
    await client.command(action="subscribe_all")
    await client.command(action="position")

    def published(offset: int, *, legacy: bool = True) -> None:
        pub = Publication(data=b"{}", offset=offset, legacy=tag(offset) if legacy else None)
        node.on_publication("global", pub, "E")

    published(1)
    published(2)
    published(3, legacy=False)  # a server API publication: not for legacy clients
    published(4)
    published(7)  # 5 and 6 never arrived
    published(9, legacy=False)  # nor did 8
    notices = [orjson.loads(f)["payload"] for f in await client.frames() if "shim.position" in f]
    assert notices == [
        # The answer to `position`: nothing dispatched yet, nothing in the engine.
        {"channel": "global", "offset": None, "epoch": None, "top": 0},
        {"channel": "global", "offset": 0, "epoch": "E"},  # the first event seen here
        {"channel": "global", "offset": 3, "epoch": "E"},
        {"channel": "global", "offset": 6, "epoch": "E", "missed": True},
        {"channel": "global", "offset": 8, "epoch": "E", "missed": True},
        {"channel": "global", "offset": 9, "epoch": "E"},
    ]


async def test_a_kit_that_opts_in_first_hears_of_personal_events_before_its_position(
    node: Node, clock: Clock
) -> None:
    """The kit sends `position` before `subscribe_all` (then again after it): a
    personal event delivered before the second answer is still announced, so the kit
    does not count its frame as one of the global stream."""
    client = Client(node, personal="user:u")
    await client.command(action="position")
    await client.command(action="subscribe_all")
    node.on_publication("user:u", Publication(data=b"{}", offset=5, legacy=tag(1)), "P")
    written = await client.frames()
    assert [orjson.loads(f).get("payload") for f in written] == [
        {"channel": "global", "offset": None, "epoch": None},
        {"channel": "user:u", "offset": 4, "epoch": "P"},
        None,  # the event frame itself ({"n": 1})
    ]
