"""WebSocket close codes both protocols send, spelled once."""

from __future__ import annotations

# RFC 6455: the server is going away (legacy hub shutdown).
WS_GOING_AWAY = 1001
# RFC 6455: a client message over the read limit.
WS_MESSAGE_TOO_BIG = 1009
# A client whose queue went over its cap: Centrifuge's "slow" disconnect, which the
# legacy hub sends too (both reconnect).
SLOW = 3008
SLOW_REASON = "slow"
