"""Several `dex-shim serve` processes on Redis, seen from the clients' side.

Every node is a real process configured by DEX_SHIM_* variables (tests/multinode.py),
every Redis a throwaway redis-server (tests/redis_server.py), every client an official
SDK (centrifuge-python) or the legacy hook's way of connecting (tests/legacyclient.py).
Events enter through one node's POST /api/v1/broadcast and leave through another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from centrifuge import ClientState, StreamPosition  # type: ignore[import-untyped]
from redis.asyncio import Redis

from adapters.brokers.redis import shard_index
from adapters.ingest.redis_stream import backlog
from shim.core.broadcast import Accepted, channel_data, parse_broadcast
from shim.core.config import Settings
from shim.core.routing import Router
from tests.conftest import free_port
from tests.legacyclient import Frame, open_legacy, settle
from tests.multinode import Balancer, NodeProcess, start_nodes
from tests.pyclient import CODECS, SubEvents, new_client, new_subscription, use_codec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

Corpus = list[dict[str, Any]]
# Seconds a client must stay quiet after its last expected message (duplicates show here).
QUIET = 0.4


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


# --- helpers ---------------------------------------------------------------------------


def numbered(key: str, n: int) -> dict[str, Any]:
    """Event number n; routed to task:<key> (and the global channel)."""
    return {"type": "task.updated", "payload": {"task_id": key, "n": n}}


@dataclass(slots=True, frozen=True)
class Outcome:
    n: int
    status: int  # 0 = no HTTP answer
    body: Any


@dataclass
class Publisher:
    """The backend: numbered events through one node's POST /api/v1/broadcast, one
    per request, each sent after the previous one was answered."""

    node: NodeProcess
    key: str
    interval: float = 0.01
    outcomes: list[Outcome] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def acked(self) -> list[int]:
        """Numbers the node answered 200 accepted for, in order."""
        return [o.n for o in self.outcomes if o.status == 200]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                response = await self.node.broadcast(numbered(self.key, n))
            except Exception as error:  # recorded, and the test fails on it
                self.outcomes.append(Outcome(n, 0, repr(error)))
            else:
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                self.outcomes.append(Outcome(n, response.status_code, body))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def wait_for(self, count: int, *, refused: bool = False, timeout: float = 10) -> None:
        """Until `count` more answers of the kind have come (acked, or refused)."""
        goal = len(self.refused if refused else self.acked) + count
        async with asyncio.timeout(timeout):
            while len(self.refused if refused else self.acked) < goal:
                assert self._task is not None and not self._task.done()
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)


def numbers(events: SubEvents) -> list[int]:
    return [ctx.pub.data["n"] for ctx in events.named("publication")]


async def delivered(events: SubEvents, n: int, timeout: float = 10) -> None:
    await events.wait_for("publication", lambda ctx: ctx.pub.data["n"] >= n, timeout=timeout)


def silently_missing(events: SubEvents, acked: Sequence[int]) -> list[int]:
    """Acknowledged numbers the subscriber never got and was never told it lost.

    The protocol's promise: a subscriber misses nothing acknowledged unless a
    resubscribe answered `recovered: false` in the place of the gap (the stream
    could not be recovered, so the app must reload its state)."""
    missing: list[int] = []
    told = False
    last = 0
    for name, ctx in events.events:
        if name == "subscribed" and ctx.was_recovering and not ctx.recovered:
            told = True
        elif name == "publication":
            n = ctx.pub.data["n"]
            if not told:
                missing += [m for m in acked if last < m < n]
            told = False
            last = max(last, n)
    if not told:
        missing += [m for m in acked if m > last]
    return missing


async def connected_subscription(
    url: str, token: str, channel: str, **options: Any
) -> tuple[Any, SubEvents]:
    client, events = new_client(url, token)
    await client.connect()
    await events.wait_for("connected")
    sub, sub_events = new_subscription(client, channel, **options)
    await sub.subscribe()
    await sub_events.wait_for("subscribed")
    return client, sub_events


def publish_through(node: NodeProcess) -> Any:
    async def publish(body: Any) -> None:
        response = await node.broadcast(body)
        assert response.status_code == 200, response.text

    return publish


def corpus_task(corpus: Corpus) -> str:
    """The task id most corpus examples name (payload or top level)."""
    counts: dict[str, int] = {}
    for item in corpus:
        example = item["example"]
        for task in {example["payload"].get("task_id"), example.get("task_id")} - {None}:
            counts[task] = counts.get(task, 0) + 1
    return max(counts, key=lambda t: counts[t])


def channel_view(corpus: Corpus, channel: str) -> list[dict[str, Any]]:
    """What a channel subscriber gets of the corpus, by the shim's own parser and the
    default routing table, in corpus order."""
    settings = Settings()
    router = Router(
        settings.routes,
        default_channel=settings.default_channel,
        global_channel=settings.global_channel,
    )
    body = orjson.dumps([item["example"] for item in corpus])
    parsed = parse_broadcast(body, max_item_bytes=settings.ingest_max_item_bytes)
    events = [p.event for p in parsed if isinstance(p, Accepted)]
    assert len(events) == len(corpus)
    return [
        orjson.loads(channel_data(event))
        for event in events
        if channel in router.route(event).channels
    ]


async def shut(*clients: Any) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)


# --- 1. cross-node delivery -------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_clients_on_one_node_get_what_another_node_ingests(
    redis: RedisServer, corpus: Corpus, codec: str
) -> None:
    task_channel = f"task:{corpus_task(corpus)}"
    async with start_nodes(2, [redis.url]) as (a, b):
        hook = await open_legacy(a.port, a.token("legacy-hook"))
        client = None
        try:
            # The hook's subscribe_all is in effect once it sees B's probes.
            await settle(publish_through(b), [hook], "task:settle")
            with use_codec(codec):
                client, _events = new_client(a.ws_url, a.token("py"))
            await client.connect()
            subs: dict[str, SubEvents] = {}
            for channel in ("global", task_channel):
                sub, subs[channel] = new_subscription(client, channel)
                await sub.subscribe()
                await subs[channel].wait_for("subscribed")

            response = await b.broadcast([item["example"] for item in corpus])
            assert response.status_code == 200, response.text
            assert response.json()["accepted"] == len(corpus)

            frames = await hook.take(len(corpus), timeout=10)
            await hook.expect_silence(QUIET)
            for channel, sub_events in subs.items():
                await sub_events.wait_for(
                    "publication", count=len(channel_view(corpus, channel)), timeout=10
                )
            await asyncio.sleep(QUIET)
        finally:
            await hook.aclose()
            if client is not None:
                await shut(client)

    # Byte-equal to what the Go hub wrote, in ingest order.
    assert [frame.raw for frame in frames] == [item["wire"] for item in corpus]
    for channel, sub_events in subs.items():
        expected = channel_view(corpus, channel)
        assert [ctx.pub.data for ctx in sub_events.named("publication")] == expected, channel
        offsets = [ctx.pub.offset for ctx in sub_events.named("publication")]
        assert offsets == list(range(offsets[0], offsets[0] + len(expected))), channel
    assert len(channel_view(corpus, task_channel)) > 5


# --- 2. recovery on another node ---------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_a_client_moved_to_another_node_recovers_every_missed_publication(
    redis: RedisServer, codec: str
) -> None:
    """The client sits behind a load balancer. Its node crashes (SIGKILL); the SDK
    reconnects by itself to the same URL, which now leads to node B, and resubscribes
    from its last offset while the backend keeps publishing through B."""
    async with start_nodes(2, [redis.url]) as (a, b), Balancer(a.port) as balancer:
        with use_codec(codec):
            client, events = new_client(balancer.ws_url, a.token("mover"))
        await client.connect()
        sub, sub_events = new_subscription(client, "task:move")
        await sub.subscribe()
        first = await sub_events.wait_for("subscribed")
        publisher = Publisher(b, "move").start()
        try:
            await sub_events.wait_for("publication", count=10)
            balancer.switch(b.port)
            await a.kill()
            killed_after = len(publisher.outcomes)

            resubscribed = await sub_events.wait_for("subscribed", count=2, timeout=15)
            resubscribed_after = len(publisher.outcomes)
            # Live delivery from B goes on after the recovery.
            await delivered(sub_events, resubscribed_after + 10)
            await publisher.stop()
            await delivered(sub_events, publisher.acked[-1])
            await asyncio.sleep(QUIET)
        finally:
            await publisher.stop()
            await shut(client)

    assert first.recoverable and not first.was_recovering
    assert resubscribed.was_recovering and resubscribed.recovered
    assert len(events.named("connected")) == 2
    assert not publisher.refused, publisher.refused
    # Publications were made while A was gone and while the client resubscribed.
    assert resubscribed_after > killed_after
    got = numbers(sub_events)
    assert got == publisher.acked  # every one, once, in order
    offsets = [ctx.pub.offset for ctx in sub_events.named("publication")]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def test_a_rolling_restart_loses_nothing_for_recovering_clients(
    redis: RedisServer,
) -> None:
    """Node A is stopped the polite way (SIGTERM) under load: its client is told
    3001 "shutdown", reconnects through the balancer to B and recovers everything."""
    async with start_nodes(2, [redis.url]) as (a, b), Balancer(a.port) as balancer:
        client, events = new_client(balancer.ws_url, a.token("roller"))
        await client.connect()
        sub, sub_events = new_subscription(client, "task:roll")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        publisher = Publisher(b, "roll").start()
        try:
            await sub_events.wait_for("publication", count=10)
            balancer.switch(b.port)
            await a.stop()
            told = await events.wait_for("connecting", lambda ctx: ctx.code == 3001, timeout=15)
            resubscribed = await sub_events.wait_for("subscribed", count=2, timeout=15)
            await delivered(sub_events, len(publisher.outcomes) + 10)
            await publisher.stop()
            await delivered(sub_events, publisher.acked[-1])
            await asyncio.sleep(QUIET)
        finally:
            await publisher.stop()
            await shut(client)

    assert told.reason == "shutdown"
    assert resubscribed.was_recovering and resubscribed.recovered
    assert not publisher.refused, publisher.refused
    assert numbers(sub_events) == publisher.acked  # every one, once, in order


async def test_a_new_client_on_another_node_resumes_from_a_saved_position(
    redis: RedisServer,
) -> None:
    """A page reloaded onto another node: the app kept the last position it saw and
    hands it to the SDK through get_state; the SDK subscribes with recovery from it."""
    async with start_nodes(2, [redis.url]) as (a, b):
        first, first_events = await connected_subscription(
            a.ws_url, a.token("reloader"), "task:reload"
        )
        publisher = Publisher(b, "reload").start()
        second = None
        try:
            await first_events.wait_for("publication", count=10)
            await first.disconnect()
            last = first_events.named("publication")[-1].pub
            subscribed = first_events.named("subscribed")[0].stream_position
            saved = StreamPosition(offset=last.offset, epoch=subscribed.epoch)
            await publisher.wait_for(10)

            async def get_state(_channel: str) -> StreamPosition:
                return saved

            second, second_events = await connected_subscription(
                b.ws_url, b.token("reloader"), "task:reload", get_state=get_state
            )
            resumed = second_events.named("subscribed")[0]
            await delivered(second_events, len(publisher.outcomes) + 10)
            await publisher.stop()
            await delivered(second_events, publisher.acked[-1])
            await asyncio.sleep(QUIET)
        finally:
            await publisher.stop()
            await shut(first, *([second] if second else []))

    assert resumed.was_recovering and resumed.recovered
    assert not publisher.refused, publisher.refused
    got = numbers(first_events) + numbers(second_events)
    assert got == publisher.acked


# --- 3. presence ------------------------------------------------------------------------


async def test_presence_lists_the_clients_of_every_node(redis: RedisServer) -> None:
    async with start_nodes(2, [redis.url]) as (a, b):
        alice, alice_events = await connected_subscription(
            a.ws_url, a.token("alice"), "task:presence"
        )
        bob, _bob_events = await connected_subscription(b.ws_url, b.token("bob"), "task:presence")
        try:
            sub = alice.get_subscription("task:presence")
            assert sub is not None
            deadline = time.monotonic() + 5
            while len((presence := await sub.presence()).clients) < 2:
                assert time.monotonic() < deadline, presence
                await asyncio.sleep(0.05)
            stats = await sub.presence_stats()
            await bob.disconnect()
            deadline = time.monotonic() + 5
            while len((after := await sub.presence()).clients) > 1:
                assert time.monotonic() < deadline, after
                await asyncio.sleep(0.05)
        finally:
            await shut(alice, bob)

    assert sorted(info.user for info in presence.clients.values()) == ["alice", "bob"]
    for client_id, info in presence.clients.items():
        assert info.client == client_id
    assert (stats.num_clients, stats.num_users) == (2, 2)
    assert [info.user for info in after.clients.values()] == ["alice"]
    assert alice_events.named("subscribed")


async def test_clients_of_a_killed_node_leave_presence_after_the_expiry(
    redis: RedisServer,
) -> None:
    """Node A is SIGKILLed: it never removes its clients' presence entries. They must
    drop out of presence once the TTL passes, while B's client (refreshed by B all
    along) stays."""
    ttl = 3.0
    settings = {"presence_ttl_seconds": str(ttl), "presence_refresh_seconds": "1"}
    async with start_nodes(2, [redis.url], settings=settings) as (a, b):
        alice, _alice_events = await connected_subscription(a.ws_url, a.token("alice"), "task:gone")
        bob, _bob_events = await connected_subscription(b.ws_url, b.token("bob"), "task:gone")
        try:
            sub = bob.get_subscription("task:gone")
            assert sub is not None
            deadline = time.monotonic() + 5
            while len((before := await sub.presence()).clients) < 2:
                assert time.monotonic() < deadline, before
                await asyncio.sleep(0.05)
            await a.kill()
            killed_at = time.monotonic()
            # Right after the crash nobody has removed alice: she is still listed.
            just_after = await sub.presence()
            deadline = killed_at + ttl + 5
            while len((after := await sub.presence()).clients) > 1:
                assert time.monotonic() < deadline, after
                await asyncio.sleep(0.1)
            gone_after = time.monotonic() - killed_at
            stats = await sub.presence_stats()
            # Past two TTLs: bob's entry lives on because B keeps refreshing it.
            await asyncio.sleep(max(0.0, 2 * ttl - gone_after))
            later = await sub.presence()
        finally:
            await shut(alice, bob)

    assert sorted(info.user for info in before.clients.values()) == ["alice", "bob"]
    assert "alice" in [info.user for info in just_after.clients.values()]
    assert [info.user for info in after.clients.values()] == ["bob"]
    assert (stats.num_clients, stats.num_users) == (1, 1)
    assert [info.user for info in later.clients.values()] == ["bob"]


# --- 4. Redis dies and comes back ----------------------------------------------------------


async def test_redis_outage_refuses_ingest_keeps_clients_and_heals(redis: RedisServer) -> None:
    async with start_nodes(2, [redis.url]) as (a, b):
        hook = await open_legacy(a.port, a.token("legacy-hook"))
        client = None
        publisher = Publisher(b, "outage", interval=0.02)
        try:
            await settle(publish_through(b), [hook], "task:settle")
            client, events = new_client(a.ws_url, a.token("watcher"))
            await client.connect()
            sub, sub_events = new_subscription(client, "task:outage")
            await sub.subscribe()
            await sub_events.wait_for("subscribed")
            publisher.start()
            await sub_events.wait_for("publication", count=10)

            await redis.kill()
            outage_ready = [await node.wait_ready(False) for node in (a, b)]
            await publisher.wait_for(5, refused=True)
            # Clients stay connected through the outage.
            assert client.state is ClientState.CONNECTED
            assert not events.named("disconnected") and not events.named("connecting")[1:]
            assert not hook.closed

            await redis.start()
            for node in (a, b):
                await node.wait_ready(True, timeout=15)
            restarted_at = len(publisher.outcomes)
            await delivered(sub_events, restarted_at + 10, timeout=15)
            legacy_after = await hook.skip_until(
                lambda f: _number(f) > restarted_at and _key(f) == "outage", timeout=10
            )
            await publisher.stop()
            await delivered(sub_events, publisher.acked[-1])
            await asyncio.sleep(QUIET)
            top = await sub.history(limit=0)
            # One connection from start to end: neither the outage nor the heal cut it.
            assert len(events.named("connected")) == 1 and not hook.closed
        finally:
            await publisher.stop()
            await hook.aclose()
            if client is not None:
                await shut(client)

    for response in outage_ready:
        assert response.json()["ready"] is False
    # Nothing reported accepted that was not stored: every refusal is a JSON 503
    # that accepted nothing.
    assert publisher.refused
    for outcome in publisher.refused:
        assert outcome.status == 503, outcome
        assert outcome.body["accepted"] == 0 and outcome.body["failed"] == 1, outcome
    for outcome in publisher.outcomes:
        if outcome.status == 200:
            assert outcome.body["accepted"] == 1, outcome
    got = numbers(sub_events)
    assert got == sorted(set(got)), "duplicates or disorder"
    # The promise: no acknowledged publication silently missing.
    assert silently_missing(sub_events, publisher.acked) == []
    # The client's position is the stream's current one (it can recover from it later).
    last_epoch = sub_events.named("subscribed")[-1].stream_position.epoch
    assert (top.epoch, top.offset) == (last_epoch, sub_events.named("publication")[-1].pub.offset)
    assert legacy_after.message["payload"]["n"] > restarted_at


def _number(frame: Frame) -> int:
    n = frame.message.get("payload", {}).get("n")
    return n if isinstance(n, int) else -1


def _key(frame: Frame) -> str:
    key = frame.message.get("payload", {}).get("task_id")
    return key if isinstance(key, str) else ""


# --- 5. two shards ------------------------------------------------------------------------


async def keys_of(server: RedisServer) -> list[str]:
    redis = Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    try:
        return [str(key) async for key in redis.scan_iter(count=1000)]
    finally:
        await redis.aclose()


async def test_two_shards_carry_channels_between_nodes(redis: RedisServer) -> None:
    keys = [f"shard-{i}" for i in range(6)]
    channels = [f"task:{key}" for key in keys]
    # The channels chosen land on both shards (by the documented placement).
    assert {shard_index(channel, 2) for channel in channels} == {0, 1}
    async with RedisServer() as second:
        servers = [redis, second]
        async with start_nodes(2, [s.url for s in servers]) as (a, b):
            client, _events = new_client(a.ws_url, a.token("sharded"))
            await client.connect()
            subs: dict[str, SubEvents] = {}
            try:
                for channel in channels:
                    sub, subs[channel] = new_subscription(client, channel)
                    await sub.subscribe()
                    await subs[channel].wait_for("subscribed")
                response = await b.broadcast([numbered(key, i) for i, key in enumerate(keys)])
                assert response.status_code == 200, response.text
                for sub_events in subs.values():
                    await sub_events.wait_for("publication")
                await asyncio.sleep(QUIET)
            finally:
                await shut(client)
        held = [await keys_of(server) for server in servers]

    for i, channel in enumerate(channels):
        assert numbers(subs[channel]) == [i], channel
        # A's subscribe and B's publish both touched the channel's keys: all of them
        # are on one server, the one its place says.
        where = [s for s, names in enumerate(held) if any(f"{{{channel}}}" in k for k in names)]
        assert where == [shard_index(channel, 2)], (channel, where)
    assert all(held), "both Redis servers hold keys"


# --- 6. one setting switches; the default stays Redis-free --------------------------------


async def test_default_engine_is_memory_and_needs_no_redis() -> None:
    # No engine setting at all (what `make run` does), and the old way of saying
    # memory: an explicit engine beside a redis_url where nothing listens.
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    seen = []
    for settings in ({}, {"engine": "memory", "redis_url": nowhere}):
        async with start_nodes(1, settings=settings) as (node,):
            ready = await node.wait_ready(True)
            client, sub_events = await connected_subscription(
                node.ws_url, node.token("solo"), "task:solo"
            )
            try:
                response = await node.broadcast(numbered("solo", 1))
                assert response.status_code == 200, response.text
                await delivered(sub_events, 1)
            finally:
                await shut(client)
        seen.append((ready.json()["engine"], numbers(sub_events)))

    assert seen == [("memory", [1]), ("memory", [1])]


async def test_redis_url_alone_switches_nodes_to_the_redis_engine(redis: RedisServer) -> None:
    # Only DEX_SHIM_REDIS_URL, no DEX_SHIM_ENGINE: the nodes must share publications.
    async with start_nodes(2, settings={"redis_url": redis.url}) as (a, b):
        readies = [await node.wait_ready(True) for node in (a, b)]
        client, sub_events = await connected_subscription(
            a.ws_url, a.token("switched"), "task:switched"
        )
        try:
            response = await b.broadcast(numbered("switched", 1))
            assert response.status_code == 200, response.text
            await delivered(sub_events, 1)
        finally:
            await shut(client)

    assert [ready.json()["engine"] for ready in readies] == ["redis", "redis"]
    assert numbers(sub_events) == [1]
    assert await redis.dbsize() > 0  # history lives in this Redis


# --- durable ingest with a node killed mid-stream ----------------------------------------


async def test_stream_ingest_survives_a_node_killed_mid_stream(redis: RedisServer) -> None:
    """Both nodes consume one Redis stream of one partition. The node publishing it is
    killed while it holds read, uncommitted entries; the other takes the partition
    over once the lease runs out and starts from the last commit, so every entry is
    published exactly once, in order, and nothing is left (docs/stream-ingest.md)."""
    stream, total = "dex:ingest-kill", 400
    settings = {
        "ingest_stream_key": stream,
        "ingest_stream_claim_idle_seconds": "1",
        "ingest_stream_partitions": "1",
    }
    async with start_nodes(2, [redis.url], settings=settings) as (a, b):
        watchers = []
        for node in (a, b):
            client, _events = new_client(node.ws_url, node.token("watcher"))
            await client.connect()
            sub, sub_events = new_subscription(client, "task:stream-kill")
            await sub.subscribe()
            await sub_events.wait_for("subscribed")
            watchers.append((node, client, sub_events))
        producer = Redis.from_url(redis.url)
        sent = 0

        async def send(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                body = {"type": "task.updated", "payload": {"task_id": "stream-kill", "n": sent}}
                await producer.xadd(stream, {"message": orjson.dumps(body)})
                sent += 1

        async def owner() -> NodeProcess | None:
            # A lease token starts with its node's name (hostname:pid by default).
            token = await producer.get(f"{stream}:lease:p0")
            name = token.decode().rsplit(":", 2)[0] if token else ""
            return next((n for n in (a, b) if name.endswith(f":{n.pid}")), None)

        try:
            await send(total // 4)
            # Freeze the owner right after a burst, until it is caught holding read,
            # uncommitted entries; then kill it.
            killed: NodeProcess | None = None
            while killed is None and sent < total // 2:
                await send(5)
                node = await owner()
                if node is None:
                    continue
                node.process.send_signal(signal.SIGSTOP)
                if await producer.xlen(f"{stream}:p0") > 0:
                    killed = node
                else:
                    node.process.send_signal(signal.SIGCONT)
            assert killed is not None, "the owner was never caught holding an entry"
            await killed.kill()
            await send(total - sent)
            ((survivor, _client, sub_events),) = [w for w in watchers if w[0] is not killed]
            await sub_events.wait_for(
                "publication", lambda _ctx: len(numbers(sub_events)) >= total, timeout=30
            )
            async with asyncio.timeout(15):
                while await backlog(producer, stream):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # anything published twice would show by now
            assert await owner() is survivor
        finally:
            await producer.aclose()
            await shut(*(client for _n, client, _e in watchers))

    assert numbers(sub_events) == list(range(total))
