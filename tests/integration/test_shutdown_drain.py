"""SIGTERM on a real `dex-shim serve` while it drains: newcomers of both protocols
are turned away, one stalled client cannot hold the exit past the grace period,
and an ingest request caught in flight is finished and its events delivered."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.legacyclient import Frame, legacy_url, open_legacy
from tests.multinode import ClusterKeys, NodeProcess, spawn_node, start_nodes
from tests.pyclient import new_client, new_subscription
from tests.rawclient import stalled_subscriber
from tests.redis_server import RedisServer

GRACE_SECONDS = 4.0
# hypercorn's own wait for connections after our drain (shim/app/server.py), and slack
# for a loaded machine; still far below the stalled client's 60 s write timeout.
EXIT_BOUND_SECONDS = GRACE_SECONDS + 2.0 + 4.0


def numbered(channel_key: str, n: int, pad: str = "") -> dict[str, object]:
    return {"type": "task.updated", "payload": {"task_id": channel_key, "n": n, "pad": pad}}


async def queued_bytes(node: NodeProcess) -> float:
    text = (await node.http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "dex_shim_client_queue_bytes":
            return float(family.samples[0].value)
    raise AssertionError("no dex_shim_client_queue_bytes in /metrics")


@contextlib.asynccontextmanager
async def one_node(tmp_path: Path, **settings: str) -> AsyncIterator[NodeProcess]:
    node = await spawn_node("drain", ClusterKeys.generate(), tmp_path / "node", settings=settings)
    try:
        yield node
    finally:
        await node.stop()


# With permessage-deflate, frames go through hypercorn, not straight to the
# transport: the stalled client must still be dropped at the end of the grace period.
@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
async def test_draining_node_turns_newcomers_away_and_a_stalled_client_cannot_hold_it(
    tmp_path: Path, compression: bool
) -> None:
    settings = {
        "websocket_compression": "true" if compression else "false",
        "shutdown_grace_seconds": str(GRACE_SECONDS),
        # Neither limit may cut the stalled client off: only the grace period ends it.
        "websocket_write_timeout_seconds": "60",
        "client_queue_max_size_bytes": str(64 * 1024 * 1024),
        "legacy_ping_interval_seconds": "1",
    }
    async with one_node(tmp_path, **settings) as node:
        stalled = await stalled_subscriber(
            node.ws_url, node.token("stalled"), "task:drain", deflate=compression
        )
        fast, fast_events = new_client(node.ws_url, node.token("fast"))
        await fast.connect()
        sub, sub_events = new_subscription(fast, "task:drain")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        legacy = await open_legacy(node.port, node.token("fast-legacy"))

        # Until the stalled client's own queue holds half a megabyte (its kernel
        # buffers are full by then); the fast clients keep up all along.
        total = 0
        deadline = time.monotonic() + 30
        while await queued_bytes(node) < 512 * 1024:
            assert time.monotonic() < deadline, "the stalled client's queue never grew"
            # Random text when compressing: repeated padding would deflate to nothing
            # and never fill the stalled client's buffers.
            batch = [
                numbered("drain", n, secrets.token_urlsafe(1500) if compression else "x" * 2000)
                for n in range(total, total + 100)
            ]
            assert (await node.broadcast(batch)).json()["accepted"] == 100
            total += 100
            await sub_events.wait_for("publication", count=total, timeout=20)

        node.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # Everyone keeping up gets everything queued, then the goodbye.
        legacy_frames: list[Frame] = await legacy.take(total, timeout=10)
        assert [f.message["payload"]["n"] for f in legacy_frames] == list(range(total))
        assert await legacy.wait_closed(timeout=10) == (1001, "server shutting down")
        await fast_events.wait_for("connecting", lambda ctx: ctx.code == 3001, timeout=10)
        assert [ctx.pub.data["n"] for ctx in sub_events.named("publication")] == list(range(total))
        await fast.disconnect()

        # The stalled socket keeps the node draining; whoever arrives now is sent away.
        assert node.running
        newcomer = await connect(node.ws_url, compression=None, open_timeout=5)
        with pytest.raises(ConnectionClosed) as closed:
            # The close may come before the connect command is even sent.
            await newcomer.send(
                orjson.dumps({"id": 1, "connect": {"token": node.token("late")}}).decode()
            )
            await asyncio.wait_for(newcomer.recv(), 5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (3001, "shutdown")
        with pytest.raises(InvalidStatus) as refused:
            await connect(legacy_url(node.port, node.token("late-legacy")), open_timeout=5)
        assert refused.value.response.status_code == 503
        assert (await node.http.get("/ready")).status_code == 503
        assert node.running, "the node stopped before the newcomers were turned away"

        # The stalled client is abandoned at the end of the grace period, not after
        # its 60 s write timeout.
        code = await asyncio.wait_for(node.process.wait(), EXIT_BOUND_SECONDS * 2)
        took = time.monotonic() - signalled
        assert code == 0
        assert GRACE_SECONDS - 0.5 <= took <= EXIT_BOUND_SECONDS, took
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            while True:
                await asyncio.wait_for(stalled.recv(), 5)
        await stalled.close()


@pytest.mark.redis
async def test_ingest_in_flight_at_sigterm_is_finished_and_delivered(tmp_path: Path) -> None:
    count = 50
    async with (
        RedisServer() as redis,
        start_nodes(2, [redis.url], settings={"legacy_ping_interval_seconds": "1"}) as (a, b),
    ):
        # The events enter through `a`, which is stopped, and leave through `b`.
        client, _events = new_client(b.ws_url, b.token("alice"))
        await client.connect()
        sub, sub_events = new_subscription(client, "task:inflight")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        legacy = await open_legacy(
            b.port, b.token("bob"), first_commands=['{"action":"subscribe","task_id":"inflight"}']
        )
        probe = await a.broadcast(numbered("inflight", -1))
        assert probe.json()["accepted"] == 1
        await sub_events.wait_for("publication")
        await legacy.skip_until(lambda f: f.message["payload"]["n"] == -1)

        # Redis holds every write for 2.6 s (under the broker's 3 s socket timeout):
        # the request below is stuck publishing inside `a` when the signal arrives,
        # and still stuck when hypercorn's own 2 s wait for requests would give up.
        # Only the node's drain waits for it.
        assert await redis.command("CLIENT", "PAUSE", "2600", "WRITE") == b"+OK\r\n"
        paused = time.monotonic()
        async with httpx.AsyncClient(timeout=20) as http:
            request = asyncio.create_task(
                http.post(
                    f"{a.url}/api/v1/broadcast",
                    content=orjson.dumps([numbered("inflight", n) for n in range(count)]),
                    headers={"X-API-Key": a.keys.api_key},
                )
            )
            await asyncio.sleep(0.2)
            assert not request.done()
            a.process.send_signal(signal.SIGTERM)
            response = await request
        answered = time.monotonic()
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == count
        assert answered - paused >= 2.4  # it really waited for Redis, past the signal
        assert await asyncio.wait_for(a.process.wait(), 15) == 0

        publications = await sub_events.wait_for("publication", count=count + 1, timeout=10)
        assert publications.pub.data["n"] == count - 1
        assert [ctx.pub.data["n"] for ctx in sub_events.named("publication")] == [
            -1,
            *range(count),
        ]
        frames = await legacy.take(count, timeout=10)
        assert [f.message["payload"]["n"] for f in frames] == list(range(count))

        # And stored: a client that was not there reads them from history.
        history = await b.http.post(
            "/api/history",
            json={"channel": "task:inflight", "limit": -1},
            headers={"X-API-Key": b.keys.api_key},
        )
        stored = [p["data"]["n"] for p in history.json()["result"]["publications"]]
        assert stored == [-1, *range(count)]
        await legacy.aclose()
        await client.disconnect()
