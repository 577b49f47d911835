"""Every Centrifuge error, disconnect and unsubscribe code we send, as data.

The reconnect decision travels in the code's range (protocol v2): disconnects in
3000-3499 and 4000-4499 make clients reconnect, 3500-3999 and 4500-4999 do not;
unsubscribe codes >= 2500 make clients resubscribe.
"""

from __future__ import annotations

from dataclasses import dataclass

from shim.core import close_codes


@dataclass(slots=True, frozen=True)
class ErrorCode:
    code: int
    message: str
    temporary: bool = False

    def as_dict(self, message: str | None = None) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": message or self.message}
        if self.temporary:
            body["temporary"] = True
        return body


@dataclass(slots=True, frozen=True)
class DisconnectCode:
    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        return not (3500 <= self.code <= 3999 or 4500 <= self.code <= 4999)


@dataclass(slots=True, frozen=True)
class UnsubscribeCode:
    code: int
    reason: str

    @property
    def resubscribe(self) -> bool:
        return self.code >= 2500


# Reply errors (Reply.error).
INTERNAL = ErrorCode(100, "internal server error", temporary=True)
UNAUTHORIZED = ErrorCode(101, "unauthorized")
UNKNOWN_CHANNEL = ErrorCode(102, "unknown channel")
PERMISSION_DENIED = ErrorCode(103, "permission denied")
METHOD_NOT_FOUND = ErrorCode(104, "method not found")
ALREADY_SUBSCRIBED = ErrorCode(105, "already subscribed")
LIMIT_EXCEEDED = ErrorCode(106, "limit exceeded")
BAD_REQUEST = ErrorCode(107, "bad request")
NOT_AVAILABLE = ErrorCode(108, "not available")
TOKEN_EXPIRED = ErrorCode(109, "token expired")
# For sub_refresh: the SDKs drop a subscription for good on a non-temporary error
# there, while a temporary one makes them retry; if they never get a fresh token the
# subscription expires on its own (unsubscribe 2501, which makes them resubscribe).
TOKEN_EXPIRED_RETRY = ErrorCode(109, "token expired", temporary=True)
EXPIRED = ErrorCode(110, "expired")
TOO_MANY_REQUESTS = ErrorCode(111, "too many requests", temporary=True)
UNRECOVERABLE_POSITION = ErrorCode(112, "unrecoverable position")

# Disconnects, sent as the WebSocket close code and reason.
SHUTDOWN = DisconnectCode(3001, "shutdown")
SERVER_ERROR = DisconnectCode(3004, "internal server error")
CONNECTION_EXPIRED = DisconnectCode(3005, "connection expired")
SUBSCRIPTION_EXPIRED = DisconnectCode(3006, "subscription expired")
SLOW = DisconnectCode(close_codes.SLOW, close_codes.SLOW_REASON)
WRITE_ERROR = DisconnectCode(3009, "write error")
INSUFFICIENT_STATE = DisconnectCode(3010, "insufficient state")
FORCE_RECONNECT = DisconnectCode(3011, "force reconnect")
NO_PONG = DisconnectCode(3012, "no pong")
# Still sending commands after the command rate limit refused a burst of them.
TOO_MANY_REQUESTS_DISCONNECT = DisconnectCode(3013, "too many requests")
INVALID_TOKEN = DisconnectCode(3500, "invalid token")
BAD_PROTOCOL = DisconnectCode(3501, "bad request")
STALE = DisconnectCode(3502, "stale")
FORCE_DISCONNECT = DisconnectCode(3503, "force disconnect")
# The cutover is in `legacy` mode: channel clients are turned away without retrying.
CENTRIFUGE_DISABLED = DisconnectCode(3503, "channel protocol disabled")
# client_user_connection_limit reached at connect.
CONNECTION_LIMIT = DisconnectCode(3504, "connection limit")
CHANNEL_LIMIT = DisconnectCode(3505, "channel limit")
INAPPROPRIATE_PROTOCOL = DisconnectCode(3506, "inappropriate protocol")
DISCONNECT_PERMISSION_DENIED = DisconnectCode(3507, "permission denied")
DISCONNECT_NOT_AVAILABLE = DisconnectCode(3508, "not available")

# Server-initiated unsubscribes (push.unsubscribe).
UNSUBSCRIBE_SERVER = UnsubscribeCode(2000, "server unsubscribe")
UNSUBSCRIBE_INSUFFICIENT_STATE = UnsubscribeCode(2500, "insufficient state")
UNSUBSCRIBE_EXPIRED = UnsubscribeCode(2501, "subscription expired")

# WebSocket-level close codes we use outside the Centrifuge ranges.
WS_MESSAGE_TOO_BIG = close_codes.WS_MESSAGE_TOO_BIG
WS_GOING_AWAY = close_codes.WS_GOING_AWAY
