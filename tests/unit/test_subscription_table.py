"""SubscriptionTable on its own: the connection's subscriptions by channel, the limit a
client's subscribe meets, and the lists the session walks on close, expiry and presence
refresh. The subscriptions are real ones of a real (socket-less) session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.auth.jwt import TokenVerifier, generate_signing_key
from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from shim.centrifuge import codes
from shim.centrifuge.errors import Reject
from shim.centrifuge.fanout import CentrifugeFanout
from shim.centrifuge.session import CentrifugeSession
from shim.centrifuge.subscription_table import SubscriptionTable
from shim.centrifuge.subscriptions import Subscription
from shim.core.broker import ClientInfo
from shim.core.config import NamespaceOptions, Settings
from shim.core.node import Node
from shim.core.outbox import Outbox
from shim.core.policy import AllowAuthenticated, ChannelAuthorizer

ALGORITHM = "EdDSA"
_, VERIFICATION_KEY = generate_signing_key(ALGORITHM)
PLAIN = NamespaceOptions(presence=False)
WITH_PRESENCE = NamespaceOptions(presence=True)


class _NoSocket:
    transport_name = "none"

    def close(self, code: int, reason: str) -> None:
        pass


@pytest.fixture
async def session() -> AsyncIterator[CentrifugeSession]:
    node = Node(Settings(), MemoryBroker(), MemoryPresenceManager(), fanouts=(CentrifugeFanout(),))
    await node.start()

    async def write(frame: bytes) -> None:
        pass

    yield CentrifugeSession(
        node,
        TokenVerifier(ALGORITHM, VERIFICATION_KEY),
        ChannelAuthorizer(AllowAuthenticated()),
        _NoSocket(),
        Outbox(1 << 16, write),
    )
    await node.close()


def _sub(
    session: CentrifugeSession,
    channel: str,
    *,
    server_side: bool = False,
    namespace: NamespaceOptions = PLAIN,
    expires_at: float = 0.0,
) -> Subscription:
    sub = Subscription(
        session, channel, namespace, server_side=server_side, info=ClientInfo("ada", "c1")
    )
    sub.expires_at = expires_at
    return sub


def _code(excinfo: pytest.ExceptionInfo[Reject]) -> int:
    return excinfo.value.error.code


async def test_lookups_by_channel_and_iteration_over_channel_names(
    session: CentrifugeSession,
) -> None:
    table = SubscriptionTable(limit=8)
    task, user = _sub(session, "task:1"), _sub(session, "user:ada", server_side=True)
    table.add(task)
    table.add(user)
    assert len(table) == 2 and list(table) == ["task:1", "user:ada"]
    assert "task:1" in table and "task:2" not in table
    assert table["user:ada"] is user and table.get("task:2") is None
    assert table.all() == [task, user]


async def test_a_client_meets_already_subscribed_then_the_limit(
    session: CentrifugeSession,
) -> None:
    table = SubscriptionTable(limit=2)
    table.check_room("task:1")  # room: nothing raised
    table.add(_sub(session, "task:1"))
    with pytest.raises(Reject) as again:
        table.check_room("task:1")
    assert _code(again) == codes.ALREADY_SUBSCRIBED.code == 105
    # Server-side subscriptions count towards the limit a client's subscribe meets.
    table.add(_sub(session, "user:ada", server_side=True))
    with pytest.raises(Reject) as full:
        table.check_room("task:2")
    assert _code(full) == codes.LIMIT_EXCEEDED.code == 106
    with pytest.raises(Reject) as both:
        table.check_room("task:1")
    assert _code(both) == 105  # already subscribed is said before the limit


async def test_remove_drops_only_the_current_subscription_once(
    session: CentrifugeSession,
) -> None:
    table = SubscriptionTable(limit=8)
    old, new = _sub(session, "task:1"), _sub(session, "task:1")
    table.add(old)
    assert table.remove(old) is True
    assert table.remove(old) is False  # a second release is refused
    table.add(new)
    assert table.remove(old) is False and table["task:1"] is new  # a stale one never evicts
    assert table.remove(new) is True and len(table) == 0


async def test_a_client_may_not_unsubscribe_a_server_side_subscription(
    session: CentrifugeSession,
) -> None:
    table = SubscriptionTable(limit=8)
    task = _sub(session, "task:1")
    table.add(task)
    table.add(_sub(session, "user:ada", server_side=True))
    assert table.client_side("task:1") is task
    assert table.client_side("user:ada") is None
    assert table.client_side("task:9") is None


async def test_lists_are_copies_so_dropping_while_walking_is_safe(
    session: CentrifugeSession,
) -> None:
    table = SubscriptionTable(limit=8)
    for n in range(3):
        table.add(_sub(session, f"task:{n}", namespace=WITH_PRESENCE))
    for sub in table.all():
        table.remove(sub)
    assert len(table) == 0


async def test_presence_and_expiry_lists(session: CentrifugeSession) -> None:
    table = SubscriptionTable(limit=8)
    present = _sub(session, "task:p", namespace=WITH_PRESENCE)
    forever = _sub(session, "task:f")
    lapsed = _sub(session, "task:l", expires_at=1000.0)
    table.add(present)
    table.add(forever)
    table.add(lapsed)
    assert table.with_presence() == [present]
    # Expired once the wall clock is past expiry plus the grace, not at it.
    assert table.expired(wall=1004.0, grace=5.0) == []
    assert table.expired(wall=1005.0, grace=5.0) == []
    assert table.expired(wall=1005.5, grace=5.0) == [lapsed]
