"""The official centrifuge-js SDK, unmodified, against the real hypercorn server.

Each test drives the SDK through tests/js/driver.mjs and asserts what an application
using it would see: its events, call results and errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from shim.centrifuge import codes
from shim.centrifuge.session import CentrifugeSession
from shim.core.config import Settings
from tests.conftest import ADMIN_KEY, RunningServer, run_server, sessions_of
from tests.conventions import centrifugo_conventions, publish_api, with_quest_delta
from tests.jsclient import Event, JsClient, JsError
from tests.pyclient import CODECS, OUTAGES, cut_off, use_codec
from tests.streams import content_event

pytestmark = pytest.mark.js


@pytest.fixture(autouse=True, params=CODECS)
def codec(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with the SDK's JSON build and its protobuf build."""
    with use_codec(request.param):
        yield request.param


# Short SDK backoffs so reconnects and retries happen within a test's few seconds.
FAST = {"minReconnectDelay": 100, "maxReconnectDelay": 300}


def task_event(task_id: str, seq: int) -> dict[str, Any]:
    return {
        "type": "task.updated",
        "payload": {"task_id": task_id, "status": "running", "seq": seq},
    }


async def broadcast_ok(server: RunningServer, body: Any) -> None:
    resp = await server.broadcast(body)
    assert resp.status_code == 200, resp.text
    expected = len(body) if isinstance(body, list) else 1
    assert resp.json()["accepted"] == expected, resp.text


async def connect(js: JsClient) -> str:
    """Connect and return the client id the SDK was given."""
    await js.call("connect")
    connected = await js.wait_event("connected", timeout=5)
    client_id = connected["client"]
    assert isinstance(client_id, str) and client_id
    return client_id


async def subscribe(js: JsClient, channel: str, **options: Any) -> Event:
    """Subscribe client-side and return the SDK's `subscribed` context."""
    await js.call("newSubscription", channel=channel, options=options)
    await js.call("subscribe", channel=channel, wait=True, timeout=5000)
    return await js.wait_event(on(channel, "sub.subscribed"), timeout=5)


def on(channel: str, name: str) -> Callable[[Event], bool]:
    return lambda event: event["event"] == name and event["channel"] == channel


def publications(js: JsClient, channel: str) -> list[Event]:
    return js.find_events(on(channel, "sub.publication"))


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def session_of(server: RunningServer, client_id: str) -> CentrifugeSession:
    for session in server.runtime.node.sessions:
        if isinstance(session, CentrifugeSession) and session.client_id == client_id:
            return session
    raise LookupError(client_id)


def assert_contiguous(pubs: list[Event], first: int, last: int) -> None:
    assert [p["offset"] for p in pubs] == list(range(first, last + 1))
    assert [p["data"]["seq"] for p in pubs] == list(range(first, last + 1))


# 1 -----------------------------------------------------------------------------------


async def test_connect_gets_client_id_and_server_side_user_channel(
    server: RunningServer, codec: str
) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        client_id = await connect(js)
        assert len(client_id) == 36  # a UUID
        # The server speaks the wire the SDK build asked for (subprotocol negotiation).
        assert [s.wire.name for s in sessions_of(server, "alice")] == [codec]
        sub = await js.wait_event(on("user:alice", "subscribed"), timeout=5)
        # The namespace forces recovery: the SDK tracks the position of the personal channel.
        assert sub["recoverable"] is True and sub["positioned"] is True

        bob = {"type": "approval.required", "payload": {"user_id": "bob", "approval_id": "b1"}}
        alice = {"type": "approval.required", "payload": {"user_id": "alice", "approval_id": "a1"}}
        await broadcast_ok(server, [bob, alice])

        pub = await js.wait_event(on("user:alice", "publication"), timeout=5)
        assert pub["data"]["approval_id"] == "a1"  # bob's approval never reached alice
        assert pub["data"]["user_id"] == "alice"
        assert pub["data"]["type"] == "approval.required"
        assert isinstance(pub["data"]["timestamp"], str) and pub["data"]["timestamp"]
        assert pub["offset"] == 1
        assert not js.find_events(on("user:bob", "publication"))


# 2 -----------------------------------------------------------------------------------


async def test_fifty_broadcasts_arrive_in_order(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await connect(js)
        subscribed = await subscribe(js, "task:T")
        assert subscribed["streamPosition"]["offset"] == 0
        for seq in range(1, 51):
            await broadcast_ok(server, task_event("T", seq))
        await wait_until(lambda: len(publications(js, "task:T")) >= 50)
        pubs = publications(js, "task:T")
        assert_contiguous(pubs, 1, 50)
        for pub in pubs:
            assert pub["data"]["task_id"] == "T"
            assert pub["data"]["status"] == "running"
            assert pub["data"]["type"] == "task.updated"
            assert pub["data"]["timestamp"]


async def test_frames_written_together_arrive_in_order(signing_keys: tuple[str, str]) -> None:
    """Small frames and a write delay put several frames in one write, so Node's `ws`
    hands the SDK all of them in one task. centrifuge-js 5.7.4 interleaves such
    frames' replies (a browser gives each message its own task); the driver passes it
    the kit's joining socket, and every publication arrives once, in order."""
    async with (
        run_server(
            signing_keys, websocket_max_frame_bytes=700, client_write_delay_seconds=0.05
        ) as server,
        JsClient(server.ws_url, server.token("alice")) as js,
    ):
        await connect(js)
        await subscribe(js, "task:T")
        seq = 0
        for _burst in range(4):
            batch = [task_event("T", seq + n) for n in range(1, 41)]
            seq += len(batch)
            await broadcast_ok(server, batch)
            await asyncio.sleep(0.2)
        await wait_until(lambda: len(publications(js, "task:T")) >= seq)
        assert_contiguous(publications(js, "task:T"), 1, seq)


# 3 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", OUTAGES)
async def test_recovery_fills_the_gap(server: RunningServer, outage: str) -> None:
    async with JsClient(server.ws_url, server.token("alice"), **FAST) as js:
        client_id = await connect(js)
        first = await subscribe(js, "task:rec", recoverable=True)
        assert first["recoverable"] is True and first["wasRecovering"] is False

        sent = 0
        stop = asyncio.Event()

        async def publisher() -> None:
            nonlocal sent
            while not stop.is_set():
                await broadcast_ok(server, task_event("rec", sent + 1))
                sent += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(publisher())
        try:
            await wait_until(lambda: len(publications(js, "task:rec")) >= 10)
            mark = js.mark()
            session = session_of(server, client_id)
            expected = cut_off(session, outage)

            dropped = await js.wait_event("connecting", timeout=5, since=mark)
            assert (dropped["code"], dropped["reason"]) == expected
            again = await js.wait_event(on("task:rec", "sub.subscribed"), timeout=5, since=mark)
            assert again["wasRecovering"] is True
            assert again["recovered"] is True
            # Publications went out while the socket was down and came back through recovery.
            assert again["hasRecoveredPublications"] is True
            after = js.mark()
            await wait_until(
                lambda: len(js.find_events(on("task:rec", "sub.publication"), after)) >= 10
            )
        finally:
            stop.set()
            await task
        await wait_until(lambda: len(publications(js, "task:rec")) >= sent)
        await asyncio.sleep(0.1)  # anything duplicated would show up now
        assert_contiguous(publications(js, "task:rec"), 1, sent)
        assert not js.find_events("disconnected")


# 4 -----------------------------------------------------------------------------------


async def test_history_and_presence(server: RunningServer) -> None:
    channel = "task:hist"
    async with (
        JsClient(server.ws_url, server.token("alice")) as alice,
        JsClient(server.ws_url, server.token("bob")) as bob,
    ):
        alice_id = await connect(alice)
        bob_id = await connect(bob)
        await subscribe(alice, channel)
        await subscribe(bob, channel)
        await broadcast_ok(server, [task_event("hist", seq) for seq in range(1, 11)])
        await wait_until(lambda: len(publications(alice, channel)) >= 10)

        def offsets(result: dict[str, Any]) -> list[int]:
            seqs = [p["data"]["seq"] for p in result["publications"]]
            assert seqs == [p["offset"] for p in result["publications"]]
            return seqs

        top = await alice.call("history", channel=channel)
        assert top["publications"] == [] and top["offset"] == 10
        epoch = top["epoch"]
        assert isinstance(epoch, str) and epoch

        oldest = await alice.call("history", channel=channel, limit=3)
        assert offsets(oldest) == [1, 2, 3]
        assert (oldest["offset"], oldest["epoch"]) == (10, epoch)
        since = {"offset": 5, "epoch": epoch}
        page = await alice.call("history", channel=channel, limit=2, since=since)
        assert offsets(page) == [6, 7]
        newest = await alice.call("history", channel=channel, limit=3, reverse=True)
        assert offsets(newest) == [10, 9, 8]
        before = await alice.call("history", channel=channel, limit=10, since=since, reverse=True)
        assert offsets(before) == [4, 3, 2, 1]
        everything = await alice.call("history", channel=channel, limit=100)
        assert offsets(everything) == list(range(1, 11))
        assert everything["publications"][0]["data"]["type"] == "task.updated"

        async def stats() -> dict[str, Any]:
            result: dict[str, Any] = await bob.call("presenceStats", channel=channel)
            return result

        # Presence is recorded just after the subscribe reply; give it a moment.
        deadline = time.monotonic() + 3
        while (current := await stats()) != {"numClients": 2, "numUsers": 2}:
            assert time.monotonic() < deadline, current
            await asyncio.sleep(0.05)
        presence = await alice.call("presence", channel=channel)
        clients = presence["clients"]
        assert set(clients) == {alice_id, bob_id}
        assert clients[alice_id]["user"] == "alice" and clients[alice_id]["client"] == alice_id
        assert clients[bob_id]["user"] == "bob" and clients[bob_id]["client"] == bob_id


# 5 -----------------------------------------------------------------------------------


async def test_join_and_leave(signing_keys: tuple[str, str]) -> None:
    namespaces = dict(Settings().namespaces)
    namespaces["task"] = replace(namespaces["task"], join_leave=True)
    channel = "task:jl"
    async with (
        run_server(signing_keys, namespaces=namespaces) as server,
        JsClient(server.ws_url, server.token("alice")) as alice,
        JsClient(server.ws_url, server.token("bob")) as bob,
    ):
        await connect(alice)
        await subscribe(alice, channel, joinLeave=True)
        bob_id = await connect(bob)
        await subscribe(bob, channel)

        join = await alice.wait_event(
            lambda e: on(channel, "sub.join")(e) and e["info"]["client"] == bob_id, timeout=5
        )
        assert join["info"]["user"] == "bob"

        await bob.call("unsubscribe", channel=channel)
        await bob.wait_event(on(channel, "sub.unsubscribed"), timeout=5)
        leave = await alice.wait_event(on(channel, "sub.leave"), timeout=5)
        assert leave["info"]["client"] == bob_id
        assert leave["info"]["user"] == "bob"


# 6 -----------------------------------------------------------------------------------


async def test_connection_token_refresh_keeps_the_connection(
    signing_keys: tuple[str, str],
) -> None:
    # A half-second grace: without a refresh the server would close the socket
    # (3005) about 4.5 s after connecting.
    async with (
        run_server(signing_keys, client_expired_close_delay_seconds=0.5) as server,
        JsClient(server.ws_url, server.token("alice", ttl=3), **FAST) as js,
    ):
        await js.call("setToken", token=server.token("alice", ttl=3600))
        client_id = await connect(js)
        mark = js.mark()
        original_expiry = session_of(server, client_id).expires_at
        assert 0 < original_expiry - time.time() <= 3
        await subscribe(js, "task:ttl")

        await asyncio.sleep(original_expiry - time.time() + 2.5)
        await broadcast_ok(server, task_event("ttl", 1))
        pub = await js.wait_event(on("task:ttl", "sub.publication"), timeout=3)
        assert pub["data"]["seq"] == 1
        dropped = ("disconnected", "connecting", "error")
        assert not js.find_events(lambda e: e["event"] in dropped, since=mark)
        assert (await js.call("state"))["client"] == "connected"
        # The server took the refreshed token: the connection now lives on the new expiry.
        assert session_of(server, client_id).expires_at > original_expiry + 3000


async def test_expired_token_makes_the_sdk_fetch_a_fresh_one(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice", ttl=-10), **FAST) as js:
        await js.call("setToken", token=server.token("alice", ttl=3600))
        await js.call("connect")
        error = await js.wait_event("error", timeout=5)
        assert error["type"] == "connect"
        assert error["error"]["code"] == codes.TOKEN_EXPIRED.code
        connected = await js.wait_event("connected", timeout=5)
        assert connected["client"]
        await js.wait_event(on("user:alice", "subscribed"), timeout=5)
        assert not js.find_events("disconnected")


# 7 -----------------------------------------------------------------------------------


async def test_subscribing_to_another_users_channel_is_denied(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await connect(js)
        await js.call("newSubscription", channel="user:bob")
        await js.call("subscribe", channel="user:bob")
        unsubscribed = await js.wait_event(on("user:bob", "sub.unsubscribed"), timeout=5)
        assert unsubscribed["code"] == codes.PERMISSION_DENIED.code
        assert unsubscribed["reason"] == "permission denied"
        assert not js.find_events(on("user:bob", "sub.subscribed"))
        # The connection itself is unharmed.
        assert (await js.call("state"))["client"] == "connected"


# 8 -----------------------------------------------------------------------------------


async def test_rpc_ping_and_publish_refused(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await connect(js)
        assert await js.call("rpc", method="ping") == {"data": {"pong": True}}
        with pytest.raises(JsError) as unknown:
            await js.call("rpc", method="nope")
        assert unknown.value.code == codes.METHOD_NOT_FOUND.code

        await subscribe(js, "task:pub")
        with pytest.raises(JsError) as refused:
            await js.call("publish", channel="task:pub", data={"hello": 1})
        assert refused.value.code == codes.PERMISSION_DENIED.code
        await js.expect_no_event(on("task:pub", "sub.publication"), within=0.3)


# 9 -----------------------------------------------------------------------------------


async def test_two_hundred_broadcasts_in_one_request_arrive_in_order(
    server: RunningServer,
) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await connect(js)
        await subscribe(js, "task:batch")
        await broadcast_ok(server, [task_event("batch", seq) for seq in range(1, 201)])
        await wait_until(lambda: len(publications(js, "task:batch")) >= 200)
        await asyncio.sleep(0.1)  # a duplicate would show up now
        assert_contiguous(publications(js, "task:batch"), 1, 200)


# fossil delta ----------------------------------------------------------------------


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "no-delta"])
async def test_growing_message_with_and_without_fossil_delta(
    signing_keys: tuple[str, str], delta: bool
) -> None:
    channel = "quest:q1"
    async with (
        run_server(signing_keys, namespaces=with_quest_delta()) as server,
        JsClient(server.ws_url, server.token("alice")) as js,
    ):
        await connect(js)
        subscribed = await subscribe(js, channel, **({"delta": "fossil"} if delta else {}))
        start = subscribed["streamPosition"]["offset"]
        events = [content_event("q1", step) for step in range(1, 61)]
        for event in events[:20]:
            await broadcast_ok(server, event)
        await broadcast_ok(server, events[20:])

        await wait_until(lambda: len(publications(js, channel)) >= len(events))
        pubs = publications(js, channel)
        assert [p["data"]["content"] for p in pubs] == [e["payload"]["content"] for e in events]
        assert [p["offset"] for p in pubs] == list(range(start + 1, start + len(events) + 1))
        stats = await js.call("deltaStats", channel=channel)
        if delta:
            # In full after the subscribe, then every one a delta against the one before.
            assert (stats["numFullPayloads"], stats["numDeltaPayloads"]) == (1, len(events) - 1)
            # Payload bytes only, 60 updates (the 200-update wire figure is in test_delta_wire).
            assert stats["compressionRatio"] > 0.8
        else:
            assert stats["numPublications"] == 0  # the SDK had nothing to decode


async def test_delta_recovery_decodes_the_chain(signing_keys: tuple[str, str]) -> None:
    channel = "quest:q3"
    async with (
        run_server(signing_keys, namespaces=with_quest_delta()) as server,
        # Back after 1 s: the ten publications made while away are surely all stored.
        JsClient(
            server.ws_url, server.token("alice"), minReconnectDelay=1000, maxReconnectDelay=1500
        ) as js,
    ):
        client_id = await connect(js)
        await subscribe(js, channel, delta="fossil", recoverable=True)
        stream = [content_event("q3", step) for step in range(1, 31)]
        await broadcast_ok(server, stream[:10])
        await wait_until(lambda: len(publications(js, channel)) >= 10)

        mark = js.mark()
        cut_off(session_of(server, client_id), "server closes 3011")
        await broadcast_ok(server, stream[10:20])  # while the client is away
        again = await js.wait_event(on(channel, "sub.subscribed"), timeout=5, since=mark)
        assert again["recovered"] is True and again["hasRecoveredPublications"] is True
        await wait_until(lambda: len(publications(js, channel)) >= 20)
        await broadcast_ok(server, stream[20:])
        await wait_until(lambda: len(publications(js, channel)) >= 30)

        pubs = publications(js, channel)
        assert [p["data"]["content"] for p in pubs] == [e["payload"]["content"] for e in stream]
        stats = await js.call("deltaStats", channel=channel)
        # Full: the first after the subscribe and the first recovered one.
        assert (stats["numFullPayloads"], stats["numDeltaPayloads"]) == (2, 28)


# Centrifugo's channel conventions ---------------------------------------------------


async def test_centrifugo_personal_and_user_limited_channels(
    signing_keys: tuple[str, str],
) -> None:
    async with (
        run_server(
            signing_keys,
            namespaces=centrifugo_conventions(),
            user_subscribe_to_personal=True,
        ) as server,
        JsClient(server.ws_url, server.token("42")) as js,
    ):
        await connect(js)
        # Both personal channels, server-side: Centrifugo's `#42` beside today's `user:42`.
        await js.wait_event(on("user:42", "subscribed"), timeout=5)
        await js.wait_event(on("#42", "subscribed"), timeout=5)
        await publish_api(server, "#42", {"hello": 42})
        pub = await js.wait_event(on("#42", "publication"), timeout=5)
        assert pub["data"] == {"hello": 42}

        await subscribe(js, "dialog#42,43")
        await publish_api(server, "dialog#42,43", {"text": "hi"})
        said = await js.wait_event(on("dialog#42,43", "sub.publication"), timeout=5)
        assert said["data"] == {"text": "hi"}

        for channel in ("dialog#43,44", "#43"):
            await js.call("newSubscription", channel=channel)
            await js.call("subscribe", channel=channel)
            refused = await js.wait_event(on(channel, "sub.unsubscribed"), timeout=5)
            assert refused["code"] == codes.PERMISSION_DENIED.code, channel
        assert (await js.call("state"))["client"] == "connected"


async def test_a_flag_change_reaches_the_sdk_as_a_message(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await connect(js)
        response = await server.http.post(
            "/api/v1/admin/cutover",
            json={"channels_percent": 5},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        assert response.status_code == 200
        message = await js.wait_event("message", timeout=5)
        assert message["data"] == {"cutover_version": server.runtime.cutover.version}
        # The connection goes on: a subscription is served on it.
        await subscribe(js, "task:t1")
        await broadcast_ok(server, task_event("t1", 1))
        pub = await js.wait_event(on("task:t1", "sub.publication"), timeout=5)
        assert pub["data"]["seq"] == 1
        assert not js.find_events("disconnected")


async def test_publications_carry_the_legacy_routing_ids_as_tags(server: RunningServer) -> None:
    async with JsClient(server.ws_url, server.token("alice")) as js:
        await connect(js)
        await subscribe(js, "global")
        event = {"type": "session.started", "payload": {"session_id": "s1"}, "task_id": "t9"}
        await broadcast_ok(server, event)
        pub = await js.wait_event(on("global", "sub.publication"), timeout=5)
        assert pub["tags"] == {"task_id": "t9"}
        assert pub["data"]["session_id"] == "s1"
