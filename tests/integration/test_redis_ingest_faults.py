"""Durable stream ingest when publishing cannot finish: the history shard is down, or
slow while the node is told to stop.

Two real redis-server processes as two shards: the ingest stream lives on the first
(that is where nodes keep it), the channel used here on the second, so the second can
be killed or paused while the stream stays readable. Nodes are real `dex-shim serve`
processes; the subscriber is the official Python SDK.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from adapters.brokers.redis import shard_index
from adapters.ingest.redis_stream import backlog
from tests.integration.test_multinode import connected_subscription, numbers, shut
from tests.multinode import NodeProcess, start_nodes
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

STREAM = "dex:ingest-faults"
SETTINGS = {"ingest_stream_key": STREAM, "ingest_stream_claim_idle_seconds": "1"}


@pytest.fixture
async def shards() -> AsyncIterator[tuple[RedisServer, RedisServer]]:
    async with RedisServer() as first, RedisServer() as second:
        yield first, second


def on_second_shard(prefix: str) -> str:
    """A task id whose channel lives on the second of two shards."""
    for i in range(100):
        key = f"{prefix}-{i}"
        if shard_index(f"task:{key}", 2) == 1:
            return key
    raise AssertionError("no key on shard 1")


def entry(key: str, n: int) -> dict[str, bytes]:
    return {"message": orjson.dumps({"type": "task.updated", "payload": {"task_id": key, "n": n}})}


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def history(node: NodeProcess, channel: str) -> list[Any]:
    """The channel's stored publications, through the server API."""
    response = await node.http.post(
        "/api/history",
        json={"channel": channel, "limit": -1},
        headers={"X-API-Key": node.keys.api_key},
    )
    assert response.status_code == 200, response.text
    return [pub["data"]["n"] for pub in response.json()["result"]["publications"]]


async def split_to_partition(producer: Redis, entry_id: str) -> bool:
    """The entry was copied to its partition (and is now its owner's to publish)."""
    cursor = await producer.get(f"{STREAM}:cursor")
    return cursor is not None and cursor.decode() == entry_id


async def test_an_entry_whose_publish_fails_stays_pending_and_is_published_after_recovery(
    shards: tuple[RedisServer, RedisServer],
) -> None:
    first, second = shards
    key = on_second_shard("down")
    channel = f"task:{key}"
    producer = Redis.from_url(first.url)
    # The default claim idle time (30 s): the node must retry its own entry by itself,
    # not wait until it could claim it as abandoned.
    settings = {"ingest_stream_key": STREAM}
    try:
        async with start_nodes(1, [first.url, second.url], settings=settings) as (node,):
            await node.wait_ready(True)
            await second.kill()
            entry_id = (await producer.xadd(STREAM, entry(key, 1))).decode()

            # Read, tried, refused by the dead shard, tried again: never committed.
            async def retried() -> bool:
                return node.log_path.read_text().count("batch not stored, retrying") >= 3

            await until(lambda: split_to_partition(producer, entry_id))
            await until(retried)
            assert await backlog(producer, STREAM) == 1

            await second.start()  # empty: the channel's history starts again
            await until(lambda: _nothing_pending(producer), timeout=15)
            stored = await history(node, channel)
    finally:
        await producer.aclose()

    assert stored == [1]


async def _nothing_pending(producer: Redis) -> bool:
    return await backlog(producer, STREAM) == 0


async def test_an_entry_in_progress_at_shutdown_is_published_and_acknowledged_once(
    shards: tuple[RedisServer, RedisServer],
) -> None:
    """SIGTERM arrives while an entry's publish waits on a paused history shard. The
    node finishes that entry (published, acknowledged) before it goes; a node started
    afterwards finds nothing to claim and publishes nothing again."""
    first, second = shards
    key = on_second_shard("stop")
    channel = f"task:{key}"
    pause_ms = 2000
    producer = Redis.from_url(first.url)
    try:
        async with start_nodes(1, [first.url, second.url], settings=SETTINGS) as (node,):
            await node.wait_ready(True)
            client, sub_events = await connected_subscription(
                node.ws_url, node.token("watcher"), channel
            )
            try:
                # Writes to the history shard wait until the pause ends.
                assert await second.command("CLIENT", "PAUSE", str(pause_ms), "WRITE") == b"+OK\r\n"
                paused_at = time.monotonic()
                entry_id = (await producer.xadd(STREAM, entry(key, 1))).decode()

                await until(lambda: split_to_partition(producer, entry_id))
                await asyncio.sleep(0.2)  # read by its owner: the publish is now waiting
                node.process.send_signal(signal.SIGTERM)
                signalled_at = time.monotonic()
                try:
                    async with asyncio.timeout(15):
                        await node.process.wait()
                except TimeoutError:
                    raise AssertionError(node.log_tail(60)) from None
                await sub_events.wait_for("publication", timeout=5)
                await asyncio.sleep(0.3)
            finally:
                await shut(client)
        # The entry really was mid-publish when the signal came.
        assert signalled_at - paused_at < pause_ms / 1000 - 0.5
        assert node.process.returncode == 0, node.log_tail()
        assert await _nothing_pending(producer), node.log_tail(40)

        async with start_nodes(1, [first.url, second.url], settings=SETTINGS) as (after,):
            await after.wait_ready(True)
            await asyncio.sleep(2.0)  # past the claim idle time: anything pending is taken
            stored = await history(after, channel)
    finally:
        await producer.aclose()

    assert numbers(sub_events) == [1]
    assert stored == [1]


async def test_shutdown_waits_for_an_entry_in_progress_only_within_the_grace_period(
    shards: tuple[RedisServer, RedisServer],
) -> None:
    """An entry whose publish cannot finish in time does not hold the node: it goes at
    the end of its grace period and the entry, never acknowledged, is claimed and
    published by the next node."""
    first, second = shards
    key = on_second_shard("stuck")
    channel = f"task:{key}"
    settings = {**SETTINGS, "shutdown_grace_seconds": "1"}
    producer = Redis.from_url(first.url)
    try:
        async with start_nodes(1, [first.url, second.url], settings=settings) as (node,):
            await node.wait_ready(True)
            assert await second.command("CLIENT", "PAUSE", "2500", "WRITE") == b"+OK\r\n"
            entry_id = (await producer.xadd(STREAM, entry(key, 1))).decode()

            await until(lambda: split_to_partition(producer, entry_id))
            await asyncio.sleep(0.2)  # read by its owner: the publish is now waiting
            node.process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            async with asyncio.timeout(10):
                await node.process.wait()
            exited_after = time.monotonic() - signalled_at
        left_pending = await backlog(producer, STREAM)

        async with start_nodes(1, [first.url, second.url], settings=settings) as (after,):
            await until(lambda: _nothing_pending(producer), timeout=15)
            stored = await history(after, channel)
    finally:
        await producer.aclose()

    assert exited_after < 2.0  # the grace period (1 s), not the pause (2.5 s)
    assert left_pending == 1
    # The stopped node's publish may still have run when the pause ended; the next
    # owner's is then Superseded (fenced), so the channel has it once either way.
    assert stored == [1]
