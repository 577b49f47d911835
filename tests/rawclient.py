"""A bare Centrifuge JSON client (the `websockets` library) for what no SDK does on
purpose: stop reading."""

from __future__ import annotations

import orjson
from websockets.asyncio.client import ClientConnection, connect


async def stalled_subscriber(
    url: str, token: str, channel: str, *, deflate: bool = False
) -> ClientConnection:
    """Connected and subscribed to `channel`, and from now on never read: max_queue=1
    makes websockets stop reading the socket once one message waits, so the kernel
    buffers fill as with a browser tab that froze."""
    ws = await connect(
        url, compression="deflate" if deflate else None, max_queue=1, ping_interval=None
    )
    await ws.send(orjson.dumps({"id": 1, "connect": {"token": token}}).decode())
    await ws.send(orjson.dumps({"id": 2, "subscribe": {"channel": channel}}).decode())
    seen: set[int] = set()
    while not {1, 2} <= seen:
        for line in str(await ws.recv()).split("\n"):
            reply = orjson.loads(line)
            assert "error" not in reply, reply
            seen.add(reply.get("id", 0))
    return ws
