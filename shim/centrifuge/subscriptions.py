"""A client's subscriptions: what each one negotiated, and its delivery from the
node (buffered while the subscribe reply is prepared, then checked against the
stream position it promised the client)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shim.centrifuge import codes
from shim.centrifuge.codec import SubscribeRequest
from shim.centrifuge.errors import Disconnect
from shim.centrifuge.fanout import CentrifugeFanout, PreparedControl, PreparedPublication
from shim.centrifuge.positions import position_checker
from shim.core.broker import ClientInfo, Publication, StreamPosition
from shim.core.config import NamespaceOptions
from shim.core.session import SessionState

if TYPE_CHECKING:
    from shim.centrifuge.session import CentrifugeSession

# The one delta format of the protocol.
DELTA_FOSSIL = "fossil"


class Subscription:
    """One channel of one client. Lives in the node's channel table while active."""

    # As the node's Subscriber (delivered by CentrifugeFanout).
    protocol = CentrifugeFanout.protocol

    __slots__ = (
        "buffer",
        "channel",
        "delta",
        "delta_last",
        "epoch",
        "expires_at",
        "info",
        "join_leave",
        "max_time_lag",
        "missing_until",
        "namespace",
        "offset",
        "positioned",
        "recoverable",
        "server_side",
        "session",
    )

    def __init__(
        self,
        session: CentrifugeSession,
        channel: str,
        namespace: NamespaceOptions,
        *,
        server_side: bool,
        info: ClientInfo,
    ) -> None:
        self.session = session
        self.channel = channel
        self.namespace = namespace
        self.server_side = server_side
        self.info = info
        self.positioned = False
        self.recoverable = False
        self.join_leave = False
        self.epoch = ""
        self.offset = 0
        self.expires_at = 0.0
        # The stream top a position check found this subscription behind on (0: in
        # sync at the last check); see shim/centrifuge/positions.py.
        self.missing_until = 0
        # client_channel_position_max_time_lag_seconds (0: publications may come late).
        self.max_time_lag = session.node.settings.client_channel_position_max_time_lag_seconds
        # Fossil delta negotiated; delta_last is the publication the client holds last.
        self.delta = False
        self.delta_last: Publication | None = None
        # Publications that arrive while the subscribe reply is being prepared; None once live.
        self.buffer: list[tuple[str, PreparedPublication]] | None = []

    # ChannelSubscriber (called by the node on the publish path: append only).

    def deliver(self, epoch: str, prepared: PreparedPublication) -> None:
        if self.buffer is not None:
            self.buffer.append((epoch, prepared))
            return
        pub = prepared.pub
        if self.positioned and pub.offset:
            if epoch != self.epoch or pub.offset != self.offset + 1:
                if self.offset == 0 and pub.offset == 1:
                    # The stream's first publication: an engine makes the stream (and
                    # its epoch) on the first publish, after we read it empty.
                    self.epoch = epoch
                elif epoch == self.epoch and pub.offset <= self.offset:
                    return  # already delivered (recovery overlap)
                else:
                    self.session.lost_position(self)
                    return
            if self.max_time_lag and prepared.age() > self.max_time_lag:
                # Too late (a backlog between the engine and this node): the client
                # resubscribes and reads what it lacks from history instead.
                self.session.lost_position(self)
                return
            self.offset = pub.offset
        session = self.session
        if self.delta:
            push = prepared.delta_push(session.wire, self.delta_last)
            self.delta_last = pub
        else:
            push = prepared.push(session.wire)
        if not session.outbox.push(push) and session.state is not SessionState.CLOSED:
            session.close_slow()

    def deliver_control(self, control: PreparedControl) -> None:
        if self.buffer is None:
            self.session.enqueue(control.push(self.session.wire))

    def go_live(self, position: StreamPosition) -> None:
        """Flush what arrived during the subscribe, skipping what the reply already held."""
        buffered, self.buffer = self.buffer or [], None
        self.epoch, self.offset = position.epoch, position.offset
        if self.delta_last is not None:
            self.session.node.seed_delta_base(self.channel, self.delta_last)
        for epoch, prepared in buffered:
            if self.session.state is SessionState.CLOSED:
                return
            self.deliver(epoch, prepared)
        if self.positioned and self.session.subscriptions.get(self.channel) is self:
            position_checker(self.session.node).add(self)


def negotiate(
    sub: Subscription, namespace: NamespaceOptions, request: SubscribeRequest | None
) -> None:
    """What the subscription gets: what the client asked for (none for a server-side
    subscription), as far as the namespace allows or forces it."""
    history = namespace.history_enabled
    sub.recoverable = history and (
        namespace.force_recovery or bool(request and request.recoverable)
    )
    sub.positioned = history and (
        sub.recoverable or namespace.force_positioning or bool(request and request.positioned)
    )
    sub.join_leave = namespace.join_leave and (
        namespace.force_push_join_leave or bool(request and request.join_leave)
    )
    if request is not None and request.delta:
        if request.delta != DELTA_FOSSIL:
            raise Disconnect(codes.BAD_PROTOCOL)  # as Go: unknown delta type
        sub.delta = DELTA_FOSSIL in namespace.allowed_delta_types
