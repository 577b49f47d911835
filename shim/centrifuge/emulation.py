"""Bidirectional emulation: commands of an HTTP-streaming or SSE client arrive as
separate POST /emulation requests, each naming the session and the node that holds
its stream. This node feeds its own sessions; another node's go through the relay
(Redis pub/sub with the Redis engine), as Centrifugo sends them through its broker.

A connection's commands are handled one frame at a time in arrival order, as on a
WebSocket; the frames waiting for their turn are capped in bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from shim.centrifuge.framing import EmulationRequest, RequestError
from shim.centrifuge.session import CentrifugeSession
from shim.core.broker import BrokerUnavailable

log = logging.getLogger("shim.emulation")


class Relay(Protocol):
    """Reaches the node holding a session."""

    async def forward(self, node: str, session: str, data: str | bytes) -> bool:
        """Hand the commands to `node`; False when no such node listens."""
        ...


class EmulatedConnection:
    """The command side of one emulated client."""

    __slots__ = ("_cap", "_inbox", "_pending", "_worker", "session")

    def __init__(self, session: CentrifugeSession, cap_bytes: int) -> None:
        self.session = session
        self._cap = cap_bytes
        self._inbox: list[str | bytes] = []
        self._pending = 0
        self._worker: asyncio.Task[None] | None = None

    def feed(self, data: str | bytes) -> bool:
        """Queue one request's commands; False when too much is already waiting."""
        if self._pending + len(data) > self._cap:
            return False
        self._inbox.append(data)
        self._pending += len(data)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return True

    async def _work(self) -> None:
        try:
            while self._inbox:
                frame = self._inbox.pop(0)
                self._pending -= len(frame)
                await self.session.handle_frame(frame)
        finally:
            self._worker = None

    def stop(self) -> None:
        self._inbox, self._pending = [], 0
        if self._worker is not None:
            self._worker.cancel()


class EmulationHub:
    """This node's emulated sessions by session id, and the way to other nodes'."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self.relay: Relay | None = None
        self._connections: dict[str, EmulatedConnection] = {}

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, session_id: str, connection: EmulatedConnection) -> None:
        self._connections[session_id] = connection

    def remove(self, session_id: str) -> None:
        connection = self._connections.pop(session_id, None)
        if connection is not None:
            connection.stop()

    def feed_local(self, session_id: str, data: str | bytes) -> None:
        """Commands for a session of this node (from a request or the relay)."""
        connection = self._connections.get(session_id)
        if connection is None:
            raise RequestError(404, "session not found")
        if not connection.feed(data):
            raise RequestError(429, "too many commands waiting for this session")

    async def deliver(self, request: EmulationRequest) -> None:
        """Route one emulation request; RequestError says why it could not be."""
        if request.node == self.node_name:
            self.feed_local(request.session, request.data)
            return
        if self.relay is None:
            raise RequestError(404, "node not found")
        try:
            reached = await self.relay.forward(request.node, request.session, request.data)
        except BrokerUnavailable:
            raise RequestError(503, "engine unavailable: command not forwarded") from None
        if not reached:
            raise RequestError(404, "node not found")

    def on_relayed(self, session_id: str, data: str | bytes) -> None:
        """Commands another node forwarded here."""
        try:
            self.feed_local(session_id, data)
        except RequestError as exc:
            log.info("relayed emulation request dropped: %s", exc.message)
