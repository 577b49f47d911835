"""What an authenticated connection is, and the contract an authenticator meets.

The protocols check credentials through `Authenticator`; the JWT adapter
(adapters.auth.jwt) implements it, so no session imports a token library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


def no_claims() -> Mapping[str, Any]:
    """The shared empty claims mapping (every anonymous or plain connection holds it)."""
    return _NO_CLAIMS


@dataclass(slots=True, frozen=True)
class Credentials:
    """Who a connection token says the client is."""

    # `user_id` when it is a non-empty string, else `sub`; "" = anonymous.
    user: str
    # Unix seconds the connection expires at (`expire_at` wins over `exp`); 0 = never.
    expires_at: int = 0
    # Connection info as raw bytes (`b64info` decoded, else `info` as JSON), or None.
    info: bytes | None = None
    # Claim `channels`: server-side subscriptions and, for the claims policy, grants
    # (which may be `namespace:*` patterns).
    channels: tuple[str, ...] = ()
    # Claim `project_ids`: the claims policy grants `project:<id>` for each.
    project_ids: tuple[str, ...] = ()
    # The verified claims not consumed above (e.g. an app's own `role`), read-only,
    # for policies.
    claims: Mapping[str, Any] = field(
        default_factory=no_claims, compare=False, hash=False, repr=False
    )

    @property
    def anonymous(self) -> bool:
        return not self.user

    @property
    def server_side_channels(self) -> tuple[str, ...]:
        """Exact names from `channels`; `ns:*` patterns grant access but name no channel."""
        return tuple(name for name in self.channels if not name.endswith(":*"))


@dataclass(slots=True, frozen=True)
class SubscriptionClaims:
    """What a verified subscription token grants."""

    user: str
    channel: str
    # Client id the token is bound to; "" = any client of the user.
    client: str
    # Unix seconds the subscription expires at (`expire_at` wins over `exp`); 0 = never.
    expires_at: int
    # Channel info (`b64info` decoded, else `info` as JSON), or None.
    info: bytes | None
    # Sent to the client in the subscribe result (`b64data` decoded, else `data` as JSON).
    data: bytes | None


class TokenError(Exception):
    """A token was refused. `expired` is True only when the signature was valid and the
    token's `exp` has passed (clients then fetch a fresh token: code 109). `mismatch`
    marks a valid subscription token issued for another channel, user or client.
    The message never contains the token.
    """

    def __init__(self, message: str, *, expired: bool = False, mismatch: bool = False) -> None:
        super().__init__(message)
        self.expired = expired
        self.mismatch = mismatch


class Authenticator(Protocol):
    """Verifies connection and subscription tokens; raises TokenError."""

    def verify_connection(self, token: str) -> Credentials: ...

    def verify_subscription(
        self, token: str, *, channel: str, user: str, client: str
    ) -> SubscriptionClaims: ...

    def channel_claim(self, token: str) -> str:
        """The `channel` claim of a subscription token read without verifying it, or ""
        (the Python SDK sends sub_refresh without a channel; the token is verified
        right after)."""
        ...
