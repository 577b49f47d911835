"""The cutover flag: which protocol each user should be on, changed at runtime.

Modes: `legacy` (legacy hub only), `dual` (both, the default), `channels` (new
legacy connections refused, existing ones drained over a window). In `dual`,
cohorts decide what `GET /api/v1/realtime/config` tells each user: a percentage
of users by a stable hash of the user id, plus allow (always channels) and deny
(always legacy) lists. Raising the percentage only ever adds users to the
channels cohort, so a user never flips back and forth during a ramp.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


# The values are what operators set and read ("channels" names the Centrifuge
# protocol there); the member names say which protocol is meant.
class Mode(enum.Enum):
    LEGACY = "legacy"
    DUAL = "dual"
    # Centrifuge only: new legacy connections refused, existing ones drained.
    CENTRIFUGE = "channels"


class ClientProtocol(enum.Enum):
    """The protocol a user is told to use."""

    LEGACY = "legacy"
    CENTRIFUGE = "channels"


class CutoverError(ValueError):
    """A requested change is not valid; the message says which field."""


def user_bucket(user: str) -> float:
    """The user's stable place in [0, 100): the same on every node and restart."""
    digest = hashlib.blake2b(user.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100


@dataclass(slots=True, frozen=True)
class CutoverState:
    mode: Mode = Mode.DUAL
    # Share of users (0-100) told to use channels while in `dual`.
    channels_percent: float = 0.0
    # Users always told channels / always told legacy (deny wins over allow).
    allow_users: frozenset[str] = field(default_factory=frozenset)
    deny_users: frozenset[str] = field(default_factory=frozenset)
    # Seconds over which existing legacy connections are closed after entering `channels`.
    drain_seconds: float = 300.0
    # Serve the Centrifuge protocol to an SDK that connects to /api/v1/ws (recognised by
    # its first frame), so a frontend can switch SDK without changing its URL.
    detect_centrifuge_on_legacy_path: bool = True
    # Bumped on every change; nodes sharing the state apply the newest.
    version: int = 0

    def protocol_for(self, user: str) -> ClientProtocol:
        if self.mode is Mode.LEGACY:
            return ClientProtocol.LEGACY
        if self.mode is Mode.CENTRIFUGE:
            return ClientProtocol.CENTRIFUGE
        if user in self.deny_users:
            return ClientProtocol.LEGACY
        if user in self.allow_users:
            return ClientProtocol.CENTRIFUGE
        return (
            ClientProtocol.CENTRIFUGE
            if user_bucket(user) < self.channels_percent
            else ClientProtocol.LEGACY
        )

    @property
    def legacy_served(self) -> bool:
        return self.mode is not Mode.CENTRIFUGE

    @property
    def centrifuge_served(self) -> bool:
        return self.mode is not Mode.LEGACY

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "channels_percent": self.channels_percent,
            "allow_users": sorted(self.allow_users),
            "deny_users": sorted(self.deny_users),
            "drain_seconds": self.drain_seconds,
            "detect_centrifuge_on_legacy_path": self.detect_centrifuge_on_legacy_path,
            "version": self.version,
        }

    def updated(self, changes: Mapping[str, Any]) -> CutoverState:
        """A new state with `changes` applied (the admin API's body), validated."""
        unknown = set(changes) - {
            "mode",
            "channels_percent",
            "allow_users",
            "deny_users",
            "drain_seconds",
            "detect_centrifuge_on_legacy_path",
        }
        if unknown:
            raise CutoverError(f"unknown fields: {sorted(unknown)}")
        values: dict[str, Any] = {}
        if "mode" in changes:
            try:
                values["mode"] = Mode(changes["mode"])
            except ValueError:
                raise CutoverError("mode: expected legacy, dual or channels") from None
        if "channels_percent" in changes:
            percent = changes["channels_percent"]
            if isinstance(percent, bool) or not isinstance(percent, int | float):
                raise CutoverError("channels_percent: expected a number")
            if not 0 <= percent <= 100:
                raise CutoverError("channels_percent: must be within 0..100")
            values["channels_percent"] = float(percent)
        for name in ("allow_users", "deny_users"):
            if name in changes:
                users = changes[name]
                if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
                    raise CutoverError(f"{name}: expected a list of user ids")
                values[name] = frozenset(users)
        if "drain_seconds" in changes:
            seconds = changes["drain_seconds"]
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                raise CutoverError("drain_seconds: expected a non-negative number")
            values["drain_seconds"] = float(seconds)
        if "detect_centrifuge_on_legacy_path" in changes:
            flag = changes["detect_centrifuge_on_legacy_path"]
            if not isinstance(flag, bool):
                raise CutoverError("detect_centrifuge_on_legacy_path: expected a boolean")
            values["detect_centrifuge_on_legacy_path"] = flag
        return replace(self, version=self.version + 1, **values)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> CutoverState:
        state = cls().updated({k: v for k, v in body.items() if k != "version"})
        return replace(state, version=int(body.get("version", 0)))
