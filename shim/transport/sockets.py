"""The socket steps both pumps (WebSocket and HTTP stream) take when a peer has to go."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable

# SO_LINGER on, zero seconds: close() resets the connection and frees the kernel's
# send queue at once (a peer with a zero window would otherwise hold it for minutes).
_LINGER_RESET = struct.pack("ii", 1, 0)


def drop(transport: asyncio.WriteTransport | None, *, reset: bool) -> None:
    """Drop the connection at once, the bytes still in our buffer included. With
    `reset`, the kernel's unsent bytes too (RST instead of FIN)."""
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


async def within(awaitable: Awaitable[None], timeout: float) -> bool:
    """Await at most `timeout` seconds: True when it finished in time without error."""
    with contextlib.suppress(TimeoutError, Exception):
        async with asyncio.timeout(timeout):
            await awaitable
            return True
    return False
