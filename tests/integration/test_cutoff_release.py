"""A client cut off as slow (3008) does not keep its socket: with its receive
window held at zero, the server side of its TCP connection is no longer
ESTABLISHED within the write timeout of the cut-off, on both protocols, with and
without permessage-deflate (issue #10, item 4). The kernel's view is read from
/proc/net/tcp: what an operator's `ss` shows."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from legacy.session import LegacySession
from shim.centrifuge.session import CentrifugeSession
from tests.conftest import RunningServer, run_server
from tests.legacyclient import SUBSCRIBE_ALL, legacy_url
from tests.rawclient import stalled_subscriber, tcp_state

Keys = tuple[str, str]
CHANNEL = "task:frozen"
WRITE_TIMEOUT = 2.0
# Scheduling slack on a shared machine (the check itself polls every 20 ms).
SLACK = 1.0


async def stalled_legacy(server: RunningServer, *, deflate: bool) -> ClientConnection:
    """A legacy `*` client that never reads again (see stalled_subscriber)."""
    ws = await connect(
        legacy_url(server.port, server.token("frozen")),
        compression="deflate" if deflate else None,
        max_queue=1,
        ping_interval=None,
        proxy=None,
    )
    await ws.send(SUBSCRIBE_ALL)
    node = server.runtime.node
    global_channel = server.settings.global_channel
    async with asyncio.timeout(5):
        while node.subscriber_count(global_channel) < 1:
            await asyncio.sleep(0.02)
    return ws


@contextlib.asynccontextmanager
async def frozen_client(
    server: RunningServer, protocol: str, *, deflate: bool
) -> AsyncIterator[ClientConnection]:
    if protocol == "channels":
        ws = await stalled_subscriber(
            server.ws_url, server.token("frozen"), CHANNEL, deflate=deflate
        )
    else:
        ws = await stalled_legacy(server, deflate=deflate)
    assert (ws.response is not None) and (
        ("permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")) is deflate
    )
    try:
        yield ws
    finally:
        ws.transport.abort()


def sessions(server: RunningServer, kind: type[Any]) -> int:
    return sum(isinstance(s, kind) for s in server.runtime.node.sessions)


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("protocol", ["channels", "legacy"])
async def test_a_client_cut_off_as_slow_loses_its_connection_within_the_write_timeout(
    signing_keys: Keys, protocol: str, deflate: bool
) -> None:
    kind = CentrifugeSession if protocol == "channels" else LegacySession
    async with (
        run_server(
            signing_keys,
            client_queue_max_size_bytes=256 * 1024,
            websocket_write_timeout_seconds=WRITE_TIMEOUT,
            websocket_compression=deflate,
            legacy_read_deadline_seconds=600,
        ) as server,
        frozen_client(server, protocol, deflate=deflate) as ws,
    ):
        client_port = ws.local_address[1]
        assert tcp_state(server.port, client_port) == "ESTABLISHED"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        n = 0
        # Random text, so that deflate cannot shrink the stream to nothing.
        while sessions(server, kind):
            assert loop.time() < give_up, "the frozen client was never cut off"
            batch = [
                {
                    "type": "task.updated",
                    "payload": {"task_id": "frozen", "n": n + i, "pad": secrets.token_hex(1000)},
                }
                for i in range(50)
            ]
            response = await server.broadcast(batch)
            assert response.status_code == 200, response.text
            n += len(batch)
            await asyncio.sleep(0)
        cut_at = loop.time()
        counters = server.runtime.node.counters.disconnects
        assert counters.get(("legacy" if protocol == "legacy" else "channels", 3008)) == 1
        # The client still reads nothing; the server must let go of the socket anyway.
        state = tcp_state(server.port, client_port)
        while state == "ESTABLISHED" and loop.time() < cut_at + WRITE_TIMEOUT + SLACK:
            await asyncio.sleep(0.05)
            state = tcp_state(server.port, client_port)
        assert state != "ESTABLISHED", f"still ESTABLISHED {loop.time() - cut_at:.1f}s after 3008"
        assert not server.runtime.open_sockets


async def test_a_close_whose_frame_cannot_be_flushed_releases_the_connection(
    signing_keys: Keys,
) -> None:
    # Not a slow client: the cutover retires a legacy client (4410) whose kernel
    # buffers happen to be full. What is queued and the close frame get one write
    # timeout each; then the connection is aborted instead of waiting on the peer.
    async with (
        run_server(
            signing_keys,
            websocket_write_timeout_seconds=WRITE_TIMEOUT,
            client_queue_max_size_bytes=64 * 1024 * 1024,
            cutover_drain_seconds=0.2,
            legacy_read_deadline_seconds=600,
        ) as server,
        frozen_client(server, "legacy", deflate=False) as ws,
    ):
        client_port = ws.local_address[1]
        (pump,) = server.runtime.open_sockets
        transport = pump.direct.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        n = 0
        # Until the kernel takes no more: bytes start waiting in the server's buffer.
        while not transport.get_write_buffer_size():
            assert loop.time() < give_up, "the kernel buffers never filled"
            batch = [
                {"type": "task.updated", "payload": {"task_id": "f", "n": n + i, "p": "x" * 2000}}
                for i in range(10)
            ]
            assert (await server.broadcast(batch)).status_code == 200
            n += len(batch)
            await asyncio.sleep(0.01)
        await server.runtime.change_cutover({"mode": "channels"})
        async with asyncio.timeout(5):
            while sessions(server, LegacySession):
                await asyncio.sleep(0.02)
        closed_at = loop.time()
        assert server.runtime.node.counters.disconnects.get(("legacy", 4410)) == 1
        state = tcp_state(server.port, client_port)
        while state == "ESTABLISHED" and loop.time() < closed_at + 2 * WRITE_TIMEOUT + SLACK:
            await asyncio.sleep(0.05)
            state = tcp_state(server.port, client_port)
        assert state != "ESTABLISHED", f"still ESTABLISHED {loop.time() - closed_at:.1f}s later"
