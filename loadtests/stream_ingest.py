"""Ingest throughput, side by side: the HTTP path (POST /api/v1/broadcast) on one
node, and the durable stream path (the backend's XADD to one Redis stream) consumed
by one, two and three nodes, in one run.

The HTTP path runs twice: one request at a time (what keeps each task's order) and
--concurrency requests at a time (faster, but nothing orders concurrent requests).
Each setup gets a fresh throwaway redis-server (tests/redis_server.py) and real
`dex-shim serve` processes (tests/multinode.py) on the Redis engine. The workload is
the same for all: E `task.updated` messages over 20 tasks (`task:<id>` channels with
history, the default routes).

- HTTP: the messages in requests of --batch messages, --concurrency requests at a
  time; timed from the first request to the last answer (every answer means stored).
- Stream: the nodes hold their partitions first; then all E entries are appended
  back to back (one pipeline), and the clock runs from the first XADD until every
  entry is published and committed (the input cursor reached the last entry and
  every partition stream is empty).

Setups run interleaved, --rounds times; the table gives each setup's median, and its
ratio to the first (HTTP, one request at a time), and the CPU time the nodes used
per 1,000 entries (from /proc: less disturbed by the machine's other load than the
wall clock). Afterwards, for every setup that
promises order, a few task channels' histories are checked to hold their entries in
append order (a measurement that reordered would be worthless).

Run: `python -m loadtests.stream_ingest [--entries 4000] [--rounds 3]`. Everything
stays on 127.0.0.1; every wait has a deadline. The load generator, Redis and the
nodes share the machine: with 2 cores, a third node adds processes, not cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from redis.asyncio import Redis

from loadtests.servers import parse_cpu_seconds
from tests.multinode import NodeProcess, start_nodes
from tests.redis_server import RedisServer

STREAM = "dex:ingest-measure"
TASKS = [f"measure-{i:02d}" for i in range(20)]
PARTITIONS = 8
DEADLINE_SECONDS = 120.0


@dataclass(slots=True, frozen=True)
class Setup:
    label: str
    path: str  # "http" or "stream"
    nodes: int
    # HTTP requests in flight at once (0: --concurrency). One at a time keeps each
    # task's order; concurrent requests do not (nothing orders them).
    concurrency: int = 1


SETUPS = (
    Setup("HTTP, 1 node, 1 request at a time", "http", 1),
    Setup("HTTP, 1 node, concurrent requests (no order)", "http", 1, concurrency=0),
    Setup("stream, 1 node", "stream", 1),
    Setup("stream, 2 nodes", "stream", 2),
    Setup("stream, 3 nodes", "stream", 3),
)


def messages(count: int) -> list[dict[str, object]]:
    return [
        {
            "type": "task.updated",
            "payload": {"task_id": TASKS[n % len(TASKS)], "n": n, "status": "running"},
        }
        for n in range(count)
    ]


async def run_http(
    node: NodeProcess, bodies: list[dict[str, object]], batch: int, concurrency: int
) -> float:
    chunks = [bodies[i : i + batch] for i in range(0, len(bodies), batch)]
    queue: asyncio.Queue[list[dict[str, object]]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def sender() -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            response = await node.broadcast(chunk)
            if response.status_code != 200:
                raise RuntimeError(f"broadcast answered {response.status_code}: {response.text}")

    started = time.perf_counter()
    async with asyncio.timeout(DEADLINE_SECONDS):
        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run_stream(producer: Redis, bodies: list[dict[str, object]]) -> float:
    started = time.perf_counter()
    pipe = producer.pipeline(transaction=False)
    for body in bodies:
        pipe.xadd(STREAM, {"message": orjson.dumps(body)})
    ids = await pipe.execute()
    last = ids[-1]
    async with asyncio.timeout(DEADLINE_SECONDS):
        while True:
            if await producer.get(f"{STREAM}:cursor") == last:
                pipe = producer.pipeline(transaction=False)
                for partition in range(PARTITIONS):
                    pipe.xlen(f"{STREAM}:p{partition}")
                if sum(await pipe.execute()) == 0:
                    break
            await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def partitions_spread(producer: Redis, nodes: int) -> None:
    """Until every node holds partitions (a lease token starts with its node's name)."""
    async with asyncio.timeout(30):
        while True:
            owners = set()
            for partition in range(PARTITIONS):
                token = await producer.get(f"{STREAM}:lease:p{partition}")
                if isinstance(token, bytes):
                    owners.add(token.decode().rsplit(":", 2)[0])
            if len(owners) == nodes:
                return
            await asyncio.sleep(0.1)


async def check_order(node: NodeProcess, count: int) -> None:
    """A few task channels' histories (the last 100 publications, the default) are
    their entries' tail, once each, in append order."""
    for index, task in enumerate(TASKS[:3]):
        response = await node.http.post(
            "/api/history",
            json={"channel": f"task:{task}", "limit": -1},
            headers={"X-API-Key": node.keys.api_key},
        )
        got = [pub["data"]["n"] for pub in response.json()["result"]["publications"]]
        wanted = list(range(index, count, len(TASKS)))
        if got != wanted[-len(got) :] or not got:
            raise RuntimeError(f"task:{task} history out of order or incomplete: {got[:20]}")


def nodes_cpu_seconds(nodes: Sequence[NodeProcess]) -> float:
    return sum(parse_cpu_seconds(Path(f"/proc/{n.pid}/stat").read_text()) for n in nodes)


async def measure(setup: Setup, count: int, batch: int, concurrency: int) -> tuple[float, float]:
    """(entries per second, node CPU milliseconds per 1,000 entries)."""
    bodies = messages(count)
    settings: dict[str, str] = {}
    if setup.path == "stream":
        settings.update(
            {
                "ingest_stream_key": STREAM,
                "ingest_stream_partitions": str(PARTITIONS),
                "ingest_stream_claim_idle_seconds": "3",
            }
        )
    async with RedisServer() as redis_server:
        producer = Redis.from_url(redis_server.url)
        try:
            async with start_nodes(setup.nodes, [redis_server.url], settings=settings) as nodes:
                for node in nodes:
                    await node.wait_ready(True, timeout=30)
                if setup.path == "stream":
                    await partitions_spread(producer, setup.nodes)
                cpu_before = nodes_cpu_seconds(nodes)
                if setup.path == "http":
                    in_flight = setup.concurrency or concurrency
                    seconds = await run_http(nodes[0], bodies, batch, in_flight)
                else:
                    seconds = await run_stream(producer, bodies)
                cpu = nodes_cpu_seconds(nodes) - cpu_before
                if setup.concurrency:
                    await check_order(nodes[0], count)
        finally:
            await producer.aclose()
    return count / seconds, cpu * 1000 / count * 1000


def table(results: dict[str, list[tuple[float, float]]]) -> str:
    base = statistics.median(rate for rate, _cpu in results[SETUPS[0].label])
    lines = [
        "| setup | entries/s (median) | runs | vs the first | node CPU ms per 1,000 entries (median) |",
        "|---|---|---|---|---|",
    ]
    for setup in SETUPS:
        runs = results[setup.label]
        median = statistics.median(rate for rate, _cpu in runs)
        cpu = statistics.median(cpu for _rate, cpu in runs)
        shown = ", ".join(f"{rate:,.0f}" for rate, _cpu in runs)
        lines.append(
            f"| {setup.label} | {median:,.0f} | {shown} | {median / base:.2f}x | {cpu:,.0f} |"
        )
    return "\n".join(lines)


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="messages per HTTP request")
    parser.add_argument("--concurrency", type=int, default=4, help="HTTP requests at a time")
    args = parser.parse_args(argv)
    results: dict[str, list[tuple[float, float]]] = {setup.label: [] for setup in SETUPS}
    for round_number in range(args.rounds):
        for setup in SETUPS:
            rate, cpu = await measure(setup, args.entries, args.batch, args.concurrency)
            results[setup.label].append((rate, cpu))
            print(
                f"round {round_number + 1}: {setup.label}: {rate:,.0f} entries/s", file=sys.stderr
            )
    print(
        f"{args.entries} task.updated messages over {len(TASKS)} tasks, "
        f"{args.rounds} rounds, {PARTITIONS} partitions; HTTP: {args.batch} per request, "
        f"{args.concurrency} at a time"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
