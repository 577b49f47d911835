"""python-socketio broadcasting to a room, served by uvicorn (uvloop, httptools, and
uvicorn's default websocket implementation: the `websockets` sans-I/O one).

Clients connect over websocket (Engine.IO v4 / Socket.IO v5), emit `subscribe` with
a room name (acked once joined). `POST /api/v1/broadcast` takes the shim's body (a
legacy hub message or an array) and emits each message as event `message` to room
`task:<task_id>`, one `emit` per message, the way an application would.

Run: python -m bench.peers.socketio_peer  (prints `peer listening on 127.0.0.1:<port>`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import socketio  # type: ignore[import-untyped]
import uvicorn

from bench.peers.common import loopback_socket, messages_of, ready_line, room_of

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"], cors_allowed_origins=[])


@sio.on("subscribe")  # type: ignore[untyped-decorator]
async def subscribe(sid: str, room: str) -> str:
    await sio.enter_room(sid, room)
    return "ok"


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def publish_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The HTTP side: everything that is not Socket.IO."""
    if scope["type"] != "http":
        return
    if scope["method"] != "POST" or scope["path"] != "/api/v1/broadcast":
        await _respond(send, 404, b'{"error":"not found"}')
        return
    chunks = []
    while True:
        event = await receive()
        chunks.append(event.get("body", b""))
        if not event.get("more_body"):
            break
    try:
        items = messages_of(orjson.loads(b"".join(chunks)))
    except orjson.JSONDecodeError:
        await _respond(send, 400, b'{"error":"bad json"}')
        return
    for item in items:
        await sio.emit("message", item, room=room_of(item))
    await _respond(send, 200, b'{"accepted":%d}' % len(items))


app = socketio.ASGIApp(sio, other_asgi_app=publish_app)


def main() -> None:
    sock = loopback_socket()
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    print(ready_line(sock.getsockname()[1]), flush=True)
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
