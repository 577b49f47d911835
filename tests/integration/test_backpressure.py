"""A client that stops reading is cut off with 3008 and never delays the others."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import RunningServer, run_server
from tests.jsclient import JsClient
from tests.pyclient import new_client, new_subscription
from tests.rawclient import stalled_subscriber

CHANNEL = "task:stall"


async def _close_code(ws: ClientConnection) -> int | None:
    """Read what is left (the stalled client wakes up) until the close arrives."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code


async def _publish_until_cut(server: RunningServer, cut_by: str) -> int:
    """Publish 2 KB events until only the fast client is left; how many were sent.
    Bounded: the kernel buffers of a loopback socket take a few MB before the
    server's queue grows."""
    node = server.runtime.node
    filler = "x" * 2000
    total, batch = 0, 100
    deadline = asyncio.get_running_loop().time() + 20
    while node.subscriber_count(CHANNEL) > 1:
        assert asyncio.get_running_loop().time() < deadline, "stalled clients never cut off"
        response = await server.broadcast(
            [
                {"type": "task.updated", "payload": {"task_id": "stall", "n": n, "pad": filler}}
                for n in range(total, total + batch)
            ]
        )
        assert response.status_code == 200, response.text
        total += batch
        if cut_by == "write timeout":
            await asyncio.sleep(0.1)
    return total


QUEUE_CAP = {"client_queue_max_size_bytes": 512 * 1024, "websocket_write_timeout_seconds": 60}
WRITE_TIMEOUT = {
    "client_queue_max_size_bytes": 256 * 1024 * 1024,
    "websocket_write_timeout_seconds": 1,
}
CASES = [
    # The queue cap trips first: the write timeout is far away.
    ("queue cap", 1, QUEUE_CAP),
    ("queue cap", 3, QUEUE_CAP),
    # The write timeout trips first: the cap is far away.
    ("write timeout", 1, WRITE_TIMEOUT),
]


@pytest.mark.parametrize(("cut_by", "stalled_count", "overrides"), CASES)
async def test_stalled_client_is_cut_off_and_fast_client_gets_everything(
    signing_keys: tuple[str, str], cut_by: str, stalled_count: int, overrides: dict[str, int]
) -> None:
    async with run_server(signing_keys, **overrides) as server:
        node = server.runtime.node
        fast, fast_events = new_client(server.ws_url, server.token("fast"))
        await fast.connect()
        sub, sub_events = new_subscription(fast, CHANNEL)
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        stalled = [
            await stalled_subscriber(server.ws_url, server.token(f"slow-{i}"), CHANNEL)
            for i in range(stalled_count)
        ]
        assert node.subscriber_count(CHANNEL) == 1 + stalled_count

        total = await _publish_until_cut(server, cut_by)

        await sub_events.wait_for("publication", count=total, timeout=30)
        publications = sub_events.named("publication")
        assert [ctx.pub.data["n"] for ctx in publications] == list(range(total))
        offsets = [ctx.pub.offset for ctx in publications]
        assert offsets == list(range(offsets[0], offsets[0] + total))

        for ws in stalled:
            assert await _close_code(ws) == 3008
        assert not fast_events.named("disconnected")
        assert [name for name, _ in fast_events.events].count("connected") == 1
        await fast.disconnect()


@pytest.mark.js
@pytest.mark.parametrize(("cut_by", "stalled_count", "overrides"), [CASES[0], CASES[2]])
async def test_stalled_client_is_cut_off_and_fast_js_client_gets_everything(
    signing_keys: tuple[str, str], cut_by: str, stalled_count: int, overrides: dict[str, int]
) -> None:
    def received(js: JsClient) -> list[dict[str, Any]]:
        return js.find_events(lambda e: e["event"] == "sub.publication")

    async with (
        run_server(signing_keys, **overrides) as server,
        JsClient(server.ws_url, server.token("fast")) as js,
    ):
        await js.call("connect")
        await js.wait_event("connected", timeout=5)
        await js.call("newSubscription", channel=CHANNEL, options={})
        await js.call("subscribe", channel=CHANNEL, wait=True, timeout=5000)
        stalled = [
            await stalled_subscriber(server.ws_url, server.token(f"slow-{i}"), CHANNEL)
            for i in range(stalled_count)
        ]
        assert server.runtime.node.subscriber_count(CHANNEL) == 1 + stalled_count

        total = await _publish_until_cut(server, cut_by)

        deadline = asyncio.get_running_loop().time() + 30
        while len(received(js)) < total:
            assert asyncio.get_running_loop().time() < deadline, len(received(js))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # a duplicate would show up now
        publications = received(js)
        assert [p["data"]["n"] for p in publications] == list(range(total))
        offsets = [p["offset"] for p in publications]
        assert offsets == list(range(offsets[0], offsets[0] + total))

        for ws in stalled:
            assert await _close_code(ws) == 3008
        # The fast client was never dropped: one connect, no reconnect or resubscribe
        # (code 0 is the SDK's own "connect/subscribe called").
        dropped = js.find_events(lambda e: e["event"] in NOT_LIVE and e["code"] != 0)
        assert dropped == []
        assert len(js.find_events("connected")) == 1


NOT_LIVE = ("connecting", "disconnected", "sub.subscribing", "sub.unsubscribed")
