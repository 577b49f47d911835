"""One legacy hub client: its subscriptions, and delivery of each event once.

The legacy subscriptions `*`, `task:<id>` and `project:<id>` are held as
attachments to routed channels (`*` is the global channel). An event routed to
several channels the client holds arrives once per channel; the session passes
on the first and drops the rest by event id. With strict matching the session
instead reads only the global channel and applies the old hub's rule: top-level
`task_id`/`project_id` only.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from legacy.commands import LegacyCommand, MalformedCommand, parse_command
from shim.broker import LegacyTag
from shim.hypercorn_compat import Liveness
from shim.node import Node
from shim.outbox import Outbox

log = logging.getLogger("shim.legacy")

# The Go hub's read limit per client message; above it the socket closes with 1009.
READ_LIMIT_BYTES = 4096
WILDCARD = "*"
# Event ids remembered to drop the second copy of an event reaching a client
# through two of its subscriptions (copies arrive back to back, so a few suffice).
RECENT_EVENTS = 64


# Close codes of our own (the legacy hook reacts to every close the same way:
# it reconnects). The reasons are for people reading a browser's network panel.
RETIRED = (4410, "legacy protocol retired: reload the page")
NO_PONG = (4408, "no pong within the read deadline")


class State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Transport(Protocol):
    def close(self, code: int, reason: str) -> None: ...


class LegacyStats:
    """Counters shared by all legacy sessions of a node."""

    __slots__ = ("malformed_commands", "slow_disconnects", "unknown_actions")

    def __init__(self) -> None:
        # Frames the Go hub could not decode (it logged and dropped them).
        self.malformed_commands = 0
        # Decoded commands whose action the hub did not know (it ignored them).
        self.unknown_actions = 0
        self.slow_disconnects = 0


class LegacySession:
    __slots__ = (
        "_attached",
        "_drain_at",
        "_recent",
        "_strict",
        "liveness",
        "node",
        "outbox",
        "state",
        "stats",
        "subscriptions",
        "transport",
        "user",
        "write_timeout",
    )

    def __init__(
        self,
        node: Node,
        transport: Transport,
        outbox: Outbox,
        stats: LegacyStats,
        *,
        user: str,
        strict_matching: bool,
        liveness: Liveness | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self.outbox = outbox
        self.stats = stats
        self.user = user
        self._strict = strict_matching
        self.state = State.OPEN
        self.subscriptions: set[str] = set()
        self._attached: set[str] = set()
        self._recent: dict[str, None] = {}
        self.write_timeout = node.settings.websocket_write_timeout_seconds
        self.liveness = liveness
        self._drain_at = 0.0
        node.add_session(self)

    # -- input -------------------------------------------------------------------

    async def handle_frame(self, frame: str | bytes) -> None:
        """One client frame (the edge already closed with 1009 above READ_LIMIT_BYTES)."""
        try:
            command = parse_command(frame)
        except MalformedCommand:
            # The hub logged and ignored these; we count them.
            self.stats.malformed_commands += 1
            return
        self._apply(command)
        await self._sync_attachments()

    def _apply(self, command: LegacyCommand) -> None:
        action = command.action
        if action == "subscribe_all":
            self.subscriptions.add(WILDCARD)
        elif action == "subscribe":
            self.subscriptions.update(_named(command))
        elif action == "unsubscribe":
            self.subscriptions.difference_update(_named(command))
        elif action == "unsubscribe_all":
            self.subscriptions.clear()
        else:
            self.stats.unknown_actions += 1

    def _wanted_channels(self) -> set[str]:
        if not self.subscriptions:
            return set()
        global_channel = self.node.settings.global_channel
        if self._strict:
            return {global_channel}
        return {global_channel if name == WILDCARD else name for name in self.subscriptions}

    async def _sync_attachments(self) -> None:
        wanted = self._wanted_channels()
        for channel in self._attached - wanted:
            self._attached.discard(channel)
            self.node.detach_legacy(channel, self)
        for channel in wanted - self._attached:
            if self.state is State.CLOSED:
                return
            self._attached.add(channel)
            await self.node.attach_legacy(channel, self)

    # -- delivery (publish path: append only) -----------------------------------------

    def deliver_legacy(self, tag: LegacyTag) -> None:
        if self._strict:
            if not self._matches_strictly(tag):
                return
        elif len(self._attached) > 1:
            recent = self._recent
            if tag.event_id in recent:
                return
            recent[tag.event_id] = None
            if len(recent) > RECENT_EVENTS:
                del recent[next(iter(recent))]
        if not self.outbox.push(tag.frame):
            self.stats.slow_disconnects += 1
            self.close(3008, "slow")

    def _matches_strictly(self, tag: LegacyTag) -> bool:
        subscriptions = self.subscriptions
        return (
            WILDCARD in subscriptions
            or (bool(tag.task_id) and f"task:{tag.task_id}" in subscriptions)
            or (bool(tag.project_id) and f"project:{tag.project_id}" in subscriptions)
        )

    # -- lifecycle ---------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.node.counters.disconnected("legacy", code)
        log.info(
            "disconnecting legacy client: %s",
            reason or code,
            extra={"user": self.user, "code": code, "protocol": "legacy"},
        )
        self.outbox.close(discard=code == 3008)
        if self.liveness is not None:
            self.liveness.stop()
        self.transport.close(code, reason)
        self._release()

    def transport_closed(self) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.outbox.close(discard=True)
            self._release()

    def _release(self) -> None:
        self.node.remove_session(self)
        for channel in self._attached:
            self.node.detach_legacy(channel, self)
        self._attached.clear()

    def drain_by(self, deadline: float) -> None:
        """Close at loop time `deadline` (the cutover retired the protocol); 0 cancels."""
        self._drain_at = deadline

    def tick(self, now: float, wall: float) -> None:
        if self.state is State.CLOSED:
            return
        started = self.outbox.write_started
        if started and now - started > self.write_timeout:
            self.stats.slow_disconnects += 1
            self.close(3008, "slow")
        elif self._drain_at and now >= self._drain_at:
            self.close(*RETIRED)
        elif self.liveness is not None and (
            now - self.liveness.last_pong > self.node.settings.legacy_read_deadline_seconds
        ):
            # The hub's read deadline: only a pong renews it, however much the client sends.
            self.close(*NO_PONG)


def _named(command: LegacyCommand) -> set[str]:
    names = set()
    if command.task_id:
        names.add(f"task:{command.task_id}")
    if command.project_id:
        names.add(f"project:{command.project_id}")
    return names


def legacy_token(headers: list[tuple[bytes, bytes]], query: bytes) -> str:
    """The token as the Go middleware found it: a well-formed `Authorization:
    Bearer <token>` header wins (even if the token is bad), else `?token=`."""
    from urllib.parse import parse_qs

    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, space, rest = value.decode("latin-1").partition(" ")
            if space and scheme.lower() == "bearer":
                return rest
            break
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("token")
    return values[0] if values else ""
