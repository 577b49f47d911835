"""Server CPU per delivery with and without fossil delta, in both codecs, on a real
`dex-shim serve` process (its own utime+stime from /proc), side by side in one run.

    .venv/bin/python -m bench.delta_cpu [--subscribers 100] [--updates 200] [--rounds 2]

Each case: SUBSCRIBERS raw clients (tests/rawcentrifuge.py) subscribe to one quest
channel, with or without `delta: "fossil"`, and the backend posts UPDATES growing
assistant-message updates (tests/streams.py) in batches of 20; the server's CPU from
the first post until every client holds every update, divided by the deliveries.
Ingest (HTTP, routing, history) is in every case alike, so the difference between
cases is what delta costs. Rounds alternate the case order. Loopback only; the node
is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson

from shim.core.config import Settings
from tests.multinode import NodeProcess, start_nodes
from tests.rawcentrifuge import RawClient, raw_client
from tests.streams import content_event

CASES = [("json", False), ("json", True), ("protobuf", False), ("protobuf", True)]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def namespaces_env() -> str:
    namespaces = {
        name: {**dataclasses.asdict(options), "allowed_delta_types": ["fossil"]}
        for name, options in Settings().namespaces.items()
    }
    return orjson.dumps(namespaces).decode()


async def read_updates(client: RawClient, updates: int) -> None:
    seen = 0
    while seen < updates:
        seen += sum(1 for item in await client.replies() if "push" in item)


async def one_case(
    node: NodeProcess, codec: str, delta: bool, subscribers: int, updates: int, run: int
) -> tuple[float, int]:
    channel = f"quest:cpu-{run}-{codec}-{delta}"
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(raw_client(node.ws_url, node.token(f"u{i}"), codec))
            for i in range(subscribers)
        ]
        for client in clients:
            subscribe: dict[str, Any] = {"channel": channel}
            if delta:
                subscribe["delta"] = "fossil"
            await client.send({"id": 2, "subscribe": subscribe})
            assert "subscribe" in (await client.replies())[0]
            client.wire_bytes = 0
        readers = [asyncio.create_task(read_updates(c, updates)) for c in clients]
        quest = channel.partition(":")[2]
        events = [content_event(quest, step) for step in range(1, updates + 1)]
        before = cpu_seconds(node.pid)
        for start in range(0, updates, 20):
            response = await node.broadcast(events[start : start + 20])
            assert response.status_code == 200, response.text
        async with asyncio.timeout(120):
            await asyncio.gather(*readers)
        used = cpu_seconds(node.pid) - before
        return used, sum(c.wire_bytes for c in clients) // subscribers


async def main(subscribers: int, updates: int, rounds: int) -> None:
    results: dict[tuple[str, bool], list[tuple[float, int]]] = {case: [] for case in CASES}
    async with start_nodes(1, settings={"namespaces": namespaces_env()}) as (node,):
        for run in range(rounds):
            order = CASES if run % 2 == 0 else list(reversed(CASES))
            for codec, delta in order:
                results[codec, delta].append(
                    await one_case(node, codec, delta, subscribers, updates, run)
                )
                await asyncio.sleep(0.5)
    deliveries = subscribers * updates
    print(f"{subscribers} subscribers x {updates} updates = {deliveries} deliveries per case,")
    print(f"{rounds} rounds, median CPU of the server process (shared machine: read the ratios)")
    for codec in ("json", "protobuf"):
        plain = sorted(r[0] for r in results[codec, False])[rounds // 2]
        delta = sorted(r[0] for r in results[codec, True])[rounds // 2]
        plain_bytes = results[codec, False][-1][1]
        delta_bytes = results[codec, True][-1][1]
        print(
            f"  {codec:<8} without delta {plain / deliveries * 1e6:6.1f} us/delivery,"
            f" {plain_bytes} B per subscriber;"
            f" with delta {delta / deliveries * 1e6:6.1f} us/delivery ({delta / plain:4.2f}x),"
            f" {delta_bytes} B per subscriber ({1 - delta_bytes / plain_bytes:.1%} fewer)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    started = time.monotonic()
    asyncio.run(main(options.subscribers, options.updates, options.rounds))
    print(f"({time.monotonic() - started:.0f} s)")
