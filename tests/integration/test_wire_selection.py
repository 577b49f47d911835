"""Which wire a WebSocket gets, as Centrifugo decides it, on both Centrifuge paths."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from tests.conftest import RunningServer, sessions_of
from tests.rawcentrifuge import RawClient


@pytest.mark.parametrize(
    ("path", "offered", "answered", "wire"),
    [
        ("/connection/websocket", [], None, "json"),
        ("/connection/websocket", ["centrifuge-json"], "centrifuge-json", "json"),
        ("/connection/websocket", ["centrifuge-protobuf"], "centrifuge-protobuf", "protobuf"),
        ("/connection/websocket?cf_protocol=protobuf", [], None, "protobuf"),
        ("/api/v1/ws", ["centrifuge-protobuf"], "centrifuge-protobuf", "protobuf"),
        ("/api/v1/ws", [], None, "json"),
    ],
)
async def test_subprotocol_and_query_pick_the_wire(
    server: RunningServer, path: str, offered: list[str], answered: str | None, wire: str
) -> None:
    url = f"ws://127.0.0.1:{server.port}{path}"
    protocols = [Subprotocol(p) for p in offered] or None
    async with connect(url, subprotocols=protocols, compression=None) as ws:
        assert ws.subprotocol == answered
        client = RawClient(ws, wire)
        await client.send({"id": 1, "connect": {"token": server.token("wired")}})
        assert "connect" in (await client.replies())[0]
        assert [s.wire.name for s in sessions_of(server, "wired")] == [wire]
