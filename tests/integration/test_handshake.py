"""The Centrifuge endpoint's handshake and timers, seen from a raw websocket client.

Handshake: the Python SDK's empty Sec-WebSocket-Protocol header (spec §1.2) and
permessage-deflate on/off. Timers (spec §4, §5, §9.3) run on the node's ticker,
once per second, so servers here use 1 s settings and waits of a few seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import connect

from shim.core.config import Settings
from shim.transport.hypercorn_compat import install_hypercorn_hooks
from tests.conftest import RunningServer, run_server
from tests.integration.test_protocol_errors import RawClient, connected, raw_client

Keys = tuple[str, str]

# The node's ticker period: timers fire at most this late.
TICK = 1.0
# Scheduling slack on top of it.
SLACK = 0.5

# --- handshake -------------------------------------------------------------------


async def test_empty_subprotocol_header_is_accepted(server: RunningServer) -> None:
    # subprotocols=[] is what centrifuge-python passes: an empty header value.
    async with connect(server.ws_url, subprotocols=[]) as ws:
        assert ws.request is not None and ws.response is not None
        assert ws.request.headers.get_all("Sec-WebSocket-Protocol") == [""]
        assert ws.response.status_code == 101
        assert "Sec-WebSocket-Protocol" not in ws.response.headers
        assert ws.subprotocol is None
        client = RawClient(ws)
        result = await client.connect(server.token("alice"))
        assert result["client"]
        assert "user:alice" in result["subs"]


async def test_absent_subprotocol_header_is_accepted(server: RunningServer) -> None:
    # centrifuge-js in JSON mode sends no header at all.
    async with connect(server.ws_url) as ws:
        assert ws.request is not None and ws.response is not None
        assert "Sec-WebSocket-Protocol" not in ws.request.headers
        assert "Sec-WebSocket-Protocol" not in ws.response.headers
        assert (await RawClient(ws).connect(server.token("alice")))["client"]


async def offered_deflate_answer(server: RunningServer) -> str | None:
    """The server's Sec-WebSocket-Extensions answer to an offer of permessage-deflate,
    after checking that a connect and a broadcast still get through."""
    async with connect(server.ws_url, subprotocols=[], compression="deflate") as ws:
        assert ws.request is not None and ws.response is not None
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        client = RawClient(ws)
        await client.connect(server.token("alice"))
        task_id = uuid.uuid4().hex
        assert "subscribe" in await client.call("subscribe", {"channel": f"task:{task_id}"})
        # Large and repetitive: compresses well, and crosses several deflate blocks.
        note = "compressible " * 4000
        resp = await server.broadcast(
            {"type": "task.updated", "payload": {"task_id": task_id, "note": note}}
        )
        assert resp.status_code == 200, resp.text
        assert (await client.push(f"task:{task_id}"))["data"]["note"] == note
        return ws.response.headers.get("Sec-WebSocket-Extensions")


async def test_permessage_deflate_off_by_default(server: RunningServer) -> None:
    assert server.settings.websocket_compression is False
    assert await offered_deflate_answer(server) is None


async def test_permessage_deflate_on_when_enabled(signing_keys: Keys) -> None:
    try:
        async with run_server(signing_keys, websocket_compression=True) as server:
            answer = await offered_deflate_answer(server)
            assert answer is not None and answer.startswith("permessage-deflate")
            # A client that offers nothing gets nothing.
            async with connect(server.ws_url, compression=None) as ws:
                assert ws.response is not None
                assert "Sec-WebSocket-Extensions" not in ws.response.headers
        # The switch is process-wide: the next server must put its own setting back.
        async with run_server(signing_keys) as server:
            assert await offered_deflate_answer(server) is None
    finally:
        install_hypercorn_hooks(compression=Settings().websocket_compression)


# --- ping / pong and stale -----------------------------------------------------------


@pytest.fixture
async def fast_timers(signing_keys: Keys) -> AsyncIterator[RunningServer]:
    async with run_server(
        signing_keys,
        client_ping_interval_seconds=1,
        client_pong_timeout_seconds=1,
        client_stale_close_delay_seconds=1,
    ) as server:
        yield server


async def answer_pings_for(client: RawClient, seconds: float) -> list[float]:
    """Pong every ping for `seconds`; the loop times the pings arrived at."""
    loop = asyncio.get_running_loop()
    pings: list[float] = []
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            message = await client.receive(left)
        except TimeoutError:
            break
        assert message == {}, f"only pings expected, got {message}"
        pings.append(loop.time())
        await client.ws.send("{}")
    return pings


async def test_connect_result_announces_ping_and_pong(fast_timers: RunningServer) -> None:
    async with raw_client(fast_timers) as client:
        result = await client.connect(fast_timers.token("alice"))
        assert result["ping"] == 1
        assert result["pong"] is True


async def test_client_that_pongs_stays_connected(fast_timers: RunningServer) -> None:
    async with connected(fast_timers) as client:
        pings = await answer_pings_for(client, 5.0)
        # First ping within one interval (+ a tick), then one per interval.
        assert len(pings) >= 3, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.5 < gap < 1 + TICK + SLACK for gap in gaps), gaps
        rpc = await client.call("rpc", {"method": "ping"})
        assert rpc["rpc"] == {"data": {"pong": True}}


async def test_client_that_never_pongs_is_closed_3012(fast_timers: RunningServer) -> None:
    loop = asyncio.get_running_loop()
    async with connected(fast_timers) as client:
        connected_at = loop.time()
        assert await client.receive(1 + TICK + SLACK) == {}
        first_ping = loop.time()
        close = await client.closed(1 + TICK + SLACK + 1)
        closed_at = loop.time()
    assert (close.code, close.reason) == (3012, "no pong")
    # Not before the pong timeout, and at most a tick after it.
    assert 1 - 0.1 <= closed_at - first_ping <= 1 + TICK + SLACK
    # ping interval + pong timeout + one tick.
    assert closed_at - connected_at <= 1 + 1 + TICK + SLACK


async def test_socket_without_connect_is_closed_3502(fast_timers: RunningServer) -> None:
    loop = asyncio.get_running_loop()
    async with raw_client(fast_timers) as client:
        opened = loop.time()
        close = await client.closed(1 + TICK + SLACK + 1)
        elapsed = loop.time() - opened
    assert (close.code, close.reason) == (3502, "stale")
    assert client.skipped == []
    assert 1 - 0.1 <= elapsed <= 1 + TICK + SLACK


# --- connection expiry and refresh ----------------------------------------------------


GRACE = 1.0


@pytest.fixture
async def short_grace(signing_keys: Keys) -> AsyncIterator[RunningServer]:
    async with run_server(signing_keys, client_expired_close_delay_seconds=GRACE) as server:
        yield server


async def connect_expiring(server: RunningServer, client: RawClient) -> float:
    """Connect with a token that expires in ~2 s; its exp (unix seconds)."""
    token = server.token("alice", ttl=2)
    exp = float(int(time.time()) + 2)
    result = await client.connect(token)
    assert result["expires"] is True
    assert 1 <= result["ttl"] <= 2
    return exp


async def test_unrefreshed_connection_is_closed_3005(short_grace: RunningServer) -> None:
    async with raw_client(short_grace) as client:
        exp = await connect_expiring(short_grace, client)
        close = await client.closed(exp + GRACE + TICK + SLACK - time.time())
        closed_at = time.time()
    assert (close.code, close.reason) == (3005, "connection expired")
    assert closed_at >= exp + GRACE - 0.1
    assert client.skipped == []


async def test_refreshed_connection_outlives_old_expiry(short_grace: RunningServer) -> None:
    async with raw_client(short_grace) as client:
        exp = await connect_expiring(short_grace, client)
        reply = await client.call("refresh", {"token": short_grace.token("alice", ttl=3600)})
        assert reply == {
            "id": reply["id"],
            "refresh": {"expires": True, "ttl": reply["refresh"]["ttl"]},
        }
        assert 3590 <= reply["refresh"]["ttl"] <= 3600
        # Past the old expiry plus grace plus a tick, still open and served.
        await client.stays_open(exp + GRACE + TICK + SLACK - time.time())


async def test_refresh_with_expired_token_closes_3005(short_grace: RunningServer) -> None:
    async with connected(short_grace) as client:
        await client.send(
            {"id": client.new_id(), "refresh": {"token": short_grace.token("alice", ttl=-10)}}
        )
        close = await client.closed()
    assert (close.code, close.reason) == (3005, "connection expired")
    assert client.skipped == []


async def test_refresh_with_other_users_token_closes_3500(short_grace: RunningServer) -> None:
    async with connected(short_grace) as client:
        await client.send(
            {"id": client.new_id(), "refresh": {"token": short_grace.token("mallory")}}
        )
        close = await client.closed()
    assert (close.code, close.reason) == (3500, "invalid token")
    assert client.skipped == []
