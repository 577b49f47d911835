"""CentrifugeSession as the state machine it is, without a socket: frames go in through
`handle_frame`, what the client would read comes out of a real Outbox into a list,
and close requests land on a fake transport. The node, engine (in-memory), token
verifier and channel policy are the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from adapters.auth.jwt import TokenVerifier, generate_signing_key, mint_token
from adapters.brokers.memory import MemoryBroker, MemoryPresenceManager
from shim.centrifuge.fanout import CentrifugeFanout
from shim.centrifuge.session import CentrifugeSession
from shim.core.config import Settings
from shim.core.node import Node
from shim.core.outbox import Outbox
from shim.core.policy import AllowAuthenticated, ChannelAuthorizer

ALGORITHM = "EdDSA"
SIGNING_KEY, VERIFICATION_KEY = generate_signing_key(ALGORITHM)
VERIFIER = TokenVerifier(ALGORITHM, VERIFICATION_KEY)


class FakeTransport:
    transport_name = "fake"

    def __init__(self) -> None:
        self.closes: list[tuple[int, str]] = []

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


class Client:
    """One session, its outbox's writes decoded message by message."""

    def __init__(self, node: Node, *, queue_bytes: int = 1 << 20) -> None:
        self.frames: list[bytes] = []
        self.outbox = Outbox(queue_bytes, self._write)
        self.transport = FakeTransport()
        self.session = CentrifugeSession(
            node, VERIFIER, ChannelAuthorizer(AllowAuthenticated()), self.transport, self.outbox
        )
        self._next_id = 0

    async def _write(self, frame: bytes) -> None:
        self.frames.append(frame)

    async def send(self, **command: Any) -> int:
        self._next_id += 1
        # A text frame: the JSON wire refuses binary ones.
        await self.session.handle_frame(orjson.dumps({"id": self._next_id, **command}).decode())
        return self._next_id

    async def messages(self) -> list[dict[str, Any]]:
        """Everything written so far, one decoded message per newline-joined item."""
        await asyncio.sleep(0)
        await self.outbox.flushed(5)
        return [orjson.loads(line) for frame in self.frames for line in frame.split(b"\n")]

    async def reply(self, command_id: int) -> dict[str, Any]:
        found = [m for m in await self.messages() if m.get("id") == command_id]
        assert len(found) == 1, await self.messages()
        return found[0]

    async def connect(self, user: str = "ada") -> dict[str, Any]:
        token = mint_token(SIGNING_KEY, ALGORITHM, user=user)
        return await self.reply(await self.send(connect={"token": token}))


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(
        Settings(),
        MemoryBroker(),
        MemoryPresenceManager(),
        fanouts=(CentrifugeFanout(),),
    )
    await node.start()
    yield node
    await node.close()


async def test_connect_then_subscribe_then_a_publication_arrives(node: Node) -> None:
    client = Client(node)
    connected = await client.connect()
    assert connected["connect"]["client"] == client.session.client_id
    # The personal channel comes as a server-side subscription.
    assert "user:ada" in connected["connect"]["subs"]
    reply = await client.reply(await client.send(subscribe={"channel": "task:1"}))
    assert "error" not in reply and client.session.connected

    await node.publish("task:1", b'{"n":1}')
    pushes = [m["push"] for m in await client.messages() if "push" in m]
    assert pushes == [{"channel": "task:1", "pub": {"data": {"n": 1}, "offset": 1}}]


async def test_a_command_before_connect_closes_with_bad_request(node: Node) -> None:
    client = Client(node)
    await client.send(subscribe={"channel": "task:1"})
    assert client.transport.closes == [(3501, "bad request")]
    assert client.session.closed and client.session not in node.sessions


async def test_a_frame_that_is_not_json_closes_with_bad_request(node: Node) -> None:
    client = Client(node)
    await client.session.handle_frame("{not json")
    assert client.transport.closes == [(3501, "bad request")]


async def test_an_invalid_token_closes_without_reconnect(node: Node) -> None:
    client = Client(node)
    await client.send(connect={"token": "not.a.token"})
    assert client.transport.closes == [(3500, "invalid token")]


async def test_an_error_reply_keeps_the_connection(node: Node) -> None:
    client = Client(node)
    await client.connect()
    reply = await client.reply(await client.send(subscribe={"channel": "task:1"}))
    again = await client.reply(await client.send(subscribe={"channel": "task:1"}))
    assert "error" not in reply
    assert again["error"] == {"code": 105, "message": "already subscribed"}
    assert client.transport.closes == [] and client.session.connected


async def test_a_client_over_its_queue_cap_is_cut_off_as_slow(node: Node) -> None:
    client = Client(node, queue_bytes=1024)
    await client.connect()
    await client.reply(await client.send(subscribe={"channel": "task:1"}))
    await node.publish("task:1", orjson.dumps({"pad": "x" * 2048}))
    assert client.transport.closes == [(3008, "slow")]
    assert node.counters.disconnects == {("channels", 3008): 1}
    # Its channels were let go: nothing more is delivered to it.
    assert node.subscriber_count("task:1") == 0


async def test_recovery_returns_what_the_client_missed(node: Node) -> None:
    for n in range(1, 4):
        await node.publish("task:1", orjson.dumps({"n": n}))
    client = Client(node)
    await client.connect()
    epoch = (await node.broker.history("task:1", limit=0)).position.epoch
    reply = await client.reply(
        await client.send(
            subscribe={"channel": "task:1", "recover": True, "offset": 1, "epoch": epoch}
        )
    )
    result = reply["subscribe"]
    assert result["recovered"] is True and result["was_recovering"] is True
    assert [p["data"]["n"] for p in result["publications"]] == [2, 3]
    assert result["offset"] == 1 and result["epoch"] == epoch


async def test_a_connection_that_never_connects_goes_stale(node: Node) -> None:
    client = Client(node)
    now = asyncio.get_running_loop().time()
    client.session.tick(now + node.settings.client_stale_close_delay_seconds + 1, 0.0)
    assert client.transport.closes == [(3502, "stale")]


async def test_the_socket_going_away_releases_everything(node: Node) -> None:
    client = Client(node)
    await client.connect()
    await client.reply(await client.send(subscribe={"channel": "task:1"}))
    assert node.subscriber_count("task:1") == 1
    client.session.transport_closed()
    assert node.subscriber_count("task:1") == 0
    assert client.session not in node.sessions and node.user_connections == {}
    # The client closed; nobody asks the transport to close again.
    assert client.transport.closes == []


async def test_shutdown_tells_sdks_to_reconnect_elsewhere(node: Node) -> None:
    client = Client(node)
    await client.connect()
    client.session.shutdown()
    assert client.transport.closes == [(3001, "shutdown")]


async def test_a_cutover_change_reaches_a_connected_client_as_a_message(node: Node) -> None:
    client = Client(node)
    await client.connect()
    client.session.cutover_changed(7)
    messages = [m["push"]["message"] for m in await client.messages() if "push" in m]
    assert messages == [{"data": {"cutover_version": 7}}]


async def test_a_binary_frame_on_the_json_wire_closes_with_bad_request(node: Node) -> None:
    client = Client(node)
    token = mint_token(SIGNING_KEY, ALGORITHM, user="ada")
    await client.session.handle_frame(orjson.dumps({"id": 1, "connect": {"token": token}}))
    assert client.transport.closes == [(3501, "bad request")]


async def test_subscribes_past_the_channel_limit_are_refused_with_106() -> None:
    # The personal channel (server-side) takes one of the two places.
    node = Node(
        Settings(client_channel_limit=2),
        MemoryBroker(),
        MemoryPresenceManager(),
        fanouts=(CentrifugeFanout(),),
    )
    await node.start()
    try:
        client = Client(node)
        await client.connect()
        first = await client.reply(await client.send(subscribe={"channel": "task:1"}))
        over = await client.reply(await client.send(subscribe={"channel": "task:2"}))
        assert "error" not in first
        assert over["error"] == {"code": 106, "message": "limit exceeded"}
        # Leaving one makes room again.
        await client.reply(await client.send(unsubscribe={"channel": "task:1"}))
        again = await client.reply(await client.send(subscribe={"channel": "task:2"}))
        assert "error" not in again and client.session.connected
    finally:
        await node.close()


async def test_a_client_cannot_unsubscribe_its_server_side_channel(node: Node) -> None:
    client = Client(node)
    await client.connect()
    command_id = await client.send(unsubscribe={"channel": "user:ada"})
    # Answered as done (as Centrifuge does), yet the subscription stays.
    assert await client.reply(command_id) == {"id": command_id, "unsubscribe": {}}
    assert client.session.subscriptions["user:ada"].server_side
    await node.publish("user:ada", b'{"n":1}')
    pushes = [m["push"] for m in await client.messages() if "push" in m]
    assert pushes == [{"channel": "user:ada", "pub": {"data": {"n": 1}, "offset": 1}}]


async def test_clients_connected_together_renew_presence_at_different_times(node: Node) -> None:
    clients = [Client(node) for _ in range(20)]
    for n, client in enumerate(clients):
        await client.connect(user=f"user-{n}")
        await client.reply(await client.send(subscribe={"channel": "task:1"}))
    refresh = node.settings.presence_refresh_seconds
    now = asyncio.get_running_loop().time()
    for client in clients:
        client.session.tick(now, 0.0)
    # The first renewal falls anywhere in the second half of the interval, not at
    # one instant for all of them (5,000 renewing in one tick stalled the loop).
    due = [client.session.next_presence_at for client in clients]
    assert all(now + refresh / 2 <= at <= now + refresh for at in due)
    assert len(set(due)) > 10
    for client in clients:
        client.session.tick(now + refresh / 2 - 0.001, 0.0)
    assert [client.session.next_presence_at for client in clients] == due
    # Then every interval after its own first renewal.
    for client, at in zip(clients, due, strict=True):
        client.session.tick(at, 0.0)
        assert client.session.next_presence_at == at + refresh
