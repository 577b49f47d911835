"""The cutover flag against the real server: what users are told, who is served which
protocol in each mode, the drain of legacy connections, and the admin API guarding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ADMIN_KEY, RunningServer, run_server, sessions_of
from tests.jsclient import JsClient
from tests.legacyclient import SHORT_PINGS, LegacyClient, legacy_url, open_legacy, settle
from tests.pyclient import CODECS, new_client, new_subscription, use_codec

Keys = tuple[str, str]
ADMIN = {"X-Admin-Key": ADMIN_KEY}
# The node's ticker period (drain deadlines are checked once per tick), and slack.
TICK = 1.0
SLACK = 0.7


def serve(
    signing_keys: Keys, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[RunningServer]:
    return run_server(signing_keys, **{**SHORT_PINGS, **overrides})


@pytest.fixture
async def server(signing_keys: Keys) -> AsyncIterator[RunningServer]:
    """conftest's server, with SHORT_PINGS (see tests/legacyclient.py)."""
    async with serve(signing_keys) as running:
        yield running


async def set_cutover(server: RunningServer, **changes: Any) -> dict[str, Any]:
    response = await server.http.post("/api/v1/admin/cutover", json=changes, headers=ADMIN)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def report_of(server: RunningServer) -> dict[str, Any]:
    response = await server.http.get("/api/v1/admin/cutover", headers=ADMIN)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def told(server: RunningServer, user: str) -> dict[str, Any]:
    response = await server.http.get(
        "/api/v1/realtime/config", headers={"Authorization": f"Bearer {server.token(user)}"}
    )
    assert response.status_code == 200, response.text
    config: dict[str, Any] = response.json()
    assert config["user"] == user
    return config


async def channels_users(server: RunningServer, users: list[str]) -> set[str]:
    # A few requests at a time: hundreds at once only make one server slower.
    configs: list[dict[str, Any]] = []
    for start in range(0, len(users), 4):
        configs += await asyncio.gather(*(told(server, u) for u in users[start : start + 4]))
    for config in configs:
        expected = "/connection/websocket" if config["protocol"] == "channels" else "/api/v1/ws"
        assert config["url"] == expected, config
    return {c["user"] for c in configs if c["protocol"] == "channels"}


async def publish(server: RunningServer, body: Any) -> None:
    response = await server.broadcast(body)
    assert response.status_code == 200, response.text


def publisher(server: RunningServer) -> Callable[[Any], Any]:
    async def run(body: Any) -> None:
        await publish(server, body)

    return run


async def wait_until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- what users are told ---------------------------------------------------------------


async def test_realtime_config_answers_per_mode(server: RunningServer) -> None:
    config = await told(server, "alice")
    assert config["protocol"] == "legacy" and config["url"] == "/api/v1/ws"
    assert config["mode"] == "dual"
    before = config["cutover_version"]

    await set_cutover(server, mode="channels")
    config = await told(server, "alice")
    assert (config["protocol"], config["url"], config["mode"]) == (
        "channels",
        "/connection/websocket",
        "channels",
    )
    assert config["cutover_version"] == before + 1

    await set_cutover(server, mode="legacy", channels_percent=100)
    config = await told(server, "alice")
    assert (config["protocol"], config["url"], config["mode"]) == ("legacy", "/api/v1/ws", "legacy")

    # Without a usable token: 401 JSON, no protocol.
    missing = await server.http.get("/api/v1/realtime/config")
    assert missing.status_code == 401 and "error" in missing.json()
    expired = await server.http.get(
        "/api/v1/realtime/config", headers={"Authorization": f"Bearer {server.token(ttl=-5)}"}
    )
    assert expired.status_code == 401 and expired.json() == {"error": "token expired"}


async def test_cohorts_are_about_the_percentage_and_only_grow(server: RunningServer) -> None:
    users = [f"user-{n:04d}" for n in range(1000)]
    await set_cutover(server, channels_percent=30)
    at_30 = await channels_users(server, users)
    assert 250 <= len(at_30) <= 350, len(at_30)
    # Stable: asking again gives the same answer.
    assert await channels_users(server, users[:50]) == at_30 & set(users[:50])

    await set_cutover(server, channels_percent=60)
    at_60 = await channels_users(server, users)
    assert 550 <= len(at_60) <= 650, len(at_60)
    assert at_30 <= at_60  # nobody flips back to legacy during a ramp


async def test_allow_and_deny_lists_win_over_the_percentage(server: RunningServer) -> None:
    await set_cutover(server, channels_percent=0, allow_users=["ann", "both"], deny_users=["both"])
    assert (await told(server, "ann"))["protocol"] == "channels"
    assert (await told(server, "both"))["protocol"] == "legacy"  # deny wins over allow
    assert (await told(server, "bob"))["protocol"] == "legacy"

    await set_cutover(server, channels_percent=100, allow_users=[], deny_users=["dan"])
    assert (await told(server, "dan"))["protocol"] == "legacy"
    assert (await told(server, "bob"))["protocol"] == "channels"
    assert (await told(server, "ann"))["protocol"] == "channels"


# --- the admin API -------------------------------------------------------------------------


async def test_admin_api_requires_the_admin_key(server: RunningServer) -> None:
    for headers in ({}, {"X-Admin-Key": "wrong"}, {"X-API-Key": "test-api-key"}):
        for response in (
            await server.http.get("/api/v1/admin/cutover", headers=headers),
            await server.http.post(
                "/api/v1/admin/cutover", json={"mode": "channels"}, headers=headers
            ),
        ):
            assert response.status_code == 401, headers
            assert response.headers["content-type"] == "application/json"
            assert "error" in response.json()
    assert (await report_of(server))["cutover"]["mode"] == "dual"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'"channels"',
        b'{"mode":"everything"}',
        b'{"channels_percent":101}',
        b'{"channels_percent":-1}',
        b'{"channels_percent":"30"}',
        b'{"channels_percent":true}',
        b'{"allow_users":"ann"}',
        b'{"deny_users":[1]}',
        b'{"drain_seconds":-1}',
        b'{"detect_centrifuge_on_legacy_path":"yes"}',
        b'{"version":7}',
        b'{"colour":"blue"}',
    ],
)
async def test_invalid_admin_bodies_get_400_and_change_nothing(
    server: RunningServer, body: bytes
) -> None:
    before = await report_of(server)
    response = await server.http.post(
        "/api/v1/admin/cutover",
        content=body,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert (await report_of(server))["cutover"] == before["cutover"]


# --- who is served what -------------------------------------------------------------------


async def test_legacy_mode_closes_centrifuge_clients_3503(server: RunningServer) -> None:
    await set_cutover(server, mode="legacy")
    async with connect(server.ws_url, compression=None, proxy=None) as ws:
        # The server may close before the connect command is even read.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(f'{{"id":1,"connect":{{"token":"{server.token()}"}}}}')
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 3503
    # Legacy clients are served as usual.
    client = await open_legacy(server.port, server.token())
    try:
        await settle(publisher(server), [client], "legacy-mode")
    finally:
        await client.aclose()


async def test_channels_mode_retires_new_legacy_sockets_but_serves_sdks_on_that_path(
    server: RunningServer,
) -> None:
    await set_cutover(server, mode="channels")
    legacy = await open_legacy(server.port, server.token())
    try:
        response = legacy.ws.response
        assert response is not None and response.status_code == 101
        code, reason = await legacy.wait_closed()
        assert code == 4410
        assert reason is not None and "reload" in reason
        assert legacy.frames == []
    finally:
        await legacy.aclose()

    # A Centrifuge SDK pointed at the legacy URL is recognised and served.
    client, events = new_client(legacy_url(server.port), server.token("sdk"))
    await client.connect()
    try:
        await events.wait_for("connected")
        sub, sub_events = new_subscription(client, "task:retire")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        await publish(server, {"type": "task.updated", "payload": {"task_id": "retire", "n": 1}})
        pub = await sub_events.wait_for("publication")
        assert pub.pub.data["n"] == 1 and pub.pub.data["type"] == "task.updated"
    finally:
        await client.disconnect()


async def open_many(server: RunningServer, count: int) -> list[LegacyClient]:
    clients = [await open_legacy(server.port, server.token(f"hook-{n}")) for n in range(count)]
    await settle(publisher(server), clients, "drain")
    return clients


async def closed_at(client: LegacyClient, timeout: float) -> tuple[float, int | None, str | None]:
    code, reason = await client.wait_closed(timeout)
    return time.monotonic(), code, reason


async def test_entering_channels_drains_legacy_clients_over_the_window(signing_keys: Keys) -> None:
    drain = 3.0
    async with serve(signing_keys, cutover_drain_seconds=drain) as server:
        clients = await open_many(server, 8)
        try:
            switched = time.monotonic()
            await set_cutover(server, mode="channels")
            ends = await asyncio.gather(*(closed_at(c, drain + TICK + SLACK + 1) for c in clients))
            offsets = sorted(end - switched for end, _, _ in ends)
            assert offsets[-1] <= drain + TICK + SLACK, offsets
            # Spread over the window, not all at one instant.
            assert offsets[-1] - offsets[0] >= 0.5, offsets
            for _, code, reason in ends:
                assert code == 4410 and reason is not None and "reload" in reason
            await wait_until(lambda: _legacy_count_is(server, 0))
        finally:
            for client in clients:
                await client.aclose()


async def _legacy_count_is(server: RunningServer, count: int) -> bool:
    return bool((await report_of(server))["connections"]["legacy"] == count)


async def test_switching_back_to_dual_stops_the_drain(signing_keys: Keys) -> None:
    drain = 6.0
    async with serve(signing_keys, cutover_drain_seconds=drain) as server:
        clients = await open_many(server, 8)
        try:
            switched = time.monotonic()
            await set_cutover(server, mode="channels")
            # Wait for the first one to go, then call the cutover off.
            async with asyncio.timeout(drain + TICK + SLACK):
                while not any(c.closed for c in clients):
                    await asyncio.sleep(0.02)
            await set_cutover(server, mode="dual")
            gone = [c for c in clients if c.closed]
            remaining = [c for c in clients if not c.closed]
            assert remaining, "all closed at the first tick: cannot tell"
            await asyncio.sleep(max(0.0, switched + drain + TICK + SLACK - time.monotonic()))
            assert all(not c.closed for c in remaining), [c.close_code for c in remaining]
            assert all(c.close_code == 4410 for c in gone)
            await settle(publisher(server), remaining, "after-drain")
            assert await _legacy_count_is(server, len(remaining))
        finally:
            for client in clients:
                await client.aclose()


async def test_connection_counts_follow_clients(server: RunningServer) -> None:
    assert (await report_of(server))["connections"] == {"legacy": 0, "channels": 0}

    async def counts_are(legacy: int, channels: int) -> bool:
        return bool(
            (await report_of(server))["connections"] == {"legacy": legacy, "channels": channels}
        )

    first = await open_legacy(server.port, server.token("a"))
    second = await open_legacy(server.port, server.token("b"))
    try:
        await wait_until(lambda: counts_are(2, 0))
        sdk, events = new_client(server.ws_url, server.token("c"))
        await sdk.connect()
        await events.wait_for("connected")
        await wait_until(lambda: counts_are(2, 1))
        # An SDK on the legacy path counts as channels.
        other, other_events = new_client(legacy_url(server.port), server.token("d"))
        await other.connect()
        await other_events.wait_for("connected")
        await wait_until(lambda: counts_are(2, 2))
        await first.aclose()
        await wait_until(lambda: counts_are(1, 2))
        await sdk.disconnect()
        await other.disconnect()
        await wait_until(lambda: counts_are(1, 0))
    finally:
        await first.aclose()
        await second.aclose()
    await wait_until(lambda: counts_are(0, 0))


# --- SDKs on the legacy URL in `dual` ------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_python_sdk_on_the_legacy_url_is_served_centrifuge(
    server: RunningServer, codec: str
) -> None:
    with use_codec(codec):
        client, events = new_client(legacy_url(server.port), server.token("py"))
    await client.connect()
    try:
        connected = await events.wait_for("connected")
        assert connected.client
        sub, sub_events = new_subscription(client, "task:dual-py")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        await publish(server, {"type": "task.updated", "payload": {"task_id": "dual-py", "n": 3}})
        pub = await sub_events.wait_for("publication")
        assert [s.wire.name for s in sessions_of(server, "py")] == [codec]
        assert pub.pub.data == {
            "task_id": "dual-py",
            "n": 3,
            "type": "task.updated",
            "timestamp": pub.pub.data["timestamp"],
        }
    finally:
        await client.disconnect()


@pytest.mark.js
@pytest.mark.parametrize("codec", CODECS)
async def test_js_sdk_on_the_legacy_url_is_served_centrifuge(
    server: RunningServer, codec: str
) -> None:
    with use_codec(codec):
        js_client = JsClient(legacy_url(server.port), server.token("js"))
    async with js_client as js:
        await js.call("connect")
        connected = await js.wait_event("connected", timeout=5)
        assert connected["client"]
        await js.call("newSubscription", channel="task:dual-js", options={})
        await js.call("subscribe", channel="task:dual-js", wait=True, timeout=5000)
        await publish(server, {"type": "task.updated", "payload": {"task_id": "dual-js", "n": 4}})
        pub = await js.wait_event(
            lambda e: e["event"] == "sub.publication" and e["channel"] == "task:dual-js",
            timeout=5,
        )
        assert pub["data"]["n"] == 4 and pub["data"]["type"] == "task.updated"
        assert [s.wire.name for s in sessions_of(server, "js")] == [codec]


async def test_plain_http_client_is_not_a_websocket(server: RunningServer) -> None:
    # The legacy path's plain GET keeps its hub answer in every mode.
    for mode in ("legacy", "dual", "channels"):
        await set_cutover(server, mode=mode)
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.get("/api/v1/ws", params={"token": server.token()})
        assert (response.status_code, response.content) == (400, b"Bad Request\n"), mode
