"""What a session and its outbox need from the socket edge, declared once here and
met by shim.transport (DirectWrite, Liveness, the socket pumps), so neither
protocol imports the server libraries."""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    """What the edge offers a session: ask for the socket to be closed."""

    @property
    def transport_name(self) -> str:
        """Centrifugo's name for it (websocket, http_stream, sse, uni_*), for metrics."""
        ...

    def close(self, code: int, reason: str) -> None: ...


class FrameSink(Protocol):
    """The connection's own transport, for whole frames written without awaiting."""

    def idle(self) -> bool:
        """True when a write now goes to the socket at once (nothing pending, nobody
        else writing), so it needs no drain."""
        ...

    def write(self, data: bytes) -> None: ...


class Pings(Protocol):
    """The transport's WebSocket pings of one connection (legacy hub liveness)."""

    # Loop time of the last pong received.
    last_pong: float

    def stop(self) -> None:
        """No more pings (the connection is closing)."""
        ...
