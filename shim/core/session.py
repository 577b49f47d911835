"""What both protocols' sessions share: closing (asked for by the server, or the
socket gone), the slow-writer check and the questions the composition root asks of
any session, so it never tells the two apart by type.

Sessions are state machines fed by the edge; none awaits a socket.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar

from shim.core import close_codes

if TYPE_CHECKING:
    from shim.core.node import Node
    from shim.core.outbox import Outbox
    from shim.core.transport import Transport


class SessionState(enum.Enum):
    # Centrifuge only: the socket is open, the connect command not yet accepted.
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class Session:
    # The label counters and logs use ("channels" for Centrifuge, "legacy").
    protocol: ClassVar[str]

    __slots__ = ("node", "outbox", "state", "transport")

    def __init__(
        self, node: Node, transport: Transport, outbox: Outbox, state: SessionState
    ) -> None:
        self.node = node
        self.transport = transport
        self.outbox = outbox
        self.state = state

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def connected(self) -> bool:
        return self.state is SessionState.CONNECTED

    def close(self, code: int, reason: str) -> None:
        """Close the connection with `code`; safe to call more than once. A slow
        client's queue is dropped at once; otherwise what is already queued (e.g. the
        error explaining the close) still goes out before the close frame."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self.node.counters.disconnected(self.protocol, code)
        self._log_close(code, reason)
        self.outbox.close(discard=code == close_codes.SLOW)
        self._closing()
        self.transport.close(code, reason)
        self._release()

    def close_slow(self) -> None:
        """The client cannot keep up: its queue went over the cap, or one write to its
        socket outlasted websocket_write_timeout_seconds."""
        self.close(close_codes.SLOW, close_codes.SLOW_REASON)

    def transport_closed(self) -> None:
        """The socket is gone (the client left, or the edge closed it)."""
        if self.state is not SessionState.CLOSED:
            self.state = SessionState.CLOSED
            self.outbox.close(discard=True)
            self._release()

    def write_stalled(self, now: float) -> bool:
        """One socket write has been waiting longer than the write timeout."""
        started = self.outbox.write_started
        return bool(started) and now - started > self.node.settings.websocket_write_timeout_seconds

    # -- per protocol --------------------------------------------------------------

    @property
    def user(self) -> str:
        """The user id ("" = anonymous)."""
        raise NotImplementedError

    @property
    def client_id(self) -> str:
        """The id the protocol gives this connection ("" when it names none: legacy)."""
        return ""

    @property
    def subscription_count(self) -> int:
        raise NotImplementedError

    def tick(self, now: float, wall: float) -> None:
        """About once per node tick_interval: timeouts, pings, expiry."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """The server is going away: close the way this protocol's clients expect."""
        raise NotImplementedError

    def cutover_changed(self, version: int) -> None:
        """The cutover flag changed: tell a client that asked to know."""
        raise NotImplementedError

    def drain_by(self, deadline: float) -> None:
        """Close at loop time `deadline` because the cutover retired the protocol (0
        cancels). Only legacy sessions are ever retired."""

    def _log_close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def _closing(self) -> None:
        """Before the transport is asked to close (a server-side close only)."""

    def _release(self) -> None:
        """Leave the node: detach every channel, forget the user."""
        raise NotImplementedError
