"""One Centrifuge client connection as a state machine.

CONNECTING --connect ok--> CONNECTED --disconnect/close--> CLOSED. Frames come in
through `handle_frame`; everything the client must see goes into its Outbox; the
edge is asked to close the socket through `Transport.close`. Commands of one
connection are handled one at a time in arrival order, as the SDKs expect.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from shim import __version__
from shim.centrifuge import codec, codes
from shim.centrifuge.codec import (
    Command,
    ConnectRequest,
    HistoryRequest,
    PresenceRequest,
    PresenceStatsRequest,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)
from shim.centrifuge.errors import Disconnect, Reject
from shim.centrifuge.fanout import CentrifugeFanout
from shim.centrifuge.positions import position_checker
from shim.centrifuge.recovery import subscribe_position
from shim.centrifuge.subscription_table import SubscriptionTable
from shim.centrifuge.subscriptions import Subscription, negotiate
from shim.centrifuge.wire import JSON, WIRES, Wire
from shim.core import console_credential
from shim.core.auth import Authenticator, Credentials, TokenError
from shim.core.broker import (
    BrokerUnavailable,
    ClientInfo,
    Publication,
    StreamPosition,
    UnrecoverablePosition,
)
from shim.core.config import NamespaceOptions
from shim.core.limits import TokenBucket, Verdict
from shim.core.node import Node
from shim.core.outbox import Outbox
from shim.core.policy import ChannelAuthorizer
from shim.core.session import Session, SessionState
from shim.core.transport import Transport

# Longest a frame of several commands holds its replies (and the client's
# publications) back so they leave in one write: a subscribe awaiting Redis or the
# HTTP policy releases the others after this long.
FRAME_HOLD_SECONDS = 0.005

log = logging.getLogger("shim.centrifuge")

_COMMAND_NAMES: dict[type, str] = {
    ConnectRequest: "connect",
    SubscribeRequest: "subscribe",
    UnsubscribeRequest: "unsubscribe",
    PublishRequest: "publish",
    PresenceRequest: "presence",
    PresenceStatsRequest: "presence_stats",
    HistoryRequest: "history",
    RefreshRequest: "refresh",
    SubRefreshRequest: "sub_refresh",
    RPCRequest: "rpc",
    SendRequest: "send",
}


class CentrifugeSession(Session):
    protocol = CentrifugeFanout.protocol

    __slots__ = (
        "_client_id",
        "_commands",
        "_connect_failed",
        "_counted_user",
        "_opened_at",
        "authorizer",
        "console",
        "credentials",
        "expires_at",
        "next_ping_at",
        "next_presence_at",
        "pong_deadline",
        "subscriptions",
        "verifier",
        "wire",
    )

    def __init__(
        self,
        node: Node,
        verifier: Authenticator,
        authorizer: ChannelAuthorizer,
        transport: Transport,
        outbox: Outbox,
        wire: Wire = JSON,
    ) -> None:
        super().__init__(node, transport, outbox, SessionState.CONNECTING)
        # JSON or Protobuf, fixed at the handshake.
        self.wire = wire
        self.verifier = verifier
        self.authorizer = authorizer
        self._client_id = str(uuid.uuid4())
        self.credentials: Credentials | None = None
        self.subscriptions = SubscriptionTable(node.settings.client_channel_limit)
        self.expires_at = 0.0
        self.next_ping_at = 0.0
        self.next_presence_at = 0.0
        self.pong_deadline = 0.0
        self._opened_at = asyncio.get_running_loop().time()
        self._connect_failed = False
        self.console = False
        settings = node.settings
        # client_command_rate_limit: one small bucket per connection, None when off.
        self._commands = (
            TokenBucket(
                settings.client_command_rate_limit, settings.client_command_burst, self._opened_at
            )
            if settings.client_command_rate_limit > 0
            else None
        )
        # The user counted against client_user_connection_limit ("" = not counted).
        self._counted_user = ""
        node.add_session(self)

    # -- output ------------------------------------------------------------------

    def enqueue(self, message: bytes) -> None:
        if self.state is SessionState.CLOSED:
            return
        if not self.outbox.push(message):
            self.close_slow()

    def disconnect(self, code: codes.DisconnectCode) -> None:
        """Close the connection with `code`; safe to call more than once."""
        self.close(code.code, codec.close_reason(code))

    @property
    def user(self) -> str:
        return self.credentials.user if self.credentials is not None else ""

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def subscription_count(self) -> int:
        return len(self.subscriptions)

    def shutdown(self) -> None:
        self.disconnect(codes.SHUTDOWN)

    def cutover_changed(self, version: int) -> None:
        # A `message` push: SDKs without a message handler ignore it.
        if self.state is SessionState.CONNECTED:
            self.enqueue(_cutover_push(self.wire, version))

    def _log_close(self, code: int, reason: str) -> None:
        log.info(
            "disconnecting: %s",
            reason,
            extra={"client": self.client_id, "user": self.user, "code": code},
        )

    def lost_position(self, sub: Subscription) -> None:
        """A gap or epoch change in a positioned stream: the client must resync."""
        if sub.server_side:
            self.disconnect(codes.INSUFFICIENT_STATE)
            return
        self.unsubscribe_server(sub.channel, codes.UNSUBSCRIBE_INSUFFICIENT_STATE)

    def _release(self) -> None:
        self.node.remove_session(self)
        self._uncount_user()
        for sub in self.subscriptions.all():
            self._drop_subscription(sub)

    def _drop_subscription(self, sub: Subscription) -> None:
        if not self.subscriptions.remove(sub):
            return
        self.node.detach(sub.channel, sub)
        if sub.positioned:
            position_checker(self.node).discard(sub)
        if sub.namespace.presence or sub.namespace.join_leave:
            task = asyncio.get_running_loop().create_task(self._leave(sub))
            task.add_done_callback(_log_failure)

    def _uncount_user(self) -> None:
        if self._counted_user:
            self.node.user_disconnected(self._counted_user)
            self._counted_user = ""

    async def _leave(self, sub: Subscription) -> None:
        if sub.namespace.presence:
            await self.node.presence.remove_presence(sub.channel, self.client_id, sub.info.user)
        if sub.namespace.join_leave:
            await self.node.broker.publish_leave(sub.channel, sub.info)

    # -- input -------------------------------------------------------------------

    async def handle_frame(self, frame: str | bytes) -> None:
        # Decoding a frame of many commands is command work too: twenty such frames
        # arriving together are decoded one budget at a time (see WorkPacer).
        pacer = self.node.command_pacer
        if pacer.must_wait():
            await pacer.wait()
            if self.state is SessionState.CLOSED:
                return
        started = pacer.now()
        try:
            # A frame of the other kind (text on protobuf, binary on JSON) is refused too.
            commands = self.wire.decode_frame(frame)
        except ProtocolError as exc:
            self.disconnect(exc.code)
            return
        finally:
            pacer.charge(started, pacer.now())
        self._connect_failed = False
        # The replies to several commands leave together (FRAME_HOLD_SECONDS at most).
        held = len(commands) > 1
        if held:
            self.outbox.hold(FRAME_HOLD_SECONDS)
        try:
            for command in commands:
                if self.state is SessionState.CLOSED or self._connect_failed:
                    return
                await self._handle(command, held=held)
        finally:
            if held:
                self.outbox.release()

    async def _handle(self, command: Command, *, held: bool = False) -> None:
        request = command.request
        if request is None:  # pong
            self.pong_deadline = 0.0
            return
        if self.state is SessionState.CONNECTING and not isinstance(request, ConnectRequest):
            self.disconnect(codes.BAD_PROTOCOL)
            return
        if self._commands is not None and not self._within_rate(command.id):
            return
        pacer = self.node.command_pacer
        if pacer.must_wait():
            await pacer.wait()
            if self.state is SessionState.CLOSED:
                return
            if held:
                # Time spent waiting for the shared budget does not count against the
                # frame's hold: its replies still leave together.
                self.outbox.hold(FRAME_HOLD_SECONDS)
        started = pacer.now()
        try:
            await self._dispatch(command.id, request)
        except Reject as exc:
            self.enqueue(self.wire.encode_error(command.id, exc.error, exc.message))
        except Disconnect as exc:
            self.disconnect(exc.code)
        except BrokerUnavailable:
            self.node.counters.broker_failed("command")
            self.enqueue(self.wire.encode_error(command.id, codes.INTERNAL))
        except Exception:
            log.exception("command failed", extra={"client": self.client_id})
            self.enqueue(self.wire.encode_error(command.id, codes.INTERNAL))
        finally:
            ended = pacer.now()
            pacer.charge(started, ended)
            self.node.observer.command(
                _COMMAND_NAMES.get(type(request), "unknown"), ended - started
            )

    def _within_rate(self, command_id: int) -> bool:
        """client_command_rate_limit: False when this command is refused (error 111,
        or disconnect 3013 for a client that kept sending into the empty bucket)."""
        assert self._commands is not None
        verdict = self._commands.take(asyncio.get_running_loop().time())
        if verdict is Verdict.ALLOW:
            return True
        self.node.counters.refused("client_command_rate")
        if verdict is Verdict.DISCONNECT:
            self.disconnect(codes.TOO_MANY_REQUESTS_DISCONNECT)
        elif command_id:
            self.enqueue(self.wire.encode_error(command_id, codes.TOO_MANY_REQUESTS))
        return False

    async def _dispatch(self, command_id: int, request: object) -> None:
        handler = _HANDLERS.get(type(request))
        if handler is None:
            # The ping command is not part of protocol v2 usage.
            raise Reject(codes.NOT_AVAILABLE)
        await handler(self, command_id, request)

    # -- connect -----------------------------------------------------------------

    async def _connect(self, command_id: int, request: ConnectRequest) -> None:
        if self.state is not SessionState.CONNECTING:
            raise Disconnect(codes.BAD_PROTOCOL)
        settings = self.node.settings
        if request.token and console_credential.looks_like_one(request.token):
            # The operator console (/console) tails channels with a short-lived
            # credential minted for the admin key (never the admin key itself).
            expires_at = console_credential.verify(request.token, settings.admin_api_key)
            if not expires_at:
                raise Disconnect(codes.INVALID_TOKEN)
            if expires_at <= time.time():
                self._connect_failed = True
                raise Reject(codes.TOKEN_EXPIRED)  # the page fetches a new one
            self.console = True
            credentials = Credentials(
                user=CONSOLE_USER, expires_at=expires_at, claims={"console": True}
            )
        elif request.token:
            try:
                credentials = self.verifier.verify_connection(request.token)
            except TokenError as exc:
                if exc.expired:
                    self._connect_failed = True
                    raise Reject(codes.TOKEN_EXPIRED) from None
                raise Disconnect(codes.INVALID_TOKEN) from None
        else:
            credentials = Credentials(
                user="", expires_at=0, info=None, channels=(), project_ids=(), claims={}
            )
        if not credentials.user and not settings.client_anonymous:
            self._connect_failed = True
            raise Reject(codes.UNAUTHORIZED)
        if credentials.expires_at and credentials.expires_at <= time.time():
            # `expire_at` in the past: as good as expired, so the SDK fetches a new token.
            self._connect_failed = True
            raise Reject(codes.TOKEN_EXPIRED)

        if not self.console:
            if self.node.user_at_limit(credentials.user):
                raise Disconnect(codes.CONNECTION_LIMIT)
            self.node.user_connected(credentials.user)
            self._counted_user = credentials.user
        self.credentials = credentials
        self.state = SessionState.CONNECTED
        now = asyncio.get_running_loop().time()
        interval = settings.client_ping_interval_seconds
        if interval > 0:
            # The first ping comes at a random point of the first interval, so
            # clients that connected together do not get their pings together.
            self.next_ping_at = now + random.uniform(interval / 2, interval)

        result: dict[str, Any] = {}
        if credentials.expires_at:
            self.expires_at = float(credentials.expires_at)
            result["expires"] = True
            result["ttl"] = max(1, int(self.expires_at - time.time()))

        server_channels = []
        if not self.console:
            server_channels += self.authorizer.personal_channels(credentials.user)
        # Wildcard grants (`task:*`) in the token authorize, they do not subscribe;
        # another user's personal channel is never granted, not even by the token.
        server_channels += [
            c
            for c in credentials.server_side_channels
            if c not in server_channels and not self.authorizer.never_granted(c, credentials.user)
        ]
        opened: list[tuple[Subscription, StreamPosition]] = []
        subs_result: dict[str, Mapping[str, Any]] = {}
        try:
            for channel in server_channels:
                wanted = request.subs.get(channel) if request.subs else None
                sub, sub_result, position = await self._open(channel, wanted, server_side=True)
                opened.append((sub, position))
                subs_result[channel] = sub_result
        except BaseException:
            for sub, _ in opened:
                self._drop_subscription(sub)
            self.state = SessionState.CONNECTING
            self.credentials = None
            self._uncount_user()
            self._connect_failed = True
            raise
        log.debug("connected", extra={"client": self.client_id, "user": credentials.user})
        self.enqueue(
            self.wire.encode_connect_result(
                command_id,
                client=self.client_id,
                version=__version__,
                ping=int(interval) if interval > 0 else 0,
                pong=interval > 0,
                subs=subs_result,
                **result,
            )
        )
        for sub, position in opened:
            sub.go_live(position)
            self._announce(sub)

    # -- subscribe ---------------------------------------------------------------

    def _check_channel(self, channel: str) -> NamespaceOptions:
        settings = self.node.settings
        if not channel:
            raise Disconnect(codes.BAD_PROTOCOL)
        if len(channel.encode()) > settings.channel_max_length:
            raise Reject(codes.BAD_REQUEST, "channel name too long")
        namespace = self.node.namespace(channel)
        if namespace is None:
            raise Reject(codes.UNKNOWN_CHANNEL)
        return namespace

    async def _subscribe(self, command_id: int, request: SubscribeRequest) -> None:
        assert self.credentials is not None
        namespace = self._check_channel(request.channel)
        channel = request.channel
        self.subscriptions.check_room(channel)
        if request.type:
            raise Reject(codes.NOT_AVAILABLE, "subscription type not supported")

        expires_at = 0.0
        chan_info: bytes | None = None
        if request.token:
            try:
                claims = self.verifier.verify_subscription(
                    request.token,
                    channel=channel,
                    user=self.credentials.user,
                    client=self.client_id,
                )
            except TokenError as exc:
                if exc.mismatch:
                    # A valid token of another channel/user/client (reference 9.2).
                    raise Disconnect(codes.INVALID_TOKEN) from None
                raise Reject(
                    codes.TOKEN_EXPIRED if exc.expired else codes.PERMISSION_DENIED
                ) from None
            if self.authorizer.never_granted(channel, self.user):
                # A token may not hand one user another's personal channel either.
                log.info(
                    "subscribe refused: channel no token may grant",
                    extra={"client": self.client_id, "user": self.user, "channel": channel},
                )
                raise Reject(codes.PERMISSION_DENIED)
            expires_at = float(claims.expires_at)
            chan_info = claims.info
        elif not self.console:  # the console reads any channel
            decision = await self.authorizer.authorize_subscribe(
                self.credentials, channel, self.client_id
            )
            if not decision.allowed:
                log.info(
                    "subscribe refused: %s",
                    decision.reason,
                    extra={"client": self.client_id, "user": self.user, "channel": channel},
                )
                raise Reject(codes.INTERNAL if decision.temporary else codes.PERMISSION_DENIED)
        if channel in self.subscriptions:  # a concurrent subscribe won while we awaited
            raise Reject(codes.ALREADY_SUBSCRIBED)

        sub, result, position = await self._open(
            channel, request, server_side=False, chan_info=chan_info, namespace=namespace
        )
        if expires_at:
            sub.expires_at = expires_at
            result["expires"] = True
            result["ttl"] = max(1, int(expires_at - time.time()))
        self.enqueue(self.wire.encode_subscribe_result(command_id, **result))
        sub.go_live(position)
        self._announce(sub)

    async def _open(
        self,
        channel: str,
        request: SubscribeRequest | None,
        *,
        server_side: bool,
        chan_info: bytes | None = None,
        namespace: NamespaceOptions | None = None,
    ) -> tuple[Subscription, dict[str, Any], StreamPosition]:
        """Register a buffering subscription, then read the stream, so nothing
        published in between is lost; the caller sends the reply and goes live."""
        assert self.credentials is not None
        if namespace is None:
            namespace = self._check_channel(channel)
        info = ClientInfo(
            user=self.credentials.user,
            client=self.client_id,
            conn_info=self.credentials.info,
            chan_info=chan_info,
        )
        sub = Subscription(self, channel, namespace, server_side=server_side, info=info)
        negotiate(sub, namespace, request)
        self.subscriptions.add(sub)
        try:
            await self.node.attach(channel, sub)
            result, position = await subscribe_position(
                self.node.broker, self.node.publish_options(channel), sub, request
            )
        except BaseException:
            self._drop_subscription(sub)
            raise
        if sub.delta:
            result["delta"] = True
            recovered: list[Publication] = result.get("publications", [])
            # The reply carries them as a delta chain; the client holds the last.
            sub.delta_last = recovered[-1] if recovered else None
        return sub, result, position

    # -- server API ------------------------------------------------------------------

    async def subscribe_server_side(
        self,
        channel: str,
        *,
        chan_info: bytes | None = None,
        data: bytes | None = None,
        expire_at: int = 0,
    ) -> None:
        """Add a server-side subscription to a connected client and tell it with a
        subscribe push (centrifuge-js reports a client-level `subscribed`)."""
        if self.state is not SessionState.CONNECTED or channel in self.subscriptions:
            return  # nothing to do, as in Centrifugo
        sub, result, position = await self._open(
            channel, None, server_side=True, chan_info=chan_info
        )
        if _is_closed(self):
            return  # closing released the subscription already
        if expire_at:
            sub.expires_at = float(expire_at)
        self.enqueue(
            self.wire.encode_subscribe_push(
                channel,
                recoverable=bool(result.get("recoverable")),
                epoch=str(result.get("epoch", "")),
                offset=int(result.get("offset", 0)),
                positioned=bool(result.get("positioned")),
                data=data,
            )
        )
        # The push is queued before anything published during the subscribe.
        sub.go_live(position)
        self._announce(sub)

    def unsubscribe_server(
        self, channel: str, code: codes.UnsubscribeCode = codes.UNSUBSCRIBE_SERVER
    ) -> None:
        """Drop a subscription (client- or server-side) and tell the client."""
        sub = self.subscriptions.get(channel)
        if sub is not None:
            self._drop_subscription(sub)
            self.enqueue(self.wire.encode_unsubscribe_push(channel, code))

    def _refresh_presence(self, now: float) -> None:
        """Renew this client's presence entries before the engine expires them (a node
        that dies stops renewing, so its clients leave presence by themselves)."""
        first = self.next_presence_at == 0.0
        refresh = self.node.settings.presence_refresh_seconds
        if first:
            # The first renewal at a random point of the interval, as the first ping:
            # clients that connected together all renewed in one tick otherwise
            # (5,000 of them: a stall of over 100 ms every interval, issue 14).
            self.next_presence_at = now + random.uniform(refresh / 2, refresh)
            return  # entries were just written by the subscribes
        self.next_presence_at = now + refresh
        present = self.subscriptions.with_presence()
        if present:
            task = asyncio.get_running_loop().create_task(self._renew(present))
            task.add_done_callback(_log_failure)

    async def _renew(self, subs: list[Subscription]) -> None:
        for sub in subs:
            await self.node.presence.add_presence(sub.channel, self.client_id, sub.info)

    def _announce(self, sub: Subscription) -> None:
        """Presence and join after the reply went out (a client never sees its own
        join before its subscribe reply)."""
        if self.state is SessionState.CLOSED:
            return
        if sub.namespace.presence or sub.namespace.join_leave:
            task = asyncio.get_running_loop().create_task(self._join(sub))
            task.add_done_callback(_log_failure)

    async def _join(self, sub: Subscription) -> None:
        if sub.namespace.presence:
            await self.node.presence.add_presence(sub.channel, self.client_id, sub.info)
        if sub.namespace.join_leave:
            await self.node.broker.publish_join(sub.channel, sub.info)

    # -- other commands -----------------------------------------------------------

    async def _unsubscribe(self, command_id: int, request: UnsubscribeRequest) -> None:
        sub = self.subscriptions.client_side(request.channel)
        if sub is not None:
            self._drop_subscription(sub)
        self.enqueue(self.wire.encode_reply(command_id, "unsubscribe", {}))

    async def _presence(self, command_id: int, request: PresenceRequest) -> None:
        self._presence_allowed(request.channel)
        clients = await self.node.presence.presence(request.channel)
        self.enqueue(self.wire.encode_presence_result(command_id, presence=clients))

    async def _presence_stats(self, command_id: int, request: PresenceStatsRequest) -> None:
        self._presence_allowed(request.channel)
        stats = await self.node.presence.presence_stats(request.channel)
        self.enqueue(self.wire.encode_presence_stats_result(command_id, stats=stats))

    async def _send_message(self, command_id: int, request: SendRequest) -> None:
        """Fire-and-forget messages have no handler here: ignored, as Go does without one."""

    async def _publish(self, command_id: int, request: PublishRequest) -> None:
        namespace = self._check_channel(request.channel)
        subscribed = request.channel in self.subscriptions
        allowed = namespace.allow_publish_for_client or (
            namespace.allow_publish_for_subscriber and subscribed
        )
        if not allowed:
            raise Reject(codes.PERMISSION_DENIED)
        if request.data is None:
            raise Reject(codes.BAD_REQUEST, "publish needs data")
        if self.node.over_publish_rate((request.channel,)) is not None:
            raise Reject(codes.TOO_MANY_REQUESTS)
        if self.wire.binary and not _is_json(request.data):
            # Publications reach JSON clients too, which embed the data verbatim.
            raise Reject(codes.BAD_REQUEST, "publish data must be JSON")
        sub = self.subscriptions.get(request.channel)
        info = sub.info if sub is not None else self._client_info()
        await self.node.publish(request.channel, request.data, info=info)
        self.enqueue(self.wire.encode_reply(command_id, "publish", {}))

    def _client_info(self) -> ClientInfo:
        assert self.credentials is not None
        return ClientInfo(self.credentials.user, self.client_id, self.credentials.info)

    async def _history(self, command_id: int, request: HistoryRequest) -> None:
        namespace = self._check_channel(request.channel)
        if not namespace.history_enabled:
            raise Reject(codes.NOT_AVAILABLE)
        if not (namespace.allow_history_for_subscriber and request.channel in self.subscriptions):
            raise Reject(codes.PERMISSION_DENIED)
        since = request.since
        if request.reverse and since is not None and since.offset == 0:
            raise Reject(codes.BAD_REQUEST, "reverse history needs a since offset")
        try:
            history = await self.node.broker.history(
                request.channel,
                since=since,
                limit=request.limit,
                reverse=request.reverse,
                options=self.node.publish_options(request.channel),
            )
        except UnrecoverablePosition:
            raise Reject(codes.UNRECOVERABLE_POSITION) from None
        self.enqueue(
            self.wire.encode_history_result(
                command_id, publications=history.publications, position=history.position
            )
        )

    def _presence_allowed(self, channel: str) -> None:
        namespace = self._check_channel(channel)
        if not namespace.presence:
            raise Reject(codes.NOT_AVAILABLE)
        if not (namespace.allow_presence_for_subscriber and channel in self.subscriptions):
            raise Reject(codes.PERMISSION_DENIED)

    async def _refresh(self, command_id: int, request: RefreshRequest) -> None:
        assert self.credentials is not None
        if not request.token:
            raise Disconnect(codes.BAD_PROTOCOL)
        if self.console:
            self._refresh_console(command_id, request.token)
            return
        try:
            credentials = self.verifier.verify_connection(request.token)
        except TokenError as exc:
            # An expired refresh token closes with "connection expired": the client
            # reconnects, gets 109 for the old token and fetches a fresh one.
            raise Disconnect(
                codes.CONNECTION_EXPIRED if exc.expired else codes.INVALID_TOKEN
            ) from None
        if credentials.user != self.credentials.user:
            raise Disconnect(codes.INVALID_TOKEN)
        self.credentials = credentials
        self.expires_at = float(credentials.expires_at)
        if self.expires_at:
            ttl = max(1, int(self.expires_at - time.time()))
            self.enqueue(self.wire.encode_refresh_result(command_id, expires=True, ttl=ttl))
        else:
            self.enqueue(self.wire.encode_refresh_result(command_id, expires=False, ttl=0))

    def _refresh_console(self, command_id: int, token: str) -> None:
        expires_at = console_credential.verify(token, self.node.settings.admin_api_key)
        if not expires_at:
            raise Disconnect(codes.INVALID_TOKEN)
        if expires_at <= time.time():
            raise Disconnect(codes.CONNECTION_EXPIRED)
        self.expires_at = float(expires_at)
        ttl = max(1, int(self.expires_at - time.time()))
        self.enqueue(self.wire.encode_refresh_result(command_id, expires=True, ttl=ttl))

    async def _sub_refresh(self, command_id: int, request: SubRefreshRequest) -> None:
        assert self.credentials is not None
        if not request.token:
            raise Reject(codes.BAD_REQUEST)
        channel = request.channel or self.verifier.channel_claim(request.token)
        sub = self.subscriptions.get(channel)
        if sub is None:
            raise Reject(codes.PERMISSION_DENIED)
        try:
            claims = self.verifier.verify_subscription(
                request.token, channel=channel, user=self.credentials.user, client=self.client_id
            )
        except TokenError as exc:
            if exc.mismatch:
                raise Disconnect(codes.INVALID_TOKEN) from None
            raise Reject(
                codes.TOKEN_EXPIRED_RETRY if exc.expired else codes.PERMISSION_DENIED
            ) from None
        if claims.expires_at and claims.expires_at < time.time():
            raise Reject(codes.EXPIRED)
        sub.expires_at = float(claims.expires_at)
        if sub.expires_at:
            ttl = max(1, int(sub.expires_at - time.time()))
            self.enqueue(self.wire.encode_sub_refresh_result(command_id, expires=True, ttl=ttl))
        else:
            self.enqueue(self.wire.encode_sub_refresh_result(command_id, expires=False, ttl=0))

    async def _rpc(self, command_id: int, request: RPCRequest) -> None:
        if request.method == "ping":
            # Latency check used by the product's UI every 30 s.
            self.enqueue(self.wire.encode_rpc_result(command_id, data=b'{"pong":true}'))
            return
        raise Reject(codes.METHOD_NOT_FOUND)

    # -- timers ------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> None:
        settings = self.node.settings
        if self.state is SessionState.CLOSED:
            return
        if self.write_stalled(now):
            self.close_slow()
            return
        if self.state is SessionState.CONNECTING:
            if now - self._opened_at > settings.client_stale_close_delay_seconds:
                self.disconnect(codes.STALE)
            return
        if self.pong_deadline and now > self.pong_deadline:
            self.disconnect(codes.NO_PONG)
            return
        grace = settings.client_expired_close_delay_seconds
        if self.expires_at and wall > self.expires_at + grace:
            self.disconnect(codes.CONNECTION_EXPIRED)
            return
        for sub in self.subscriptions.expired(wall, grace):
            if sub.server_side:
                self.disconnect(codes.SUBSCRIPTION_EXPIRED)
                return
            self.unsubscribe_server(sub.channel, codes.UNSUBSCRIBE_EXPIRED)
        if now >= self.next_presence_at:
            self._refresh_presence(now)
        if self.next_ping_at and now >= self.next_ping_at:
            self.enqueue(self.wire.ping)
            self.next_ping_at = now + settings.client_ping_interval_seconds
            if not self.pong_deadline:
                self.pong_deadline = now + settings.client_pong_timeout_seconds


CONSOLE_USER = "dex-shim-console"


def _is_closed(session: CentrifugeSession) -> bool:
    # A function, so a state check after an await is not narrowed away by one before it.
    return session.state is SessionState.CLOSED


def _cutover_push(wire: Wire, version: int) -> bytes:
    return _cutover_push_of(wire.index, version)


@functools.lru_cache(maxsize=4)
def _cutover_push_of(wire_index: int, version: int) -> bytes:
    """Encoded once per wire and flag version, however many clients hear of it."""
    data = orjson.dumps({"cutover_version": version})
    return WIRES[wire_index].encode_message_push(data)


# Each command's handler: (session, command id, request) -> reply enqueued, or Reject /
# Disconnect raised.
_HANDLERS: dict[type, Callable[[CentrifugeSession, int, Any], Awaitable[None]]] = {
    ConnectRequest: CentrifugeSession._connect,
    SubscribeRequest: CentrifugeSession._subscribe,
    UnsubscribeRequest: CentrifugeSession._unsubscribe,
    PublishRequest: CentrifugeSession._publish,
    HistoryRequest: CentrifugeSession._history,
    PresenceRequest: CentrifugeSession._presence,
    PresenceStatsRequest: CentrifugeSession._presence_stats,
    RefreshRequest: CentrifugeSession._refresh,
    SubRefreshRequest: CentrifugeSession._sub_refresh,
    RPCRequest: CentrifugeSession._rpc,
    SendRequest: CentrifugeSession._send_message,
}


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("presence/join update failed: %s", task.exception())
