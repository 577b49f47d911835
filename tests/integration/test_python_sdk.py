"""The official centrifuge-python SDK against the real hypercorn server.

Each test asserts what an application using the SDK sees: its events, the results
of its calls and the errors they raise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from centrifuge import (  # type: ignore[import-untyped]
    Client,
    ClientState,
    DeltaType,
    ReplyError,
    StreamPosition,
    SubscriptionState,
)

from adapters.auth.jwt import mint_token
from shim.centrifuge import codes
from shim.core.config import NamespaceOptions, Settings
from tests.conftest import RunningServer, eventually, run_server, sessions_of
from tests.conventions import centrifugo_conventions, publish_api, with_quest_delta
from tests.pyclient import (
    CODECS,
    OUTAGES,
    ClientEvents,
    Recorder,
    cut_off,
    new_client,
    new_subscription,
    use_codec,
)
from tests.streams import content_event


@pytest.fixture(autouse=True, params=CODECS)
def codec(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with the SDK in JSON and in Protobuf mode."""
    with use_codec(request.param):
        yield request.param


@contextlib.asynccontextmanager
async def connected(
    server: RunningServer, user: str, token: str | None = None, **options: Any
) -> AsyncIterator[tuple[Client, ClientEvents]]:
    """A connected SDK client of `user`, disconnected when the block ends."""
    client, events = new_client(
        server.ws_url, server.token(user) if token is None else token, **options
    )
    await client.connect()
    try:
        await events.wait_for("connected", timeout=5)
        yield client, events
    finally:
        await client.disconnect()


async def broadcast_ok(server: RunningServer, body: Any) -> list[dict[str, Any]]:
    resp = await server.broadcast(body)
    assert resp.status_code == 200, resp.text
    results: list[dict[str, Any]] = resp.json()["results"]
    assert all(r["status"] == "accepted" for r in results), resp.text
    return results


def task_event(task_id: str, n: int, timestamp: str = "") -> dict[str, Any]:
    event: dict[str, Any] = {"type": "task.updated", "payload": {"task_id": task_id, "n": n}}
    if timestamp:
        event["timestamp"] = timestamp
    return event


def seen(recorder: Recorder) -> list[tuple[str, Any]]:
    """What a recorder got, for failure messages: event names with their codes."""
    return [(name, getattr(ctx, "code", None)) for name, ctx in recorder.events]


def with_namespace(**options: Any) -> dict[str, NamespaceOptions]:
    """The default namespaces, with `task` changed."""
    namespaces = dict(Settings().namespaces)
    namespaces["task"] = replace(namespaces["task"], **options)
    return namespaces


# 1. connect, server-side personal channel, approvals --------------------------------


async def test_connect_personal_channel_and_approval_routing(
    server: RunningServer, codec: str
) -> None:
    async with connected(server, "alice") as (client, events):
        ctx = events.named("connected")[0]
        assert ctx.client and ctx.client == client.client_id
        assert [s.client_id for s in sessions_of(server, "alice")] == [ctx.client]
        # The server speaks the wire the SDK asked for (subprotocol negotiation).
        assert [s.wire.name for s in sessions_of(server, "alice")] == [codec]

        personal = await events.wait_for("subscribed", lambda c: c.channel == "user:alice")
        assert personal.recoverable and personal.positioned
        assert personal.stream_position is not None and personal.stream_position.epoch

        system, system_events = new_subscription(client, "system")
        await system.subscribe()
        await system_events.wait_for("subscribed")

        named = await broadcast_ok(
            server,
            {"type": "approval.required", "payload": {"user_id": "alice", "approval_id": "a1"}},
        )
        # Personal: not on `global`, where every user would read it.
        assert named[0]["channels"] == ["user:alice"]
        pub = await events.wait_for("publication", lambda c: c.channel == "user:alice")
        assert pub.pub.data["type"] == "approval.required"
        assert pub.pub.data["approval_id"] == "a1"
        assert pub.pub.offset == personal.stream_position.offset + 1

        unnamed = await broadcast_ok(
            server, {"type": "approval.required", "payload": {"approval_id": "a2"}}
        )
        assert unnamed[0]["channels"] == ["system", "global"]
        on_system = await system_events.wait_for("publication")
        assert on_system.pub.data["approval_id"] == "a2"

        # The personal channel got a2 only if it arrived before this marker.
        await broadcast_ok(
            server,
            {"type": "approval.required", "payload": {"user_id": "alice", "approval_id": "a3"}},
        )
        await events.wait_for("publication", lambda c: c.pub.data["approval_id"] == "a3")
        personal_ids = [
            c.pub.data["approval_id"]
            for c in events.named("publication")
            if c.channel == "user:alice"
        ]
        assert personal_ids == ["a1", "a3"]


# 2. order and data of a burst ------------------------------------------------------


async def test_hundred_publications_in_order_with_flat_data(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, _events):
        sub, sub_events = new_subscription(client, "task:T")
        await sub.subscribe()
        subscribed = await sub_events.wait_for("subscribed")
        start = subscribed.stream_position.offset

        batch = [task_event("T", n, f"2026-02-04T16:21:{n // 10:02d}.{n:03d}Z") for n in range(100)]
        for n, event in enumerate(batch):
            event["payload"]["status"] = "running" if n % 2 else "ready"
        await broadcast_ok(server, batch)

        await sub_events.wait_for("publication", count=100)
        pubs = [c.pub for c in sub_events.named("publication")]
        assert [p.offset for p in pubs] == list(range(start + 1, start + 101))
        for pub, event in zip(pubs, batch, strict=True):
            expected = {**event["payload"], "type": "task.updated", "timestamp": event["timestamp"]}
            assert pub.data == expected
            assert list(pub.data) == [*event["payload"], "type", "timestamp"]
            assert pub.info is None  # published by the backend, not by a client


# 3. recovery ----------------------------------------------------------------------


@pytest.mark.parametrize("outage", OUTAGES)
async def test_recovery_while_publications_continue(server: RunningServer, outage: str) -> None:
    total = 80
    # A reconnect delay of 0.3-0.5 s: publications surely go out while the client is away.
    async with connected(server, "alice", min_reconnect_delay=0.3) as (client, events):
        sub, sub_events = new_subscription(client, "task:rec")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        # Published (stored, answered) from start to end while the client had no connection.
        while_away: list[int] = []

        async def publisher() -> None:
            for n in range(1, total + 1):
                away = client.state is not ClientState.CONNECTED
                await broadcast_ok(server, task_event("rec", n))
                if away and client.state is not ClientState.CONNECTED:
                    while_away.append(n)
                await asyncio.sleep(0.01)

        publishing = asyncio.create_task(publisher())
        try:
            await sub_events.wait_for("publication", count=20)
            (session,) = sessions_of(server, "alice")
            expected = cut_off(session, outage)

            reconnecting = await events.wait_for("connecting", lambda c: c.code != 0)
            assert (reconnecting.code, reconnecting.reason) == expected
            await events.wait_for("connected", count=2)
            again = await sub_events.wait_for("subscribed", count=2)
            assert again.was_recovering and again.recovered
            await publishing
        finally:
            publishing.cancel()

        await sub_events.wait_for("publication", lambda c: c.pub.data["n"] == total)
        pubs = [c.pub for c in sub_events.named("publication")]
        assert [p.data["n"] for p in pubs] == list(range(1, total + 1))
        assert [p.offset for p in pubs] == list(range(pubs[0].offset, pubs[0].offset + total))
        # There was a gap to fill, and it was filled after the resubscribe: by recovery.
        assert while_away, "nothing was published while the client was away"
        resubscribed_at = [
            i for i, (name, _) in enumerate(sub_events.events) if name == "subscribed"
        ][1]
        after = [
            c.pub.data["n"]
            for name, c in sub_events.events[resubscribed_at:]
            if name == "publication"
        ]
        assert set(while_away) <= set(after), (while_away, after)
        assert len(sessions_of(server, "alice")) == 1

        # The server-side personal channel was recovered through the connect too.
        personal = await events.wait_for("subscribed", lambda c: c.channel == "user:alice", count=2)
        assert personal.was_recovering and personal.recovered
        assert not events.named("disconnected")


async def test_recovery_after_stream_reset_is_not_recovered(server: RunningServer) -> None:
    channel = "task:reset"
    async with connected(server, "alice") as (client, _):
        sub, sub_events = new_subscription(client, channel)
        await sub.subscribe()
        first = await sub_events.wait_for("subscribed")
        await broadcast_ok(server, [task_event("reset", n) for n in range(3)])
        await sub_events.wait_for("publication", count=3)

        (session,) = sessions_of(server, "alice")
        session.disconnect(codes.FORCE_RECONNECT)
        # Before the SDK can come back: the memory broker forgets the stream at once.
        await server.runtime.broker.remove_history(channel)

        again = await sub_events.wait_for("subscribed", count=2)
        assert again.was_recovering and not again.recovered
        assert again.stream_position.epoch != first.stream_position.epoch
        assert again.stream_position.offset == 0

        await broadcast_ok(server, task_event("reset", 99))
        latest = await sub_events.wait_for("publication", count=4)
        assert latest.pub.data["n"] == 99 and latest.pub.offset == 1
        assert client.state is ClientState.CONNECTED


# 4. history and presence ----------------------------------------------------------


async def test_history(server: RunningServer) -> None:
    await broadcast_ok(server, [task_event("hist", n) for n in range(1, 11)])
    async with connected(server, "alice") as (client, _events):
        sub, sub_events = new_subscription(client, "task:hist")
        await sub.subscribe()
        subscribed = await sub_events.wait_for("subscribed")
        position = subscribed.stream_position
        assert position.offset == 10

        def numbers(result: Any) -> list[int]:
            assert result.offset == 10 and result.epoch == position.epoch
            assert [p.offset for p in result.publications] == [
                p.data["n"] for p in result.publications
            ]
            return [p.data["n"] for p in result.publications]

        assert numbers(await sub.history()) == []
        assert numbers(await sub.history(limit=5)) == [1, 2, 3, 4, 5]
        assert numbers(await sub.history(limit=-1)) == list(range(1, 11))
        assert numbers(await sub.history(limit=3, reverse=True)) == [10, 9, 8]
        since = StreamPosition(offset=7, epoch=position.epoch)
        assert numbers(await sub.history(limit=10, since=since)) == [8, 9, 10]
        since = StreamPosition(offset=4, epoch=position.epoch)
        assert numbers(await sub.history(limit=2, since=since, reverse=True)) == [3, 2]
        top = StreamPosition(offset=10, epoch=position.epoch)
        assert numbers(await sub.history(limit=10, since=top)) == []

        full = await sub.history(limit=1)
        assert full.publications[0].data == {
            "task_id": "hist",
            "n": 1,
            "type": "task.updated",
            "timestamp": full.publications[0].data["timestamp"],
        }
        with pytest.raises(ReplyError) as stale:
            await sub.history(limit=1, since=StreamPosition(offset=1, epoch="other"))
        assert stale.value.code == codes.UNRECOVERABLE_POSITION.code


async def test_presence_and_presence_stats(server: RunningServer) -> None:
    channel = "task:pres"
    async with connected(server, "alice") as (alice, _):
        alice_sub, alice_events = new_subscription(alice, channel)
        await alice_sub.subscribe()
        await alice_events.wait_for("subscribed")
        async with connected(server, "bob") as (bob, _):
            bob_sub, bob_events = new_subscription(bob, channel)
            await bob_sub.subscribe()
            await bob_events.wait_for("subscribed")

            async def both_present() -> bool:
                return len((await alice_sub.presence()).clients) == 2

            await eventually(both_present)
            presence = await bob_sub.presence()
            assert {k: (v.client, v.user) for k, v in presence.clients.items()} == {
                alice.client_id: (alice.client_id, "alice"),
                bob.client_id: (bob.client_id, "bob"),
            }
            stats = await alice_sub.presence_stats()
            assert (stats.num_clients, stats.num_users) == (2, 2)

        async def only_alice() -> bool:
            return set((await alice_sub.presence()).clients) == {alice.client_id}

        await eventually(only_alice)
        stats = await alice_sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (1, 1)


# 5. join / leave ------------------------------------------------------------------


async def test_join_and_leave(signing_keys: tuple[str, str]) -> None:
    channel = "task:jl"
    async with (
        run_server(signing_keys, namespaces=with_namespace(join_leave=True)) as server,
        connected(server, "alice") as (alice, _),
        connected(server, "carol") as (carol, _),
    ):
        alice_sub, alice_events = new_subscription(alice, channel, join_leave=True)
        await alice_sub.subscribe()
        await alice_events.wait_for("subscribed")
        # Carol does not ask for join/leave: she gets publications only.
        carol_sub, carol_events = new_subscription(carol, channel)
        await carol_sub.subscribe()
        await carol_events.wait_for("subscribed")

        async with connected(server, "bob") as (bob, _):
            bob_sub, bob_events = new_subscription(bob, channel)
            await bob_sub.subscribe()
            await bob_events.wait_for("subscribed")
            join = await alice_events.wait_for("join", lambda c: c.info.user == "bob")
            assert join.info.client == bob.client_id
            await bob_sub.unsubscribe()
            leave = await alice_events.wait_for("leave", lambda c: c.info.user == "bob")
            assert leave.info.client == bob.client_id

        # Pushes of one connection are ordered: join/leave for carol would come first.
        await broadcast_ok(server, task_event("jl", 1))
        await carol_events.wait_for("publication")
        assert not carol_events.named("join") and not carol_events.named("leave")
        assert await alice_events.wait_for("publication")


# 6. connection token refresh ------------------------------------------------------


async def test_token_refresh_keeps_connection(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, client_expired_close_delay_seconds=1) as server:
        calls = 0

        async def get_token() -> str:
            nonlocal calls
            calls += 1
            return server.token("alice", ttl=3)

        async with (
            connected(server, "alice", server.token("alice", ttl=3), get_token=get_token) as (
                client,
                events,
            ),
            # Same short token, nothing to refresh it with: the server must close it.
            connected(server, "dave", server.token("dave", ttl=3)) as (_, control),
        ):
            sub, sub_events = new_subscription(client, "task:refresh")
            await sub.subscribe()
            await sub_events.wait_for("subscribed")

            expired = await control.wait_for(
                "connecting", lambda c: c.code == codes.CONNECTION_EXPIRED.code, timeout=8
            )
            assert expired.reason == codes.CONNECTION_EXPIRED.reason
            await asyncio.sleep(1.0)  # past the original expiry + grace + a server tick

            assert calls >= 1
            assert client.state is ClientState.CONNECTED
            assert [c.code for c in events.named("connecting")] == [0]
            assert len(events.named("connected")) == 1
            assert not events.named("disconnected")
            await broadcast_ok(server, task_event("refresh", 1))
            pub = await sub_events.wait_for("publication")
            assert pub.pub.data["n"] == 1


async def test_expired_token_with_get_token_connects(server: RunningServer) -> None:
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        return server.token("alice")

    async with connected(server, "alice", server.token("alice", ttl=-10), get_token=get_token) as (
        client,
        events,
    ):
        assert calls == 1
        error = events.named("error")[0].error
        assert isinstance(error, ReplyError) and error.code == codes.TOKEN_EXPIRED.code
        assert client.state is ClientState.CONNECTED
        await events.wait_for("subscribed", lambda c: c.channel == "user:alice")


# 7. permission denied -------------------------------------------------------------


async def test_subscribing_to_another_users_channel_is_denied(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, events):
        sub, sub_events = new_subscription(client, "user:bob")
        await sub.subscribe()
        denied = await sub_events.wait_for("unsubscribed")
        assert denied.code == codes.PERMISSION_DENIED.code
        assert sub.state is SubscriptionState.UNSUBSCRIBED
        assert not sub_events.named("subscribed")

        # The connection is untouched.
        assert (await client.rpc("ping", None)).data == {"pong": True}
        assert client.state is ClientState.CONNECTED
        assert not events.named("disconnected")
        assert [c.code for c in events.named("connecting")] == [0]


# 8. subscription tokens -----------------------------------------------------------


def sub_token(server: RunningServer, user: str, channel: str, ttl: int) -> str:
    return mint_token(
        server.signing_key, "EdDSA", user=user, ttl_seconds=ttl, extra={"channel": channel}
    )


async def test_subscription_token_is_refreshed(signing_keys: tuple[str, str]) -> None:
    channel = "task:T"
    async with (
        run_server(signing_keys, client_expired_close_delay_seconds=1) as server,
        connected(server, "alice") as (client, _),
    ):
        requested: list[str] = []

        async def get_token(for_channel: str) -> str:
            requested.append(for_channel)
            return sub_token(server, "alice", for_channel, 3)

        sub, sub_events = new_subscription(
            client, channel, token=sub_token(server, "alice", channel, 3), get_token=get_token
        )
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        (session,) = sessions_of(server, "alice")
        first_expiry = session.subscriptions[channel].expires_at
        assert first_expiry

        # Past the first token's expiry + 1 s grace + a server tick.
        await asyncio.sleep(5.5)
        assert requested and set(requested) == {channel}
        assert session.subscriptions[channel].expires_at > first_expiry
        assert sub.state is SubscriptionState.SUBSCRIBED
        assert not sub_events.named("unsubscribed")
        assert [c.code for c in sub_events.named("subscribing")] == [0]
        assert not sub_events.named("error")
        await broadcast_ok(server, task_event("T", 1))
        assert (await sub_events.wait_for("publication")).pub.data["n"] == 1


async def test_subscription_token_for_another_channel_closes_the_connection(
    server: RunningServer,
) -> None:
    # Reference 9.2: a valid token for another channel, user or client is an
    # invalid token, and the connection goes for good (3500: no reconnect).
    async with connected(server, "alice") as (client, events):
        wrong = sub_token(server, "alice", "task:other", 60)
        sub, sub_events = new_subscription(client, "task:T", token=wrong)
        await sub.subscribe()
        gone = await events.wait_for("disconnected")
        assert (gone.code, gone.reason) == (codes.INVALID_TOKEN.code, codes.INVALID_TOKEN.reason)
        assert client.state is ClientState.DISCONNECTED
        assert not sub_events.named("subscribed")
        await asyncio.sleep(0.3)  # a reconnect would have started by now
        assert [c.code for c in events.named("connecting")] == [0]
        assert not sessions_of(server, "alice")


async def test_subscription_token_cannot_grant_another_users_channel(
    server: RunningServer,
) -> None:
    async with connected(server, "alice") as (client, events):
        # Signed by the backend, for alice and for user:bob: still bob's channel only.
        token = sub_token(server, "alice", "user:bob", 60)
        sub, sub_events = new_subscription(client, "user:bob", token=token)
        await sub.subscribe()
        denied = await sub_events.wait_for("unsubscribed")
        assert denied.code == codes.PERMISSION_DENIED.code
        assert not sub_events.named("subscribed")

        await broadcast_ok(
            server,
            [
                {"type": "approval.required", "payload": {"user_id": "bob", "approval_id": "b1"}},
                {"type": "approval.required", "payload": {"user_id": "alice", "approval_id": "a1"}},
            ],
        )
        # One connection's pushes are ordered: bob's approval would have come first.
        pub = await events.wait_for("publication")
        assert (pub.channel, pub.pub.data["approval_id"]) == ("user:alice", "a1")
        assert not sub_events.named("publication")
        assert client.state is ClientState.CONNECTED


# 9. unsubscribe push on an expired subscription -----------------------------------


@pytest.mark.parametrize("outage", ["raises", "stale token"])
async def test_unrefreshed_subscription_gets_2501_and_resubscribes(
    signing_keys: tuple[str, str], outage: str
) -> None:
    """The app's token service is broken when the refresh is due (it fails, or it
    hands back the token that is expiring); once the server gives up on the
    subscription (2501) the service is back, and the SDK resubscribes."""
    channel = "task:exp"
    async with (
        run_server(signing_keys, client_expired_close_delay_seconds=1) as server,
        connected(server, "alice") as (client, events),
    ):
        first_token = sub_token(server, "alice", channel, 2)
        token_service_up = False

        async def get_token(for_channel: str) -> str:
            if token_service_up:
                return sub_token(server, "alice", for_channel, 60)
            if outage == "raises":
                raise RuntimeError("token service down")
            return first_token

        sub, sub_events = new_subscription(client, channel, token=first_token, get_token=get_token)
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        await broadcast_ok(server, task_event("exp", 1))
        await sub_events.wait_for("publication")

        try:
            expired = await sub_events.wait_for(
                "subscribing", lambda c: c.code == codes.UNSUBSCRIBE_EXPIRED.code, timeout=8
            )
        except TimeoutError:
            pytest.fail(f"no 2501 unsubscribe; the subscription saw {seen(sub_events)}")
        assert expired.reason == codes.UNSUBSCRIBE_EXPIRED.reason
        token_service_up = True

        again = await sub_events.wait_for("subscribed", count=2)
        assert again.was_recovering and again.recovered
        assert not sub_events.named("unsubscribed")
        await broadcast_ok(server, task_event("exp", 2))
        latest = await sub_events.wait_for("publication", count=2)
        assert latest.pub.data["n"] == 2
        assert [c.code for c in events.named("connecting")] == [0]


# 10. RPC and client publish -------------------------------------------------------


async def test_rpc_ping_and_publish_refused_by_default(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, _):
        assert (await client.rpc("ping", {})).data == {"pong": True}
        with pytest.raises(ReplyError) as unknown:
            await client.rpc("no-such-method", None)
        assert unknown.value.code == codes.METHOD_NOT_FOUND.code

        sub, sub_events = new_subscription(client, "task:pub")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        with pytest.raises(ReplyError) as refused:
            await sub.publish({"text": "hi"})
        assert refused.value.code == codes.PERMISSION_DENIED.code
        assert client.state is ClientState.CONNECTED


async def test_publish_allowed_for_subscribers(signing_keys: tuple[str, str]) -> None:
    channel = "task:pub"
    async with (
        run_server(
            signing_keys, namespaces=with_namespace(allow_publish_for_subscriber=True)
        ) as server,
        connected(server, "alice") as (alice, _),
        connected(server, "bob") as (bob, _),
    ):
        alice_sub, alice_events = new_subscription(alice, channel)
        bob_sub, bob_events = new_subscription(bob, channel)
        for sub, sub_events in ((alice_sub, alice_events), (bob_sub, bob_events)):
            await sub.subscribe()
            await sub_events.wait_for("subscribed")

        await alice_sub.publish({"text": "hi"})
        for sub_events in (alice_events, bob_events):
            pub = (await sub_events.wait_for("publication")).pub
            assert pub.data == {"text": "hi"}
            assert pub.info is not None
            assert (pub.info.user, pub.info.client) == ("alice", alice.client_id)
            assert pub.offset >= 1

        # Still subscribers only: a channel alice is not in is refused.
        with pytest.raises(ReplyError) as refused:
            await alice.publish("task:elsewhere", {"text": "no"})
        assert refused.value.code == codes.PERMISSION_DENIED.code


# fossil delta ----------------------------------------------------------------------


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "no-delta"])
async def test_growing_message_with_and_without_fossil_delta(
    signing_keys: tuple[str, str], delta: bool
) -> None:
    async with (
        run_server(signing_keys, namespaces=with_quest_delta()) as server,
        connected(server, "alice") as (client, _),
    ):
        options = {"delta": DeltaType.FOSSIL} if delta else {}
        sub, sub_events = new_subscription(client, "quest:q1", **options)
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        events = [content_event("q1", step) for step in range(1, 61)]
        # Some alone, some in a batch (several pushes in one frame).
        for event in events[:20]:
            await broadcast_ok(server, event)
        await broadcast_ok(server, events[20:])

        await sub_events.wait_for("publication", count=len(events))
        pubs = [c.pub for c in sub_events.named("publication")]
        assert [p.data["content"] for p in pubs] == [e["payload"]["content"] for e in events]
        assert [p.data["delta"] for p in pubs] == [e["payload"]["delta"] for e in events]
        # In full after the subscribe, then every one a delta against the one before.
        assert [p.delta for p in pubs] == [False] + [delta] * (len(events) - 1)


async def test_delta_not_allowed_by_the_namespace_sends_full_data(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, _):
        sub, sub_events = new_subscription(client, "quest:q2", delta=DeltaType.FOSSIL)
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        await broadcast_ok(server, [content_event("q2", step) for step in range(1, 6)])
        await sub_events.wait_for("publication", count=5)
        pubs = [c.pub for c in sub_events.named("publication")]
        assert not any(p.delta for p in pubs)
        assert pubs[-1].data["content"] == content_event("q2", 5)["payload"]["content"]


async def test_delta_recovery_sends_a_delta_chain(signing_keys: tuple[str, str]) -> None:
    async with (
        run_server(signing_keys, namespaces=with_quest_delta()) as server,
        # Back after 1 s: the ten publications made while away are surely all stored.
        connected(server, "alice", min_reconnect_delay=1.0) as (client, events),
    ):
        sub, sub_events = new_subscription(client, "quest:q3", delta=DeltaType.FOSSIL)
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        stream = [content_event("q3", step) for step in range(1, 31)]
        await broadcast_ok(server, stream[:10])
        await sub_events.wait_for("publication", count=10)

        (session,) = sessions_of(server, "alice")
        cut_off(session, "server closes 3011")
        await broadcast_ok(server, stream[10:20])  # while the client is away
        again = await sub_events.wait_for("subscribed", count=2)
        assert again.was_recovering and again.recovered
        await sub_events.wait_for("publication", count=20)
        await broadcast_ok(server, stream[20:])
        await sub_events.wait_for("publication", count=30)

        pubs = [c.pub for c in sub_events.named("publication")]
        assert [p.data["content"] for p in pubs] == [e["payload"]["content"] for e in stream]
        # Recovered: the first in full, the rest deltas; live ones go on as deltas.
        assert [p.delta for p in pubs[10:]] == [False] + [True] * 19
        assert len(events.named("connected")) == 2


# Centrifugo's channel conventions ---------------------------------------------------


async def test_centrifugo_personal_and_user_limited_channels(
    signing_keys: tuple[str, str],
) -> None:
    async with (
        run_server(
            signing_keys,
            namespaces=centrifugo_conventions(),
            user_subscribe_to_personal=True,
            user_personal_channel_namespace="personal",
        ) as server,
        connected(server, "42") as (client, events),
    ):
        # Both personal channels, server-side: Centrifugo's shape beside today's.
        for channel in ("user:42", "personal:#42"):
            await events.wait_for("subscribed", lambda c, ch=channel: c.channel == ch)
        await publish_api(server, "personal:#42", {"hello": 42})
        pub = await events.wait_for("publication", lambda c: c.channel == "personal:#42")
        assert pub.pub.data == {"hello": 42}

        dialog, dialog_events = new_subscription(client, "dialog#42,43")
        await dialog.subscribe()
        await dialog_events.wait_for("subscribed")
        await publish_api(server, "dialog#42,43", {"text": "hi"})
        assert (await dialog_events.wait_for("publication")).pub.data == {"text": "hi"}

        for channel in ("dialog#43,44", "#43", "personal:#43"):
            sub, sub_events = new_subscription(client, channel)
            await sub.subscribe()
            denied = await sub_events.wait_for("unsubscribed")
            assert denied.code == codes.PERMISSION_DENIED.code, channel
        assert client.state is ClientState.CONNECTED


async def test_personal_channel_recovers_missed_publications_through_connect(
    server: RunningServer,
) -> None:
    # Back after 1 s: what is published while away is stored before the reconnect.
    async with connected(server, "alice", min_reconnect_delay=1.0) as (_client, events):
        await events.wait_for("subscribed", lambda c: c.channel == "user:alice")
        approval = {"type": "approval.required", "payload": {"user_id": "alice"}}
        await broadcast_ok(
            server, {**approval, "payload": {"user_id": "alice", "approval_id": "a0"}}
        )
        await events.wait_for("publication", lambda c: c.channel == "user:alice")

        (session,) = sessions_of(server, "alice")
        cut_off(session, "server closes 3011")
        missed = [
            {**approval, "payload": {"user_id": "alice", "approval_id": f"a{n}"}}
            for n in range(1, 4)
        ]
        await broadcast_ok(server, missed)
        again = await events.wait_for("subscribed", lambda c: c.channel == "user:alice", count=2)
        assert again.was_recovering and again.recovered
        await events.wait_for("publication", lambda c: c.channel == "user:alice", count=4)
        got = [c.pub.data["approval_id"] for c in events.named("publication")]
        assert got == ["a0", "a1", "a2", "a3"]
