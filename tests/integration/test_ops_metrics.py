"""/metrics as an operator reads it during a cutover: scraped from a real server
while real clients of both protocols come and go, events are ingested, a stalled
client is cut off and the cutover flag changes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ADMIN_KEY, RunningServer, eventually, run_server
from tests.legacyclient import SHORT_PINGS, SUBSCRIBE_ALL, legacy_url, open_legacy
from tests.pyclient import new_client, new_subscription

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: RunningServer) -> Samples:
    response = await server.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample; an absent labelled counter reads 0, as Prometheus would treat it."""
    return samples.get((f"dex_shim_{name}", frozenset(labels.items())), 0.0)


async def clients_are(server: RunningServer, channels: int, legacy: int) -> None:
    node = server.runtime.node.name

    async def check() -> bool:
        samples = await scrape(server)
        return (
            value(samples, "node_num_clients", node=node, protocol="channels"),
            value(samples, "node_num_clients", node=node, protocol="legacy"),
        ) == (channels, legacy)

    await eventually(check)


async def test_connections_publications_deliveries_and_ingest_results_move(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, **SHORT_PINGS) as server:
        await clients_are(server, 0, 0)

        client, _events = new_client(server.ws_url, server.token("alice"))
        await client.connect()
        sub, sub_events = new_subscription(client, "task:m1")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        await clients_are(server, 1, 0)
        legacy = await open_legacy(server.port, server.token("bob"))
        await clients_are(server, 1, 1)
        samples = await scrape(server)
        assert value(samples, "node_num_users") == 2
        # alice: task:m1 and her server-side user:alice; bob: "*".
        assert value(samples, "node_num_subscriptions") == 3

        before = await scrape(server)
        response = await server.broadcast(
            [
                {"type": "task.updated", "payload": {"task_id": "m1", "n": 1}},
                42,
                {"type": "brand.new_thing", "payload": {"x": 1}},
                {"type": "task.updated", "payload": {"task_id": "m1", "n": 2}},
            ]
        )
        assert response.status_code == 200, response.text
        assert (response.json()["accepted"], response.json()["refused"]) == (3, 1)
        await sub_events.wait_for("publication", count=2)
        await legacy.take(3)
        after = await scrape(server)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        # alice (task:m1) got the two task events; bob ("*", i.e. global) all three.
        assert delta("node_publications_total", protocol="channels") == 2
        assert delta("node_publications_total", protocol="legacy") == 3
        assert delta("node_messages_sent_total", protocol="channels") == 2
        assert delta("node_messages_sent_total", protocol="legacy") == 3
        assert delta("ingest_events_total", type="task.updated", result="accepted") == 2
        assert delta("ingest_events_total", type="", result="refused") == 1
        assert delta("ingest_events_total", type="brand.new_thing", result="accepted") == 1
        assert delta("ingest_events_total", type="brand.new_thing", result="unknown_type") == 1
        assert delta("ingest_events_total", type="task.updated", result="unknown_type") == 0

        await legacy.aclose()
        await clients_are(server, 1, 0)
        await client.disconnect()
        await clients_are(server, 0, 0)
        assert value(await scrape(server), "node_num_users") == 0


async def _stalled_centrifuge(server: RunningServer, channel: str) -> ClientConnection:
    # max_queue=1: once one message waits unread, websockets stops reading the
    # socket and the kernel buffers fill, as with a client that stopped reading.
    ws = await connect(server.ws_url, compression=None, max_queue=1, ping_interval=None)
    await ws.send(orjson.dumps({"id": 1, "connect": {"token": server.token("slow-c")}}).decode())
    await ws.send(orjson.dumps({"id": 2, "subscribe": {"channel": channel}}).decode())
    seen: set[int] = set()
    while not {1, 2} <= seen:
        for line in str(await ws.recv()).split("\n"):
            seen.add(orjson.loads(line).get("id", 0))
    return ws


async def _drain_until_closed(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code


async def test_slow_disconnects_are_counted_by_protocol_and_code(
    signing_keys: tuple[str, str],
) -> None:
    overrides: dict[str, Any] = {
        **SHORT_PINGS,
        "client_queue_max_size_bytes": 256 * 1024,
        "websocket_write_timeout_seconds": 60,
    }
    async with run_server(signing_keys, **overrides) as server:
        before = await scrape(server)
        assert (
            value(before, "client_num_server_disconnects_total", protocol="channels", code="3008")
            == 0
        )
        stalled = await _stalled_centrifuge(server, "task:slow")
        stalled_legacy = await connect(
            legacy_url(server.port, server.token("slow-l")),
            compression=None,
            max_queue=1,
            ping_interval=None,
        )
        await stalled_legacy.send(SUBSCRIBE_ALL)
        await clients_are(server, 1, 1)

        filler = "x" * 2000
        total = 0
        deadline = asyncio.get_running_loop().time() + 30
        while server.runtime.connection_counts() != {"legacy": 0, "channels": 0}:
            assert asyncio.get_running_loop().time() < deadline, "stalled clients never cut off"
            batch = [
                {"type": "task.updated", "payload": {"task_id": "slow", "n": n, "pad": filler}}
                for n in range(total, total + 100)
            ]
            assert (await server.broadcast(batch)).status_code == 200
            total += 100

        assert await _drain_until_closed(stalled) == 3008
        # Legacy pings sit in the stalled client's buffer: answering one after the
        # server aborted the cut-off connection meets a reset (1006) before the 3008
        # frame is read (tests/integration/test_legacy_protocol.py explains).
        assert await _drain_until_closed(stalled_legacy) in {3008, 1006}
        after = await scrape(server)
        for protocol in ("channels", "legacy"):
            assert (
                value(after, "client_num_server_disconnects_total", protocol=protocol, code="3008")
                == 1
            ), protocol
        assert value(after, "client_queue_bytes") == 0  # their queues were dropped


async def test_cutover_gauges_follow_an_admin_change(server: RunningServer) -> None:
    def modes(samples: Samples) -> dict[str, float]:
        return {
            mode: value(samples, "cutover_mode", mode=mode)
            for mode in ("legacy", "dual", "channels")
        }

    samples = await scrape(server)
    assert modes(samples) == {"legacy": 0, "dual": 1, "channels": 0}
    assert value(samples, "cutover_channels_percent") == 0
    assert value(samples, "cutover_cohort_users") == 0

    response = await server.http.post(
        "/api/v1/admin/cutover",
        json={"channels_percent": 40, "allow_users": ["ann", "ben"]},
        headers={"X-Admin-Key": ADMIN_KEY},
    )
    assert response.status_code == 200, response.text
    samples = await scrape(server)
    assert value(samples, "cutover_channels_percent") == 40
    assert value(samples, "cutover_cohort_users") == 2

    response = await server.http.post(
        "/api/v1/admin/cutover", json={"mode": "channels"}, headers={"X-Admin-Key": ADMIN_KEY}
    )
    assert response.status_code == 200, response.text
    assert modes(await scrape(server)) == {"legacy": 0, "dual": 0, "channels": 1}
