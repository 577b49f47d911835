"""Centrifugo's server HTTP API, driven by the official `cent` SDK (and raw HTTP where
the SDK cannot express a case), against the real hypercorn server. Each test checks
what the backend sees in the API answers and what connected SDK clients see.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    Disconnect,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
    SubscribeRequest,
    UnsubscribeRequest,
)
from cent.exceptions import CentApiResponseError, CentUnauthorizedError
from centrifuge import Client  # type: ignore[import-untyped]

from shim import __version__
from shim.core.config import Settings
from tests.conftest import API_KEY, RunningServer, eventually, run_server, sessions_of
from tests.jsclient import JsClient
from tests.legacyclient import legacy_client, probe_event, probe_matcher, settle
from tests.pyclient import (
    CODECS,
    ClientEvents,
    SubEvents,
    new_client,
    new_subscription,
    use_codec,
)


@pytest.fixture(autouse=True, params=CODECS)
def codec(request: pytest.FixtureRequest) -> Iterator[str]:
    """The SDKs in these tests speak JSON, then Protobuf."""
    with use_codec(request.param):
        yield request.param


@contextlib.asynccontextmanager
async def cent_client(server: RunningServer, key: str = API_KEY) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(api_url=f"{server.url}/api", api_key=key)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def connected(server: RunningServer, user: str) -> AsyncIterator[tuple[Client, ClientEvents]]:
    client, events = new_client(server.ws_url, server.token(user))
    await client.connect()
    try:
        await events.wait_for("connected", timeout=5)
        yield client, events
    finally:
        await client.disconnect()


async def subscribed(client: Client, channel: str) -> SubEvents:
    sub, events = new_subscription(client, channel)
    await sub.subscribe()
    await events.wait_for("subscribed", timeout=5)
    return events


async def api_post(server: RunningServer, method: str, body: Any, **headers: str) -> Any:
    headers = headers or {"X-API-Key": API_KEY}
    return await server.http.post(f"/api/{method}", json=body, headers=headers)


# --- publishing ------------------------------------------------------------------------


async def test_publish_reaches_subscriber_with_offset_and_epoch(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, _), cent_client(server) as api:
        events = await subscribed(client, "task:pub")
        first = await api.publish(PublishRequest(channel="task:pub", data={"n": 1}))
        second = await api.publish(PublishRequest(channel="task:pub", data=["any", 2, None]))
        assert first.offset >= 1 and first.epoch
        assert (second.offset, second.epoch) == (first.offset + 1, first.epoch)

        pubs = [await events.wait_for("publication", count=n) for n in (1, 2)]
        assert [p.pub.data for p in pubs] == [{"n": 1}, ["any", 2, None]]
        assert [p.pub.offset for p in pubs] == [first.offset, second.offset]
        # The server API publishes as nobody: no client info on the publication.
        assert pubs[0].pub.info is None


async def test_publish_errors(server: RunningServer) -> None:
    async with cent_client(server) as api:
        with pytest.raises(CentApiResponseError) as unknown:
            await api.publish(PublishRequest(channel="nosuch:1", data={}))
        assert unknown.value.code == 102
        with pytest.raises(CentApiResponseError) as empty:
            await api.publish(PublishRequest(channel="", data={}))
        assert empty.value.code == 107
        with pytest.raises(CentApiResponseError) as tags:
            await api.publish(PublishRequest(channel="task:t", data={}, tags={"k": "v"}))
        assert tags.value.code == 108


async def test_skip_history_and_idempotency_key(server: RunningServer) -> None:
    async with cent_client(server) as api:
        kept = await api.publish(PublishRequest(channel="task:idem", data={"n": 1}))
        skipped = await api.publish(
            PublishRequest(channel="task:idem", data={"n": 2}, skip_history=True)
        )
        assert skipped.offset == 0
        once = await api.publish(
            PublishRequest(channel="task:idem", data={"n": 3}, idempotency_key="k1")
        )
        again = await api.publish(
            PublishRequest(channel="task:idem", data={"n": 3}, idempotency_key="k1")
        )
        assert once.offset == kept.offset + 1
        assert (again.offset, again.epoch) == (once.offset, once.epoch)
        history = await api.history(HistoryRequest(channel="task:idem", limit=-1))
        assert [p.data for p in history.publications] == [{"n": 1}, {"n": 3}]


async def test_broadcast_to_three_channels(server: RunningServer) -> None:
    channels = ["task:b1", "task:b2", "project:b3"]
    async with connected(server, "alice") as (client, _), cent_client(server) as api:
        subs = [await subscribed(client, channel) for channel in channels]
        result = await api.broadcast(BroadcastRequest(channels=channels, data={"hi": "all"}))
        assert len(result.responses) == 3
        for response in result.responses:
            assert response.error is None and response.result is not None
            assert response.result.offset == 1 and response.result.epoch
        for events in subs:
            pub = await events.wait_for("publication")
            assert pub.pub.data == {"hi": "all"}

        mixed = await api.broadcast(BroadcastRequest(channels=["task:b1", "nosuch:x"], data=1))
        ok, failed = mixed.responses
        assert ok.result is not None and ok.result.offset == 2
        assert failed.error is not None and failed.error.code == 102


async def test_api_publications_do_not_reach_legacy_clients(server: RunningServer) -> None:
    """The server API publishes raw data, not legacy events: legacy clients skip it."""
    async with (
        legacy_client(server.port, server.token("carol")) as legacy,
        cent_client(server) as api,
    ):
        await settle(server.broadcast, [legacy], "task:L1")
        await api.publish(PublishRequest(channel="global", data={"api": True}))
        await api.publish(PublishRequest(channel="task:L1", data={"api": True}))
        await server.broadcast(probe_event("task:L1", 424242))
        frame = await legacy.next_frame()
        assert probe_matcher(424242)(frame), frame.raw


# --- presence, history, channels, info -----------------------------------------------


async def test_presence_and_presence_stats(server: RunningServer) -> None:
    async with (
        connected(server, "alice") as (alice, _),
        connected(server, "bob") as (bob, _),
        cent_client(server) as api,
    ):
        await subscribed(alice, "task:pres")
        await subscribed(bob, "task:pres")

        async def both_present() -> bool:
            stats = await api.presence_stats(PresenceStatsRequest(channel="task:pres"))
            return stats.num_clients == 2

        await eventually(both_present)
        stats = await api.presence_stats(PresenceStatsRequest(channel="task:pres"))
        assert (stats.num_clients, stats.num_users) == (2, 2)
        presence = await api.presence(PresenceRequest(channel="task:pres"))
        assert {cid: info.user for cid, info in presence.presence.items()} == {
            alice.client_id: "alice",
            bob.client_id: "bob",
        }
        assert all(cid == info.client for cid, info in presence.presence.items())


async def test_presence_and_history_not_available_when_disabled(
    signing_keys: tuple[str, str],
) -> None:
    namespaces = dict(Settings().namespaces)
    namespaces["task"] = replace(namespaces["task"], presence=False, history_size=0)
    async with (
        run_server(signing_keys, namespaces=namespaces) as server,
        cent_client(server) as api,
    ):
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: api.presence(PresenceRequest(channel="task:x")),
            lambda: api.presence_stats(PresenceStatsRequest(channel="task:x")),
            lambda: api.history(HistoryRequest(channel="task:x", limit=10)),
            lambda: api.history_remove(HistoryRemoveRequest(channel="task:x")),
        ]
        for call in calls:
            with pytest.raises(CentApiResponseError) as exc:
                await call()
            assert exc.value.code == 108
        # Other namespaces keep both.
        await api.presence(PresenceRequest(channel="quest:x"))
        await api.history(HistoryRequest(channel="quest:x", limit=10))


async def test_history_queries_and_history_remove(server: RunningServer) -> None:
    async with cent_client(server) as api:
        for n in range(1, 4):
            await api.publish(PublishRequest(channel="task:hist", data={"n": n}))
        top = await api.history(HistoryRequest(channel="task:hist"))
        assert top.publications == [] and top.offset == 3 and top.epoch

        every = await api.history(HistoryRequest(channel="task:hist", limit=-1))
        assert [(p.offset, p.data) for p in every.publications] == [
            (1, {"n": 1}),
            (2, {"n": 2}),
            (3, {"n": 3}),
        ]
        two = await api.history(HistoryRequest(channel="task:hist", limit=2))
        assert [p.offset for p in two.publications] == [1, 2]
        since = await api.history(
            HistoryRequest(
                channel="task:hist", limit=-1, since=StreamPosition(offset=1, epoch=top.epoch)
            )
        )
        assert [p.offset for p in since.publications] == [2, 3]
        newest = await api.history(HistoryRequest(channel="task:hist", limit=1, reverse=True))
        assert [p.offset for p in newest.publications] == [3]

        with pytest.raises(CentApiResponseError) as stale:
            await api.history(
                HistoryRequest(
                    channel="task:hist", limit=-1, since=StreamPosition(offset=1, epoch="old")
                )
            )
        assert stale.value.code == 112

        await api.history_remove(HistoryRemoveRequest(channel="task:hist"))
        after = await api.history(HistoryRequest(channel="task:hist", limit=-1))
        assert after.publications == [] and after.offset == 0
        assert after.epoch and after.epoch != top.epoch


async def test_channels_lists_this_nodes_channels(server: RunningServer) -> None:
    async with (
        connected(server, "alice") as (alice, _),
        connected(server, "bob") as (bob, _),
        cent_client(server) as api,
    ):
        await subscribed(alice, "task:c1")
        await subscribed(bob, "task:c1")
        await subscribed(bob, "quest:c2")
        found = (await api.channels(ChannelsRequest())).channels
        counts = {name: info.num_clients for name, info in found.items()}
        assert counts == {"user:alice": 1, "user:bob": 1, "task:c1": 2, "quest:c2": 1}

        tasks = (await api.channels(ChannelsRequest(pattern="task:*"))).channels
        assert {name: info.num_clients for name, info in tasks.items()} == {"task:c1": 2}


async def test_info_describes_the_node(server: RunningServer) -> None:
    async with (
        connected(server, "alice") as (alice, _),
        connected(server, "alice"),
        cent_client(server) as api,
    ):
        await subscribed(alice, "task:i")
        info = await api.info(InfoRequest())
        (node,) = info.nodes
        assert node.name == server.runtime.node.name and node.uid
        assert node.version == __version__
        assert (node.num_clients, node.num_users) == (2, 1)
        # user:alice (two connections) and task:i (one).
        assert (node.num_channels, node.num_subs) == (2, 3)
        assert node.uptime >= 0


# --- acting on users' connections --------------------------------------------------------


async def test_disconnect_uses_force_disconnect_by_default(server: RunningServer) -> None:
    async with connected(server, "alice") as (_, events), cent_client(server) as api:
        await api.disconnect(DisconnectRequest(user="alice"))
        ctx = await events.wait_for("disconnected", timeout=5)
        assert (ctx.code, ctx.reason) == (3503, "force disconnect")


async def test_disconnect_with_custom_code_and_one_client(server: RunningServer) -> None:
    async with (
        connected(server, "alice") as (first, first_events),
        connected(server, "alice") as (_, second_events),
        cent_client(server) as api,
    ):
        await api.disconnect(
            DisconnectRequest(
                user="alice",
                client=first.client_id,
                disconnect=Disconnect(code=4501, reason="go away"),
            )
        )
        ctx = await first_events.wait_for("disconnected", timeout=5)
        assert (ctx.code, ctx.reason) == (4501, "go away")
        await asyncio.sleep(0.2)
        assert not second_events.named("disconnected")
        assert len(sessions_of(server, "alice")) == 1

        with pytest.raises(CentApiResponseError) as bad:
            await api.disconnect(DisconnectRequest(user="alice", disconnect=Disconnect(code=1)))
        assert bad.value.code == 107
        assert len(sessions_of(server, "alice")) == 1


async def test_unsubscribe_sends_server_unsubscribe(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, _), cent_client(server) as api:
        events = await subscribed(client, "task:u")
        await api.unsubscribe(UnsubscribeRequest(user="alice", channel="task:u"))
        ctx = await events.wait_for("unsubscribed", timeout=5)
        assert ctx.code == 2000
        (session,) = sessions_of(server, "alice")
        assert "task:u" not in session.subscriptions
        assert server.runtime.node.subscriber_count("task:u") == 0

        await api.publish(PublishRequest(channel="task:u", data={"late": True}))
        await asyncio.sleep(0.2)
        assert not events.named("publication")


@pytest.mark.js
async def test_subscribe_adds_a_server_side_subscription(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js, cent_client(server) as api:
        await js.call("connect")
        await js.wait_event("connected", timeout=5)
        await api.publish(PublishRequest(channel="task:srv", data={"before": True}))

        await api.subscribe(SubscribeRequest(user="alice", channel="task:srv", data={"hi": 1}))
        sub = await js.wait_event(
            lambda e: e["event"] == "subscribed" and e["channel"] == "task:srv", timeout=5
        )
        assert sub["data"] == {"hi": 1}
        assert sub["recoverable"] and sub["positioned"]
        assert sub["streamPosition"]["offset"] == 1

        result = await api.publish(PublishRequest(channel="task:srv", data={"after": True}))
        pub = await js.wait_event(
            lambda e: e["event"] == "publication" and e["channel"] == "task:srv", timeout=5
        )
        assert pub["data"] == {"after": True} and pub["offset"] == result.offset

        # centrifuge-js reports a server-side unsubscribe by channel only (no code).
        await api.unsubscribe(UnsubscribeRequest(user="alice", channel="task:srv"))
        await js.wait_event(
            lambda e: e["event"] == "unsubscribed" and e["channel"] == "task:srv", timeout=5
        )
        mark = js.mark()
        await api.publish(PublishRequest(channel="task:srv", data={"gone": True}))
        await js.expect_no_event("publication", within=0.3, since=mark)


async def test_subscribe_registers_on_every_connection_of_the_user(server: RunningServer) -> None:
    async with (
        connected(server, "alice"),
        connected(server, "alice"),
        cent_client(server) as api,
    ):
        await api.subscribe(SubscribeRequest(user="alice", channel="task:both"))
        sessions = sessions_of(server, "alice")
        assert len(sessions) == 2
        for session in sessions:
            assert session.subscriptions["task:both"].server_side
        assert server.runtime.node.subscriber_count("task:both") == 2
        with pytest.raises(CentApiResponseError) as unknown:
            await api.subscribe(SubscribeRequest(user="alice", channel="nosuch:1"))
        assert unknown.value.code == 102


# --- batch, auth, malformed requests -------------------------------------------------


async def test_batch_runs_commands_in_order(server: RunningServer) -> None:
    async with connected(server, "alice") as (client, _), cent_client(server) as api:
        events = await subscribed(client, "task:batch")
        for parallel in (False, True):
            result = await api.batch(
                BatchRequest(
                    requests=[
                        PublishRequest(channel="task:batch", data={"p": parallel}),
                        BroadcastRequest(channels=["task:batch", "quest:batch"], data={"b": 1}),
                        PresenceStatsRequest(channel="task:batch"),
                    ],
                    parallel=parallel,
                )
            )
            publish, broadcast, stats = result.replies
            assert publish.offset >= 1 and publish.epoch  # type: ignore[attr-defined]
            assert len(broadcast.responses) == 2  # type: ignore[attr-defined]
            assert stats.num_clients == 1  # type: ignore[attr-defined]
        await events.wait_for("publication", count=4)

    resp = await api_post(
        server,
        "batch",
        {"commands": [{"info": {}}, {"frobnicate": {}}, {"publish": {"channel": "nosuch:1"}}]},
    )
    assert resp.status_code == 200
    replies = resp.json()["replies"]
    assert replies[0]["info"]["nodes"][0]["name"] == server.runtime.node.name
    assert replies[1] == {"error": {"code": 104, "message": "not found"}}
    assert replies[2]["error"]["code"] == 107  # data is required


async def test_bad_key_is_refused(server: RunningServer) -> None:
    async with cent_client(server, key="wrong") as api:
        with pytest.raises(CentUnauthorizedError):
            await api.publish(PublishRequest(channel="task:k", data={}))
    async with cent_client(server, key="") as api:
        with pytest.raises(CentUnauthorizedError):
            await api.info(InfoRequest())


async def test_http_shapes(server: RunningServer) -> None:
    # Centrifugo's other header form.
    ok = await api_post(server, "info", {}, Authorization=f"apikey {API_KEY}")
    assert ok.status_code == 200 and ok.json()["result"]["nodes"]

    unknown = await api_post(server, "frobnicate", {})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"code": 104, "message": "not found"}}

    for body in (b"{not json", b"[1, 2]"):
        resp = await server.http.post("/api/publish", content=body, headers={"X-API-Key": API_KEY})
        assert resp.status_code == 400, body
    wrong_type = await api_post(server, "publish", {"channel": 5, "data": {}})
    assert wrong_type.status_code == 400

    error = await api_post(server, "history", {"channel": "nosuch:1"})
    assert error.status_code == 200
    assert error.json() == {"error": {"code": 102, "message": "unknown channel"}}

    get = await server.http.get("/api/publish", headers={"X-API-Key": API_KEY})
    assert get.status_code == 405
