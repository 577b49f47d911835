"""What only the Redis engine does: several nodes on one Redis, shards, Redis dying
and coming back, and the bytes it stores and sends (literal vectors).

Every Redis here is a throwaway redis-server started by the test (tests/redis_server.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.brokers.redis import (
    RedisBroker,
    RedisPresenceManager,
    parse_urls,
    scripts,
    shard_index,
)
from adapters.brokers.redis.keys import channel_keys, fnv1a_64, jump_hash
from adapters.brokers.redis.wire import (
    PresenceMessage,
    PublicationMessage,
    WireError,
    decode_body,
    decode_history_entry,
    decode_info,
    decode_message,
    encode_body,
    encode_info,
    presence_message,
    publication_message,
)
from shim.core.broker import (
    BrokerUnavailable,
    ClientInfo,
    Fence,
    LegacyFrame,
    PresenceStats,
    Publication,
    PublishOptions,
    UnrecoverablePosition,
)
from tests.contract.conftest import RecordingHandler
from tests.redis_server import RedisServer

KEEP = PublishOptions(history_size=500, history_ttl_seconds=60.0, history_meta_ttl_seconds=600.0)
WAIT_SECONDS = 5.0
# Short timeouts so fault tests finish quickly. A stopped server refuses connections
# at once, so the connect timeout only bounds a slow handshake: on a loaded machine
# 16 pool connections opened together took longer than 0.5 s.
SOCKET_TIMEOUT_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 2.0


@dataclass(slots=True)
class RedisNode:
    broker: RedisBroker
    presence: RedisPresenceManager
    handler: RecordingHandler


@asynccontextmanager
async def node(urls: list[str], presence_ttl_seconds: float = 60.0) -> AsyncIterator[RedisNode]:
    broker = RedisBroker(
        urls,
        socket_timeout_seconds=SOCKET_TIMEOUT_SECONDS,
        connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS,
        ping_interval_seconds=1.0,
        reconnect_max_delay_seconds=0.5,
    )
    presence = RedisPresenceManager(
        urls,
        presence_ttl_seconds=presence_ttl_seconds,
        socket_timeout_seconds=SOCKET_TIMEOUT_SECONDS,
        connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS,
    )
    handler = RecordingHandler()
    await broker.start(handler)
    try:
        yield RedisNode(broker, presence, handler)
    finally:
        await broker.close()
        await presence.close()


async def eventually(predicate: Callable[[], bool], seconds: float = WAIT_SECONDS) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.01)


def new_channel(prefix: str = "spec") -> str:
    return f"{prefix}:{uuid.uuid4().hex}"


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    async with RedisServer() as running:
        yield running


@pytest.fixture
async def two_nodes(server: RedisServer) -> AsyncIterator[tuple[RedisNode, RedisNode]]:
    async with node([server.url]) as first, node([server.url]) as second:
        yield first, second


# -- several nodes on one Redis ------------------------------------------------------


async def test_a_publication_through_one_node_reaches_the_other(
    two_nodes: tuple[RedisNode, RedisNode],
) -> None:
    a, b = two_nodes
    channel = new_channel()
    await b.broker.subscribe(channel)
    info = ClientInfo(user="42", client="c-1", conn_info=b'{"a":1}', chan_info=b"[]")
    legacy = LegacyFrame(
        event_id="e-1", frame=b'{"type":"task.updated"}', task_id="t", project_id="p"
    )
    sent = Publication(data=b'{"n":1}', info=info, time_ms=1_700_000_000_123, legacy=legacy)

    position = await a.broker.publish(channel, sent, KEEP)
    await a.broker.publish_join(channel, info)
    await a.broker.publish_leave(channel, info)

    await eventually(lambda: len(b.handler.leaves) == 1)
    assert position.offset == 1
    assert b.handler.publications == [
        (channel, Publication(sent.data, 1, info, sent.time_ms, legacy), position.epoch)
    ]
    assert b.handler.joins == [(channel, info)]
    assert b.handler.leaves == [(channel, info)]
    assert a.handler.publications == []


async def test_offsets_stay_strictly_increasing_when_both_nodes_publish(
    two_nodes: tuple[RedisNode, RedisNode],
) -> None:
    a, b = two_nodes
    channel = new_channel()
    await a.broker.subscribe(channel)
    await b.broker.subscribe(channel)

    positions = await asyncio.gather(
        *(
            node.broker.publish(channel, Publication(b"%d" % n), KEEP)
            for n in range(200)
            for node in (a, b)
        )
    )

    assert sorted(p.offset for p in positions) == list(range(1, 401))
    assert len({p.epoch for p in positions}) == 1
    await eventually(lambda: len(a.handler.publications) == len(b.handler.publications) == 400)
    for receiver in (a, b):
        assert [p.offset for _, p, _ in receiver.handler.publications] == list(range(1, 401))
    history = await b.broker.history(channel, limit=-1)
    assert [p.offset for p in history.publications] == list(range(1, 401))


async def test_presence_from_both_nodes_is_listed_together(
    two_nodes: tuple[RedisNode, RedisNode],
) -> None:
    a, b = two_nodes
    channel = new_channel()
    alice_phone = ClientInfo("alice", "c-1", conn_info=b'{"d":"phone"}')
    alice_laptop = ClientInfo("alice", "c-2")
    bob = ClientInfo("bob", "c-3", chan_info=b'{"r":1}')

    await a.presence.add_presence(channel, "c-1", alice_phone)
    await b.presence.add_presence(channel, "c-2", alice_laptop)
    await b.presence.add_presence(channel, "c-3", bob)

    everyone = {"c-1": alice_phone, "c-2": alice_laptop, "c-3": bob}
    assert await a.presence.presence(channel) == everyone
    assert await b.presence.presence(channel) == everyone
    assert await a.presence.presence_stats(channel) == PresenceStats(3, 2)


async def test_a_node_that_stops_refreshing_drops_out_of_presence(server: RedisServer) -> None:
    channel = new_channel()
    gone = ClientInfo("alice", "c-1")
    live = ClientInfo("bob", "c-2")
    async with node([server.url], 1.0) as dying, node([server.url], 1.0) as alive:
        await dying.presence.add_presence(channel, "c-1", gone)
        await alive.presence.add_presence(channel, "c-2", live)
        assert await alive.presence.presence_stats(channel) == PresenceStats(2, 2)

        for _ in range(6):
            await asyncio.sleep(0.25)
            # What a live node does for its clients: the idempotent add, again.
            await alive.presence.add_presence(channel, "c-2", live)

        assert await alive.presence.presence(channel) == {"c-2": live}
        assert await dying.presence.presence_stats(channel) == PresenceStats(1, 1)


# -- shards -------------------------------------------------------------------------


async def test_channels_are_spread_over_shards_and_delivered_across_nodes() -> None:
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(RedisServer()) for _ in range(2)]
        urls = [s.url for s in servers]
        a = await stack.enter_async_context(node(urls))
        b = await stack.enter_async_context(node(urls))
        channels = [new_channel("shard") for _ in range(40)]

        for channel in channels:
            await a.broker.publish(channel, Publication(b"1"), KEEP)

        for channel in channels:
            home = shard_index(channel, 2)
            meta = channel_keys("dex", channel).meta
            assert await servers[home].command("EXISTS", meta) == b":1\r\n"
            assert await servers[1 - home].command("EXISTS", meta) == b":0\r\n"
        sizes = [await s.dbsize() for s in servers]
        # Each channel has a meta and a history key on its shard.
        assert sum(sizes) == 2 * len(channels)
        assert min(sizes) > 0

        picked = [next(c for c in channels if shard_index(c, 2) == i) for i in (0, 1)]
        for channel in picked:
            await b.broker.subscribe(channel)
            await a.broker.publish(channel, Publication(b"2"), KEEP)
        await eventually(lambda: len(b.handler.publications) == 2)
        assert [(ch, p.offset) for ch, p, _ in b.handler.publications] == [
            (picked[0], 2),
            (picked[1], 2),
        ]


async def test_a_script_loaded_by_another_node_mid_pipeline_loses_no_fenced_publish(
    server: RedisServer,
) -> None:
    """A fresh Redis has no scripts cached. Another node loading the fenced publish
    script while Redis is still reading our pipeline (stood in for here by a SCRIPT
    LOAD between our two commands, so it happens every time) must not make our first
    publish come after our second: behind its fence it would then be refused as
    already stored, and the event lost."""
    async with node([server.url]) as a:
        channel = new_channel("task")
        fences = [Fence("partition-0", (1, n, 0), 60.0) for n in (1, 2)]
        first, second = (
            a.broker._command_for(channel, Publication(b"%d" % n), KEEP, fence)
            for n, fence in zip((1, 2), fences, strict=True)
        )
        shards = a.broker._shards
        replies = await shards.pipeline(
            shards.clients[0],
            [first, ("SCRIPT", "LOAD", scripts.FENCED_PUBLISH.source), second],
            (scripts.PUBLISH, scripts.FENCED_PUBLISH),
        )

        history = await a.broker.history(channel, limit=-1, options=KEEP)
        assert [(p.offset, p.data) for p in history.publications] == [(1, b"1"), (2, b"2")]
        assert [int(replies[0][0]), int(replies[2][0])] == [1, 2]


# -- Redis dying and coming back ------------------------------------------------------


async def test_killed_redis_fails_fast_and_a_restart_resumes_delivery_in_a_new_epoch(
    server: RedisServer,
) -> None:
    channel = new_channel()
    async with node([server.url]) as a, node([server.url]) as b:
        await b.broker.subscribe(channel)
        before = await a.broker.publish(channel, Publication(b"1"), KEEP)
        await eventually(lambda: len(b.handler.publications) == 1)
        await eventually(lambda: b.broker.healthy)

        await server.kill()

        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await a.broker.publish(channel, Publication(b"2"), KEEP)
        with pytest.raises(BrokerUnavailable):
            await a.broker.history(channel, limit=-1)
        with pytest.raises(BrokerUnavailable):
            await a.presence.presence(channel)
        with pytest.raises(BrokerUnavailable):
            await a.broker.subscribe(new_channel())
        assert time.monotonic() - started < 4.0
        await eventually(lambda: not b.broker.healthy)
        assert not await b.broker.ping()

        await server.start()
        # Nobody tells the listener: it reconnects and subscribes again by itself.
        await eventually(lambda: b.broker.healthy)
        after = await a.broker.publish(channel, Publication(b"3"), KEEP)

        await eventually(lambda: len(b.handler.publications) == 2)
        assert b.handler.publications[1] == (channel, Publication(b"3", 1), after.epoch)
        assert after.offset == 1
        assert after.epoch != before.epoch
        with pytest.raises(UnrecoverablePosition):
            await a.broker.history(channel, since=before, limit=-1)
        assert await a.broker.ping()


async def test_close_stops_every_listener(server: RedisServer) -> None:
    broker = RedisBroker([server.url, server.url])
    await broker.start(RecordingHandler())
    await broker.subscribe(new_channel())
    await eventually(lambda: broker.healthy)

    await broker.close()

    assert not broker.healthy
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-pubsub")]
    await broker.close()


# -- sharding function --------------------------------------------------------------


def test_fnv1a_and_jump_hash_match_their_published_vectors() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8
    # From the reference implementation's tests (github.com/dgryski/go-jump).
    assert [jump_hash(k, n) for k, n in [(1, 1), (42, 57), (0xDEAD10CC, 666), (256, 1024)]] == [
        0,
        43,
        361,
        520,
    ]


def test_shard_index_is_stable() -> None:
    # Pinned: every node, every release must place these channels alike.
    assert [shard_index("news", n) for n in (1, 2, 3, 5)] == [0, 1, 2, 3]
    assert [shard_index("user:\u00e9", n) for n in (2, 3, 5)] == [0, 2, 2]


@given(st.text(), st.integers(min_value=1, max_value=16))
def test_adding_a_shard_moves_channels_only_to_the_new_shard(channel: str, shards: int) -> None:
    before, after = shard_index(channel, shards), shard_index(channel, shards + 1)
    assert 0 <= before < shards
    assert after in (before, shards)


def test_keys_of_a_channel_share_one_hash_tag() -> None:
    keys = channel_keys("dex", "a}b{c%")
    assert keys.meta == "dex:{a%7Db%7Bc%25}:meta"
    assert keys.history == "dex:{a%7Db%7Bc%25}:hist"
    assert keys.pubsub == b"dex:pub:a}b{c%"


def test_urls_may_be_one_comma_separated_setting() -> None:
    assert parse_urls("redis://a:6379/0, redis://b:6379/0") == [
        "redis://a:6379/0",
        "redis://b:6379/0",
    ]
    with pytest.raises(ValueError):
        parse_urls(" , ")


# -- wire format ----------------------------------------------------------------------

FULL = Publication(
    data=b'{"x":1}',
    info=ClientInfo("42", "c-1", conn_info=b'{"a":1}', chan_info=None),
    time_ms=5,
    legacy=LegacyFrame("e-1", b'{"type":"t"}', task_id="t1"),
)
FULL_BODY = (
    b'{"t":5,"u":"42","c":"c-1","ci":7,"ev":"e-1","fr":12,"tk":"t1"}\n{"a":1}{"type":"t"}{"x":1}'
)


def test_body_vectors() -> None:
    assert encode_body(Publication(b'{"n":1}')) == b'{}\n{"n":1}'
    assert encode_body(FULL) == FULL_BODY
    assert decode_body(FULL_BODY, 9) == Publication(FULL.data, 9, FULL.info, 5, FULL.legacy)


def test_routed_channels_travel_with_the_legacy_tag() -> None:
    tag = LegacyFrame("e-2", b'{"type":"a"}', channels=("user:bob", "task:t"))
    body = encode_body(Publication(b"{}", legacy=tag))
    assert body == b'{"ev":"e-2","fr":12,"ch":["user:bob","task:t"]}\n{"type":"a"}{}'
    assert decode_body(body).legacy == tag


def test_message_vectors() -> None:
    assert publication_message(b'{}\n{"n":1}', 3, "Ab-_") == b'p3:Ab-_\n{}\n{"n":1}'
    assert publication_message(b"{}\n1") == b"p0:\n{}\n1"
    assert decode_message(b'p3:Ab-_\n{}\n{"n":1}') == PublicationMessage(
        Publication(b'{"n":1}', 3), "Ab-_"
    )
    assert presence_message(True, ClientInfo("u", "c")) == b'j{"u":"u","c":"c"}\n'
    assert presence_message(False, ClientInfo("u", "c", chan_info=b"{}")) == (
        b'l{"u":"u","c":"c","hi":2}\n{}'
    )
    assert decode_message(b'l{"u":"u","c":"c","hi":2}\n{}') == PresenceMessage(
        False, ClientInfo("u", "c", None, b"{}")
    )


def test_history_entry_and_presence_vectors() -> None:
    assert decode_history_entry(b"1700000000000:7:" + FULL_BODY) == Publication(
        FULL.data, 7, FULL.info, 5, FULL.legacy
    )
    assert encode_info(ClientInfo("u", "c", b"1", b"22")) == b'{"u":"u","c":"c","ci":1,"hi":2}\n122'
    assert decode_info(b'{"u":"u","c":"c","ci":1,"hi":2}\n122') == ClientInfo("u", "c", b"1", b"22")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"x{}\n",
        b"p3\n{}\n",
        b"p-1:e\n{}\n",
        b"p1:e\n[]\n",
        b"p1:e\n{}",
        b'p1:e\n{"ci":3,"u":"u","c":"c"}\n12',
        b'p1:e\n{"u":"u"}\n',
        b'p1:e\n{"ev":"e"}\n',
        b'p1:e\n{"t":true}\n',
        b'p1:e\n{"ev":"e","fr":1}\n\xff',
        b'p1:e\n{"ev":"e","fr":1,"ch":"task:t"}\n1',
        b'p1:e\n{"ev":"e","fr":1,"ch":[1]}\n1',
        b'j{"u":"u","c":"c"}\nextra',
        b"j{}\n",
    ],
)
def test_malformed_messages_raise_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_message(raw)


optional_bytes = st.none() | st.binary(max_size=20)
infos = st.builds(ClientInfo, st.text(), st.text(), optional_bytes, optional_bytes)
tags = st.builds(LegacyFrame, st.text(), st.text().map(str.encode), st.text(), st.text())
publications = st.builds(
    Publication,
    st.binary(max_size=50),
    st.integers(0, 2**53),
    st.none() | infos,
    st.integers(0, 2**53),
    st.none() | tags,
)


@given(publications, st.text(alphabet="abcXYZ019-_", max_size=12))
def test_publications_round_trip(pub: Publication, epoch: str) -> None:
    message = publication_message(encode_body(pub), pub.offset, epoch)
    assert decode_message(message) == PublicationMessage(pub, epoch)
    entry = b"%d:%d:%s" % (123, pub.offset, encode_body(pub))
    assert decode_history_entry(entry) == pub


@given(infos, st.booleans())
def test_presence_round_trips(info: ClientInfo, join: bool) -> None:
    assert decode_message(presence_message(join, info)) == PresenceMessage(join, info)
    assert decode_info(encode_info(info)) == info


@given(st.binary(max_size=80))
def test_any_bytes_decode_or_raise_wire_error(raw: bytes) -> None:
    for decode in (decode_message, decode_history_entry, decode_info):
        with suppress(WireError):
            decode(raw)


@given(publications)
def test_mangled_bodies_decode_or_raise_wire_error(pub: Publication) -> None:
    body = encode_body(pub)
    for cut in range(0, len(body), 7):
        for raw in (body[:cut], body[:cut] + b"\x00" + body[cut + 1 :]):
            with suppress(WireError):
                decode_body(raw)
