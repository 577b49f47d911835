"""Fossil delta on the wire, read by a plain WebSocket client in both codecs: bytes
for Dex's growing assistant message with and without delta, the deltas rebuilt with
centrifuge-python's own applier, and what Centrifugo does with a bad `delta`.

    pytest -s tests/integration/test_delta_wire.py -k bytes   # prints the figures
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import centrifuge.protocol.client_pb2 as sdk  # type: ignore[import-untyped]
import orjson
import pytest
from centrifuge.fossil import apply_delta  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shim.centrifuge import pbcodec
from tests.conftest import RunningServer, run_server
from tests.conventions import with_quest_delta
from tests.streams import content_event

UPDATES = 200
TIMEOUT = 10.0


def frame_bytes(message: str | bytes) -> int:
    """Bytes of one unmasked server frame on the wire: header and payload."""
    size = len(message.encode() if isinstance(message, str) else message)
    return size + (2 if size < 126 else 4 if size < 1 << 16 else 10)


class RawClient:
    """Speaks protocol v2 by hand, in JSON or Protobuf, and keeps every reply."""

    def __init__(self, ws: ClientConnection, codec: str) -> None:
        self.ws = ws
        self.codec = codec
        self.wire_bytes = 0

    async def send(self, command: dict[str, Any]) -> None:
        if self.codec == "json":
            await self.ws.send(orjson.dumps(command).decode())
            return
        message = sdk.Command()
        message.id = command["id"]
        for key, body in command.items():
            if key != "id":
                for field, value in body.items():
                    setattr(getattr(message, key), field, value)
        await self.ws.send(pbcodec.delimited(message.SerializeToString()))

    async def replies(self) -> list[dict[str, Any]]:
        """The replies of the next frame, as dicts with JSON-mode shapes."""
        frame = await self.ws.recv()
        self.wire_bytes += frame_bytes(frame)
        if isinstance(frame, str):
            return [orjson.loads(line) for line in frame.split("\n")]
        out = []
        for raw in pbcodec.split_frame(frame):
            reply = sdk.Reply.FromString(raw)
            item: dict[str, Any] = {"id": reply.id}
            if reply.HasField("push") and reply.push.HasField("pub"):
                pub = reply.push.pub
                item["push"] = {"pub": {"data": pub.data, "delta": pub.delta, "offset": pub.offset}}
            elif reply.HasField("subscribe"):
                item["subscribe"] = {"delta": reply.subscribe.delta}
            elif reply.HasField("connect"):
                item["connect"] = {"client": reply.connect.client}
            out.append(item)
        return out


@asynccontextmanager
async def raw_client(server: RunningServer, codec: str) -> AsyncIterator[RawClient]:
    query = "?cf_protocol=protobuf" if codec == "protobuf" else ""
    async with connect(server.ws_url + query, compression=None) as ws:
        client = RawClient(ws, codec)
        await client.send({"id": 1, "connect": {"token": server.token("alice")}})
        assert "connect" in (await client.replies())[0]
        yield client


async def stream_bytes(server: RunningServer, codec: str, delta: bool) -> int:
    """Wire bytes a subscriber of quest:m reads for UPDATES growing updates; checks
    that every update rebuilds to the published text."""
    channel = f"quest:m-{codec}-{delta}"
    async with raw_client(server, codec) as client:
        subscribe: dict[str, Any] = {"channel": channel}
        if delta:
            subscribe["delta"] = "fossil"
        await client.send({"id": 2, "subscribe": subscribe})
        reply = (await client.replies())[0]
        assert bool(reply["subscribe"].get("delta")) is delta
        client.wire_bytes = 0
        events = [content_event(channel.partition(":")[2], step) for step in range(1, UPDATES + 1)]
        for start in range(0, UPDATES, 20):  # as the backend posts them, in small batches
            response = await server.broadcast(events[start : start + 20])
            assert response.status_code == 200, response.text

        previous = b""
        kinds = []
        while len(kinds) < UPDATES:
            for item in await client.replies():
                pub = item["push"]["pub"]
                data = pub["data"]
                raw = data.encode() if isinstance(data, str) else data
                if not delta and isinstance(data, dict):  # JSON without delta: embedded
                    raw = orjson.dumps(data)
                current = apply_delta(previous, raw) if pub.get("delta") else raw
                expected = events[len(kinds)]["payload"]["content"]
                assert orjson.loads(current)["content"] == expected
                previous = current
                kinds.append(bool(pub.get("delta")))
        assert kinds == [False] + [delta] * (UPDATES - 1)
        return client.wire_bytes


async def test_bytes_for_200_growing_updates_with_and_without_delta(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, namespaces=with_quest_delta()) as server:
        figures = {}
        for codec in ("json", "protobuf"):
            full = await stream_bytes(server, codec, delta=False)
            deltas = await stream_bytes(server, codec, delta=True)
            figures[codec] = (full, deltas, 1 - deltas / full)
            assert deltas <= 0.1 * full, figures  # the goal: at least 90 % fewer bytes
    for codec, (full, deltas, saved) in figures.items():
        print(
            f"{codec}: {UPDATES} updates, {full} B without delta, {deltas} B with, {saved:.1%} fewer"
        )


@pytest.mark.parametrize("codec", ["json", "protobuf"])
async def test_unknown_delta_type_closes_with_3501(server: RunningServer, codec: str) -> None:
    async with raw_client(server, codec) as client:
        await client.send({"id": 2, "subscribe": {"channel": "quest:x", "delta": "zstd"}})
        with pytest.raises(ConnectionClosed) as closed:
            await client.replies()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


@pytest.mark.parametrize("codec", ["json", "protobuf"])
async def test_delta_not_allowed_is_not_negotiated(server: RunningServer, codec: str) -> None:
    async with raw_client(server, codec) as client:
        await client.send({"id": 2, "subscribe": {"channel": "quest:y", "delta": "fossil"}})
        assert not (await client.replies())[0]["subscribe"].get("delta")
