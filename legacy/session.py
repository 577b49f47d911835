"""One legacy hub client: its subscriptions, and delivery of each event once.

The legacy subscriptions `*`, `task:<id>` and `project:<id>` are held as
attachments to routed channels. `*` is the global channel, which carries every
event, so while it is held nothing else is attached and each event arrives
exactly once by construction (the browser hook's case). Without `*`, an event
routed to several channels the client holds (a task event to `task:T` and
`project:P`) arrives once per channel, and with Redis shards those copies come
through different connections, possibly seconds and thousands of events apart;
the session passes on the first and drops the rest by event id (RecentEvents).
With strict matching the session instead reads only the global channel and
applies the old hub's rule: top-level `task_id`/`project_id` only.

Events routed to a personal or user-limited channel never go to the global
channel, so `*` (and strict matching) also reads the user's own personal channels
(`user:<id>`, and Centrifugo's `#<id>` when user_subscribe_to_personal is on) --
or, with `legacy_personal_events_to_all`, the channel every such event is fanned
out on. An event routed to two personal channels of one user carries its legacy
frame on the first only, so the channels carry disjoint events and `*` still needs
no de-duplication. Events of user-limited channels (`dialog#42,43`) reach legacy
clients only through that fan-out: a legacy client cannot name those channels.

When the channel policy does not let the user read every shared channel
(`claims`, `http`, or an anonymous client), reads are authorized (legacy.reads):
a named subscription the policy refuses is ignored and counted, and an event
reaching a `*` (or strict) client is passed on only when its user may read one
of the channels it was routed to. An event whose answer needs the HTTP policy
waits, with every later one behind it, so the client's order is kept.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from legacy.commands import LegacyCommand, MalformedCommand, parse_command
from legacy.fanout import LegacyFanout
from legacy.reads import LegacyReads
from legacy.wire import encode_go_json
from shim.core import close_codes
from shim.core.broker import LegacyFrame, StreamPosition
from shim.core.events import now_timestamp
from shim.core.limits import TokenBucket, Verdict
from shim.core.node import Node
from shim.core.outbox import Outbox
from shim.core.routing import PERSONAL_FANOUT_CHANNEL
from shim.core.session import Session, SessionState
from shim.core.transport import Pings, Transport

log = logging.getLogger("shim.legacy")

# The Go hub's read limit per client message; above it the socket closes with 1009.
READ_LIMIT_BYTES = 4096
WILDCARD = "*"
# How long, and for how many events, a multi-subscription client remembers the ids
# it was sent, to drop later copies of them. Copies of one event differ only by the
# delivery lag between shards (milliseconds, seconds under load), so 10 s is ample;
# the count bound caps memory at 2 x DEDUP_MAX_EVENTS ids for a client flooded
# with events and still covers that many events between two copies.
DEDUP_WINDOW_SECONDS = 10.0
DEDUP_MAX_EVENTS = 4096


# Close codes of our own (the legacy hook reacts to every close the same way:
# it reconnects). The reasons are for people reading a browser's network panel.
RETIRED = (4410, "legacy protocol retired: reload the page")
NO_PONG = (4408, "no pong within the read deadline")
# Centrifuge's code for the same limit (client_command_rate_limit); the hook reconnects.
TOO_MANY_REQUESTS = (3013, "too many requests")

# The client kit's opt-in (docs/client-kit.md): a client that sends this action is
# told where its `*` stream stands in the global channel (a `shim.position` frame,
# then another whenever the stream does not continue from the last frame) and when
# the cutover flag changes (`shim.cutover`). Its event frames stay byte-identical;
# a client that never sends it (the legacy hook) never sees either frame type.
POSITION_ACTION = "position"
POSITION_TYPE = "shim.position"
CUTOVER_TYPE = "shim.cutover"


def notice_frame(kind: str, payload: dict[str, object]) -> bytes:
    """A kit notice in the legacy envelope's shape."""
    text = encode_go_json({"type": kind, "timestamp": now_timestamp(), "payload": payload})
    return text.encode()


class LegacyStats:
    """Counters shared by all legacy sessions of a node."""

    __slots__ = (
        "limited_commands",
        "limited_subscriptions",
        "malformed_commands",
        "refused_subscriptions",
        "slow_disconnects",
        "unknown_actions",
        "unreadable_events",
    )

    def __init__(self) -> None:
        # Frames the Go hub could not decode (it logged and dropped them).
        self.malformed_commands = 0
        # Decoded commands whose action the hub did not know (it ignored them).
        self.unknown_actions = 0
        self.slow_disconnects = 0
        # Frames dropped by client_command_rate_limit.
        self.limited_commands = 0
        # Subscriptions ignored: past client_channel_limit, or a name longer than
        # channel_max_length.
        self.limited_subscriptions = 0
        # Named subscriptions the channel policy refused (or could not answer), ignored.
        self.refused_subscriptions = 0
        # Events a `*` client did not get: its user may read none of their channels.
        self.unreadable_events = 0


class RecentEvents:
    """Event ids a client was sent lately: each is remembered for at least `window`
    seconds or the `limit` ids added after it, whichever ends first, and at most
    2 x `limit` ids are held. Two generations of sets: when the current one is
    `window` old or holds `limit` ids it becomes the previous one, and the previous
    one is dropped whole (no per-id timestamps)."""

    __slots__ = ("_current", "_previous", "_started", "limit", "window")

    def __init__(self, now: float, *, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self._started = now

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._current or event_id in self._previous

    def add(self, event_id: str, now: float) -> None:
        self.expire(now)
        current = self._current
        current.add(event_id)
        if len(current) >= self.limit:
            self._previous, self._current, self._started = current, set(), now

    def expire(self, now: float) -> None:
        """Forget what is past its window."""
        age = now - self._started
        if age >= self.window:
            # Every id of the current generation was added before started + window,
            # so after 2 x window all of them are older than one window.
            self._previous = self._current if age < 2 * self.window else set()
            self._current, self._started = set(), now

    def forgotten(self, now: float) -> bool:
        """True when nothing is remembered any more (the holder may drop this)."""
        self.expire(now)
        return not self._current and not self._previous


class LegacySession(Session):
    # The clock of the de-duplication window (a class attribute, so it costs no slot).
    clock = staticmethod(time.monotonic)
    # As the node's Subscriber: delivered by LegacyFanout, never as deltas.
    protocol = LegacyFanout.protocol
    delta = False

    __slots__ = (
        "_attached",
        "_commands",
        "_disjoint",
        "_drain_at",
        "_held",
        "_held_bytes",
        "_personal",
        "_positions",
        "_reads",
        "_resolver",
        "_seen",
        "_strict",
        "_user",
        "liveness",
        "stats",
        "subscriptions",
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
        liveness: Pings | None = None,
        personal_channels: tuple[str, ...] = (),
        reads: LegacyReads | None = None,
    ) -> None:
        super().__init__(node, transport, outbox, SessionState.CONNECTED)
        self.stats = stats
        self._user = user
        self._strict = strict_matching
        self.subscriptions: set[str] = set()
        self._attached: set[str] = set()
        # True while the attached channels carry disjoint events (`*`, strict).
        self._disjoint = False
        # The user's own personal channels (none for anonymous users), read with `*`.
        self._personal = personal_channels
        # None when the user may read every shared channel: nothing to authorize.
        self._reads = reads
        # Events waiting for the HTTP policy's answer, oldest first, and their task.
        self._held: collections.deque[LegacyFrame] | None = None
        self._held_bytes = 0
        self._resolver: asyncio.Task[None] | None = None
        # Allocated only while the client holds several channels without `*`.
        self._seen: RecentEvents | None = None
        self.liveness = liveness
        self._drain_at = 0.0
        settings = node.settings
        # client_command_rate_limit: every frame counts (the hub never answered one).
        self._commands = (
            TokenBucket(
                settings.client_command_rate_limit, settings.client_command_burst, self.clock()
            )
            if settings.client_command_rate_limit > 0
            else None
        )
        # The client asked for stream positions and cutover notices (the kit).
        self._positions = False
        node.add_session(self)
        node.user_connected(user)

    # -- input -------------------------------------------------------------------

    async def handle_frame(self, frame: str | bytes) -> None:
        """One client frame (the edge already closed with 1009 above READ_LIMIT_BYTES)."""
        if self._commands is not None:
            verdict = self._commands.take(self.clock())
            if verdict is not Verdict.ALLOW:
                self.stats.limited_commands += 1
                self.node.counters.refused("client_command_rate")
                if verdict is Verdict.DISCONNECT:
                    self.close(*TOO_MANY_REQUESTS)
                return
        pacer = self.node.command_pacer
        if pacer.must_wait():
            await pacer.wait()
            if self.closed:
                return
        started = pacer.now()
        try:
            await self._handle_command(frame)
        finally:
            pacer.charge(started, pacer.now())

    async def _handle_command(self, frame: str | bytes) -> None:
        try:
            command = parse_command(frame)
        except MalformedCommand:
            # The hub logged and ignored these; we count them.
            self.stats.malformed_commands += 1
            return
        if command.action == "subscribe" and self._reads is not None:
            await self._add_authorized(_named(command))
            if self.closed:
                return
        else:
            self._apply(command)
        await self._sync_attachments()
        if command.action == POSITION_ACTION and not self.closed:
            self._positions = True
            global_channel = self.node.settings.global_channel
            top: StreamPosition | None = None
            if WILDCARD in self.subscriptions:
                await self._send_starts(self._attached - {global_channel})
                top = await self._stream_top(global_channel)
                if self.closed:
                    return
            position = (
                self.node.dispatched_position(global_channel)
                if global_channel in self._attached and WILDCARD in self.subscriptions
                else None
            )
            self._send_position(position, top=top)

    async def _stream_top(self, channel: str) -> StreamPosition | None:
        """The stream's top in the engine (None when it cannot be read): a kit that
        stays behind it with nothing arriving knows its node stopped getting events."""
        try:
            options = self.node.publish_options(channel)
            return (await self.node.broker.history(channel, limit=0, options=options)).position
        except Exception:
            return None

    async def _send_starts(self, channels: set[str]) -> None:
        """Where the client's other streams (its personal events) stand, so that a kit
        can recover them after a reconnect even before it received one: the last
        position dispatched here, else the stream's top (a publication stored but not
        yet dispatched at that instant would be taken as already seen)."""
        for channel in sorted(channels):
            position = self.node.dispatched_position(channel)
            if position is None:
                try:
                    options = self.node.publish_options(channel)
                    found = await self.node.broker.history(channel, limit=0, options=options)
                except Exception:  # the engine is down: the kit just has no start then
                    continue
                if self.closed:
                    return
                position = found.position
            payload = {
                "channel": channel,
                "offset": position.offset,
                "epoch": position.epoch,
                "start": True,
            }
            self._push(notice_frame(POSITION_TYPE, payload))

    def _send_position(
        self,
        position: StreamPosition | None,
        channel: str = "",
        *,
        missed: bool = False,
        top: StreamPosition | None = None,
    ) -> None:
        """Global channel: every event frame before this notice is at or before
        `position`, every one after it follows on (offset null: unknown yet, ask again
        after an event). Another channel: the next frame is that channel's, at
        `position.offset + 1`. `missed`: events up to `position` since the previous
        frame never reached this node; the kit recovers them from history. `top`: the
        engine's stream top (answers to `position`), for the kit's stall check."""
        payload: dict[str, object] = {
            "channel": channel or self.node.settings.global_channel,
            "offset": None if position is None else position.offset,
            "epoch": None if position is None else position.epoch,
        }
        if missed:
            payload["missed"] = True
        if top is not None:
            # The answer to `position` also says where the engine's stream stands.
            payload["top"] = top.offset
        self._push(notice_frame(POSITION_TYPE, payload))

    async def _add_authorized(self, names: set[str]) -> None:
        """_add_subscriptions, asking the channel policy about each name within the
        limits; a refused one is ignored (the hub never answered a command) and counted."""
        assert self._reads is not None
        for name in sorted(names - self.subscriptions):
            if not self._within_limits(name):
                continue
            decision = await self._reads.may_subscribe(name)
            if self.closed:
                return
            if decision.allowed:
                self.subscriptions.add(name)
                continue
            self.stats.refused_subscriptions += 1
            log.info(
                "legacy subscription refused: %s",
                decision.reason,
                extra={"user": self.user, "channel": name, "protocol": "legacy"},
            )

    def _apply(self, command: LegacyCommand) -> None:
        action = command.action
        if action == "subscribe_all":
            self.subscriptions.add(WILDCARD)
        elif action == "subscribe":
            self._add_subscriptions(_named(command))
        elif action == "unsubscribe":
            self.subscriptions.difference_update(_named(command))
        elif action == "unsubscribe_all":
            self.subscriptions.clear()
        elif action == POSITION_ACTION:
            return  # answered after the attachments are in place
        else:
            self.stats.unknown_actions += 1

    def _add_subscriptions(self, names: set[str]) -> None:
        """Subscriptions within client_channel_limit and channel_max_length; the rest
        are ignored and counted (each command costs O(subscriptions), and every name
        is held until the client leaves)."""
        for name in sorted(names - self.subscriptions):
            if self._within_limits(name):
                self.subscriptions.add(name)

    def _within_limits(self, name: str) -> bool:
        settings = self.node.settings
        if (
            len(name.encode()) > settings.channel_max_length
            or len(self.subscriptions) >= settings.client_channel_limit
        ):
            self.stats.limited_subscriptions += 1
            self.node.counters.refused("legacy_subscription")
            return False
        return True

    def _reads_everything(self) -> bool:
        return self._strict or WILDCARD in self.subscriptions

    def _wanted_channels(self) -> set[str]:
        if not self.subscriptions:
            return set()
        settings = self.node.settings
        if self._reads_everything():
            # Every event but a personal one is routed to the global channel too: any
            # other channel would only bring second copies. Personal events come
            # through the user's own channels, or all of them through the fan-out one.
            wanted = {settings.global_channel}
            if settings.legacy_personal_events_to_all:
                wanted.add(PERSONAL_FANOUT_CHANNEL)
            else:
                wanted.update(self._personal)
            return wanted
        return set(self.subscriptions)

    async def _sync_attachments(self) -> None:
        wanted = self._wanted_channels()
        disjoint = self._reads_everything()
        # Copies are recorded from the start of a change away from disjoint channels,
        # and until the end of a change towards them (old and new overlap meanwhile).
        self._disjoint = self._disjoint and disjoint
        # New channels before dropping old ones, so an event routed to both is not
        # missed while the broker subscribes.
        for channel in wanted - self._attached:
            if self.closed:
                return
            await self.node.attach(channel, self)
            if self.closed:
                # Closed while the broker subscribed: _release did not know this one.
                self.node.detach(channel, self)
                return
            self._attached.add(channel)
        for channel in self._attached - wanted:
            self._attached.discard(channel)
            self.node.detach(channel, self)
        self._disjoint = disjoint

    # -- delivery (publish path: append only) -----------------------------------------

    def deliver_legacy(self, tag: LegacyFrame) -> None:
        if self._strict:
            if not self._matches_strictly(tag):
                return
        elif (
            self._seen is not None or (len(self._attached) > 1 and not self._disjoint)
        ) and not self._first_copy(tag.event_id):
            return
        if self._reads is not None and self._reads_everything():
            self._deliver_readable(tag)
            return
        self._push(tag.frame)

    def _push(self, frame: bytes) -> None:
        if not self.outbox.push(frame):
            self.close_slow()

    def _deliver_readable(self, tag: LegacyFrame) -> None:
        """Pass the event on if the user may read one of its channels; hold it (and
        everything after it) while the policy is asked."""
        if self._held is not None:
            self._hold(tag)
            return
        assert self._reads is not None
        readable = self._reads.readable_now(tag.channels)
        if readable is None:
            self._held = collections.deque()
            self._hold(tag)
            if not self.closed:  # one event alone may be over the cap
                self._resolver = asyncio.get_running_loop().create_task(self._resolve_held())
        elif readable:
            self._push(tag.frame)
        else:
            self.stats.unreadable_events += 1

    def _hold(self, tag: LegacyFrame) -> None:
        assert self._held is not None
        self._held.append(tag)
        self._held_bytes += len(tag.frame)
        # Held events count against the queue cap, as if queued.
        if self._held_bytes + self.outbox.size > self.node.settings.client_queue_max_size_bytes:
            self.close_slow()

    async def _resolve_held(self) -> None:
        """Ask the policy what the held events need, passing them on in order."""
        held, reads = self._held, self._reads
        assert held is not None and reads is not None
        try:
            while held and not self.closed:
                tag = held[0]
                readable = reads.readable_now(tag.channels)
                if readable is None:
                    readable = await reads.readable(tag.channels)
                    if self.closed:
                        return
                held.popleft()
                self._held_bytes -= len(tag.frame)
                if readable:
                    self._push(tag.frame)
                else:
                    self.stats.unreadable_events += 1
        finally:
            if self._held is held:
                self._held, self._held_bytes = None, 0
            self._resolver = None

    def stream_moved(self, channel: str, position: StreamPosition, *, missed: bool = False) -> None:
        if not self._positions or self.closed or WILDCARD not in self.subscriptions:
            return
        if channel == self.node.settings.global_channel:
            self._send_position(position, missed=missed)
        elif channel in self._attached:
            # The next frame is this channel's (a personal event): a notice for that
            # frame alone; the frames after it are the global stream's again.
            self._send_position(position, channel, missed=missed)

    def cutover_changed(self, version: int) -> None:
        """Tell a kit client the flag changed, so it asks for its config again."""
        if self._positions and not self.closed:
            self._push(notice_frame(CUTOVER_TYPE, {"cutover_version": version}))

    def _first_copy(self, event_id: str) -> bool:
        """False for a copy of an event already sent. Ids are recorded while several
        channels are attached; those already recorded are still checked after the
        client drops to one channel (a late copy through it may still be on its way)."""
        now = self.clock()
        seen = self._seen
        if seen is not None and event_id in seen:
            return False
        if len(self._attached) > 1 and not self._disjoint:
            if seen is None:
                seen = self._seen = RecentEvents(
                    now, window=DEDUP_WINDOW_SECONDS, limit=DEDUP_MAX_EVENTS
                )
            seen.add(event_id, now)
        return True

    @property
    def remembered_events(self) -> int:
        """How many event ids the session holds for de-duplication."""
        return 0 if self._seen is None else len(self._seen)

    def _matches_strictly(self, tag: LegacyFrame) -> bool:
        subscriptions = self.subscriptions
        return (
            WILDCARD in subscriptions
            or (bool(tag.task_id) and f"task:{tag.task_id}" in subscriptions)
            or (bool(tag.project_id) and f"project:{tag.project_id}" in subscriptions)
        )

    # -- lifecycle ---------------------------------------------------------------

    @property
    def user(self) -> str:
        return self._user

    @property
    def subscription_count(self) -> int:
        return len(self.subscriptions)

    def close_slow(self) -> None:
        self.stats.slow_disconnects += 1
        super().close_slow()

    def shutdown(self) -> None:
        self.close(close_codes.WS_GOING_AWAY, "server shutting down")

    def _log_close(self, code: int, reason: str) -> None:
        log.info(
            "disconnecting legacy client: %s",
            reason or code,
            extra={"user": self.user, "code": code, "protocol": "legacy"},
        )

    def _closing(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()

    def _release(self) -> None:
        self._seen = None
        self._held, self._held_bytes = None, 0
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None
        self.node.remove_session(self)
        self.node.user_disconnected(self.user)
        for channel in self._attached:
            self.node.detach(channel, self)
        self._attached.clear()

    def drain_by(self, deadline: float) -> None:
        """Close at loop time `deadline` (the cutover retired the protocol); 0 cancels."""
        self._drain_at = deadline

    def tick(self, now: float, wall: float) -> None:
        if self.closed:
            return
        if self._seen is not None and self._seen.forgotten(self.clock()):
            self._seen = None  # an idle client goes back to holding nothing
        if self.write_stalled(now):
            self.close_slow()
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
