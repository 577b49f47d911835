"""centrifuge-js, unmodified, where WebSocket is unavailable: it falls back to
HTTP-streaming or SSE with bidirectional emulation and then behaves as on WebSocket.

Node 20 has no WebSocket of its own; these clients get none (`websocket: False`),
so the SDK skips the WebSocket entry of its transport list exactly as a browser
without one would. One test keeps WebSocket but blocks it, as a proxy does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from shim.app.fallback import EMULATION_PATH, HTTP_STREAM_PATH, SSE_PATH
from shim.centrifuge import codes
from shim.transport.stream import StreamPump
from tests.conftest import API_KEY, RunningServer, run_server
from tests.integration.test_js_sdk import (
    FAST,
    broadcast_ok,
    on,
    publications,
    session_of,
    subscribe,
    task_event,
    wait_until,
)
from tests.jsclient import JsClient

pytestmark = pytest.mark.js

FALLBACKS = {"http_stream": HTTP_STREAM_PATH, "sse": SSE_PATH}


def fallback_options(
    server_url: str, ws_url: str, transport: str, *, websocket: bool = False, protobuf: bool = False
) -> dict[str, Any]:
    """The SDK's options for a transport list of WebSocket, then `transport`."""
    return {
        "transports": [
            {"transport": "websocket", "endpoint": ws_url},
            {"transport": transport, "endpoint": server_url + FALLBACKS[transport]},
        ],
        # Node's fetch needs an absolute URL (a browser resolves "/emulation" itself).
        "emulationEndpoint": server_url + EMULATION_PATH,
        "websocket": websocket,
        "protobuf": protobuf,
        **FAST,
    }


async def server_api(server: RunningServer, method: str, body: dict[str, Any]) -> Any:
    response = await server.http.post(f"/api/{method}", json=body, headers={"X-API-Key": API_KEY})
    assert response.status_code == 200, response.text
    assert "error" not in response.json(), response.text
    return response.json().get("result")


@pytest.mark.parametrize(
    ("transport", "protobuf"),
    [("http_stream", False), ("sse", False), ("http_stream", True)],
    ids=["http_stream", "sse", "http_stream-protobuf"],
)
async def test_sdk_without_websocket_falls_back_and_does_everything(
    signing_keys: tuple[str, str], transport: str, protobuf: bool
) -> None:
    # A half-second grace past expiry: without the refresh (sent through /emulation)
    # the server would close the stream about 4.5 s after connecting.
    async with (
        run_server(signing_keys, client_expired_close_delay_seconds=0.5) as server,
        JsClient(
            "",
            server.token("alice", ttl=4),
            **fallback_options(server.url, server.ws_url, transport, protobuf=protobuf),
        ) as js,
    ):
        await js.call("setToken", token=server.token("alice", ttl=3600))
        await js.call("connect")
        connected = await js.wait_event("connected", timeout=10)
        assert connected["transport"] == transport
        client_id = connected["client"]
        session = session_of(server, client_id)
        assert isinstance(session.transport, StreamPump)
        assert session.wire.name == ("protobuf" if protobuf else "json")
        # Chunks go straight to the socket (h11 chose chunked framing for the body).
        assert session.transport.direct.frames and session.transport.direct.transport
        original_expiry = session.expires_at

        # Server-side subscription from connect: the personal channel.
        personal = await js.wait_event(on("user:alice", "subscribed"), timeout=5)
        assert personal["recoverable"] is True

        # Client-side subscribe through /emulation, with recovery on.
        subscribed = await subscribe(js, "task:T", recoverable=True)
        assert subscribed["streamPosition"]["offset"] == 0
        await broadcast_ok(server, [task_event("T", seq) for seq in (1, 2, 3)])
        await wait_until(lambda: len(publications(js, "task:T")) >= 3)
        assert [p["data"]["seq"] for p in publications(js, "task:T")] == [1, 2, 3]
        assert [p["offset"] for p in publications(js, "task:T")] == [1, 2, 3]

        # Personal channel events, routed from the backend's broadcast.
        approval = {"type": "approval.required", "payload": {"user_id": "alice", "id": "a1"}}
        await broadcast_ok(server, approval)
        pub = await js.wait_event(on("user:alice", "publication"), timeout=5)
        assert pub["data"]["id"] == "a1"

        # Calls answered through the stream.
        assert await js.call("rpc", method="ping") == {"data": {"pong": True}}
        history = await js.call("history", channel="task:T", limit=10)
        assert [p["data"]["seq"] for p in history["publications"]] == [1, 2, 3]
        presence = await js.call("presence", channel="task:T")
        assert [c["user"] for c in presence["clients"].values()] == ["alice"]
        stats = await js.call("presenceStats", channel="task:T")
        assert stats == {"numClients": 1, "numUsers": 1}

        # A server-side subscription added through the server API.
        await server_api(server, "subscribe", {"user": "alice", "channel": "project:P"})
        added = await js.wait_event(on("project:P", "subscribed"), timeout=5)
        assert added["channel"] == "project:P"

        # The token refresh goes through /emulation and keeps the connection alive.
        await asyncio.sleep(max(0.0, original_expiry - time.time()) + 1.5)
        assert (await js.call("state"))["client"] == "connected"
        assert session_of(server, client_id).expires_at > original_expiry + 3000
        assert not js.find_events("disconnected")

        # The stream is cut (a network drop): the SDK reconnects on the same fallback
        # and recovers what was published meanwhile, in order, exactly once.
        mark = js.mark()
        session_of(server, client_id).transport.abort()  # type: ignore[attr-defined]
        await js.wait_event("connecting", since=mark)
        await broadcast_ok(server, [task_event("T", seq) for seq in (4, 5)])
        reconnected = await js.wait_event("connected", timeout=10, since=mark)
        assert reconnected["transport"] == transport
        recovered = await js.wait_event(on("task:T", "sub.subscribed"), timeout=5, since=mark)
        assert recovered["wasRecovering"] is True and recovered["recovered"] is True
        await wait_until(lambda: len(publications(js, "task:T")) >= 5)
        assert [p["data"]["seq"] for p in publications(js, "task:T")] == [1, 2, 3, 4, 5]

        # Disconnect codes reach the SDK as on WebSocket: a no-reconnect code ends it.
        mark = js.mark()
        custom = {"code": 4503, "reason": "account closed"}
        await server_api(server, "disconnect", {"user": "alice", "disconnect": custom})
        gone = await js.wait_event("disconnected", timeout=5, since=mark)
        assert (gone["code"], gone["reason"]) == (4503, "account closed")
        after = js.mark()
        await asyncio.sleep(0.5)
        assert not js.find_events("connecting", since=after)
        assert (await js.call("state"))["client"] == "disconnected"


@pytest.mark.parametrize("transport", sorted(FALLBACKS))
async def test_sdk_falls_back_when_websocket_is_blocked(
    server: RunningServer, transport: str
) -> None:
    # The SDK has WebSocket, but the upgrade is refused (as by a proxy that blocks it).
    blocked = f"ws://127.0.0.1:{server.port}/blocked-by-proxy"
    options = fallback_options(server.url, blocked, transport, websocket=True)
    async with JsClient("", server.token("bob"), **options) as js:
        await js.call("connect")
        connected = await js.wait_event("connected", timeout=10)
        assert connected["transport"] == transport
        await subscribe(js, "task:B")
        await broadcast_ok(server, task_event("B", 1))
        pub = await js.wait_event(on("task:B", "sub.publication"), timeout=5)
        assert pub["data"]["seq"] == 1


async def test_shutdown_tells_emulated_clients_to_reconnect(server: RunningServer) -> None:
    options = fallback_options(server.url, server.ws_url, "http_stream")
    async with JsClient("", server.token("carol"), **options) as js:
        await js.call("connect")
        connected = await js.wait_event("connected", timeout=10)
        session = session_of(server, connected["client"])
        mark = js.mark()
        session.disconnect(codes.SHUTDOWN)
        event = await js.wait_event(lambda e: e["event"] == "connecting", since=mark, timeout=5)
        assert (event["code"], event["reason"]) == (codes.SHUTDOWN.code, codes.SHUTDOWN.reason)
        # It comes back (to this node, which is still up).
        await js.wait_event("connected", since=mark, timeout=10)
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/health")).status_code == 200


@pytest.mark.parametrize("transport", sorted(FALLBACKS))
async def test_pongs_through_emulation_keep_the_stream_alive(
    signing_keys: tuple[str, str], transport: str
) -> None:
    # Pings every second, one second to answer: the SDK's pongs must come back
    # through POST /emulation in time, again and again.
    async with (
        run_server(
            signing_keys, client_ping_interval_seconds=1, client_pong_timeout_seconds=1
        ) as server,
        JsClient(
            "", server.token("kim"), **fallback_options(server.url, server.ws_url, transport)
        ) as js,
    ):
        await js.call("connect")
        connected = await js.wait_event("connected", timeout=10)
        mark = js.mark()
        await asyncio.sleep(4)
        assert not js.find_events("disconnected", since=mark)
        assert not js.find_events("connecting", since=mark)
        session = session_of(server, connected["client"])
        assert session.state.value == "connected"
        assert (
            server.runtime.node.counters.disconnects.get(("channels", codes.NO_PONG.code)) is None
        )


async def test_expired_token_at_connect_is_refreshed_over_the_fallback(
    server: RunningServer,
) -> None:
    options = fallback_options(server.url, server.ws_url, "sse")
    async with JsClient("", server.token("lee", ttl=-10), **options) as js:
        await js.call("setToken", token=server.token("lee", ttl=3600))
        await js.call("connect")
        error = await js.wait_event("error", timeout=10)
        assert error["type"] == "connect"
        assert error["error"]["code"] == codes.TOKEN_EXPIRED.code
        connected = await js.wait_event("connected", timeout=10)
        assert connected["transport"] == "sse"
        # The refused attempt left nothing behind: one session, one emulated stream.
        await wait_until(lambda: len(server.runtime.emulation) == 1)
        assert [s.client_id for s in server.runtime.node.sessions] == [connected["client"]]
