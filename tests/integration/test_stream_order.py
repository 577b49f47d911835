"""Stream ingest with several nodes keeps each task's entries in append order, through
a node killed (SIGKILL) and a node paused (SIGSTOP) mid-stream.

A real redis-server started here; real `dex-shim serve` processes consuming the one
stream the backend appends to with XADD; subscribers are the official Python SDK on
a node that stays up. 1,000 entries over 20 tasks (in two projects) are appended
back to back, half before and half after the faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from adapters.ingest.redis_stream import backlog
from tests.integration.test_multinode import shut
from tests.integration.test_redis_ingest_faults import history
from tests.multinode import NodeProcess, start_nodes
from tests.pyclient import SubEvents, new_client, new_subscription
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

STREAM = "dex:ingest-order"
LEASE_SECONDS = 1.0
SETTINGS = {
    "ingest_stream_key": STREAM,
    "ingest_stream_claim_idle_seconds": str(LEASE_SECONDS),
    "ingest_stream_partitions": "6",
}
TASKS = [f"t{i:02d}" for i in range(20)]
PROJECTS = ["pa", "pb"]
ENTRIES = 1000


def project_of(task: str) -> str:
    return PROJECTS[int(task[1:]) % 2]


def plan() -> list[tuple[str, int]]:
    """(task, n) in append order: n counts up over the whole stream; tasks interleave
    unevenly (a burst of one task, then round robin) as a real backlog would."""
    order = [TASKS[0]] * 100 + [TASKS[i % len(TASKS)] for i in range(ENTRIES - 100)]
    return [(task, n) for n, task in enumerate(order)]


async def append(producer: Redis, entries: list[tuple[str, int]]) -> None:
    """Back to back, in one pipeline: the backend's XADD, nothing else."""
    pipe = producer.pipeline(transaction=False)
    for task, n in entries:
        body = {
            "type": "task.updated",
            "payload": {"task_id": task, "project_id": project_of(task), "n": n},
        }
        pipe.xadd(STREAM, {"message": orjson.dumps(body)})
    await pipe.execute()


async def until(
    check: Callable[[], Awaitable[bool]],
    timeout: float,
    explain: Callable[[], Awaitable[str]] | None = None,
) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        if explain is None:
            raise
        raise AssertionError(await explain()) from None


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


async def owners(producer: Redis) -> set[str]:
    """Nodes holding at least one partition lease (a token is "<node>:<hex>:<hex>")."""
    found = set()
    for partition in range(int(SETTINGS["ingest_stream_partitions"])):
        token = await producer.get(f"{STREAM}:lease:p{partition}")
        if token is not None:
            found.add(token.decode().rsplit(":", 2)[0])
    return found


@contextlib.asynccontextmanager
async def subscribed(node: NodeProcess) -> AsyncIterator[dict[str, SubEvents]]:
    """One client on `node` subscribed to every task and project channel."""
    client, events = new_client(node.ws_url, node.token("watcher"))
    await client.connect()
    await events.wait_for("connected")
    subs: dict[str, SubEvents] = {}
    try:
        for channel in [f"task:{t}" for t in TASKS] + [f"project:{p}" for p in PROJECTS]:
            sub, sub_events = new_subscription(client, channel)
            await sub.subscribe()
            await sub_events.wait_for("subscribed")
            subs[channel] = sub_events
        yield subs
    finally:
        await shut(client)


def received(events: SubEvents) -> list[tuple[str, int]]:
    return [(ctx.pub.data["task_id"], ctx.pub.data["n"]) for ctx in events.named("publication")]


def expected_by_channel(entries: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    channels: dict[str, list[tuple[str, int]]] = {}
    for task, n in entries:
        channels.setdefault(f"task:{task}", []).append((task, n))
        channels.setdefault(f"project:{project_of(task)}", []).append((task, n))
    return channels


def check_order(subs: dict[str, SubEvents], entries: list[tuple[str, int]]) -> dict[str, int]:
    """Every channel got exactly its entries; each task's in append order (a project
    channel interleaves its tasks as their partitions publish). Returns the number
    of duplicates per channel (the fence allows none)."""
    duplicates: dict[str, int] = {}
    for channel, wanted in expected_by_channel(entries).items():
        got = received(subs[channel])
        duplicates[channel] = len(got) - len(set(got))
        for task in {t for t, _n in wanted}:
            mine = [n for t, n in got if t == task]
            assert mine == [n for t, n in wanted if t == task], (channel, task)
        if channel.startswith("task:"):
            assert got == wanted, channel
    return duplicates


async def all_delivered(subs: dict[str, SubEvents], entries: list[tuple[str, int]]) -> bool:
    return all(
        len(received(subs[channel])) >= len(wanted)
        for channel, wanted in expected_by_channel(entries).items()
    )


async def run_with_faults(
    redis_server: RedisServer, count: int, faults: Callable[[list[NodeProcess]], Awaitable[Any]]
) -> None:
    entries = plan()
    producer = Redis.from_url(redis_server.url)
    try:
        async with start_nodes(count, [redis_server.url], settings=SETTINGS) as nodes:
            watcher_node = nodes[-1]  # never killed nor paused
            for node in nodes:
                await node.wait_ready(True)

            async def balanced() -> bool:
                return len(await owners(producer)) == count

            await until(balanced, timeout=15)
            async with subscribed(watcher_node) as subs:
                await append(producer, entries[:500])

                async def some_published() -> bool:
                    return len(received(subs["task:t00"])) >= 40

                await until(some_published, timeout=15)
                resumed = await faults(nodes)
                await append(producer, entries[500:])

                async def explain() -> str:
                    missing = {
                        channel: len(wanted) - len(received(subs[channel]))
                        for channel, wanted in expected_by_channel(entries).items()
                    }
                    leases = {
                        p: await producer.get(f"{STREAM}:lease:p{p}")
                        for p in range(int(SETTINGS["ingest_stream_partitions"]))
                    }
                    return (
                        f"missing {missing}, backlog {await backlog(producer, STREAM)}, "
                        f"leases {leases}\n{watcher_node.log_tail(40)}"
                    )

                await until(lambda: all_delivered(subs, entries), timeout=40, explain=explain)
                await resumed()
                await until(lambda: _drained(producer), timeout=15)
                await asyncio.sleep(0.5)  # anything repeated late would show now
                duplicates = check_order(subs, entries)
            assert sum(duplicates.values()) == 0, duplicates
            stored = await history(watcher_node, "task:t00")
            assert stored[-10:] == [n for t, n in entries if t == "t00"][-10:]
            assert await backlog(producer, STREAM) == 0
    finally:
        await producer.aclose()


async def _drained(producer: Redis) -> bool:
    return await backlog(producer, STREAM) == 0


async def test_two_nodes_keep_each_tasks_order_when_one_is_killed_mid_stream(
    redis_server: RedisServer,
) -> None:
    async def kill_first(nodes: list[NodeProcess]) -> Callable[[], Awaitable[None]]:
        await nodes[0].kill()

        async def nothing() -> None:
            return None

        return nothing

    await run_with_faults(redis_server, 2, kill_first)


async def test_three_nodes_keep_each_tasks_order_through_a_kill_and_a_pause(
    redis_server: RedisServer,
) -> None:
    """Node 0 is killed; node 1 is paused past its leases (its partitions move to the
    others) and resumes with whatever it had in flight: fenced, never replayed."""

    async def kill_and_pause(nodes: list[NodeProcess]) -> Callable[[], Awaitable[None]]:
        nodes[1].process.send_signal(signal.SIGSTOP)
        await nodes[0].kill()

        async def resume() -> None:
            # Paused since before the second half: well past its leases.
            nodes[1].process.send_signal(signal.SIGCONT)
            await nodes[1].wait_ready(True, timeout=15)

        return resume

    await run_with_faults(redis_server, 3, kill_and_pause)
