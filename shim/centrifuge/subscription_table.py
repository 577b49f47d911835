"""The subscriptions of one Centrifuge connection, by channel.

The table only keeps them: attaching to the node, presence and leave messages are
the session's. Its lists are copies, so a caller may drop subscriptions (or close the
whole connection) while it walks one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from shim.centrifuge import codes
from shim.centrifuge.errors import Reject
from shim.centrifuge.subscriptions import Subscription


class SubscriptionTable(Mapping[str, Subscription]):
    """At most one subscription per channel; a client's subscribe is refused once the
    connection holds `limit` of them (server-side ones included, never refused)."""

    __slots__ = ("_by_channel", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_channel: dict[str, Subscription] = {}

    # Mapping: lookups by channel; iteration yields channel names.

    def __getitem__(self, channel: str) -> Subscription:
        return self._by_channel[channel]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_channel)

    def __len__(self) -> int:
        return len(self._by_channel)

    def __contains__(self, channel: object) -> bool:
        return channel in self._by_channel

    def check_room(self, channel: str) -> None:
        """Reject a client's subscribe to `channel`: 105 when already there, 106 when full."""
        if channel in self._by_channel:
            raise Reject(codes.ALREADY_SUBSCRIBED)
        if len(self._by_channel) >= self.limit:
            raise Reject(codes.LIMIT_EXCEEDED)

    def add(self, sub: Subscription) -> None:
        self._by_channel[sub.channel] = sub

    def remove(self, sub: Subscription) -> bool:
        """Drop `sub` if it is still the channel's subscription; False when it was
        already gone (or replaced), so the caller releases it only once."""
        if self._by_channel.get(sub.channel) is not sub:
            return False
        del self._by_channel[sub.channel]
        return True

    def client_side(self, channel: str) -> Subscription | None:
        """The subscription a client may unsubscribe from itself (not a server-side one)."""
        sub = self._by_channel.get(channel)
        return sub if sub is not None and not sub.server_side else None

    def all(self) -> list[Subscription]:
        return list(self._by_channel.values())

    def with_presence(self) -> list[Subscription]:
        return [sub for sub in self._by_channel.values() if sub.namespace.presence]

    def expired(self, wall: float, grace: float) -> list[Subscription]:
        """Subscriptions whose token expired more than `grace` seconds before `wall`."""
        return [
            sub
            for sub in self._by_channel.values()
            if sub.expires_at and wall > sub.expires_at + grace
        ]
