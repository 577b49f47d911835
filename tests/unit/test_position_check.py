"""The position check: its verdicts, and the checker on a real session state machine
(in-memory engine, no socket), where one stream-top read serves every subscriber of a
channel and a publication that never reached the node is noticed at its tail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from shim.centrifuge.fanout import CentrifugeFanout
from shim.centrifuge.positions import Verdict, check_position
from shim.centrifuge.subscriptions import Subscription
from shim.core.broker import ClientInfo, HistoryResult, Publication, StreamPosition
from shim.core.config import Settings
from shim.core.node import Node
from tests.unit.test_centrifuge_session import Client

DELAY = 0.2


def positioned(offset: int, epoch: str) -> Subscription:
    sub = object.__new__(Subscription)  # only its position fields are read
    sub.offset, sub.epoch, sub.missing_until = offset, epoch, 0
    return sub


def test_in_sync_and_empty_streams_pass() -> None:
    assert check_position(positioned(5, "e"), StreamPosition(5, "e")) is Verdict.IN_SYNC
    assert check_position(positioned(0, ""), StreamPosition(0, "")) is Verdict.IN_SYNC


def test_behind_twice_on_the_same_publication_is_insufficient() -> None:
    sub = positioned(5, "e")
    assert check_position(sub, StreamPosition(6, "e")) is Verdict.BEHIND
    assert check_position(sub, StreamPosition(6, "e")) is Verdict.INSUFFICIENT


def test_behind_only_on_what_came_since_the_last_check_waits_again() -> None:
    sub = positioned(5, "e")
    assert check_position(sub, StreamPosition(6, "e")) is Verdict.BEHIND
    sub.offset = 6  # the publication was in flight, and arrived
    assert check_position(sub, StreamPosition(8, "e")) is Verdict.BEHIND
    sub.offset = 8
    assert check_position(sub, StreamPosition(8, "e")) is Verdict.IN_SYNC
    assert sub.missing_until == 0


def test_a_subscriber_that_saw_the_stream_empty_is_behind_its_first_publication() -> None:
    sub = positioned(0, "")
    assert check_position(sub, StreamPosition(1, "new")) is Verdict.BEHIND
    assert check_position(sub, StreamPosition(1, "new")) is Verdict.INSUFFICIENT


def test_a_reset_stream_is_insufficient_at_the_second_check() -> None:
    sub = positioned(50, "old")
    assert check_position(sub, StreamPosition(3, "new")) is Verdict.BEHIND
    assert check_position(sub, StreamPosition(3, "new")) is Verdict.INSUFFICIENT


class CountingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.tops: list[str] = []

    async def history(self, channel: str, **options: Any) -> HistoryResult:
        if options.get("limit") == 0 and options.get("since") is None:
            self.tops.append(channel)
        return await super().history(channel, **options)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    settings = Settings(client_channel_position_check_delay_seconds=DELAY)
    node = Node(settings, CountingBroker(), MemoryPresenceManager(), fanouts=(CentrifugeFanout(),))
    await node.start()
    yield node
    await node.close()


def unsubscribes(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["push"] for m in messages if "unsubscribe" in m.get("push", {})]


async def test_one_stream_top_read_per_channel_serves_all_its_subscribers(node: Node) -> None:
    broker = node.broker
    assert isinstance(broker, CountingBroker)
    clients = [Client(node) for _ in range(3)]
    for client in clients:
        await client.connect()
        await client.send(subscribe={"channel": "task:1", "recoverable": True})
    await node.publish("task:1", b'{"n":1}')
    broker.tops.clear()
    await asyncio.sleep(DELAY * 3.5)
    # About one read per delay for the channel, not one per subscriber.
    assert 2 <= broker.tops.count("task:1") <= 4
    for client in clients:
        assert unsubscribes(await client.messages()) == []


async def test_a_publication_that_never_reached_the_node_unsubscribes_with_2500(
    node: Node,
) -> None:
    broker = node.broker
    assert isinstance(broker, CountingBroker)
    behind, other = Client(node), Client(node)
    for client in (behind, other):
        await client.connect()
    await behind.send(subscribe={"channel": "task:1", "recoverable": True})
    await other.send(subscribe={"channel": "task:2", "recoverable": True})
    await node.publish("task:1", b'{"n":1}')
    await node.publish("task:2", b'{"n":1}')

    handler, broker._handler = broker._handler, None  # lost on its way to the node
    await node.publish("task:1", b'{"n":2}')
    broker._handler = handler

    async with asyncio.timeout(DELAY * 3 + 2):
        while not unsubscribes(await behind.messages()):
            await asyncio.sleep(0.05)
    assert unsubscribes(await behind.messages()) == [
        {"channel": "task:1", "unsubscribe": {"code": 2500, "reason": "insufficient state"}}
    ]
    assert "task:1" not in behind.session.subscriptions
    await asyncio.sleep(DELAY * 2)
    assert unsubscribes(await other.messages()) == []
    assert "task:2" in other.session.subscriptions


async def test_the_last_subscriber_left_on_a_channel_is_still_checked(node: Node) -> None:
    """A channel held by one subscription, then two, then one again (the other
    unsubscribed): the one left is still checked, and found behind."""
    broker = node.broker
    assert isinstance(broker, CountingBroker)
    stays, leaves = Client(node), Client(node)
    for client in (stays, leaves):
        await client.connect()
        await client.send(subscribe={"channel": "task:1", "recoverable": True})
    await node.publish("task:1", b'{"n":1}')
    await leaves.send(unsubscribe={"channel": "task:1"})

    handler, broker._handler = broker._handler, None  # lost on its way to the node
    await node.publish("task:1", b'{"n":2}')
    broker._handler = handler

    async with asyncio.timeout(DELAY * 3 + 2):
        while not unsubscribes(await stays.messages()):
            await asyncio.sleep(0.05)
    assert [m["unsubscribe"]["code"] for m in unsubscribes(await stays.messages())] == [2500]


async def test_a_publication_delivered_later_than_the_max_time_lag_unsubscribes() -> None:
    settings = Settings(
        client_channel_position_check_delay_seconds=0,
        client_channel_position_max_time_lag_seconds=0.2,
    )
    broker = MemoryBroker()
    node = Node(settings, broker, MemoryPresenceManager(), fanouts=(CentrifugeFanout(),))
    await node.start()
    try:
        client = Client(node)
        await client.connect()
        await client.send(subscribe={"channel": "task:1", "recoverable": True})
        await node.publish("task:1", b'{"n":1}')  # on time
        handler = broker._handler
        assert handler is not None
        late: list[tuple[str, Publication, str]] = []

        class Backlog:  # holds publications, as a pub/sub backlog would
            def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
                late.append((channel, pub, epoch))

            def on_join(self, channel: str, info: ClientInfo) -> None: ...

            def on_leave(self, channel: str, info: ClientInfo) -> None: ...

        broker._handler = Backlog()
        await node.publish("task:1", b'{"n":2}')
        broker._handler = handler
        await asyncio.sleep(0.3)
        for item in late:
            handler.on_publication(*item)
        messages = await client.messages()
    finally:
        await node.close()
    pubs = [m["push"]["pub"]["data"] for m in messages if "pub" in m.get("push", {})]
    assert pubs == [{"n": 1}]
    assert unsubscribes(messages) == [
        {"channel": "task:1", "unsubscribe": {"code": 2500, "reason": "insufficient state"}}
    ]
