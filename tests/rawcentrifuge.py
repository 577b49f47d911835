"""A hand-driven Centrifuge protocol v2 client (JSON or Protobuf, messages built
with centrifuge-python's generated classes) that counts the bytes it reads: for
wire-level tests and measurements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import centrifuge.protocol.client_pb2 as sdk  # type: ignore[import-untyped]
import orjson
from websockets.asyncio.client import ClientConnection, connect

from shim.centrifuge import pbcodec


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
async def raw_client(ws_url: str, token: str, codec: str) -> AsyncIterator[RawClient]:
    """Connected (no permessage-deflate: bytes as the protocol makes them)."""
    query = "?cf_protocol=protobuf" if codec == "protobuf" else ""
    async with connect(ws_url + query, compression=None, max_size=None) as ws:
        client = RawClient(ws, codec)
        await client.send({"id": 1, "connect": {"token": token}})
        assert "connect" in (await client.replies())[0]
        yield client
