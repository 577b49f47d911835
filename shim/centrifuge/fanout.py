"""One publication as its subscribers need it: encoded at most once per wire (and
delta form), on first demand, and shared by every subscriber of that form.

`base` is the channel's previous publication on this node. A delta subscriber whose
last delivered publication is that base (the common case: it is in sync) gets the
shared fossil delta, computed once per publication; any other delta subscriber
(just subscribed, recovered, or having missed one) gets the full data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from shim.centrifuge.wire import WIRES, Wire, fossil_patch
from shim.core.broker import ClientInfo, Publication

_UNSET = b""


class ChannelSubscriber(Protocol):
    """A Centrifuge client's subscription to one channel."""

    join_leave: bool

    def deliver(self, epoch: str, prepared: PreparedPublication) -> None:
        """`prepared.pub`, made in `epoch` of the channel's stream."""

    def deliver_control(self, control: PreparedControl) -> None: ...


class PreparedPublication:
    __slots__ = ("_age", "_delta", "_full", "_patch", "_plain", "base", "channel", "pub")

    def __init__(self, channel: str, pub: Publication, base: Publication | None) -> None:
        self.channel = channel
        self.pub = pub
        self.base = base
        self._plain: list[bytes | None] = [None] * len(WIRES)
        # Delta forms, allocated for the first delta subscriber only.
        self._full: list[bytes | None] | None = None
        self._delta: list[bytes | None] | None = None
        # The fossil patch against base: _UNSET until computed, None when not smaller.
        self._patch: bytes | None = _UNSET
        self._age = -1.0

    def age(self) -> float:
        """Seconds since the publish, read once per publication (0 when unknown)."""
        age = self._age
        if age < 0:
            time_ms = self.pub.time_ms
            age = self._age = max(0.0, time.time() - time_ms / 1000) if time_ms else 0.0
        return age

    def push(self, wire: Wire) -> bytes:
        """The publication push for a subscriber without delta."""
        push = self._plain[wire.index]
        if push is None:
            push = self._plain[wire.index] = wire.publication_push(self.channel, self.pub)
        return push

    def delta_push(self, wire: Wire, last: Publication | None) -> bytes:
        """The push for a delta subscriber whose previous publication was `last`."""
        if self._full is None:
            self._full, self._delta = [None] * len(WIRES), [None] * len(WIRES)
        assert self._delta is not None
        base = self.base
        if last is not None and base is not None and (last is base or last.data == base.data):
            push = self._delta[wire.index]
            if push is not None:
                return push
            patch = self._patch
            if patch is _UNSET:
                patch = self._patch = fossil_patch(base.data, self.pub.data)
            if patch is not None:
                push = wire.delta_push(self.channel, self.pub, patch)
                if push is not None:
                    self._delta[wire.index] = push
                    return push
        push = self._full[wire.index]
        if push is None:
            push = wire.delta_push(self.channel, self.pub, None)
            assert push is not None
            self._full[wire.index] = push
        return push


class PreparedControl:
    """A join or leave push, encoded once per wire on first demand."""

    __slots__ = ("_pushes", "channel", "info", "join")

    def __init__(self, channel: str, info: ClientInfo, *, join: bool) -> None:
        self.channel = channel
        self.info = info
        self.join = join
        self._pushes: list[bytes | None] = [None] * len(WIRES)

    def push(self, wire: Wire) -> bytes:
        push = self._pushes[wire.index]
        if push is None:
            encode = wire.encode_join_push if self.join else wire.encode_leave_push
            push = self._pushes[wire.index] = encode(self.channel, self.info)
        return push


class CentrifugeFanout:
    """The node's Fanout for Centrifuge subscriptions: one PreparedPublication per
    publication, encoded lazily once per wire and delta form by the first
    subscriber needing it."""

    __slots__ = ()

    # The label users see in metrics, logs and the cutover mode: "channels".
    protocol = "channels"

    def publish(
        self,
        channel: str,
        pub: Publication,
        epoch: str,
        *,
        moved: bool,
        missed: bool,
        base: Publication | None,
        subscribers: Sequence[ChannelSubscriber],
    ) -> bool:
        prepared = PreparedPublication(channel, pub, base)
        for subscriber in subscribers:
            subscriber.deliver(epoch, prepared)
        return True

    def control(
        self, channel: str, info: ClientInfo, join: bool, subscribers: Sequence[ChannelSubscriber]
    ) -> None:
        control = PreparedControl(channel, info, join=join)
        for subscriber in subscribers:
            if subscriber.join_leave:
                subscriber.deliver_control(control)
