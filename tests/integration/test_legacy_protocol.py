"""The legacy hub protocol on GET /api/v1/ws, against the real hypercorn server.

One test (or a few) per point of the acceptance checklist at the end of
docs/spec/legacy-hub-protocol.md that still applies: the handshake and its
401/400 answers (§1), frames and their envelope (§2), commands (§3), limits and
keepalive (§4) and the stalled-client cut-off (§7, as changed in MIGRATION.md).
Clients behave like the product's browser hook (tests/legacyclient.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from adapters.auth.jwt import generate_signing_key, mint_token
from tests.conftest import ADMIN_KEY, RunningServer, run_server
from tests.legacyclient import (
    OP_CLOSE,
    OP_PING,
    SHORT_PINGS,
    SUBSCRIBE_ALL,
    LegacyClient,
    RawSocket,
    legacy_client,
    legacy_url,
    open_legacy,
    settle,
)

Keys = tuple[str, str]

MISSING = b'{"message":"missing authorization header"}\n'
EXPIRED = b'{"message":"token expired"}\n'
INVALID = b'{"message":"invalid token"}\n'
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z$")
# How long a socket must stay quiet to count as "nothing arrived".
QUIET = 0.5
# The node's ticker period (deadlines are checked once per tick), and scheduling slack.
TICK = 1.0
SLACK = 0.7


def serve(
    signing_keys: Keys, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[RunningServer]:
    return run_server(signing_keys, **{**SHORT_PINGS, **overrides})


@pytest.fixture
async def server(signing_keys: Keys) -> AsyncIterator[RunningServer]:
    """conftest's server, with SHORT_PINGS."""
    async with serve(signing_keys) as running:
        yield running


def task_event(task: str, n: int, **top: str) -> dict[str, Any]:
    return {"type": "task.updated", "payload": {"task_id": task, "n": n}, **top}


def project_event(project: str, n: int, **top: str) -> dict[str, Any]:
    return {"type": "project.updated", "payload": {"project_id": project, "n": n}, **top}


def subscribe(**ids: str) -> str:
    return orjson.dumps({"action": "subscribe", **ids}).decode()


def unsubscribe(**ids: str) -> str:
    return orjson.dumps({"action": "unsubscribe", **ids}).decode()


async def publish(server: RunningServer, body: Any) -> None:
    response = await server.broadcast(body)
    assert response.status_code == 200, response.text
    expected = len(body) if isinstance(body, list) else 1
    assert response.json()["accepted"] == expected, response.text


def publisher(server: RunningServer) -> Any:
    async def run(body: Any) -> None:
        await publish(server, body)

    return run


async def admin_report(server: RunningServer) -> dict[str, Any]:
    response = await server.http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": ADMIN_KEY})
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def refused(port: int, token: str | None = None, **options: Any) -> Response:
    """The HTTP response of a handshake the server refused before upgrading."""
    with pytest.raises(InvalidStatus) as info:
        client = await open_legacy(port, token, **options)
        await client.aclose()
    return info.value.response


def assert_rejected(response: Response, body: bytes) -> None:
    assert response.status_code == 401
    assert response.body == body
    assert response.headers["Content-Type"] == "application/json"
    assert "Upgrade" not in response.headers


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tampered(token: str) -> str:
    """The same signature over claims naming another user."""
    header, claims, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    body["user_id"] = body["sub"] = "user-admin"
    return f"{header}.{b64(json.dumps(body, separators=(',', ':')).encode())}.{signature}"


def unsigned(token: str) -> str:
    """The token's claims under `alg: none`."""
    _, claims, _ = token.split(".")
    header = b64(b'{"alg":"none","typ":"JWT"}')
    return f"{header}.{claims}."


# --- §1: handshake and authentication ------------------------------------------------


async def test_upgrade_selects_no_subprotocol_nor_extension_and_accepts_any_origin(
    server: RunningServer,
) -> None:
    # A client offering both still gets neither (the hub never negotiated any).
    async with legacy_client(
        server.port,
        server.token(),
        origin="https://attacker.example",
        subprotocols=["chat"],
        compression="deflate",
    ) as client:
        response = client.ws.response
        assert response is not None and response.status_code == 101
        assert client.ws.subprotocol is None
        assert "Sec-WebSocket-Protocol" not in response.headers
        assert "Sec-WebSocket-Extensions" not in response.headers
        await settle(publisher(server), [client], "origin")
        await publish(server, task_event("origin", 1))
        assert (await client.next_frame()).message["payload"] == {"task_id": "origin", "n": 1}


async def test_bad_tokens_get_the_hubs_401_bodies_before_any_upgrade(
    server: RunningServer, signing_keys: Keys
) -> None:
    foreign, _ = generate_signing_key("EdDSA")
    good = server.token("user-1")
    cases = {
        "expired": (server.token("user-1", ttl=-5), EXPIRED),
        "tampered": (tampered(good), INVALID),
        "wrong alg HS256": (mint_token("s" * 48, "HS256", user="user-1"), INVALID),
        "alg none": (unsigned(good), INVALID),
        "foreign key": (mint_token(foreign, "EdDSA", user="user-1"), INVALID),
        # The signature is checked before the claims: a foreign expired token is invalid.
        "foreign key, expired": (mint_token(foreign, "EdDSA", user="u", ttl_seconds=-5), INVALID),
        "garbage": ("not-a-jwt", INVALID),
    }
    for name, (token, body) in cases.items():
        response = await refused(server.port, token)
        assert response.body == body, name
        assert_rejected(response, body)
    # The same answers for the token in a Bearer header.
    assert_rejected(await refused(server.port, bearer=server.token(ttl=-5)), EXPIRED)
    assert_rejected(await refused(server.port, bearer=tampered(good)), INVALID)
    assert (await admin_report(server))["connections"] == {"legacy": 0, "channels": 0}


async def test_no_token_is_a_401_when_centrifuge_detection_is_off(signing_keys: Keys) -> None:
    async with serve(signing_keys, detect_centrifuge_on_legacy_path=False) as server:
        assert_rejected(await refused(server.port), MISSING)
        # An empty parameter and a header of another scheme count as no token.
        assert_rejected(await refused(server.port, ""), MISSING)
        assert_rejected(await refused(server.port, headers={"Authorization": "Token abc"}), MISSING)


async def test_no_token_with_detection_on_is_upgraded_then_closed_4401(
    server: RunningServer,
) -> None:
    # In `dual` a socket without a token may be a Centrifuge SDK (its token travels in
    # the connect command), so it is upgraded; a legacy command then ends it.
    client = await open_legacy(server.port)
    try:
        response = client.ws.response
        assert response is not None and response.status_code == 101
        code, reason = await client.wait_closed()
        assert (code, reason) == (4401, "missing authorization header")
        assert client.frames == []
    finally:
        await client.aclose()


async def test_no_token_and_no_frame_with_detection_on_is_closed_3502_stale(
    signing_keys: Keys,
) -> None:
    # Upgraded because it may be a Centrifuge SDK; one that never sends its connect
    # command is closed as Centrifuge closes such sockets (the hub would have kept it).
    async with serve(signing_keys, client_stale_close_delay_seconds=1) as server:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        client = await open_legacy(server.port, first_commands=())
        try:
            code, reason = await client.wait_closed()
            elapsed = loop.time() - opened
        finally:
            await client.aclose()
        assert (code, reason) == (3502, "stale")
        assert client.frames == []
        assert 1 - 0.1 <= elapsed <= 1 + SLACK


async def raw_handshake(port: int, token: str, *, key: str | None, version: str | None) -> bytes:
    """The server's whole answer to a hand-made upgrade request."""
    lines = [
        f"GET /api/v1/ws?token={token} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(5):
            return await reader.readuntil(b"\r\n\r\n") + await _body_of(reader)
    finally:
        writer.close()


async def _body_of(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
        async with asyncio.timeout(0.3):
            return await reader.read(4096)
    return b""


async def test_a_broken_handshake_is_hypercorns_empty_400_before_any_token_check(
    server: RunningServer,
) -> None:
    key = base64.b64encode(b"0123456789abcdef").decode()
    bad_token = tampered(server.token())
    for name, header_key, version in [
        ("no key", None, "13"),
        ("no version", key, None),
        ("version 12", key, "12"),
    ]:
        # The Go hub answered a bad token first (401), then the handshake (400 with a
        # body); hypercorn refuses the handshake before the app runs.
        for token in (bad_token, server.token()):
            answer = await raw_handshake(server.port, token, key=header_key, version=version)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), (name, answer)
            assert b"content-length: 0" in head.lower(), (name, answer)
            assert body == b"", name
    # A key present but not 16 base64 bytes is not checked by hypercorn: the token
    # decides (Go answered 400 after authenticating).
    assert (await raw_handshake(server.port, bad_token, key="bad", version="13")).endswith(INVALID)
    accepted = await raw_handshake(server.port, server.token(), key="bad", version="13")
    assert accepted.startswith(b"HTTP/1.1 101")


async def test_bearer_header_works_without_query_token(server: RunningServer) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        client = await open_legacy(
            server.port, headers={"Authorization": f"{scheme} {server.token()}"}
        )
        try:
            await settle(publisher(server), [client], "bearer")
            await publish(server, task_event("bearer", 7))
            assert (await client.next_frame()).message["payload"]["n"] == 7
        finally:
            await client.aclose()


async def test_invalid_bearer_wins_over_a_valid_query_token(server: RunningServer) -> None:
    good = server.token()
    assert_rejected(await refused(server.port, good, bearer=tampered(good)), INVALID)
    assert_rejected(await refused(server.port, good, bearer=server.token(ttl=-5)), EXPIRED)
    # A header of another scheme is no header: the query token is used.
    async with legacy_client(server.port, good, headers={"Authorization": "Basic eDp5"}) as client:
        await settle(publisher(server), [client], "scheme")


async def test_plain_get_is_401_without_token_then_400_bad_request(server: RunningServer) -> None:
    missing = await server.http.get("/api/v1/ws")
    assert missing.status_code == 401
    assert missing.content == MISSING
    assert missing.headers["content-type"] == "application/json"
    expired = await server.http.get("/api/v1/ws", params={"token": server.token(ttl=-5)})
    assert (expired.status_code, expired.content) == (401, EXPIRED)

    for headers in (
        {},
        {"Upgrade": "websocket"},  # no Connection: Upgrade
        {"Connection": "Upgrade"},
    ):
        plain = await server.http.get(
            "/api/v1/ws", params={"token": server.token()}, headers=headers
        )
        assert plain.status_code == 400, headers
        assert plain.content == b"Bad Request\n"
        assert plain.headers["Sec-WebSocket-Version"] == "13"
        assert plain.headers["content-type"].startswith("text/plain")


# --- §1.5, §2: frames ---------------------------------------------------------------


async def test_silent_client_gets_no_frames_until_it_subscribes(server: RunningServer) -> None:
    async with legacy_client(server.port, server.token(), first_commands=()) as idle:
        for n in range(5):
            await publish(server, task_event("idle", n, task_id="idle"))
            await asyncio.sleep(0.1)
        await idle.expect_silence(QUIET)
        assert not idle.closed
        await idle.send(SUBSCRIBE_ALL)
        await settle(publisher(server), [idle], "idle")
        await publish(server, task_event("idle", 99))
        assert (await idle.next_frame()).message["payload"]["n"] == 99


async def test_silent_client_is_not_dropped_as_a_stale_centrifuge_socket(
    signing_keys: Keys,
) -> None:
    # The hub kept a silent client open (only a missing pong ended it). Centrifuge's
    # stale-socket rule (no connect within the delay) must not apply to a legacy
    # socket that authenticated with its token.
    async with (
        serve(signing_keys, client_stale_close_delay_seconds=1) as server,
        legacy_client(server.port, server.token(), first_commands=()) as idle,
    ):
        await asyncio.sleep(1 + TICK + SLACK)
        assert not idle.closed, (idle.close_code, idle.close_reason)
        await idle.send(SUBSCRIBE_ALL)
        await settle(publisher(server), [idle], "stale")


async def test_every_event_is_one_frame_with_keys_in_hub_order(server: RunningServer) -> None:
    events = [
        {"type": "quest.content_delta", "payload": {"quest_id": "q1", "delta": "x"}},
        {
            "type": "task.updated",
            "payload": {"task_id": "T1", "status": "running"},
            "task_id": "T1",
        },
        {"type": "project.updated", "payload": {"name": "p"}, "project_id": "P1"},
        {"type": "session.started", "payload": {"s": 1}, "task_id": "T1", "project_id": "P1"},
        {"type": "approval.resolved", "payload": {"id": "a", "status": "approved"}},
    ]
    async with legacy_client(server.port, server.token()) as client:
        await settle(publisher(server), [client], "order")
        before = time.time()
        await publish(server, events)
        frames = await client.take(len(events))
        after = time.time()
        await client.expect_silence(QUIET)
    for event, frame in zip(events, frames, strict=True):
        pairs = json.loads(frame.raw, object_pairs_hook=list)
        keys = [key for key, _ in pairs]
        expected = ["type", "timestamp", "payload"]
        expected += [key for key in ("task_id", "project_id") if key in event]
        assert keys == expected, frame.raw
        assert frame.message["type"] == event["type"]
        assert frame.message["payload"] == event["payload"]
        for key in ("task_id", "project_id"):
            assert frame.message.get(key) == event.get(key)
        # Compact JSON, no trailing newline: one object per text frame.
        assert frame.raw == orjson.dumps(frame.message).decode()
        stamp = frame.message["timestamp"]
        assert TIMESTAMP.match(stamp), stamp
        # UTC, stamped when the event was handed over.
        whole = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert before - 1 <= whole <= after + 1, (stamp, before, after)


async def test_unsubscribe_keeps_the_wildcard_and_unsubscribe_all_stops_everything(
    server: RunningServer,
) -> None:
    async with legacy_client(server.port, server.token()) as client:
        await client.send({"action": "subscribe", "task_id": "T"})
        await client.send({"action": "unsubscribe", "task_id": "T"})
        await settle(publisher(server), [client], "sync-1")
        await publish(server, [task_event("T", 1, task_id="T"), task_event("U", 2)])
        frames = await client.take(2)
        assert [f.message["payload"]["n"] for f in frames] == [1, 2]

        await client.send({"action": "unsubscribe_all"})
        # The wildcard is gone, so only the probe's task can show the command took effect.
        await client.send({"action": "subscribe", "task_id": "sync-2"})
        await settle(publisher(server), [client], "sync-2")
        await publish(server, [task_event("T", 3, task_id="T"), task_event("U", 4)])
        await publish(server, {"type": "quest.created", "payload": {"quest_id": "q"}})
        await client.expect_silence(QUIET)
        assert not client.closed


def sync_marker(n: int) -> dict[str, Any]:
    """An event only for holders of task:sync (or `*`)."""
    return task_event("sync", n, task_id="sync")


async def only_the_marker_arrives(server: RunningServer, client: LegacyClient, n: int) -> None:
    """The marker was published after everything else and is the one frame that
    arrives: whatever came before it was not sent to this client."""
    frame = await client.next_frame()
    assert frame.message["payload"] == {"task_id": "sync", "n": n}, frame.raw
    await client.expect_silence(QUIET)
    assert not client.closed


async def test_unsubscribe_of_the_only_task_subscription_stops_that_task(
    server: RunningServer,
) -> None:
    # task:sync only lets the test see its commands took effect; nothing else is held.
    async with legacy_client(
        server.port,
        server.token(),
        first_commands=(subscribe(task_id="T"), subscribe(task_id="sync")),
    ) as client:
        await settle(publisher(server), [client], "sync")
        await publish(server, task_event("T", 1))
        assert (await client.next_frame()).message["payload"] == {"task_id": "T", "n": 1}

        await client.send(unsubscribe(task_id="T"))
        await settle(publisher(server), [client], "sync")
        await publish(
            server,
            [
                task_event("T", 2),
                task_event("T", 3, task_id="T"),
                {"type": "activity.new", "payload": {"task_id": "T", "n": 4}, "task_id": "T"},
                sync_marker(5),
            ],
        )
        await only_the_marker_arrives(server, client, 5)


async def test_unsubscribe_of_the_only_project_subscription_stops_that_project(
    server: RunningServer,
) -> None:
    async with legacy_client(
        server.port,
        server.token(),
        first_commands=(subscribe(project_id="P"), subscribe(task_id="sync")),
    ) as client:
        await settle(publisher(server), [client], "sync")
        await publish(server, project_event("P", 1))
        assert (await client.next_frame()).message["payload"] == {"project_id": "P", "n": 1}

        await client.send(unsubscribe(project_id="P"))
        await settle(publisher(server), [client], "sync")
        await publish(
            server,
            [
                project_event("P", 2),
                project_event("P", 3, project_id="P"),
                {"type": "task.updated", "payload": {"task_id": "X", "project_id": "P", "n": 4}},
                sync_marker(5),
            ],
        )
        await only_the_marker_arrives(server, client, 5)


async def test_unsubscribe_all_stops_task_and_project_subscriptions(
    server: RunningServer,
) -> None:
    async with legacy_client(
        server.port, server.token(), first_commands=(subscribe(task_id="T", project_id="P"),)
    ) as client:
        await settle(publisher(server), [client], "T")
        await publish(server, [task_event("T", 1), project_event("P", 2)])
        assert [f.message["payload"]["n"] for f in await client.take(2)] == [1, 2]

        await client.send({"action": "unsubscribe_all"})
        # Subscribed afterwards, so seeing its probe means unsubscribe_all was applied.
        await client.send(subscribe(task_id="sync"))
        await settle(publisher(server), [client], "sync")
        await publish(
            server,
            [
                task_event("T", 3),
                task_event("T", 4, task_id="T"),
                project_event("P", 5),
                {"type": "task.updated", "payload": {"task_id": "T", "project_id": "P", "n": 6}},
                sync_marker(7),
            ],
        )
        await only_the_marker_arrives(server, client, 7)


MALFORMED: list[str | bytes] = [
    "{not json",
    "[]",
    '[{"action":"subscribe_all"}]',
    '{"action":"subscribe","task_id":1}',
    # A wrong type for a known field drops the whole command, even a valid action.
    '{"action":"subscribe_all","task_id":1}',
    '{"action":"subscribe_all"} trailing',
    '{"action":"subscribe_all"}{"action":"subscribe_all"}',
    "",
    '"subscribe_all"',
    "42",
    b'{"action":"subscribe_all"',
]


async def test_malformed_commands_are_ignored_silently_and_counted(server: RunningServer) -> None:
    before = (await admin_report(server))["legacy"]["malformed_commands"]
    async with (
        legacy_client(server.port, server.token("fresh"), first_commands=()) as fresh,
        legacy_client(server.port, server.token("subscribed")) as subscribed,
    ):
        # The subscribed client sends what would undo its wildcard, had it parsed.
        undo = ['{"action":"unsubscribe_all"} x', '{"action":"unsubscribe_all","project_id":[]}']
        for frame in MALFORMED:
            await fresh.send(frame)
        for frame in undo:
            await subscribed.send(frame)
        # A task the fresh client holds only to show its frames were all read.
        await fresh.send({"action": "subscribe", "task_id": "sync"})
        await settle(publisher(server), [fresh, subscribed], "sync")
        assert (await admin_report(server))["legacy"]["malformed_commands"] == before + len(
            MALFORMED
        ) + len(undo)

        await publish(server, [task_event("1", 1, task_id="1"), task_event("x", 2)])
        assert [f.message["payload"]["n"] for f in await subscribed.take(2)] == [1, 2]
        # No reply, no subscription, no close.
        await fresh.expect_silence(QUIET)
        await subscribed.expect_silence(0)
        assert not fresh.closed and not subscribed.closed


async def test_action_key_matches_case_insensitively(server: RunningServer) -> None:
    async with legacy_client(
        server.port, server.token(), first_commands=('{"ACTION":"subscribe_all"}',)
    ) as client:
        await settle(publisher(server), [client], "case")
        await publish(server, task_event("other", 5))
        assert (await client.next_frame()).message["payload"]["n"] == 5


async def test_command_keys_fold_case_the_last_duplicate_wins_and_null_sets_nothing(
    server: RunningServer,
) -> None:
    before = (await admin_report(server))["legacy"]
    commands = [
        '{"ACTION":"subscribe","TASK_ID":"T1"}',
        '{"Action":"subscribe","Project_Id":"P1"}',
        # Last wins: task "T2" is held, "decoy" never was.
        '{"action":"subscribe","task_id":"decoy","TASK_ID":"T2"}',
        # null leaves the field empty: subscribing to nothing.
        '{"action":"subscribe","task_id":null,"project_id":null}',
        # Action values are case-sensitive: these are unknown actions, not a wildcard.
        '{"action":"SUBSCRIBE_ALL"}',
        '{"action":"Subscribe","task_id":"T3"}',
        subscribe(task_id="sync"),
    ]
    async with legacy_client(server.port, server.token(), first_commands=commands) as client:
        await settle(publisher(server), [client], "sync")
        await publish(
            server,
            [
                task_event("T1", 1),
                project_event("P1", 2),
                task_event("T2", 3),
                task_event("decoy", 4),
                task_event("T3", 5),
                task_event("other", 6),
                {"type": "quest.created", "payload": {"quest_id": "q", "n": 7}},
                sync_marker(8),
            ],
        )
        frames = await client.take(4)
        await client.expect_silence(QUIET)
    assert [f.message["payload"]["n"] for f in frames] == [1, 2, 3, 8]
    after = (await admin_report(server))["legacy"]
    assert after["unknown_actions"] == before["unknown_actions"] + 2
    assert after["malformed_commands"] == before["malformed_commands"]


def command_of_size(size: int) -> str:
    """`{"action":"subscribe_all","pad":"xxx..."}` of exactly `size` bytes."""
    head = '{"action":"subscribe_all","pad":"'
    text = head + "x" * (size - len(head) - 2) + '"}'
    assert len(text.encode()) == size
    return text


@pytest.mark.parametrize("position", ["first", "later"])
async def test_read_limit_is_4096_bytes(server: RunningServer, position: str) -> None:
    lead = () if position == "first" else ('{"action":"subscribe","task_id":"lead"}',)
    async with legacy_client(
        server.port, server.token(), first_commands=(*lead, command_of_size(4096))
    ) as fits:
        await settle(publisher(server), [fits], "limit")
        await publish(server, task_event("any", 1))
        assert (await fits.next_frame()).message["payload"]["n"] == 1

    async with legacy_client(
        server.port, server.token(), first_commands=(*lead, command_of_size(4097))
    ) as too_big:
        code, reason = await too_big.wait_closed()
        assert (code, reason) == (1009, "")
        assert too_big.frames == []


# --- §4: keepalive --------------------------------------------------------------------


async def test_pings_every_interval_and_only_pongs_keep_a_client(signing_keys: Keys) -> None:
    deadline = 3.0
    async with run_server(
        signing_keys, legacy_ping_interval_seconds=1, legacy_read_deadline_seconds=deadline
    ) as server:
        token = server.token()

        async def answering() -> tuple[list[float], RawSocket]:
            sock = await RawSocket.open(server.port, token)
            sock.answer_pings = True
            await sock.send_text(SUBSCRIBE_ALL)
            with contextlib.suppress(TimeoutError):
                await sock.read_until_close(5.5)
            return [f.at for f in sock.pings()], sock

        async def silent() -> tuple[float, int | None, RawSocket]:
            sock = await RawSocket.open(server.port, token)
            start = asyncio.get_running_loop().time()
            await sock.send_text(SUBSCRIBE_ALL)

            async def chatter() -> None:
                # Text frames do not renew the deadline; only pongs would.
                with contextlib.suppress(Exception):
                    while True:
                        await asyncio.sleep(0.25)
                        await sock.send_text('{"action":"subscribe_all"}')

            talking = asyncio.create_task(chatter())
            try:
                close = await sock.read_until_close(deadline + TICK + 3)
            finally:
                talking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await talking
            assert sock.pings(), "no ping before the deadline"
            ended = asyncio.get_running_loop().time() - start
            return ended, (close.close_code if close else None), sock

        async def library() -> LegacyClient:
            client = await open_legacy(server.port, token, ping_interval=None)
            await asyncio.sleep(5.5)
            return client

        (pings, kept), (ended, code, dropped), lib = await asyncio.gather(
            answering(), silent(), library()
        )
        try:
            # The answering client saw a ping about every second and was never closed.
            assert not [f for f in kept.frames if f.opcode == OP_CLOSE]
            assert len(pings) >= 4, pings
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(0.7 <= gap <= 1.4 for gap in gaps), gaps
            assert all(f.payload == b"" for f in kept.frames if f.opcode == OP_PING)
            # websockets answers pings itself: still connected after 5.5 s, still served.
            assert not lib.closed
            await settle(publisher(server), [lib], "alive")
            # The silent one was dropped about one deadline after connecting.
            assert deadline - 0.5 <= ended <= deadline + TICK + SLACK, ended
            assert code == 4408
        finally:
            await lib.aclose()
            await kept.aclose()
            await dropped.aclose()


# --- §7 / MIGRATION.md: a stalled client --------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_queue_max_size_bytes": 256 * 1024, "websocket_write_timeout_seconds": 60},
        # Cut by the write timeout while WebSocket pings to the stalled peer are stuck
        # too: the close frame must still be queued behind what was sent.
        {
            "client_queue_max_size_bytes": 256 * 1024 * 1024,
            "websocket_write_timeout_seconds": 1,
            "legacy_ping_interval_seconds": 0.2,
            "legacy_read_deadline_seconds": 600,
        },
    ],
    ids=["queue cap", "write timeout with pings"],
)
async def test_stalled_client_is_cut_off_3008_and_fast_client_gets_everything(
    signing_keys: Keys, overrides: dict[str, float]
) -> None:
    async with serve(signing_keys, **overrides) as server:
        # max_queue=1: websockets stops reading the socket once one message waits.
        stalled = await connect(
            legacy_url(server.port, server.token("slow")),
            compression=None,
            max_queue=1,
            ping_interval=None,
            proxy=None,
        )
        await stalled.send(SUBSCRIBE_ALL)
        async with legacy_client(server.port, server.token("fast")) as fast:
            await settle(publisher(server), [fast], "stall")
            slow_before = (await admin_report(server))["legacy"]["slow_disconnects"]
            filler = "x" * 2000
            total = 0
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 20
            while (await admin_report(server))["connections"]["legacy"] > 1:
                assert loop.time() < give_up, "the stalled client was never cut off"
                await publish(
                    server,
                    [
                        {"type": "task.updated", "payload": {"task_id": "s", "n": n, "p": filler}}
                        for n in range(total, total + 100)
                    ],
                )
                total += 100
            frames = await fast.take(total, timeout=20)
            assert [f.message["payload"]["n"] for f in frames] == list(range(total))
            assert not fast.closed
            report = await admin_report(server)
            assert report["legacy"]["slow_disconnects"] == slow_before + 1

        received = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await asyncio.wait_for(stalled.recv(), 10)
                received.append(orjson.loads(frame)["payload"].get("n"))
        # What reached it is a gapless start of the stream. The server aborts the
        # connection once the close frame is in the kernel (or the write timeout
        # passed, as tests/integration/test_cutoff_release.py shows for a client that
        # never wakes): the frame arrives (3008) unless the waking client answers a
        # queued ping first, which the closed socket meets with a reset (1006).
        numbered = [n for n in received if n is not None]
        assert numbered == list(range(len(numbered)))
        assert stalled.close_code in {3008, 1006}
        await stalled.close()


async def test_server_stops_promptly_after_legacy_clients_leave(signing_keys: Keys) -> None:
    # Default settings (30 s pings). A closed legacy socket must not keep anything of
    # the server busy: shutdown then has nothing to wait for.
    async with run_server(signing_keys) as server:
        for _ in range(3):
            async with legacy_client(server.port, server.token()) as client:
                await settle(publisher(server), [client], "leave")
        assert (await admin_report(server))["connections"]["legacy"] == 0
        await asyncio.sleep(0.5)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3.0


async def test_raw_handshake_without_token_param_in_legacy_mode(signing_keys: Keys) -> None:
    # In `legacy` mode nothing on this path may be a Centrifuge SDK: the exact 401.
    async with serve(signing_keys, cutover_mode="legacy") as server:
        assert_rejected(await refused(server.port), MISSING)
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/api/v1/ws")).content == MISSING
