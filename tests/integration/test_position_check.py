"""The periodic position check (client_channel_position_check_delay_seconds): a
publication that reached Redis history but never this node, with nothing published
after it, is still recovered by the subscriber.

Real redis-server, a real server on the Redis engine, the official Python SDK. The
loss is the one a Redis pub/sub reconnect causes: the broker never hands the
publication to the node (a wrapper between them drops exactly one), while the
publish itself, history included, is the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from adapters.brokers.redis import RedisBroker
from shim.core.broker import ClientInfo, Publication
from tests.conftest import RunningServer, run_server
from tests.integration.test_multinode import connected_subscription, delivered, numbered, shut
from tests.jsclient import Event, JsClient
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

CHECK_DELAY = 0.5


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


class LosesOne:
    """Stands between the Redis broker and its node; once armed, the next publication
    of `channel` is lost on the way (everything else is passed on unchanged)."""

    def __init__(self, server: RunningServer, channel: str) -> None:
        broker = server.runtime.broker
        assert isinstance(broker, RedisBroker)
        self._inner = broker._handler
        assert self._inner is not None
        self.channel = channel
        self.armed = False
        self.lost: list[int] = []
        broker._handler = self

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        if self.armed and channel == self.channel:
            self.armed = False
            self.lost.append(pub.offset)
            return
        self._inner.on_publication(channel, pub, epoch)

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self._inner.on_join(channel, info)

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self._inner.on_leave(channel, info)


async def test_a_publication_lost_at_the_tail_of_a_channel_is_recovered(
    redis: RedisServer, signing_keys: tuple[str, str]
) -> None:
    key, channel = "tail", "task:tail"
    async with run_server(
        signing_keys,
        engine="redis",
        redis_url=redis.url,
        client_channel_position_check_delay_seconds=CHECK_DELAY,
    ) as server:
        loses = LosesOne(server, channel)
        client, events = await connected_subscription(
            server.ws_url, server.token("tail-user"), channel
        )
        try:
            for n in range(1, 4):
                assert (await server.broadcast(numbered(key, n))).status_code == 200
            await delivered(events, 3)
            # In sync: several checks pass without disturbing the subscription.
            await asyncio.sleep(CHECK_DELAY * 4)
            assert len(events.named("subscribed")) == 1

            loses.armed = True
            assert (await server.broadcast(numbered(key, 4))).status_code == 200
            loop = asyncio.get_running_loop()
            started = loop.time()
            await delivered(events, 4, timeout=CHECK_DELAY * 3 + 5)
            took = loop.time() - started
            await asyncio.sleep(CHECK_DELAY * 3)  # nothing more comes
            resubscribes = [ctx.code for ctx in events.named("subscribing")]
        finally:
            await shut(client)

    assert loses.lost, "the publication was not lost on its way to the node"
    pubs = events.named("publication")
    assert [ctx.pub.data["n"] for ctx in pubs] == [1, 2, 3, 4]
    offsets = [ctx.pub.offset for ctx in pubs]
    assert offsets == list(range(offsets[0], offsets[0] + 4))
    assert offsets[-1] == loses.lost[0]
    # Told its state was insufficient, the SDK resubscribed and recovered the gap.
    assert resubscribes == [0, 2500]
    _, again = events.named("subscribed")[:2]
    assert again.was_recovering and again.recovered
    # Behind at one check, still behind at the next: at most two delays (plus a tick).
    assert took < CHECK_DELAY * 3 + 2


class HoldsOne(LosesOne):
    """As LosesOne, but the armed publication is handed over `delay` seconds late
    (a backlog between the engine and the node) instead of never."""

    delay = 0.6

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        if self.armed and channel == self.channel:
            self.armed = False
            self.lost.append(pub.offset)
            asyncio.get_running_loop().call_later(
                self.delay, self._inner.on_publication, channel, pub, epoch
            )
            return
        self._inner.on_publication(channel, pub, epoch)


async def test_a_publication_later_than_the_max_time_lag_is_recovered_once(
    redis: RedisServer, signing_keys: tuple[str, str]
) -> None:
    key, channel = "late", "task:late"
    async with run_server(
        signing_keys,
        engine="redis",
        redis_url=redis.url,
        client_channel_position_max_time_lag_seconds=0.3,
    ) as server:
        holds = HoldsOne(server, channel)
        client, events = await connected_subscription(
            server.ws_url, server.token("late-user"), channel
        )
        try:
            for n in range(1, 4):
                assert (await server.broadcast(numbered(key, n))).status_code == 200
            await delivered(events, 3)
            holds.armed = True
            assert (await server.broadcast(numbered(key, 4))).status_code == 200
            await events.wait_for("subscribing", lambda ctx: ctx.code == 2500)
            await delivered(events, 4)
            assert (await server.broadcast(numbered(key, 5))).status_code == 200
            await delivered(events, 5)
            await asyncio.sleep(HoldsOne.delay)  # the held one has come, and gone
            resubscribes = [ctx.code for ctx in events.named("subscribing")]
        finally:
            await shut(client)

    assert holds.lost, "the publication was not held"
    pubs = events.named("publication")
    assert [ctx.pub.data["n"] for ctx in pubs] == [1, 2, 3, 4, 5]
    offsets = [ctx.pub.offset for ctx in pubs]
    assert offsets == list(range(offsets[0], offsets[0] + 5))
    assert resubscribes == [0, 2500]
    _, again = events.named("subscribed")[:2]
    assert again.was_recovering and again.recovered


@pytest.mark.js
async def test_centrifuge_js_recovers_a_publication_lost_at_the_tail(
    redis: RedisServer, signing_keys: tuple[str, str]
) -> None:
    channel = "task:jstail"
    async with run_server(
        signing_keys,
        engine="redis",
        redis_url=redis.url,
        client_channel_position_check_delay_seconds=CHECK_DELAY,
    ) as server:
        loses = LosesOne(server, channel)
        async with JsClient(
            server.ws_url, server.token("js-tail"), minReconnectDelay=100, maxReconnectDelay=300
        ) as js:
            await js.call("connect")
            await js.wait_event("connected", timeout=5)
            await js.call("newSubscription", channel=channel, options={"recoverable": True})
            await js.call("subscribe", channel=channel, wait=True, timeout=5000)
            await js.wait_event(on(channel, "sub.subscribed"), timeout=5)
            for n in range(1, 4):
                assert (await server.broadcast(numbered("jstail", n))).status_code == 200
            await js.wait_event(
                lambda e: on(channel, "sub.publication")(e) and e["data"]["n"] == 3,
                timeout=5,
            )
            loses.armed = True
            assert (await server.broadcast(numbered("jstail", 4))).status_code == 200
            await js.wait_event(
                lambda e: on(channel, "sub.publication")(e) and e["data"]["n"] == 4,
                timeout=CHECK_DELAY * 3 + 5,
            )
            await asyncio.sleep(CHECK_DELAY * 3)  # nothing more comes
            pubs = js.find_events(on(channel, "sub.publication"))
            resubscribes = [e["code"] for e in js.find_events(on(channel, "sub.subscribing"))]
            subscribed = js.find_events(on(channel, "sub.subscribed"))

    assert loses.lost
    assert [p["data"]["n"] for p in pubs] == [1, 2, 3, 4]
    assert [p["offset"] for p in pubs] == list(range(pubs[0]["offset"], pubs[0]["offset"] + 4))
    assert resubscribes[1:] == [2500]
    assert subscribed[1]["wasRecovering"] is True and subscribed[1]["recovered"] is True


def on(channel: str, name: str) -> Callable[[Event], bool]:
    return lambda event: event["event"] == name and event["channel"] == channel
