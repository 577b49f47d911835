"""What a legacy client's user may read, decided by the one channel authorizer.

The legacy protocol names channels only in `subscribe` (task and project ids); a
`*` client reads the global channel, which carries events of every channel. So a
named subscription is authorized like a Centrifuge subscribe, once, and an event
reaching a `*` client is readable when its user may read one of the channels the
event was routed to (the global channel among them: a user granted `global` reads
all of it on the channel protocol too). Answers are kept per channel, so the
policy is asked once per channel, not once per event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from shim.core.auth import Credentials
from shim.core.policy import ChannelAuthorizer, Decision

# Channels whose answers one client keeps; past it they are all forgotten (and
# asked again when needed), so a `*` client seeing endless fresh task ids stays small.
MAX_REMEMBERED_CHANNELS = 1024


class LegacyReads:
    """The authorizer's answers for one legacy client. Answers that needed no I/O
    are kept for the connection's life (its token cannot change); answers of the
    HTTP policy for `cache_seconds`, like that policy's own cache; failures are not
    kept (the next event asks again) and count as "no"."""

    # The clock of cached answers (a class attribute, so it costs no slot).
    clock = staticmethod(time.monotonic)

    __slots__ = ("_authorizer", "_cache_seconds", "_credentials", "_known")

    def __init__(
        self, authorizer: ChannelAuthorizer, credentials: Credentials, *, cache_seconds: float
    ) -> None:
        self._authorizer = authorizer
        self._credentials = credentials
        self._cache_seconds = cache_seconds
        # channel -> (may read, monotonic time the answer expires at)
        self._known: dict[str, tuple[bool, float]] = {}

    @property
    def user(self) -> str:
        return self._credentials.user

    async def may_subscribe(self, channel: str) -> Decision:
        """Ask (always: a subscribe is worth a fresh answer) and keep the answer."""
        decision = self._authorizer.decide_now(self._credentials, channel)
        if decision is not None:
            self._remember(channel, decision, math.inf)
            return decision
        decision = await self._authorizer.authorize_subscribe(self._credentials, channel, "")
        self._remember(channel, decision, None)
        return decision

    def readable_now(self, channels: Iterable[str]) -> bool | None:
        """True when the user may read one of `channels`, False when it may read none,
        None when that takes asking the policy (see `readable`)."""
        unknown = False
        now = self.clock()
        for channel in channels:
            allowed = self._known_answer(channel, now)
            if allowed is None:
                decision = self._authorizer.decide_now(self._credentials, channel)
                if decision is None:
                    unknown = True
                    continue
                allowed = self._remember(channel, decision, math.inf)
            if allowed:
                return True
        return None if unknown else False

    async def readable(self, channels: Iterable[str]) -> bool:
        """Like readable_now, asking the policy for what is not known."""
        for channel in channels:
            allowed = self._known_answer(channel, self.clock())
            if allowed is None:
                decision = await self._authorizer.authorize_subscribe(
                    self._credentials, channel, ""
                )
                allowed = self._remember(channel, decision, None)
            if allowed:
                return True
        return False

    def _known_answer(self, channel: str, now: float) -> bool | None:
        entry = self._known.get(channel)
        if entry is None:
            return None
        allowed, expires_at = entry
        if now < expires_at:
            return allowed
        del self._known[channel]
        return None

    def _remember(self, channel: str, decision: Decision, expires_at: float | None) -> bool:
        if decision.temporary:
            return False
        if expires_at is None:
            if self._cache_seconds <= 0:
                return decision.allowed
            expires_at = self.clock() + self._cache_seconds
        if len(self._known) >= MAX_REMEMBERED_CHANNELS:
            self._known.clear()
        self._known[channel] = (decision.allowed, expires_at)
        return decision.allowed
