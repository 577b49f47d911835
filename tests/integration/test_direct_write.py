"""Frames go straight to the transport when no extension is in effect, and through
hypercorn (compressed) when permessage-deflate was negotiated; clients see the same."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect

from shim.centrifuge.session import CentrifugeSession
from shim.transport.edge import SocketPump
from tests.conftest import run_server


@pytest.mark.parametrize("compression", [False, True])
async def test_frames_reach_the_client_either_way(
    signing_keys: tuple[str, str], compression: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="shim.hypercorn_compat")
    async with (
        run_server(signing_keys, websocket_compression=compression) as server,
        connect(server.ws_url, compression="deflate") as ws,
    ):
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": server.token("d")}}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"id": 2, "subscribe": {"channel": "task:d"}}).decode())
        await ws.recv()
        sessions = [s for s in server.runtime.node.sessions if isinstance(s, CentrifugeSession)]
        assert len(sessions) == 1
        pump = sessions[0].transport
        assert isinstance(pump, SocketPump)
        assert pump.direct.usable() is (not compression)
        # The memory hooks applied to this socket (each says so once when it cannot).
        assert not [r for r in caplog.records if "cannot apply" in r.getMessage()]

        big = "x" * 70_000  # a 64-bit length header on the direct path
        await server.broadcast(
            [
                {"type": "task.updated", "payload": {"task_id": "d", "n": n, "pad": big}}
                for n in range(3)
            ]
        )
        received: list[int] = []
        while len(received) < 3:
            frame = await ws.recv()
            assert isinstance(frame, str)  # text frames, as the JSON protocol needs
            received += [
                orjson.loads(line)["push"]["pub"]["data"]["n"] for line in frame.split("\n")
            ]
        assert received == [0, 1, 2]


@pytest.mark.parametrize("delay", [0.0, 0.4])
async def test_a_write_delay_puts_paced_publications_in_one_frame(
    signing_keys: tuple[str, str], delay: float
) -> None:
    """Three single-event POSTs 10 ms apart: with client_write_delay_seconds they reach
    a channel-protocol client as one frame of three pushes; without it, as three."""
    async with (
        run_server(signing_keys, client_write_delay_seconds=delay) as server,
        connect(server.ws_url, compression=None) as ws,
    ):
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": server.token("w")}}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"id": 2, "subscribe": {"channel": "task:w"}}).decode())
        await ws.recv()
        for n in range(3):
            response = await server.broadcast(
                {"type": "task.updated", "payload": {"task_id": "w", "n": n}}
            )
            assert response.status_code == 200
            await asyncio.sleep(0.01)
        frames: list[list[int]] = []
        while sum(map(len, frames)) < 3:
            frame = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(frame, str)
            frames.append(
                [orjson.loads(line)["push"]["pub"]["data"]["n"] for line in frame.split("\n")]
            )
    assert frames == ([[0, 1, 2]] if delay else [[0], [1], [2]])
