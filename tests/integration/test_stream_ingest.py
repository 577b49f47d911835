"""Durable ingest through a Redis stream, and the cutover flag shared by nodes.

Real redis-server processes started by the tests, real servers, the Python SDK."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import ADMIN_KEY, RunningServer, run_server
from tests.integration.test_ops_metrics import scrape, value
from tests.pyclient import new_client, new_subscription
from tests.redis_server import RedisServer

STREAM = "dex:ingest"
GROUP = "dex-shim"


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _message(n: int, task: str = "s1") -> dict[str, bytes]:
    body = {"type": "task.updated", "payload": {"task_id": task, "n": n}}
    return {"message": orjson.dumps(body)}


async def _wait_until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def test_stream_entries_are_published_then_acknowledged(
    signing_keys: tuple[str, str], redis_server: RedisServer, redis: Redis
) -> None:
    async with run_server(
        signing_keys, engine="redis", redis_url=redis_server.url, ingest_stream_key=STREAM
    ) as server:
        client, _events = new_client(server.ws_url, server.token("alice"))
        await client.connect()
        sub, sub_events = new_subscription(client, "task:s1")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")

        for n in range(20):
            await redis.xadd(STREAM, _message(n))
        await redis.xadd(STREAM, {"message": b"{not json"})

        await sub_events.wait_for("publication", count=20)
        assert [ctx.pub.data["n"] for ctx in sub_events.named("publication")] == list(range(20))

        consumer = server.runtime.stream_consumer
        assert consumer is not None

        async def all_committed() -> bool:
            return await consumer.backlog() == 0

        await _wait_until(all_committed)
        refused = await redis.xrange(f"{STREAM}:refused")
        assert len(refused) == 1 and b"not valid JSON" in refused[0][1][b"error"]
        ready = (await server.http.get("/ready")).json()
        assert ready["ingest_stream"] is True
        await client.disconnect()


async def test_entries_of_a_dead_consumer_are_claimed_and_published_once(
    signing_keys: tuple[str, str], redis_server: RedisServer, redis: Redis
) -> None:
    # A node of the previous version (one consumer group, a "done" marker per entry)
    # read three entries and died before acknowledging them; it had published (and
    # marked) the first one already. The upgraded node starts where it stopped.
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [(await redis.xadd(STREAM, _message(n))).decode() for n in range(3)]
    taken = await redis.xreadgroup(GROUP, "dead-node", {STREAM: ">"}, count=3)
    assert len(taken[0][1]) == 3
    await redis.set(f"{STREAM}:done:{ids[0]}", b"1")

    async with run_server(
        signing_keys,
        engine="redis",
        redis_url=redis_server.url,
        ingest_stream_key=STREAM,
        ingest_stream_claim_idle_seconds=1,
    ) as server:
        consumer = server.runtime.stream_consumer
        assert consumer is not None

        async def nothing_pending() -> bool:
            old_group = (await redis.xpending(STREAM, GROUP))["pending"]
            return old_group == 0 and await consumer.backlog() == 0

        await _wait_until(nothing_pending, timeout=15)
        # Published before any client could subscribe: the channel's history shows it.
        history = await server.runtime.broker.history("task:s1", limit=-1)
        received = [orjson.loads(pub.data)["n"] for pub in history.publications]
        assert received == [1, 2]  # entry 0 was already published: not again
        assert consumer.stats.split == 2
        assert consumer.stats.skipped_already_published == 1


async def test_a_node_resuming_mid_publish_after_losing_its_lease_repeats_and_reorders_nothing(
    signing_keys: tuple[str, str], redis_server: RedisServer, redis: Redis
) -> None:
    """Node A has read entry 1 and is about to send its publish when it freezes (as
    under SIGSTOP: no lease renewal either). Node B takes the partition over and
    publishes entries 1 and 2. Then A wakes and sends its publish of entry 1: the
    channel refuses it (fenced), and A's commit is refused, so A stops there."""
    settings: dict[str, Any] = {
        "engine": "redis",
        "redis_url": redis_server.url,
        "ingest_stream_key": STREAM,
        "ingest_stream_claim_idle_seconds": 1,
        "ingest_stream_partitions": 1,
    }
    async with run_server(signing_keys, node_name="a", **settings) as a:
        consumer_a = a.runtime.stream_consumer
        assert consumer_a is not None and consumer_a._task is not None
        frozen, thaw = asyncio.Event(), asyncio.Event()
        publish_events = a.runtime.ingestor.publish_events

        async def freezing(events: Any, fences: Any = ()) -> Any:
            frozen.set()
            await thaw.wait()
            return await publish_events(events, fences)

        a.runtime.ingestor.publish_events = freezing  # type: ignore[method-assign]
        await redis.xadd(STREAM, _message(1))
        await asyncio.wait_for(frozen.wait(), 10)
        consumer_a._task.cancel()  # its lease manager freezes too: the lease runs out

        async with run_server(signing_keys, node_name="b", **settings) as b:
            client, _events = new_client(b.ws_url, b.token("alice"))
            await client.connect()
            sub, sub_events = new_subscription(client, "task:s1")
            await sub.subscribe()
            await sub_events.wait_for("subscribed")
            await redis.xadd(STREAM, _message(2))

            async def stored() -> list[int]:
                history = await b.runtime.broker.history("task:s1", limit=-1)
                return [orjson.loads(pub.data)["n"] for pub in history.publications]

            async def both_published_by_b() -> bool:
                return await stored() == [1, 2]

            await _wait_until(both_published_by_b, timeout=15)
            thaw.set()

            async def a_fenced() -> bool:
                return consumer_a.stats.fenced == 1

            await _wait_until(a_fenced)
            await asyncio.sleep(0.3)
            assert await stored() == [1, 2]
            live = [ctx.pub.data["n"] for ctx in sub_events.named("publication")]
            assert live in ([1, 2], [2])  # 1 may have come before the subscription
            # What each node's /metrics says of it.
            samples_a, samples_b = await scrape(a), await scrape(b)
            assert value(samples_a, "ingest_stream_total", kind="superseded") == 1
            assert value(samples_a, "ingest_stream_total", kind="fenced") == 1
            assert value(samples_a, "ingest_stream_total", kind="consumed") == 0
            assert value(samples_b, "ingest_stream_total", kind="consumed") == 2
            assert value(samples_b, "ingest_stream_partitions_held") == 1
            consumer_b = b.runtime.stream_consumer
            assert consumer_b is not None and await consumer_b.backlog() == 0
            await client.disconnect()


async def test_stream_ingest_survives_a_redis_restart(
    signing_keys: tuple[str, str], redis_server: RedisServer
) -> None:
    async with run_server(
        signing_keys, engine="redis", redis_url=redis_server.url, ingest_stream_key=STREAM
    ) as server:
        consumer = server.runtime.stream_consumer
        assert consumer is not None
        await _wait_until(_true_when(lambda: consumer.running))

        await redis_server.kill()

        async def not_ready() -> bool:
            return (await server.http.get("/ready")).status_code == 503

        await _wait_until(not_ready)
        await redis_server.start()
        client, _events = new_client(server.ws_url, server.token("alice"))
        await client.connect()
        sub, sub_events = new_subscription(client, "task:s1")
        await sub.subscribe()
        await sub_events.wait_for("subscribed", timeout=15)
        redis = Redis.from_url(redis_server.url)
        try:
            await redis.xadd(STREAM, _message(7))
            publication = await sub_events.wait_for("publication", timeout=15)
            assert publication.pub.data["n"] == 7
        finally:
            await redis.aclose()

        async def ready_again() -> bool:
            return (await server.http.get("/ready")).status_code == 200

        await _wait_until(ready_again, timeout=15)
        await client.disconnect()


def _true_when(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate


@contextlib.asynccontextmanager
async def two_nodes(
    signing_keys: tuple[str, str], redis_server: RedisServer
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two nodes on one Redis, in this test's process, so named (the default name is
    hostname:pid)."""
    async with (
        run_server(signing_keys, engine="redis", redis_url=redis_server.url, node_name="a") as a,
        run_server(signing_keys, engine="redis", redis_url=redis_server.url, node_name="b") as b,
    ):
        yield a, b


async def test_cutover_changed_on_one_node_reaches_the_other(
    signing_keys: tuple[str, str], redis_server: RedisServer
) -> None:
    async with two_nodes(signing_keys, redis_server) as (node_a, node_b):
        client, events = new_client(node_b.ws_url, node_b.token("alice"))
        await client.connect()
        await events.wait_for("connected")

        response = await node_a.http.post(
            "/api/v1/admin/cutover",
            json={"channels_percent": 40, "allow_users": ["alice"]},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        assert response.status_code == 200, response.text
        version = response.json()["cutover"]["version"]

        async def b_has_it() -> bool:
            state = node_b.runtime.cutover
            return state.version == version and state.channels_percent == 40

        await _wait_until(b_has_it, timeout=5)
        config = await node_b.http.get(
            "/api/v1/realtime/config",
            headers={"Authorization": f"Bearer {node_b.token('alice')}"},
        )
        assert config.json()["protocol"] == "channels"

        async def both_nodes_counted() -> bool:
            report = (
                await node_a.http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": ADMIN_KEY})
            ).json()
            return len(report["nodes"]) == 2 and report["totals"]["channels"] == 1

        await _wait_until(both_nodes_counted, timeout=15)
        await client.disconnect()


async def test_server_api_user_actions_reach_connections_on_other_nodes(
    signing_keys: tuple[str, str], redis_server: RedisServer
) -> None:
    from tests.conftest import API_KEY

    async with two_nodes(signing_keys, redis_server) as (node_a, node_b):
        client, events = new_client(node_b.ws_url, node_b.token("alice"))
        await client.connect()
        await events.wait_for("connected")
        sub, sub_events = new_subscription(client, "task:remote")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")

        # The API call goes to node A; alice is connected to node B.
        response = await node_a.http.post(
            "/api/unsubscribe",
            json={"user": "alice", "channel": "task:remote"},
            headers={"X-API-Key": API_KEY},
        )
        assert response.json() == {"result": {}}
        unsubscribed = await sub_events.wait_for("unsubscribed", timeout=5)
        assert unsubscribed.code == 2000

        response = await node_a.http.post(
            "/api/disconnect",
            json={"user": "alice", "disconnect": {"code": 4501, "reason": "go away"}},
            headers={"X-API-Key": API_KEY},
        )
        assert response.json() == {"result": {}}
        gone = await events.wait_for("disconnected", timeout=5)
        assert (gone.code, gone.reason) == (4501, "go away")


async def test_cutover_changes_after_redis_restarted_empty_reach_every_node(
    signing_keys: tuple[str, str], redis_server: RedisServer
) -> None:
    """A Redis that restarts empty counts cutover versions from 1 again; changes made
    after it must still win over the higher versions the nodes saw before."""

    async def change(node: RunningServer, percent: int) -> None:
        response = await node.http.post(
            "/api/v1/admin/cutover",
            json={"channels_percent": percent},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        assert response.status_code == 200, response.text

    async def percent_of(node: RunningServer) -> float:
        report = await node.http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": ADMIN_KEY})
        return float(report.json()["cutover"]["channels_percent"])

    async def both_at(percent: int) -> None:
        async def reached() -> bool:
            return [await percent_of(a), await percent_of(b)] == [percent, percent]

        await _wait_until(reached, timeout=15)

    async with two_nodes(signing_keys, redis_server) as (a, b):
        for percent in (10, 20, 30):
            await change(a, percent)
        await both_at(30)
        assert a.runtime.cutover.version >= 3

        await redis_server.kill()
        await redis_server.start()
        assert await redis_server.dbsize() == 0

        # The first save after the restart may meet a connection that has not noticed
        # the restart yet (503); the admin retries, as the console does.
        async def saved() -> bool:
            response = await a.http.post(
                "/api/v1/admin/cutover",
                json={"channels_percent": 40},
                headers={"X-Admin-Key": ADMIN_KEY},
            )
            return response.status_code == 200

        await _wait_until(saved, timeout=15)
        await both_at(40)
        await change(b, 50)  # and through the other node, with the next version
        await both_at(50)
