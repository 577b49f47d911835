"""The ceiling: a minimal broadcast over the `websockets` library (asyncio API, uvloop).

Subscribers connect to `/sub?channel=<name>` and only listen. A publisher connects to
`/pub` and sends frames, each a legacy hub message or an array of them; each message
is encoded once and sent with `websockets.broadcast` to its channel's subscribers as
one pre-encoded str frame per message. Nothing else: no auth, no history, no queues
of our own -- one Python process sending one frame per message and subscriber.

Run: python -m bench.peers.ws_peer  (prints `peer listening on 127.0.0.1:<port>`).
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import orjson
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, serve

from bench.peers.common import loopback_socket, messages_of, ready_line, room_of

channels: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    request = ws.request
    target = urlsplit(request.path if request is not None else "/")
    if target.path == "/pub":
        async for frame in ws:
            for item in messages_of(orjson.loads(frame)):
                members = channels.get(room_of(item))
                if members:
                    websockets.broadcast(members, orjson.dumps(item).decode())
        return
    channel = parse_qs(target.query).get("channel", [""])[0]
    members = channels.setdefault(channel, set())
    members.add(ws)
    try:
        await ws.wait_closed()
    finally:
        members.discard(ws)
        if not members:
            channels.pop(channel, None)


async def serve_forever() -> None:
    sock = loopback_socket()
    async with serve(handler, sock=sock, compression=None, max_size=8 * 1024 * 1024):
        print(ready_line(sock.getsockname()[1]), flush=True)
        await asyncio.get_running_loop().create_future()


def main() -> None:
    uvloop.run(serve_forever())


if __name__ == "__main__":
    main()
