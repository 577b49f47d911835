"""The node's Fanout for legacy sessions: each event's frame was encoded once at
ingest (the publication's LegacyFrame); this hands that same frame to every local
legacy session, and tells position-aware (kit) sessions where the stream stands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shim.core.broker import ClientInfo, LegacyFrame, Publication, StreamPosition


class LegacySubscriber(Protocol):
    """A legacy client; it may reach one event through several channels."""

    def deliver_legacy(self, tag: LegacyFrame) -> None: ...

    def stream_moved(self, channel: str, position: StreamPosition, *, missed: bool = False) -> None:
        """The channel's stream did not continue from the last event delivered (a
        publication legacy clients do not get, a gap, a new epoch), or the next event
        comes from a channel other than the global one: the next event of `channel` is
        `position.offset + 1`. `missed`: the offsets before it never reached this node
        (lost, not skipped). Only a client that asked for positions acts on it."""


class LegacyFanout:
    __slots__ = ("global_channel",)

    protocol = "legacy"

    def __init__(self, global_channel: str) -> None:
        self.global_channel = global_channel

    def publish(
        self,
        channel: str,
        pub: Publication,
        epoch: str,
        *,
        moved: bool,
        missed: bool,
        base: Publication | None,
        subscribers: Sequence[LegacySubscriber],
    ) -> bool:
        tag = pub.legacy
        if tag is None:
            if pub.offset:
                # Not a legacy event (a server API publish): legacy clients skip it.
                for subscriber in subscribers:
                    if missed:
                        before = StreamPosition(pub.offset - 1, epoch)
                        subscriber.stream_moved(channel, before, missed=True)
                    subscriber.stream_moved(channel, StreamPosition(pub.offset, epoch))
            return False
        if moved or (pub.offset and channel != self.global_channel):
            # Outside the global channel (a legacy client's personal events) each
            # event is announced: a kit client places it in that channel's stream.
            before = StreamPosition(pub.offset - 1, epoch)
            for subscriber in subscribers:
                subscriber.stream_moved(channel, before, missed=missed)
        for subscriber in subscribers:
            subscriber.deliver_legacy(tag)
        # Counts reach, before a legacy session drops a copy it already had.
        return True

    def control(
        self, channel: str, info: ClientInfo, join: bool, subscribers: Sequence[LegacySubscriber]
    ) -> None:
        """Legacy clients get no join or leave pushes."""
