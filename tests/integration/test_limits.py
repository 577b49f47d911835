"""Limits (issue 10, item 5) on a real hypercorn server: Centrifugo's setting names and
codes where the concept exists, and what each protocol's client sees past a limit.
Each test also shows that a well-behaved client beside the offender is still served.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from shim.centrifuge.codes import CONNECTION_LIMIT
from shim.core.config import ConfigError, load_settings
from tests.conftest import API_KEY, RunningServer, eventually, run_server
from tests.integration.test_protocol_errors import RawClient, connected
from tests.legacyclient import legacy_client, legacy_url, open_legacy
from tests.pyclient import new_client

TIMEOUT = 5.0


def task_event(task_id: str, seq: int) -> dict[str, Any]:
    return {"type": "task.updated", "payload": {"task_id": task_id, "seq": seq}, "task_id": task_id}


async def refused_status(url: str, **options: Any) -> int:
    """The HTTP status a WebSocket upgrade to `url` is refused with."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, proxy=None, open_timeout=TIMEOUT, **options):
            pass
    return refused.value.response.status_code


async def api(server: RunningServer, method: str, body: Any) -> httpx.Response:
    return await server.http.post(f"/api/{method}", json=body, headers={"X-API-Key": API_KEY})


# --- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["api_key", "admin_api_key"])
def test_short_configured_keys_are_refused_at_start(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: must be at least 32 bytes"):
        load_settings(env={}, **{name: "x" * 31})
    load_settings(env={}, **{name: "x" * 32})
    # From the environment too, as `dex-shim serve` reads it.
    with pytest.raises(ConfigError, match=name):
        load_settings(env={f"DEX_SHIM_{name.upper()}": "short-key"})


# --- allowed_origins ----------------------------------------------------------------------


async def test_allowed_origins_refuse_foreign_browser_origins_on_both_paths(
    signing_keys: tuple[str, str],
) -> None:
    origins = "https://app.example.com, https://*.dex.dev"
    async with run_server(signing_keys, allowed_origins=origins) as server:
        legacy = legacy_url(server.port, server.token("ann"))
        for url in (server.ws_url, legacy):
            assert await refused_status(url, origin="https://evil.example") == 403
            assert await refused_status(url, origin="null") == 403
        # Allowed ones (pattern and exact, case-blind), and clients without any Origin.
        client = await open_legacy(server.port, server.token("ann"), origin="https://eu.dex.dev")
        await client.send(orjson.dumps({"action": "subscribe", "task_id": "o1"}).decode())
        async with connect(server.ws_url, proxy=None, origin="https://APP.example.com") as ws:
            raw = RawClient(ws)
            await raw.connect(server.token("bob"))
            await raw.call("subscribe", {"channel": "task:o1"})
            await asyncio.sleep(0.1)
            assert (await server.broadcast(task_event("o1", 1))).status_code == 200
            assert (await raw.push("task:o1"))["data"]["seq"] == 1
            assert (await client.next_frame()).message["payload"]["seq"] == 1
        await client.aclose()
        async with connected(server, "cy") as no_origin:
            await no_origin.stays_open(0.1)


async def test_any_origin_is_accepted_by_default(server: RunningServer) -> None:
    async with legacy_client(server.port, server.token("ann"), origin="https://anything.example"):
        pass
    async with connect(server.ws_url, proxy=None, origin="https://anything.example") as ws:
        await RawClient(ws).connect(server.token("bob"))


# --- Content-Length with Transfer-Encoding ------------------------------------------------


async def test_content_length_with_transfer_encoding_is_refused(server: RunningServer) -> None:
    body = b'[{"type":"task.updated","payload":{"task_id":"smuggle"}}]'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    request = (
        b"POST /api/v1/broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        # A second request on the same connection: it must never be served.
        + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()  # until the server closes the connection
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"connection: close" in head.lower()
    assert orjson.loads(rest) == {"error": "both Content-Length and Transfer-Encoding given"}
    assert answer.count(b"HTTP/1.1") == 1  # the follow-up request was not answered
    assert server.runtime.ingestor.stats.total("accepted") == 0
    # One of the two alone is fine.
    assert (await server.broadcast(task_event("fine", 1))).status_code == 200


# --- connections per node and per user ----------------------------------------------------


async def test_node_connection_limit_answers_503_before_the_upgrade(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, client_connection_limit=2) as server:
        first = await open_legacy(server.port, server.token("ann"))
        async with connected(server, "bob") as bob:
            await eventually(lambda: _true(len(server.runtime.node.sessions) == 2))
            assert await refused_status(server.ws_url) == 503
            assert await refused_status(legacy_url(server.port, server.token("cy"))) == 503
            await bob.stays_open(0.1)
        await first.aclose()
        await eventually(lambda: _true(len(server.runtime.node.sessions) == 0))
        async with connected(server, "cy") as cy:
            await cy.stays_open(0.1)
        assert server.runtime.node.counters.limited["connection_limit"] == 2


async def _true(value: bool) -> bool:
    return value


async def test_user_connection_limit_on_both_protocols(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, client_user_connection_limit=2) as server:
        token = server.token("ann")
        legacy = await open_legacy(server.port, token)
        async with connected(server, "ann"):
            # The third connection of ann: the SDK is told 3504 and does not come back.
            client, events = new_client(server.ws_url, token)
            await client.connect()
            closed = await events.wait_for("disconnected", timeout=TIMEOUT)
            assert (closed.code, closed.reason) == (CONNECTION_LIMIT.code, "connection limit")
            await client.disconnect()
            assert await refused_status(legacy_url(server.port, token)) == 503
            # Other users are not affected.
            async with connected(server, "bob") as bob:
                await bob.stays_open(0.1)
        await legacy.aclose()
        # Connections that left free their places.
        await eventually(lambda: _true(not server.runtime.node.user_connections))
        async with connected(server, "ann"), connected(server, "ann") as again:
            await again.stays_open(0.1)


# --- commands per connection ---------------------------------------------------------------


async def test_command_rate_limit_answers_111_then_disconnects_3013(
    signing_keys: tuple[str, str],
) -> None:
    limits = {"client_command_rate_limit": 1.0, "client_command_burst": 5}
    async with run_server(signing_keys, **limits) as server, connected(server, "bystander") as by:
        await by.call("subscribe", {"channel": "task:by"})
        async with connect(server.ws_url, proxy=None) as ws:
            flood = RawClient(ws)
            # connect is the first of the five; four pings fit, five more are refused.
            await flood.connect(server.token("flood"))
            pings = [{"id": n, "rpc": {"method": "ping"}} for n in range(100, 110)]
            await flood.send(*pings)
            replies = [await flood.reply(n) for n in range(100, 109)]
            assert [r.get("rpc") for r in replies[:4]] == [{"data": {"pong": True}}] * 4
            assert [r.get("error") for r in replies[4:9]] == [
                {"code": 111, "message": "too many requests", "temporary": True}
            ] * 5
            close = await flood.closed()
            assert (close.code, close.reason) == (3013, "too many requests")
        assert (await server.broadcast(task_event("by", 1))).status_code == 200
        assert (await by.push("task:by"))["data"]["seq"] == 1


async def test_legacy_frames_count_against_the_command_rate(
    signing_keys: tuple[str, str],
) -> None:
    limits = {"client_command_rate_limit": 1.0, "client_command_burst": 5}
    async with run_server(signing_keys, **limits) as server:
        bystander = await open_legacy(server.port, server.token("by"))
        flood = await open_legacy(server.port, server.token("flood"), first_commands=())
        for n in range(11):
            await flood.send({"action": "subscribe", "task_id": f"f{n}"})
        code, reason = await flood.wait_closed()
        assert (code, reason) == (3013, "too many requests")
        stats = server.runtime.legacy_stats
        assert stats.limited_commands == 6  # five dropped, the sixth closed the socket
        assert (await server.broadcast(task_event("by", 1))).status_code == 200
        assert (await bystander.next_frame()).message["payload"]["seq"] == 1
        await bystander.aclose()


# --- legacy subscriptions -------------------------------------------------------------------


async def test_legacy_subscriptions_are_capped_and_long_ids_ignored(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, client_channel_limit=3, channel_max_length=40) as server:
        names = ["a", "b", "x" * 60, "c", "d"]
        client = await open_legacy(
            server.port,
            server.token("ann"),
            first_commands=[
                orjson.dumps({"action": "subscribe", "task_id": n}).decode() for n in names
            ],
        )
        await eventually(lambda: _true(server.runtime.legacy_stats.limited_subscriptions == 2))
        for name in names:
            assert (await server.broadcast(task_event(name, 1))).status_code == 200
        frames = await client.take(3)
        assert [f.message["task_id"] for f in frames] == ["a", "b", "c"]
        await client.expect_silence(0.3)
        # Unsubscribing makes room again.
        await client.send({"action": "unsubscribe", "task_id": "a"})
        await client.send({"action": "subscribe", "task_id": "d"})
        await asyncio.sleep(0.1)
        await server.broadcast(task_event("d", 2))
        assert (await client.next_frame()).message["task_id"] == "d"
        await client.aclose()


# --- per-channel publish rate -----------------------------------------------------------------


async def test_channel_publish_rate_refuses_single_ingest_items_and_api_publishes(
    signing_keys: tuple[str, str],
) -> None:
    limits = {"channel_publish_rate_limit": 0.5, "channel_publish_burst": 3}
    async with run_server(signing_keys, **limits) as server, connected(server, "ann") as ann:
        await ann.call("subscribe", {"channel": "task:hot"})
        await ann.call("subscribe", {"channel": "task:calm"})
        legacy = await open_legacy(server.port, server.token("lee"))
        batch = [task_event("hot", n) for n in range(1, 6)] + [task_event("calm", 1)]
        response = await server.broadcast(batch)
        assert response.status_code == 200
        body = response.json()
        assert (body["accepted"], body["refused"], body["failed"]) == (4, 2, 0)
        statuses = [r["status"] for r in body["results"]]
        assert statuses == ["accepted"] * 3 + ["refused"] * 2 + ["accepted"]
        assert "task:hot is over channel_publish_rate_limit" in body["results"][3]["error"]
        hot = [(await ann.push("task:hot"))["data"]["seq"] for _ in range(3)]
        assert hot == [1, 2, 3]
        assert (await ann.push("task:calm"))["data"]["seq"] == 1
        # Legacy `*` reads the global channel, which is exempt: it sees what was accepted.
        frames = await legacy.take(4)
        assert [(f.message["task_id"], f.message["payload"]["seq"]) for f in frames] == [
            ("hot", 1),
            ("hot", 2),
            ("hot", 3),
            ("calm", 1),
        ]
        await legacy.expect_silence(0.2)
        await legacy.aclose()
        # The server API publish into the same channel gets Centrifugo's 111.
        answer = (await api(server, "publish", {"channel": "task:hot", "data": {"x": 1}})).json()
        assert answer == {"error": {"code": 111, "message": "too many requests"}}
        fine = (await api(server, "publish", {"channel": "task:other", "data": {"x": 1}})).json()
        assert "result" in fine
        assert server.runtime.node.counters.limited["channel_publish_rate"] == 3


async def test_channel_publish_rate_applies_to_client_publish(
    signing_keys: tuple[str, str],
) -> None:
    from shim.core.config import NamespaceOptions, Settings

    namespaces = {
        **Settings().namespaces,
        "chat": NamespaceOptions(allow_publish_for_subscriber=True),
    }
    limits = {"channel_publish_rate_limit": 0.5, "channel_publish_burst": 2}
    async with (
        run_server(signing_keys, namespaces=namespaces, **limits) as server,
        connected(server, "ann") as ann,
    ):
        await ann.call("subscribe", {"channel": "chat:room"})
        answers = [
            await ann.call("publish", {"channel": "chat:room", "data": {"n": n}}) for n in range(3)
        ]
        assert [a.get("publish") for a in answers[:2]] == [{}, {}]
        assert answers[2]["error"]["code"] == 111


# --- request sizes ------------------------------------------------------------------------------


async def test_ingest_item_cap_answers_413_with_json(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, ingest_max_items=10) as server:
        too_many = await server.broadcast([task_event("cap", n) for n in range(11)])
        assert too_many.status_code == 413
        assert too_many.json() == {
            "error": "body holds more than 10 items; at most 10 per request (split the batch)",
            "max_items": 10,
        }
        assert server.runtime.ingestor.stats.total("accepted") == 0
        ok = await server.broadcast([task_event("cap", n) for n in range(10)])
        assert ok.json()["accepted"] == 10


async def test_server_api_batch_and_broadcast_sizes_are_capped(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, api_max_batch_size=3) as server:
        publish = {"publish": {"channel": "task:b", "data": {}}}
        too_many = await api(server, "batch", {"commands": [publish] * 4})
        assert too_many.status_code == 413
        assert too_many.json()["error"]["code"] == 106
        wide = await api(
            server, "broadcast", {"channels": ["task:1", "task:2", "task:3", "task:4"], "data": {}}
        )
        assert wide.status_code == 413
        assert len((await api(server, "batch", {"commands": [publish] * 3})).json()["replies"]) == 3


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_payload_nested_deeper_than_orjson_writes_is_a_refused_item(
    server: RunningServer,
) -> None:
    deep = {"type": "task.updated", "task_id": "deep", "payload": nested(300)}
    # orjson writes at most 254 levels, so the body is built by hand.
    body = b"[" + orjson.dumps(task_event("deep", 1)) + b"," + _dump_deep(deep) + b"]"
    response = await server.http.post(
        "/api/v1/broadcast",
        content=body,
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "refused"]
    assert results[1]["error"] == "item nested too deeply to re-encode"
    # The server API's publish data: a 400 with the reason, not a 500.
    deep_api = b'{"channel":"task:deep","data":' + _dump_deep(nested(300)) + b"}"
    answer = await server.http.post(
        "/api/publish", content=deep_api, headers={"X-API-Key": API_KEY}
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == {"code": 107, "message": "data: nested too deeply"}


def _dump_deep(value: Any) -> bytes:
    """JSON text of a value deeper than orjson.dumps accepts."""
    depth = 0
    while isinstance(value, dict) and set(value) <= {"a", "type", "task_id", "payload"}:
        if "payload" in value:
            head = orjson.dumps({k: v for k, v in value.items() if k != "payload"})[:-1]
            return head + b',"payload":' + _dump_deep(value["payload"]) + b"}"
        value = value["a"]
        depth += 1
    return b'{"a":' * depth + orjson.dumps(value) + b"}" * depth


# --- the console's credential -------------------------------------------------------------


async def test_admin_key_is_no_websocket_login_the_console_gets_a_short_lived_credential(
    signing_keys: tuple[str, str],
) -> None:
    from shim.core import console_credential
    from tests.conftest import ADMIN_KEY

    async with run_server(signing_keys, console_token_ttl_seconds=30) as server:
        async with connect(server.ws_url, proxy=None) as ws:
            admin = RawClient(ws)
            await admin.send({"id": 1, "connect": {"token": ADMIN_KEY}})
            assert (await admin.closed()).code == 3500  # not a token at all

        url = "/console/api/token"
        assert (await server.http.post(url)).status_code == 401
        assert (await server.http.post(url, headers={"X-Admin-Key": API_KEY})).status_code == 401
        minted = (await server.http.post(url, headers={"X-Admin-Key": ADMIN_KEY})).json()
        token = minted["token"]
        async with connect(server.ws_url, proxy=None) as ws:
            console = RawClient(ws)
            result = await console.connect(token)
            assert result["expires"] is True and 25 <= result["ttl"] <= 30
            # The console still reads any channel, personal ones included.
            for channel in ("task:secret", "user:bob"):
                assert "subscribe" in await console.call("subscribe", {"channel": channel})
            # Its SDK refreshes with a new credential before expiry.
            fresh = (await server.http.post(url, headers={"X-Admin-Key": ADMIN_KEY})).json()
            refreshed = await console.call("refresh", {"token": fresh["token"]})
            assert refreshed["refresh"]["expires"] is True
            # A user's JWT cannot refresh the console's connection.
            await console.send({"id": 99, "refresh": {"token": server.token("bob")}})
            assert (await console.closed()).code == 3500

        expired, _ = console_credential.mint(ADMIN_KEY, 30, now=0)
        forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
        other_key, _ = console_credential.mint("another-admin-key-0123456789abcdef", 30)
        async with connect(server.ws_url, proxy=None) as ws:
            client = RawClient(ws)
            reply = await client.call("connect", {"token": expired})
            assert reply["error"]["code"] == 109  # the page's getToken fetches another
        for bad in (forged, other_key):
            async with connect(server.ws_url, proxy=None) as ws:
                client = RawClient(ws)
                await client.send({"id": 1, "connect": {"token": bad}})
                assert (await client.closed()).code == 3500


async def test_in_legacy_mode_only_the_console_credential_opens_the_channel_endpoint(
    signing_keys: tuple[str, str],
) -> None:
    from tests.conftest import ADMIN_KEY

    async with run_server(signing_keys, cutover_mode="legacy") as server:
        async with connect(server.ws_url, proxy=None) as ws:
            admin = RawClient(ws)
            await admin.send({"id": 1, "connect": {"token": ADMIN_KEY}})
            assert (await admin.closed()).code == 3503
        headers = {"X-Admin-Key": ADMIN_KEY}
        token = (await server.http.post("/console/api/token", headers=headers)).json()["token"]
        async with connect(server.ws_url, proxy=None) as ws:
            console = RawClient(ws)
            await console.connect(token)
            assert "subscribe" in await console.call("subscribe", {"channel": "task:x"})


# --- /metrics on its own listener ------------------------------------------------------------


async def test_metrics_can_move_to_an_internal_listener(signing_keys: tuple[str, str]) -> None:
    async with run_server(
        signing_keys, metrics_listen="127.0.0.1:0", client_connection_limit=1
    ) as server:
        assert (await server.http.get("/metrics")).status_code == 404
        await eventually(lambda: _true(server.runtime.metrics_port != 0))
        async with connected(server, "ann"):
            assert await refused_status(server.ws_url) == 503
        port = server.runtime.metrics_port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as internal:
            scrape = await internal.get("/metrics")
            assert scrape.status_code == 200
            assert scrape.headers["content-type"].startswith("text/plain")
            assert 'dex_shim_limits_refused_total{limit="connection_limit"} 1.0' in scrape.text
            assert (await internal.get("/api/v1/broadcast")).status_code == 404
            assert (await internal.get("/health")).status_code == 404


async def test_metrics_stay_on_the_main_port_by_default(server: RunningServer) -> None:
    scrape = await server.http.get("/metrics")
    assert scrape.status_code == 200 and "dex_shim_node_num_clients" in scrape.text


# --- bounded state --------------------------------------------------------------------------


async def test_subscribing_to_fresh_channels_leaves_no_stream_behind(
    signing_keys: tuple[str, str],
) -> None:
    from adapters.brokers.memory import MemoryBroker

    async with (
        run_server(signing_keys, client_command_rate_limit=0) as server,
        connected(server, "ann") as ann,
    ):
        broker = server.runtime.broker
        assert isinstance(broker, MemoryBroker)
        for n in range(300):
            channel = f"task:fresh-{n}"
            assert "subscribe" in await ann.call("subscribe", {"channel": channel})
            assert "unsubscribe" in await ann.call("unsubscribe", {"channel": channel})
        # The connection's own personal channel was read, not published to, either.
        assert broker.stream_count == 0
        # A subscriber positioned on a fresh channel takes its first publications live.
        subscribed = (await ann.call("subscribe", {"channel": "task:first"}))["subscribe"]
        assert subscribed["positioned"] and subscribed.get("offset", 0) == 0
        for seq in (1, 2):
            assert (await server.broadcast(task_event("first", seq))).status_code == 200
        pubs = [await ann.push("task:first") for _ in range(2)]
        assert [(p["data"]["seq"], p["offset"]) for p in pubs] == [(1, 1), (2, 2)]
        await ann.stays_open(0.2)  # no unsubscribe push (insufficient state), no close
        assert not [m for m in ann.skipped if "unsubscribe" in m.get("push", {})]
        # Published to: task:first and the global channel.
        assert broker.stream_count == 2


async def test_a_websocket_upgrade_with_both_lengths_is_refused(server: RunningServer) -> None:
    for path in ("/connection/websocket", f"/api/v1/ws?token={server.token('ann')}"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n"
                "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode()
            )
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 400"), head


async def test_replies_to_a_frame_of_commands_leave_in_one_frame(
    signing_keys: tuple[str, str],
) -> None:
    """A frame of 40 subscribes and unsubscribes of fresh channels is answered in a
    few writes, not one per command (each subscribe awaits the engine): replies are
    held until the frame is done or FRAME_HOLD_SECONDS, whichever comes first, so a
    busy machine may split them once or twice; order is kept."""
    async with (
        run_server(signing_keys, client_command_rate_limit=0) as server,
        connected(server, "ann") as ann,
    ):
        commands = []
        for n in range(20):
            channel = f"task:fresh-{n}"
            commands.append({"id": ann.new_id(), "subscribe": {"channel": channel}})
            commands.append({"id": ann.new_id(), "unsubscribe": {"channel": channel}})
        await ann.send(*commands)
        replies: list[dict[str, Any]] = []
        frames = 0
        while len(replies) < len(commands):
            frame = await asyncio.wait_for(ann.ws.recv(), 5)
            frames += 1
            replies += [orjson.loads(line) for line in str(frame).split("\n")]
        assert [r["id"] for r in replies] == [c["id"] for c in commands]
        assert frames <= 4, f"{frames} frames for {len(commands)} replies"
        assert all("error" not in r for r in replies)
        # Single commands are not held: a subscribe, then its publication live.
        assert "subscribe" in await ann.call("subscribe", {"channel": "task:live"})
        assert (await server.broadcast(task_event("live", 1))).status_code == 200
        assert (await ann.push("task:live"))["data"]["seq"] == 1
