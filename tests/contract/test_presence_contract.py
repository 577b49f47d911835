"""PresenceManager contract: who is in a channel, and how many distinct users."""

from __future__ import annotations

from shim.core.broker import ClientInfo, PresenceStats
from tests.contract.conftest import EngineUnderTest

ALICE_PHONE = ClientInfo(user="alice", client="c-1", conn_info=b'{"device":"phone"}')
ALICE_LAPTOP = ClientInfo(user="alice", client="c-2", chan_info=b'{"role":"owner"}')
BOB = ClientInfo(user="bob", client="c-3")


async def test_empty_channel_has_no_presence(engine: EngineUnderTest, channel: str) -> None:
    assert await engine.presence.presence(channel) == {}
    assert await engine.presence.presence_stats(channel) == PresenceStats(0, 0)


async def test_presence_lists_clients_and_counts_users(
    engine: EngineUnderTest, channel: str, other_channel: str
) -> None:
    for info in (ALICE_PHONE, ALICE_LAPTOP, BOB):
        await engine.presence.add_presence(channel, info.client, info)

    assert await engine.presence.presence(channel) == {
        "c-1": ALICE_PHONE,
        "c-2": ALICE_LAPTOP,
        "c-3": BOB,
    }
    assert await engine.presence.presence_stats(channel) == PresenceStats(3, 2)
    assert await engine.presence.presence(other_channel) == {}


async def test_removing_clients_updates_list_and_stats(
    engine: EngineUnderTest, channel: str
) -> None:
    for info in (ALICE_PHONE, ALICE_LAPTOP, BOB):
        await engine.presence.add_presence(channel, info.client, info)

    await engine.presence.remove_presence(channel, "c-2", "alice")
    assert await engine.presence.presence(channel) == {"c-1": ALICE_PHONE, "c-3": BOB}
    assert await engine.presence.presence_stats(channel) == PresenceStats(2, 2)

    await engine.presence.remove_presence(channel, "c-1", "alice")
    assert await engine.presence.presence_stats(channel) == PresenceStats(1, 1)

    await engine.presence.remove_presence(channel, "c-3", "bob")
    assert await engine.presence.presence(channel) == {}
    assert await engine.presence.presence_stats(channel) == PresenceStats(0, 0)


async def test_adding_a_client_again_replaces_its_entry(
    engine: EngineUnderTest, channel: str
) -> None:
    await engine.presence.add_presence(channel, "c-1", ALICE_PHONE)
    updated = ClientInfo(user="alice", client="c-1", conn_info=b'{"device":"tablet"}')

    await engine.presence.add_presence(channel, "c-1", updated)

    assert await engine.presence.presence(channel) == {"c-1": updated}
    assert await engine.presence.presence_stats(channel) == PresenceStats(1, 1)


async def test_removing_an_absent_client_changes_nothing(
    engine: EngineUnderTest, channel: str
) -> None:
    await engine.presence.add_presence(channel, "c-3", BOB)

    await engine.presence.remove_presence(channel, "c-1", "alice")

    assert await engine.presence.presence(channel) == {"c-3": BOB}
