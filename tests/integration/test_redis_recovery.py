"""Recovery on the Redis engine: publications racing a recovering subscribe, and a
stream that Redis lost.

Real redis-server processes, real `dex-shim serve` processes publishing, the official
Python SDK as the client. One node runs in this test's process so that its broker's
history read can be held at a known point (the read itself is the real one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from centrifuge import StreamPosition  # type: ignore[import-untyped]

from adapters.brokers.redis import RedisBroker
from shim.core.broker import ClientInfo, HistoryResult, Publication
from tests.conftest import RunningServer, run_server
from tests.integration.test_multinode import (
    QUIET,
    connected_subscription,
    delivered,
    numbered,
    numbers,
    shut,
)
from tests.multinode import NodeProcess, start_nodes
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


async def publish(node: NodeProcess, key: str, numbers_: range) -> None:
    for n in numbers_:
        response = await node.broadcast(numbered(key, n))
        assert response.status_code == 200, response.text


class Heard:
    """Stands between the Redis broker and its node, counting the publications pub/sub
    hands over per channel (everything is passed on unchanged)."""

    def __init__(self, server: RunningServer) -> None:
        broker = server.runtime.broker
        assert isinstance(broker, RedisBroker)
        self._inner = broker._handler
        assert self._inner is not None
        self.counts: dict[str, int] = {}
        broker._handler = self

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.counts[channel] = self.counts.get(channel, 0) + 1
        self._inner.on_publication(channel, pub, epoch)

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self._inner.on_join(channel, info)

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self._inner.on_leave(channel, info)

    async def reach(self, channel: str, count: int) -> None:
        async with asyncio.timeout(10):
            while self.counts.get(channel, 0) < count:
                await asyncio.sleep(0.01)


async def test_publications_during_a_recovering_subscribe_are_neither_lost_nor_doubled(
    redis: RedisServer, signing_keys: tuple[str, str]
) -> None:
    """While B reads the channel's history for a recovering subscribe, node A publishes
    three events just before the read (they are in the history reply and also arrive
    by pub/sub) and three just after it (they arrive only by pub/sub, before the reply
    is sent). The client must get each missed and racing event exactly once, in order."""
    key, channel = "race", "task:race"
    async with (
        start_nodes(1, [redis.url]) as (a,),
        run_server(signing_keys, engine="redis", redis_url=redis.url) as b,
    ):
        heard = Heard(b)
        first, first_events = await connected_subscription(b.ws_url, b.token("racer"), channel)
        await publish(a, key, range(1, 6))
        await delivered(first_events, 5)
        last = first_events.named("publication")[-1].pub
        epoch = first_events.named("subscribed")[0].stream_position.epoch
        await shut(first)
        await publish(a, key, range(6, 11))  # missed while away: nobody on B hears them

        broker = b.runtime.broker
        real_history = broker.history
        raced: list[str] = []

        async def history_raced_by_node_a(name: str, **options: Any) -> HistoryResult:
            if name != channel or options.get("since") is None or raced:
                return await real_history(name, **options)
            before = heard.counts.get(channel, 0)
            await publish(a, key, range(11, 14))
            await heard.reach(channel, before + 3)
            raced.append("before the read")
            result = await real_history(name, **options)
            before = heard.counts.get(channel, 0)
            await publish(a, key, range(14, 17))
            await heard.reach(channel, before + 3)
            raced.append("after the read")
            return result

        broker.history = history_raced_by_node_a  # type: ignore[method-assign]

        async def get_state(_channel: str) -> StreamPosition:
            return StreamPosition(offset=last.offset, epoch=epoch)

        second, second_events = await connected_subscription(
            b.ws_url, b.token("racer"), channel, get_state=get_state
        )
        try:
            await publish(a, key, range(17, 21))  # live again
            await delivered(second_events, 20)
            await asyncio.sleep(QUIET)
        finally:
            await shut(second)

    assert raced == ["before the read", "after the read"]
    (resumed,) = second_events.named("subscribed")  # no resync was needed afterwards
    assert resumed.was_recovering and resumed.recovered
    assert numbers(first_events) == list(range(1, 6))
    assert numbers(second_events) == list(range(6, 21))
    offsets = [ctx.pub.offset for ctx in second_events.named("publication")]
    assert offsets == list(range(last.offset + 1, last.offset + 16))


async def test_subscribers_are_told_the_stream_was_lost_when_redis_restarted_empty(
    redis: RedisServer,
) -> None:
    """Redis restarts empty, so the channel's history and epoch are gone. A client that
    stayed connected sees the epoch change on the next publication and resubscribes; a
    client that was away reconnects and resubscribes from its position; an app with
    get_state hands in its saved position. None may get a stream that silently skips
    what was lost: the first two are answered recovered=false, the third is refused
    with 112 so the SDK asks the app to reload (get_state again)."""
    key, channel = "lost", "task:lost"
    async with start_nodes(2, [redis.url]) as (a, b):
        clients = []
        try:
            stayed, stayed_events = await connected_subscription(
                a.ws_url, a.token("stayer"), channel
            )
            away, away_events = await connected_subscription(a.ws_url, a.token("away"), channel)
            clients += [stayed, away]
            await publish(b, key, range(1, 4))
            for events in (stayed_events, away_events):
                await delivered(events, 3)
            saved = StreamPosition(
                offset=away_events.named("publication")[-1].pub.offset,
                epoch=away_events.named("subscribed")[0].stream_position.epoch,
            )
            await away.disconnect()

            await redis.kill()
            await redis.start()
            assert await redis.dbsize() == 0
            for node in (a, b):
                await node.wait_ready(True, timeout=15)
            await publish(b, key, range(4, 5))
            again = await stayed_events.wait_for("subscribed", count=2, timeout=15)

            await away.connect()
            back = await away_events.wait_for("subscribed", count=2, timeout=15)

            asked: list[StreamPosition] = []

            async def get_state(_channel: str) -> StreamPosition:
                # The app's reload: the first time its saved position, then the
                # current one (what a refetch of its own data would pair with).
                if not asked:
                    asked.append(saved)
                    return saved
                response = await b.http.post(
                    "/api/history",
                    json={"channel": channel, "limit": 0},
                    headers={"X-API-Key": b.keys.api_key},
                )
                top = response.json()["result"]
                asked.append(StreamPosition(offset=top["offset"], epoch=top["epoch"]))
                return asked[-1]

            app, app_events = await connected_subscription(
                a.ws_url, a.token("app"), channel, get_state=get_state
            )
            clients.append(app)
            await publish(b, key, range(5, 6))
            for events in (stayed_events, away_events, app_events):
                await delivered(events, 5)
        finally:
            await shut(*clients)

    assert again.was_recovering and not again.recovered
    assert again.stream_position.epoch != saved.epoch
    assert back.was_recovering and not back.recovered
    assert back.stream_position.epoch == again.stream_position.epoch
    assert len(asked) == 2 and asked[1].epoch == again.stream_position.epoch
    # After the resync each follows the new stream.
    for events in (stayed_events, away_events, app_events):
        assert numbers(events)[-1] == 5
