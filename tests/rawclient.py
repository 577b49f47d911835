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


# /proc/net/tcp's state column (include/net/tcp_states.h).
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def tcp_state(local_port: int, remote_port: int) -> str | None:
    """The kernel's state of the loopback TCP socket from `local_port` to
    `remote_port` (Linux /proc/net/tcp and tcp6), or None when there is none."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    return TCP_STATES.get(state, state)
    return None
