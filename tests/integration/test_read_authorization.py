"""Every read authorized the same way on both protocols (issue #10, items 1-3),
against the real hypercorn server: legacy clients as the browser hook behaves
(tests/legacyclient.py), Centrifuge clients through the official SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import ADMIN_KEY, RunningServer, run_server
from tests.conventions import centrifugo_conventions
from tests.integration.test_channel_policy import DecidingApp
from tests.integration.test_js_sdk import connect as js_connect
from tests.integration.test_js_sdk import on as js_on
from tests.integration.test_js_sdk import subscribe as js_subscribe
from tests.integration.test_multinode import publish_through
from tests.jsclient import JsClient
from tests.legacyclient import Frame, LegacyClient, legacy_client, open_legacy, settle
from tests.multinode import start_nodes
from tests.pyclient import new_client, new_subscription
from tests.redis_server import RedisServer

Keys = tuple[str, str]
INVALID = b'{"message":"invalid token"}\n'
# How long a socket must stay quiet to count as "nothing arrived".
QUIET = 0.5


def anonymous_token(server: RunningServer, **extra: Any) -> str:
    """Validly signed, with neither `sub` nor `user_id`."""
    return server.token("", **extra)


def subscribe(kind: str, ident: str) -> str:
    return orjson.dumps({"action": "subscribe", f"{kind}_id": ident}).decode()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def numbered(n: int, event_type: str, **ids: str) -> dict[str, Any]:
    """An event carrying `n`, routed by `ids` (task_id, project_id, quest_id, user_id)."""
    return {"type": event_type, "payload": {**ids, "n": n}}


def numbers(frames: list[Frame]) -> list[int]:
    return [frame.message["payload"]["n"] for frame in frames]


async def received_until(client: LegacyClient, last: int) -> list[int]:
    """The numbers of the events the client gets up to and including `last`."""
    got: list[int] = []
    while not got or got[-1] != last:
        got.append((await client.next_frame()).message["payload"]["n"])
    return got


def publisher(server: RunningServer) -> Any:
    async def publish(body: Any) -> None:
        response = await server.broadcast(body)
        assert response.status_code == 200, response.text

    return publish


# --- item 2: tokens without a user id -----------------------------------------------------


async def test_token_without_user_id_is_refused_on_both_protocols(server: RunningServer) -> None:
    token = anonymous_token(server)
    # Legacy: the hub's 401 before any upgrade, as for any unusable token.
    with pytest.raises(InvalidStatus) as info:
        await open_legacy(server.port, token)
    assert (info.value.response.status_code, info.value.response.body) == (401, INVALID)
    # The same for the token in a Bearer header, and for the realtime config.
    with pytest.raises(InvalidStatus) as info:
        await open_legacy(server.port, bearer=token)
    assert info.value.response.status_code == 401
    config = await server.http.get(
        "/api/v1/realtime/config", headers={"Authorization": f"Bearer {token}"}
    )
    assert (config.status_code, config.json()) == (401, {"error": "token has no user id"})
    # The channel protocol's refusal of the same token (the official SDK).
    client, events = new_client(server.ws_url, token)
    await client.connect()
    try:
        disconnected = await events.wait_for("disconnected", timeout=5)
        assert (disconnected.code, disconnected.reason) == (101, "unauthorized")
        assert not events.named("connected")
    finally:
        await client.disconnect()
    assert server.runtime.connection_counts() == {"legacy": 0, "channels": 0}


async def test_token_without_user_id_is_served_when_anonymous_clients_are_allowed(
    signing_keys: Keys,
) -> None:
    async with run_server(signing_keys, client_anonymous=True) as server:
        token = anonymous_token(server)
        config = await server.http.get("/api/v1/realtime/config", params={"token": token})
        assert config.status_code == 200 and config.json()["user"] == ""
        # Served, and authorized like an anonymous Centrifuge client: channel_policy
        # "any" grants users, so it reads nothing (a user beside it reads everything).
        async with (
            legacy_client(server.port, token) as anonymous,
            legacy_client(server.port, server.token("alice")) as alice,
        ):
            await settle(publisher(server), [alice], "anon")
            await anonymous.expect_silence(QUIET)
            assert not anonymous.closed
            await anonymous.send(subscribe("task", "anon"))
            await until(lambda: server.runtime.legacy_stats.refused_subscriptions == 1)


async def test_time_claims_as_strings_are_refused_on_the_legacy_path(
    server: RunningServer,
) -> None:
    later = str(int(time.time()) + 3600)
    for claim in ("exp", "nbf", "iat"):
        token = server.token("user-1", ttl=None, **{claim: later})
        with pytest.raises(InvalidStatus) as info:
            await open_legacy(server.port, token)
        assert (info.value.response.status_code, info.value.response.body) == (401, INVALID)


# --- item 1: the legacy protocol goes through the channel authorizer ----------------------


async def test_claims_policy_decides_legacy_reads_as_it_decides_subscriptions(
    signing_keys: Keys,
) -> None:
    async with run_server(signing_keys, channel_policy="claims") as server:
        token = server.token("alice", channels=["task:open"], project_ids=["p1"])
        stats = server.runtime.legacy_stats
        node = server.runtime.node
        async with (
            legacy_client(
                server.port,
                token,
                first_commands=[subscribe("task", "secret"), subscribe("task", "open")],
            ) as named,
            legacy_client(server.port, token) as star,
        ):
            await until(lambda: node.subscriber_count("task:open") == 1)
            await until(lambda: node.subscriber_count(server.settings.global_channel) == 1)
            assert stats.refused_subscriptions == 1
            assert node.subscriber_count("task:secret") == 0
            for event in [
                numbered(0, "task.updated", task_id="secret"),
                numbered(1, "task.updated", task_id="open"),
                numbered(2, "project.updated", project_id="p1"),
                numbered(3, "quest.updated", quest_id="q"),
                # task:secret and project:p1: the project grant lets it through.
                numbered(4, "task.updated", task_id="secret", project_id="p1"),
                numbered(5, "project.updated", project_id="p2"),
                numbered(6, "task.updated", task_id="open"),
            ]:
                await publisher(server)(event)
            assert await received_until(named, 6) == [1, 6]
            assert await received_until(star, 6) == [1, 2, 4, 6]
            await named.expect_silence(QUIET)
            await star.expect_silence(QUIET)
            assert stats.unreadable_events == 3  # 0, 3 and 5 to the `*` client
        report = await server.http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": ADMIN_KEY})
        legacy = report.json()["legacy"]
        assert (legacy["refused_subscriptions"], legacy["unreadable_events"]) == (1, 3)
        metrics = (await server.http.get("/metrics")).text
        assert "dex_shim_legacy_refused_subscriptions_total 1.0" in metrics
        assert "dex_shim_legacy_unreadable_events_total 3.0" in metrics

        # The channel protocol, same token, same answers (the official SDK); the
        # token's exact channel is a server-side subscription there.
        client, events = new_client(server.ws_url, token)
        await client.connect()
        await events.wait_for("connected")
        await events.wait_for("subscribed", lambda ctx: ctx.channel == "task:open")
        outcomes: dict[str, object] = {}
        for channel in ("task:secret", "project:p1", "global"):
            sub, sub_events = new_subscription(client, channel)
            await sub.subscribe()
            async with asyncio.timeout(5):
                while not sub_events.named("subscribed") and not sub_events.named("unsubscribed"):
                    await asyncio.sleep(0.02)
            refusals = sub_events.named("unsubscribed")
            outcomes[channel] = refusals[0].code if refusals else "subscribed"
        await client.disconnect()
        assert outcomes == {"task:secret": 103, "project:p1": "subscribed", "global": 103}


async def test_a_token_granting_the_global_channel_reads_all_of_it_on_legacy_star(
    signing_keys: Keys,
) -> None:
    async with run_server(signing_keys, channel_policy="claims") as server:
        token = server.token("ops", channels=["global"])
        async with legacy_client(server.port, token) as star:
            await until(lambda: server.runtime.node.subscriber_count("global") == 1)
            await publisher(server)(
                [
                    numbered(0, "task.updated", task_id="a"),
                    numbered(1, "quest.updated", quest_id="q"),
                    numbered(2, "project.updated", project_id="p"),
                ]
            )
            assert await received_until(star, 2) == [0, 1, 2]


async def test_http_policy_is_asked_once_per_channel_and_order_is_kept(
    signing_keys: Keys,
) -> None:
    async with (
        DecidingApp() as app,
        run_server(signing_keys, channel_policy="http", channel_policy_url=app.url) as server,
    ):
        node = server.runtime.node
        token = server.token("alice")
        async with (
            legacy_client(server.port, token) as star,
            legacy_client(
                server.port,
                token,
                first_commands=[subscribe("task", "ok-1"), subscribe("task", "secret")],
            ) as named,
        ):
            await until(lambda: node.subscriber_count("task:ok-1") == 1)
            await until(lambda: node.subscriber_count("global") == 1)
            # Allowed and refused events interleaved, published at once: the `*`
            # client's first events wait for the application's answers, later ones
            # queue behind them.
            await publisher(server)(
                [
                    numbered(n, "task.updated", task_id="ok-1" if n % 2 == 0 else "secret")
                    for n in range(40)
                ]
            )
            expected = list(range(0, 40, 2))
            assert numbers(await star.take(len(expected))) == expected
            assert numbers(await named.take(len(expected))) == expected
            await star.expect_silence(QUIET)
            await named.expect_silence(QUIET)
        asked = sorted(ask["channel"] for ask in app.asked)
        # Per channel, not per event: 40 events cost at most these three questions
        # (the two subscriptions', shared by the `*` client through the cache, and
        # the global channel's, for the refused task).
        assert asked == ["global", "task:ok-1", "task:secret"]
        assert server.runtime.legacy_stats.unreadable_events == 20


# --- item 3: personal events do not leak through `global` ------------------------------


def approval(n: int, user: str) -> dict[str, Any]:
    return {"type": "approval.requested", "payload": {"user_id": user, "n": n}}


async def sdk_reader(server: RunningServer, user: str) -> tuple[Any, Any, Any]:
    """An SDK client of `user` subscribed to the global channel (its personal channel
    is a server-side subscription): (client, its events, the global subscription's)."""
    client, events = new_client(server.ws_url, server.token(user))
    await client.connect()
    await events.wait_for("connected")
    sub, sub_events = new_subscription(client, server.settings.global_channel)
    await sub.subscribe()
    await sub_events.wait_for("subscribed")
    return client, events, sub_events


async def test_personal_events_reach_only_their_user_on_both_protocols(
    server: RunningServer,
) -> None:
    bob_sdk, bob_events, bob_global = await sdk_reader(server, "bob")
    alice_sdk, _alice_events, alice_global = await sdk_reader(server, "alice")
    try:
        async with (
            legacy_client(server.port, server.token("bob")) as bob,
            legacy_client(server.port, server.token("alice")) as alice,
        ):
            await settle(publisher(server), [bob, alice], "personal")
            response = await server.broadcast(
                [approval(1, "bob"), numbered(2, "task.updated", task_id="t")]
            )
            assert [r["channels"] for r in response.json()["results"]] == [
                ["user:bob"],
                ["task:t", "global"],
            ]
            # Legacy `*`: bob gets his approval once, alice never sees it.
            assert await received_until(bob, 2) == [1, 2]
            assert await received_until(alice, 2) == [2]
            await bob.expect_silence(QUIET)
            await alice.expect_silence(QUIET)
        # Channels: the approval is on user:bob only, not on anyone's `global`.
        await bob_events.wait_for("publication", lambda ctx: ctx.channel == "user:bob")
        await bob_global.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 2)
        await alice_global.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 2)
        assert [ctx.pub.data["n"] for ctx in bob_events.named("publication")] == [1]
        for recorder in (bob_global, alice_global):
            assert [
                ctx.pub.data.get("n")
                for ctx in recorder.named("publication")
                if "n" in ctx.pub.data
            ] == [2]
    finally:
        await bob_sdk.disconnect()
        await alice_sdk.disconnect()


async def test_compatibility_setting_gives_legacy_star_every_approval_and_channels_none(
    signing_keys: Keys,
) -> None:
    async with run_server(signing_keys, legacy_personal_events_to_all=True) as server:
        alice_sdk, _events, alice_global = await sdk_reader(server, "alice")
        try:
            async with (
                legacy_client(server.port, server.token("bob")) as bob,
                legacy_client(server.port, server.token("alice")) as alice,
            ):
                await settle(publisher(server), [bob, alice], "compat")
                await publisher(server)(
                    [approval(1, "bob"), numbered(2, "task.updated", task_id="t")]
                )
                # The Go hub's behaviour for legacy `*`: everyone, exactly once.
                assert await received_until(bob, 2) == [1, 2]
                assert await received_until(alice, 2) == [1, 2]
                await bob.expect_silence(QUIET)
                await alice.expect_silence(QUIET)
            await alice_global.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 2)
            assert all(ctx.pub.data.get("n") != 1 for ctx in alice_global.named("publication"))
            # The fan-out channel is no channel a client may subscribe to.
            sub, sub_events = new_subscription(alice_sdk, "$legacy:personal")
            await sub.subscribe()
            refused = await sub_events.wait_for("unsubscribed")
            assert refused.code == 102  # its namespace is never configured
        finally:
            await alice_sdk.disconnect()


async def test_compatibility_setting_does_not_override_the_claims_policy(
    signing_keys: Keys,
) -> None:
    async with run_server(
        signing_keys, legacy_personal_events_to_all=True, channel_policy="claims"
    ) as server:
        grants = {"channels": ["task:*"]}
        async with (
            legacy_client(server.port, server.token("bob", **grants)) as bob,
            legacy_client(server.port, server.token("alice", **grants)) as alice,
        ):
            await settle(publisher(server), [bob, alice], "claims-compat")
            await publisher(server)([approval(1, "bob"), numbered(2, "task.updated", task_id="t")])
            assert await received_until(bob, 2) == [1, 2]
            assert await received_until(alice, 2) == [2]


async def test_centrifuge_js_reads_its_own_approval_but_not_anothers_on_global(
    server: RunningServer,
) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await js_connect(js)
        await js.wait_event(js_on("user:alice", "subscribed"), timeout=5)
        await js_subscribe(js, "global")
        await publisher(server)(
            [approval(1, "bob"), approval(2, "alice"), numbered(3, "task.updated", task_id="t")]
        )
        await js.wait_event(
            lambda e: js_on("global", "sub.publication")(e) and e["data"].get("n") == 3,
            timeout=5,
        )
        own = await js.wait_event(js_on("user:alice", "publication"), timeout=5)
        assert own["data"]["n"] == 2
        on_global = js.find_events(js_on("global", "sub.publication"))
        assert [e["data"].get("n") for e in on_global if "n" in e["data"]] == [3]
        assert len(js.find_events(js_on("user:alice", "publication"))) == 1


def centrifugo_routes(personal: str) -> list[dict[str, Any]]:
    """A direct message to Centrifugo's personal channel of `to`, a chat on the
    user-limited channel of `a` and `b`, and a notice to both personal channels of `to`."""
    return [
        {"match": "dm.", "channels": [f"{personal}#{{to}}"]},
        {"match": "chat.", "channels": ["dialog#{a},{b}"]},
        {"match": "notice.", "channels": ["user:{to}", f"{personal}#{{to}}"]},
        {"match": "task.", "channels": ["task:{task_id}"]},
    ]


@pytest.mark.parametrize("namespace", ["", "personal"])
async def test_centrifugo_personal_and_user_limited_events_reach_only_their_users(
    signing_keys: Keys, namespace: str
) -> None:
    personal = f"{namespace}:" if namespace else ""
    namespaces = centrifugo_conventions()
    namespaces["dialog"] = namespaces[""]
    async with run_server(
        signing_keys,
        namespaces=namespaces,
        routes=centrifugo_routes(personal),
        user_subscribe_to_personal=True,
        user_personal_channel_namespace=namespace,
    ) as server:
        sdk42, events42, global42 = await sdk_reader(server, "42")
        sdk44, events44, global44 = await sdk_reader(server, "44")
        dialog, dialog_events = new_subscription(sdk42, "dialog#42,43")
        await dialog.subscribe()
        await dialog_events.wait_for("subscribed")
        try:
            async with (
                legacy_client(server.port, server.token("42")) as legacy42,
                legacy_client(server.port, server.token("43")) as legacy43,
                legacy_client(server.port, server.token("44")) as legacy44,
            ):
                readers = [legacy42, legacy43, legacy44]
                await settle(publisher(server), readers, "centrifugo")
                response = await server.broadcast(
                    [
                        {"type": "dm.sent", "payload": {"to": "42", "n": 1}},
                        {"type": "chat.said", "payload": {"a": "42", "b": "43", "n": 2}},
                        {"type": "notice.posted", "payload": {"to": "42", "n": 3}},
                        numbered(4, "task.updated", task_id="t"),
                    ]
                )
                assert [r["channels"] for r in response.json()["results"]] == [
                    [f"{personal}#42"],
                    ["dialog#42,43"],
                    ["user:42", f"{personal}#42"],
                    ["task:t", "global"],
                ]
                # Legacy `*`: 42 gets its personal events once each (the notice came
                # through two of its channels); nobody gets the chat (a legacy client
                # cannot name a user-limited channel); 43 and 44 get no one's events.
                assert await received_until(legacy42, 4) == [1, 3, 4]
                assert await received_until(legacy43, 4) == [4]
                assert await received_until(legacy44, 4) == [4]
                for reader in readers:
                    await reader.expect_silence(QUIET)
            # Channels: each event on the channels it was routed to, none on `global`.
            await global42.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 4)
            await global44.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 4)
            await dialog_events.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 2)
            await events42.wait_for("publication", lambda ctx: ctx.pub.data.get("n") == 3)
            got42 = sorted(
                (ctx.channel, ctx.pub.data["n"]) for ctx in events42.named("publication")
            )
            assert got42 == [(f"{personal}#42", 1), (f"{personal}#42", 3), ("user:42", 3)]
            assert not events44.named("publication")
            for recorder in (global42, global44):
                seen = [ctx.pub.data.get("n") for ctx in recorder.named("publication")]
                assert [n for n in seen if n is not None] == [4]
        finally:
            await sdk42.disconnect()
            await sdk44.disconnect()


# --- across nodes: the routed channels travel with each event through Redis --------------


async def test_reads_are_authorized_on_the_node_the_client_is_on() -> None:
    async with (
        RedisServer() as redis,
        start_nodes(2, [redis.url], settings={"channel_policy": "claims"}) as (a, b),
    ):
        token = a.token("alice", channels=["task:*"])
        async with legacy_client(a.port, token) as star:
            await settle(publish_through(b), [star], "task:settle")
            await publish_through(b)(
                [
                    numbered(1, "quest.updated", quest_id="q"),
                    approval(2, "bob"),
                    approval(3, "alice"),
                    numbered(4, "task.updated", task_id="t"),
                ]
            )
            # Ingested on B, read on A: the quest is not granted, bob's approval is
            # not alice's; her own approval and the task are.
            assert await received_until(star, 4) == [3, 4]
            await star.expect_silence(QUIET)
