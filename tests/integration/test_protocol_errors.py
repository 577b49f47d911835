"""Bad input on the Centrifuge endpoint, seen from a raw websocket client.

Each test drives one misbehaving client against the real hypercorn server and
checks the exact reply error or close frame it gets; a well-behaved bystander
connected at the same time must still subscribe and receive a broadcast
afterwards (one client's trouble never takes down anyone else). Expected codes
and messages are those of §4, §6 and §7 of docs/spec/centrifuge-protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from adapters.auth.jwt import generate_signing_key, mint_token
from shim.core.config import Settings
from tests.conftest import RunningServer, run_server

# Every wait in these tests is bounded by this many seconds.
TIMEOUT = 5.0
# How long a socket must stay quiet to count as "left open".
QUIET = 0.5


class RawClient:
    """Protocol v2 JSON over a bare websocket: commands out, one message per line in."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._lines: deque[dict[str, Any]] = deque()
        self._last_id = 0
        # Messages skipped while waiting for a reply (pings `{}` and pushes), in order.
        self.skipped: list[dict[str, Any]] = []

    def new_id(self) -> int:
        self._last_id += 1
        return self._last_id

    async def send(self, *commands: dict[str, Any]) -> None:
        """All commands in one text frame, separated by newlines."""
        await self.ws.send("\n".join(orjson.dumps(c).decode() for c in commands))

    async def receive(self, wait: float = TIMEOUT) -> dict[str, Any]:
        """The next message; several in one frame come out one at a time."""
        async with asyncio.timeout(wait):
            while not self._lines:
                frame = await self.ws.recv()
                assert isinstance(frame, str), f"binary frame from the server: {frame!r}"
                assert frame and "\n\n" not in frame and not frame.endswith("\n"), repr(frame)
                self._lines.extend(orjson.loads(line) for line in frame.split("\n"))
        return self._lines.popleft()

    async def reply(self, command_id: int, wait: float = TIMEOUT) -> dict[str, Any]:
        """The reply to `command_id`; pings and pushes before it go to `skipped`."""
        async with asyncio.timeout(wait):
            while True:
                message = await self.receive(wait)
                if message.get("id") == command_id:
                    return message
                assert "id" not in message, f"reply to another command: {message}"
                self.skipped.append(message)

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        command_id = self.new_id()
        await self.send({"id": command_id, method: body})
        return await self.reply(command_id)

    async def connect(self, token: str) -> dict[str, Any]:
        reply = await self.call("connect", {"token": token})
        assert "connect" in reply, reply
        result: dict[str, Any] = reply["connect"]
        return result

    async def push(self, channel: str, wait: float = TIMEOUT) -> dict[str, Any]:
        """The next publication push of `channel`, skipping pings and other pushes."""
        async with asyncio.timeout(wait):
            while True:
                message = await self.receive(wait)
                push = message.get("push", {})
                if push.get("channel") == channel and "pub" in push:
                    pub: dict[str, Any] = push["pub"]
                    return pub
                self.skipped.append(message)

    async def closed(self, wait: float = TIMEOUT) -> Close:
        """Read until the server closes the socket; its close frame."""
        try:
            async with asyncio.timeout(wait):
                while True:
                    self.skipped.append(await self.receive(wait))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, f"no close frame from the server ({exc})"
            return exc.rcvd
        except TimeoutError:
            raise AssertionError(
                f"socket still open after {wait} s; received {self.skipped}"
            ) from None

    async def stays_open(self, seconds: float = QUIET) -> None:
        """Nothing but pings arrives for `seconds`, and the socket is still open."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    message = await self.receive(seconds)
                    assert message == {}, f"unexpected message: {message}"
        rpc = await self.call("rpc", {"method": "ping"})
        assert rpc["rpc"] == {"data": {"pong": True}}


@contextlib.asynccontextmanager
async def raw_client(server: RunningServer) -> AsyncIterator[RawClient]:
    # subprotocols=[]: the empty Sec-WebSocket-Protocol header the Python SDK sends.
    async with connect(server.ws_url, subprotocols=[], close_timeout=2) as ws:
        yield RawClient(ws)


@contextlib.asynccontextmanager
async def connected(server: RunningServer, user: str = "alice") -> AsyncIterator[RawClient]:
    async with raw_client(server) as client:
        await client.connect(server.token(user))
        yield client


@contextlib.asynccontextmanager
async def bystander(server: RunningServer) -> AsyncIterator[None]:
    """A good client connected for the whole block; after it, it must still be served."""
    async with connected(server, "bystander") as client:
        yield
        task_id = f"t-{uuid.uuid4().hex[:8]}"
        channel = f"task:{task_id}"
        reply = await client.call("subscribe", {"channel": channel})
        assert "subscribe" in reply, reply
        resp = await server.broadcast(
            {"type": "task.updated", "payload": {"task_id": task_id, "status": "running"}}
        )
        assert resp.status_code == 200, resp.text
        pub = await client.push(channel)
        assert pub["data"]["task_id"] == task_id
        assert pub["data"]["type"] == "task.updated"


def error(command_id: int, code: int, message: str) -> dict[str, Any]:
    return {"id": command_id, "error": {"code": code, "message": message}}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- frames that are not protocol v2: close 3501 -----------------------------


async def assert_bad_request_close(client: RawClient) -> None:
    close = await client.closed()
    assert (close.code, close.reason) == (3501, "bad request")


async def test_malformed_json_closes_3501(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        await client.ws.send('{"id":2,"subscribe":{"channel":"task:t1"}')
        await assert_bad_request_close(client)


async def test_json_array_line_closes_3501(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        await client.ws.send('[{"id":2,"rpc":{"method":"ping"}}]')
        await assert_bad_request_close(client)


async def test_json_number_line_closes_3501(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        await client.ws.send("42")
        await assert_bad_request_close(client)


async def test_binary_frame_closes_3501(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        await client.ws.send(b'{"id":2,"rpc":{"method":"ping"}}')
        await assert_bad_request_close(client)


async def test_unknown_command_with_id_closes_3501(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        await client.send({"id": 2, "foo": {}})
        await assert_bad_request_close(client)


async def test_command_before_connect_closes_3501(server: RunningServer) -> None:
    async with bystander(server), raw_client(server) as client:
        await client.send({"id": 1, "subscribe": {"channel": "task:t1"}})
        await assert_bad_request_close(client)
        assert client.skipped == []


async def test_second_connect_closes_3501(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        await client.send({"id": client.new_id(), "connect": {"token": server.token("alice")}})
        await assert_bad_request_close(client)
        assert client.skipped == []


# --- frame size ---------------------------------------------------------------


def rpc_frame(command_id: int, pad: str) -> str:
    """An rpc ping carrying `pad` as its data string."""
    return f'{{"id":{command_id},"rpc":{{"method":"ping","data":"{pad}"}}}}'


def rpc_frame_of_size(command_id: int, size: int) -> str:
    """An rpc ping whose text frame is exactly `size` bytes."""
    frame = rpc_frame(command_id, "x" * (size - len(rpc_frame(command_id, ""))))
    assert len(frame.encode()) == size
    return frame


async def test_frame_at_the_read_limit_is_served(server: RunningServer) -> None:
    limit = server.settings.websocket_read_limit_bytes
    assert limit == 64 * 1024
    async with connected(server) as client:
        await client.ws.send(rpc_frame_of_size(2, limit))
        assert await client.reply(2) == {"id": 2, "rpc": {"data": {"pong": True}}}


async def test_oversized_frame_closes_1009(server: RunningServer) -> None:
    limit = server.settings.websocket_read_limit_bytes
    async with bystander(server), connected(server) as client:
        await client.ws.send(rpc_frame_of_size(2, limit + 1))
        close = await client.closed()
        assert close.code == 1009
        assert client.skipped == []


async def test_oversized_frame_counts_bytes_not_characters(server: RunningServer) -> None:
    # 40 000 two-byte characters: 80 000 bytes of UTF-8, well over the 64 KiB limit,
    # though fewer characters than that.
    limit = server.settings.websocket_read_limit_bytes
    frame = rpc_frame(2, "é" * 40_000)
    assert len(frame) < limit < len(frame.encode())
    async with bystander(server), connected(server) as client:
        await client.ws.send(frame)
        close = await client.closed()
        assert close.code == 1009
        assert client.skipped == []


# --- channel errors -------------------------------------------------------------


async def test_duplicate_subscribe_is_error_105(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        first = await client.call("subscribe", {"channel": "task:t1"})
        assert "subscribe" in first
        second = await client.call("subscribe", {"channel": "task:t1"})
        assert second == error(second["id"], 105, "already subscribed")
        await client.stays_open()


async def test_server_side_channel_cannot_be_subscribed_again(server: RunningServer) -> None:
    async with connected(server) as client:
        reply = await client.call("subscribe", {"channel": "user:alice"})
        assert reply == error(reply["id"], 105, "already subscribed")


async def test_channel_limit_is_error_106(signing_keys: tuple[str, str]) -> None:
    server_cm = run_server(signing_keys, client_channel_limit=3)
    async with server_cm as server, bystander(server), connected(server) as client:
        # user:alice (server-side) + 2 client channels = the limit of 3.
        for channel in ("task:a", "task:b"):
            assert "subscribe" in await client.call("subscribe", {"channel": channel})
        reply = await client.call("subscribe", {"channel": "task:c"})
        assert reply == error(reply["id"], 106, "limit exceeded")
        # Dropping one frees a place.
        reply = await client.call("unsubscribe", {"channel": "task:a"})
        assert reply == {"id": reply["id"], "unsubscribe": {}}
        assert "subscribe" in await client.call("subscribe", {"channel": "task:c"})


async def test_channel_name_over_255_bytes_is_error_107(server: RunningServer) -> None:
    # 5 + 2 * 126 = 257 bytes in 131 characters: the limit is in bytes.
    long_name = "task:" + "é" * 126
    async with bystander(server), connected(server) as client:
        reply = await client.call("subscribe", {"channel": long_name})
        assert reply["error"]["code"] == 107, reply
        assert reply["error"]["message"]
        # 255 bytes exactly is still a valid name.
        at_limit = "task:" + "x" * 250
        assert "subscribe" in await client.call("subscribe", {"channel": at_limit})


async def test_unknown_namespace_is_error_102(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        reply = await client.call("subscribe", {"channel": "nosuch:1"})
        assert reply == error(reply["id"], 102, "unknown channel")
        await client.stays_open()


async def test_history_of_unsubscribed_channel_is_error_103(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        reply = await client.call("history", {"channel": "task:t9", "limit": 10})
        assert reply == error(reply["id"], 103, "permission denied")
        await client.stays_open()


async def test_publish_from_client_is_error_103(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        assert "subscribe" in await client.call("subscribe", {"channel": "task:t1"})
        reply = await client.call("publish", {"channel": "task:t1", "data": {"x": 1}})
        assert reply == error(reply["id"], 103, "permission denied")
        await client.stays_open()


async def test_unsubscribe_of_unknown_channel_succeeds(server: RunningServer) -> None:
    async with connected(server) as client:
        reply = await client.call("unsubscribe", {"channel": "task:never"})
        assert reply == {"id": reply["id"], "unsubscribe": {}}
        await client.stays_open()


# --- recovery with reject-unrecovered (SubscribeRequest.flag bit 2, §8.2 step 4) -------

# What the SDKs send on every subscribe (1, channel compaction offered) plus bit 2.
REJECT_UNRECOVERED = 1 | 2


async def publish_n(server: RunningServer, task_id: str, count: int) -> None:
    resp = await server.broadcast(
        [{"type": "task.updated", "payload": {"task_id": task_id, "n": n}} for n in range(count)]
    )
    assert resp.status_code == 200 and resp.json()["accepted"] == count, resp.text


async def stream_position(client: RawClient, channel: str) -> tuple[int, str]:
    """(top offset, epoch) of `channel`, from a plain subscribe that is then dropped."""
    reply = await client.call("subscribe", {"channel": channel})
    result = reply["subscribe"]
    await client.call("unsubscribe", {"channel": channel})
    return result["offset"], result["epoch"]


def recover(channel: str, offset: int, epoch: str, flag: int) -> dict[str, Any]:
    return {
        "channel": channel,
        "recover": True,
        "recoverable": True,
        "offset": offset,
        "epoch": epoch,
        "flag": flag,
    }


async def test_reject_unrecovered_flag_turns_an_epoch_mismatch_into_error_112(
    server: RunningServer,
) -> None:
    channel = "task:r1"
    await publish_n(server, "r1", 5)
    async with bystander(server), connected(server) as client:
        top, epoch = await stream_position(client, channel)
        assert top == 5

        refused = await client.call(
            "subscribe", recover(channel, 3, "old-epoch", REJECT_UNRECOVERED)
        )
        assert refused == error(refused["id"], 112, "unrecoverable position")
        # The 112 left nothing held (no 105 now); without the flag the same request
        # is answered recovered=false at the stream top.
        plain = await client.call("subscribe", recover(channel, 3, "old-epoch", 1))
        assert plain == {
            "id": plain["id"],
            "subscribe": {
                "recoverable": True,
                "positioned": True,
                "epoch": epoch,
                "offset": 5,
                "was_recovering": True,
            },
        }
        await client.stays_open()


async def test_reject_unrecovered_flag_with_a_position_lost_from_history_is_error_112(
    signing_keys: tuple[str, str],
) -> None:
    channel = "task:r2"
    namespaces = dict(Settings().namespaces)
    namespaces["task"] = replace(namespaces["task"], history_size=3)
    async with run_server(signing_keys, namespaces=namespaces) as server:
        await publish_n(server, "r2", 6)  # offsets 1..6, only 4..6 retained
        async with bystander(server), connected(server) as client:
            top, epoch = await stream_position(client, channel)
            assert top == 6
            # Offset 1 was seen: 2 and 3 are gone, the epoch matches all the same.
            refused = await client.call("subscribe", recover(channel, 1, epoch, REJECT_UNRECOVERED))
            assert refused == error(refused["id"], 112, "unrecoverable position")
            # A position ahead of the stream cannot be recovered either.
            ahead = await client.call("subscribe", recover(channel, 9, epoch, REJECT_UNRECOVERED))
            assert ahead == error(ahead["id"], 112, "unrecoverable position")
            # Offset 3 was seen: 4..6 are all there, so the flag changes nothing.
            ok = await client.call("subscribe", recover(channel, 3, epoch, REJECT_UNRECOVERED))
            result = ok["subscribe"]
            assert (result["recovered"], result["was_recovering"]) == (True, True)
            assert (result["offset"], result["epoch"]) == (3, epoch)
            assert [p["offset"] for p in result["publications"]] == [4, 5, 6]
            assert [p["data"]["n"] for p in result["publications"]] == [3, 4, 5]
            await publish_n(server, "r2", 1)
            assert (await client.push(channel))["offset"] == 7


async def test_reject_unrecovered_flag_with_an_empty_epoch_recovers_from_offset_0(
    server: RunningServer,
) -> None:
    # An empty epoch means "any" (§8.2 step 1): a complete history from offset 0 recovers.
    channel = "task:r3"
    await publish_n(server, "r3", 2)
    async with connected(server) as client:
        reply = await client.call("subscribe", recover(channel, 0, "", REJECT_UNRECOVERED))
        result = reply["subscribe"]
        assert result["recovered"] is True
        assert "offset" not in result  # offset 0, omitted like every zero field
        assert [p["offset"] for p in result["publications"]] == [1, 2]


# --- subscription tokens (§9.2) ----------------------------------------------------------


def sub_token(server: RunningServer, user: str, channel: str, **claims: Any) -> str:
    return server.token(user, channel=channel, **claims)


async def test_subscription_token_of_another_channel_user_or_client_closes_3500(
    server: RunningServer,
) -> None:
    async with bystander(server):
        for claims in (
            {"user": "alice", "channel": "task:other"},
            {"user": "bob", "channel": "task:t1"},
            {"user": "alice", "channel": "task:t1", "client": str(uuid.uuid4())},
        ):
            async with connected(server) as client:
                token = sub_token(server, **claims)
                await client.send(
                    {"id": client.new_id(), "subscribe": {"channel": "task:t1", "token": token}}
                )
                close = await client.closed()
                assert (close.code, close.reason) == (3500, "invalid token"), claims
                assert not [m for m in client.skipped if m], client.skipped


async def test_subscription_token_with_a_bad_signature_is_error_103(server: RunningServer) -> None:
    other_private, _ = generate_signing_key("EdDSA")
    forged = mint_token(other_private, "EdDSA", user="alice", extra={"channel": "task:t1"})
    async with bystander(server), connected(server) as client:
        reply = await client.call("subscribe", {"channel": "task:t1", "token": forged})
        assert reply == error(reply["id"], 103, "permission denied")
        await client.stays_open()


async def test_sub_refresh_with_a_token_of_another_user_closes_3500(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        own = sub_token(server, "alice", "task:t1")
        assert "subscribe" in await client.call("subscribe", {"channel": "task:t1", "token": own})
        theirs = sub_token(server, "bob", "task:t1")
        await client.send(
            {"id": client.new_id(), "sub_refresh": {"channel": "task:t1", "token": theirs}}
        )
        close = await client.closed()
        assert (close.code, close.reason) == (3500, "invalid token")


async def test_no_token_grants_another_users_personal_channel(server: RunningServer) -> None:
    async with bystander(server), connected(server, "alice") as client:
        # Signed for alice and for user:bob: valid, yet bob's channel stays bob's.
        token = sub_token(server, "alice", "user:bob")
        reply = await client.call("subscribe", {"channel": "user:bob", "token": token})
        assert reply == error(reply["id"], 103, "permission denied")
        resp = await server.broadcast(
            {"type": "approval.required", "payload": {"user_id": "bob", "approval_id": "b1"}}
        )
        assert resp.status_code == 200, resp.text
        await client.stays_open()


async def test_connection_token_channels_claim_cannot_name_another_users_channel(
    server: RunningServer,
) -> None:
    async with bystander(server), raw_client(server) as client:
        token = server.token("alice", channels=["user:bob", "task:mine"])
        result = await client.connect(token)
        assert set(result["subs"]) == {"user:alice", "task:mine"}
        resp = await server.broadcast(
            [
                {"type": "approval.required", "payload": {"user_id": "bob", "approval_id": "b1"}},
                {"type": "approval.required", "payload": {"user_id": "alice", "approval_id": "a1"}},
            ]
        )
        assert resp.status_code == 200, resp.text
        # Pushes of one connection are ordered: bob's would have come first.
        pub = await client.push("user:alice")
        assert pub["data"]["approval_id"] == "a1"
        assert not [m for m in client.skipped if m.get("push", {}).get("channel") == "user:bob"]


# --- tokens ---------------------------------------------------------------------


async def test_expired_token_is_error_109_and_socket_stays_open(server: RunningServer) -> None:
    async with bystander(server), raw_client(server) as client:
        reply = await client.call("connect", {"token": server.token("alice", ttl=-10)})
        assert reply == error(1, 109, "token expired")
        with contextlib.suppress(TimeoutError):
            message = await client.receive(QUIET)
            raise AssertionError(f"unexpected message after 109: {message}")
        # Still open: the client may connect again on it with a fresh token.
        assert "connect" in await client.call("connect", {"token": server.token("alice")})


async def test_rest_of_frame_after_failed_connect_is_dropped(server: RunningServer) -> None:
    # Spec §4.3: after a connect error reply Go reads no further commands of the frame.
    async with raw_client(server) as client:
        await client.send(
            {"id": 1, "connect": {"token": server.token("alice", ttl=-10)}},
            {"id": 2, "subscribe": {"channel": "task:t1"}},
        )
        assert await client.receive() == error(1, 109, "token expired")
        with contextlib.suppress(TimeoutError):
            message = await client.receive(QUIET)
            raise AssertionError(f"unexpected message after 109: {message}")


async def assert_invalid_token_close(server: RunningServer, token: str) -> None:
    async with bystander(server), raw_client(server) as client:
        await client.send({"id": 1, "connect": {"token": token}})
        close = await client.closed()
        assert (close.code, close.reason) == (3500, "invalid token")
        assert client.skipped == []


async def test_tampered_signature_closes_3500(server: RunningServer) -> None:
    header, payload, signature = server.token("alice").split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    forged = ".".join((header, payload, signature[:middle] + flipped + signature[middle + 1 :]))
    await assert_invalid_token_close(server, forged)


async def test_tampered_claims_close_3500(server: RunningServer) -> None:
    header, payload, signature = server.token("alice").split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["user_id"] = claims["sub"] = "mallory"
    await assert_invalid_token_close(
        server, ".".join((header, b64url(orjson.dumps(claims)), signature))
    )


async def test_token_of_another_key_closes_3500(server: RunningServer) -> None:
    other_private, _ = generate_signing_key("EdDSA")
    token = mint_token(other_private, "EdDSA", user="alice", ttl_seconds=3600)
    await assert_invalid_token_close(server, token)


async def test_alg_none_token_closes_3500(server: RunningServer) -> None:
    header = b64url(b'{"alg":"none","typ":"JWT"}')
    payload = b64url(orjson.dumps({"sub": "alice", "user_id": "alice"}))
    await assert_invalid_token_close(server, f"{header}.{payload}.")


async def test_connect_without_token_is_error_101(server: RunningServer) -> None:
    async with bystander(server), raw_client(server) as client:
        reply = await client.call("connect", {})
        assert reply == error(1, 101, "unauthorized")


# --- framing and rpc --------------------------------------------------------------


async def test_commands_in_one_frame_get_replies_in_order(server: RunningServer) -> None:
    async with raw_client(server) as client:
        await client.send(
            {"id": 1, "connect": {"token": server.token("alice")}},
            {"id": 2, "subscribe": {"channel": "task:t1"}},
            {"id": 3, "subscribe": {"channel": "task:t2"}},
        )
        replies = [await client.receive() for _ in range(3)]
        assert [r.get("id") for r in replies] == [1, 2, 3], replies
        assert "connect" in replies[0]
        assert "subscribe" in replies[1] and "subscribe" in replies[2]
        resp = await server.broadcast(
            {"type": "task.updated", "payload": {"task_id": "t2", "status": "done"}}
        )
        assert resp.status_code == 200, resp.text
        assert (await client.push("task:t2"))["data"]["status"] == "done"


async def test_rpc_ping_answers_pong(server: RunningServer) -> None:
    async with connected(server) as client:
        reply = await client.call("rpc", {"method": "ping"})
        assert reply == {"id": reply["id"], "rpc": {"data": {"pong": True}}}


async def test_unknown_rpc_method_is_error_104(server: RunningServer) -> None:
    async with bystander(server), connected(server) as client:
        reply = await client.call("rpc", {"method": "nosuch", "data": {"a": 1}})
        assert reply == error(reply["id"], 104, "method not found")
        await client.stays_open()
