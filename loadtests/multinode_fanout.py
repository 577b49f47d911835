"""Fan-out throughput, side by side: one node on the memory engine, one node on Redis,
two nodes on Redis (subscribers split across them, publications entering node 0).

Each setup runs real `dex-shim serve` processes (tests/multinode.py) and, for Redis, a
fresh throwaway redis-server (tests/redis_server.py). S bare Centrifuge clients
subscribe to one channel; then one burst of P publications enters through
POST /api/v1/broadcast (P events in concurrent requests of --batch events each).
Measured: deliveries per second from the first request sent to the last delivery,
publications per second accepted by the ingest, and delivery latency.

Run: `python -m loadtests.multinode_fanout [--subscribers 200] [--publications 500]`.
Everything stays on 127.0.0.1; every wait has a deadline. Numbers, not assertions:
the clients share this machine, so they measure the whole loop, not the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from loadtests.measure_core import (
    SENT_FIELD,
    CentrifugeClient,
    Tally,
    close_clients,
    percentile,
    ping_count,
    raise_fd_limit,
    run_client_loop,
    sent_times,
)
from tests.multinode import NodeProcess, start_nodes
from tests.redis_server import RedisServer

CHANNEL_KEY = "fanout"  # task:fanout through the default `task.` route
_FILLER = "status changed; " * 12


@dataclass(slots=True, frozen=True)
class Setup:
    label: str
    engine: str  # "memory" or "redis"
    nodes: int


SETUPS = (
    Setup("memory, 1 node", "memory", 1),
    Setup("redis, 1 node", "redis", 1),
    Setup("redis, 2 nodes", "redis", 2),
)


@dataclass(slots=True, frozen=True)
class Options:
    subscribers: int = 200
    publications: int = 500
    # Events per POST; the burst's POSTs are all in flight at once.
    batch: int = 50
    connect_concurrency: int = 50
    delivery_timeout: float = 60.0


@dataclass(slots=True, frozen=True)
class Result:
    label: str
    subscribers: int
    publications: int
    expected: int
    delivered: int
    # First POST sent to last delivery.
    elapsed_s: float
    # First POST sent to last POST answered.
    ingest_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    # WebSocket frames the subscribers read in the burst.
    frames: int
    # CPU seconds the node processes (all of them) and redis-server used in the burst.
    node_cpu_s: float
    redis_cpu_s: float

    @property
    def deliveries_per_s(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def ingest_per_s(self) -> float:
        return self.publications / self.ingest_s if self.ingest_s > 0 else math.nan


def parse_cpu_seconds(stat_text: str, ticks_per_second: int) -> float:
    """utime + stime of one /proc/<pid>/stat line, in seconds."""
    # The command name (field 2) may hold spaces; the fields after it never do.
    fields = stat_text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(parse_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), ticks) for pid in pids)


def burst_bodies(publications: int, batch: int) -> list[bytes]:
    """Request bodies of the burst, each event carrying its send time (set here, just
    before the burst, so latency includes the ingest's queueing)."""
    sent = time.time_ns()
    events = [
        {
            "type": "task.updated",
            "payload": {"task_id": CHANNEL_KEY, "seq": i, "note": _FILLER, SENT_FIELD: sent},
        }
        for i in range(publications)
    ]
    return [orjson.dumps(events[i : i + batch]) for i in range(0, publications, batch)]


async def post(http: httpx.AsyncClient, node: NodeProcess, body: bytes) -> None:
    response = await http.post(
        f"{node.url}/api/v1/broadcast",
        content=body,
        headers={"X-API-Key": node.keys.api_key, "Content-Type": "application/json"},
    )
    if response.status_code != 200 or response.json().get("failed"):
        raise RuntimeError(f"broadcast refused: {response.status_code} {response.text[:300]}")


@dataclass(slots=True)
class FrameCount:
    frames: int = 0


class CountingClient(CentrifugeClient):
    """CentrifugeClient that also counts the WebSocket frames it reads: a node joins
    queued messages into one frame, so frames per delivery shows how much it batched."""

    counter = FrameCount()

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                now = time.time_ns()
                CountingClient.counter.frames += 1
                text = frame if isinstance(frame, str) else frame.decode()
                for _ in range(ping_count(text)):
                    await self.ws.send("{}")
                for sent in sent_times(text):
                    self.tally.add(now - sent)
        except ConnectionClosed:
            pass
        if not self.closing:
            self.tally.dropped += 1


async def open_subscribers(
    nodes: Sequence[NodeProcess], count: int, tally: Tally, concurrency: int
) -> list[CentrifugeClient]:
    """`count` subscribed clients, dealt round-robin over the nodes."""
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> CentrifugeClient:
        node = nodes[index % len(nodes)]
        async with gate:
            return await CountingClient.open(
                node.ws_url, node.token(f"fan-{index}"), f"task:{CHANNEL_KEY}", tally
            )

    outcomes = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    clients: list[CentrifugeClient] = [o for o in outcomes if isinstance(o, CentrifugeClient)]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        await close_clients(clients)
        raise RuntimeError(f"{len(failures)} of {count} clients failed to open") from failures[0]
    return clients


async def wait_for(tally: Tally, expected: int, timeout: float) -> None:
    tally.target = expected
    tally.reached.clear()
    if tally.deliveries >= expected:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await tally.reached.wait()


@contextlib.asynccontextmanager
async def redis_for(setup: Setup) -> AsyncIterator[tuple[list[str], list[int]]]:
    """(URLs, redis-server pids) of the setup's engine."""
    if setup.engine == "memory":
        yield [], []
        return
    async with RedisServer() as server:
        client = Redis(host="127.0.0.1", port=server.port)
        try:
            pid = int((await client.info("server"))["process_id"])
        finally:
            await client.aclose()
        yield [server.url], [pid]


async def measure(setup: Setup, options: Options) -> Result:
    async with (
        redis_for(setup) as (urls, redis_pids),
        start_nodes(setup.nodes, urls) as nodes,
        httpx.AsyncClient(timeout=60) as http,
    ):
        for node in nodes:
            await node.wait_ready()
        tally = Tally()
        clients = await open_subscribers(
            nodes, options.subscribers, tally, options.connect_concurrency
        )
        try:
            # Warm-up: one publication everyone receives (connections, first fan-out).
            await post(http, nodes[0], burst_bodies(1, 1)[0])
            await wait_for(tally, options.subscribers, options.delivery_timeout)
            if tally.deliveries < options.subscribers:
                raise RuntimeError(f"warm-up reached {tally.deliveries} subscribers")
            tally.deliveries = 0
            tally.latencies_ns.clear()
            bodies = burst_bodies(options.publications, options.batch)
            expected = options.subscribers * options.publications
            CountingClient.counter.frames = 0
            node_pids = [node.pid for node in nodes]
            node_cpu, redis_cpu = cpu_seconds(node_pids), cpu_seconds(redis_pids)
            began = time.perf_counter()
            await asyncio.gather(*(post(http, nodes[0], body) for body in bodies))
            ingest_s = time.perf_counter() - began
            await wait_for(tally, expected, options.delivery_timeout)
            elapsed_s = time.perf_counter() - began
            node_cpu = cpu_seconds(node_pids) - node_cpu
            redis_cpu = cpu_seconds(redis_pids) - redis_cpu
            frames = CountingClient.counter.frames
        finally:
            await close_clients(clients)
    latencies = sorted(tally.latencies_ns)

    def ms(q: float) -> float:
        return percentile(latencies, q) / 1e6 if latencies else math.nan

    return Result(
        label=setup.label,
        subscribers=options.subscribers,
        publications=options.publications,
        expected=expected,
        delivered=tally.deliveries,
        elapsed_s=elapsed_s,
        ingest_s=ingest_s,
        p50_ms=ms(50),
        p99_ms=ms(99),
        max_ms=ms(100),
        frames=frames,
        node_cpu_s=node_cpu,
        redis_cpu_s=redis_cpu,
    )


async def run_all(options: Options) -> list[Result]:
    raise_fd_limit(options.subscribers + 512)
    return [await measure(setup, options) for setup in SETUPS]


def render_table(results: Sequence[Result]) -> str:
    rows = [
        ("deliveries / s", [f"{r.deliveries_per_s:,.0f}" for r in results]),
        ("burst to last delivery (s)", [f"{r.elapsed_s:.2f}" for r in results]),
        ("ingest publications / s", [f"{r.ingest_per_s:,.0f}" for r in results]),
        ("latency p50 (ms)", [f"{r.p50_ms:.0f}" for r in results]),
        ("latency p99 (ms)", [f"{r.p99_ms:.0f}" for r in results]),
        ("latency max (ms)", [f"{r.max_ms:.0f}" for r in results]),
        (
            "publications per WebSocket frame",
            [f"{r.delivered / max(1, r.frames):.1f}" for r in results],
        ),
        ("node CPU in the burst (s, all nodes)", [f"{r.node_cpu_s:.2f}" for r in results]),
        ("redis-server CPU in the burst (s)", [f"{r.redis_cpu_s:.2f}" for r in results]),
        ("delivered / expected", [f"{r.delivered}/{r.expected}" for r in results]),
    ]
    lines = [
        "| measure | " + " | ".join(r.label for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Options, bool]:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.multinode_fanout", description=__doc__
    )
    parser.add_argument("--subscribers", type=int, default=defaults.subscribers)
    parser.add_argument("--publications", type=int, default=defaults.publications)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--connect-concurrency", type=int, default=defaults.connect_concurrency)
    parser.add_argument("--delivery-timeout", type=float, default=defaults.delivery_timeout)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("subscribers", "publications", "batch", "connect_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    options = Options(
        subscribers=args.subscribers,
        publications=args.publications,
        batch=args.batch,
        connect_concurrency=args.connect_concurrency,
        delivery_timeout=args.delivery_timeout,
    )
    return options, bool(args.json)


def _run(options: Options) -> list[Result]:
    return run_client_loop(run_all(options))


def main(argv: Sequence[str] | None = None) -> int:
    options, json_output = parse_args(argv)
    results = _run(options)
    if json_output:
        out = [
            {
                **asdict(r),
                "deliveries_per_s": round(r.deliveries_per_s),
                "ingest_per_s": round(r.ingest_per_s),
            }
            for r in results
        ]
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(results))
    lost = sum(r.expected - r.delivered for r in results)
    if lost:
        print(f"LOST {lost} deliveries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
