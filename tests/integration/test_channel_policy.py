"""Channel authorization through the real server: the HTTP callback policy asks
the application, the claims policy reads the token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.conftest import run_server
from tests.pyclient import new_client, new_subscription


class DecidingApp:
    """The application's subscribe endpoint: allows channels starting with `task:ok`."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> DecidingApp:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/can-subscribe"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            ask = orjson.loads(await reader.readexactly(length))
            self.asked.append(ask)
            body = orjson.dumps({"allow": ask["channel"].startswith("task:ok")})
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def deciding_app() -> AsyncIterator[DecidingApp]:
    async with DecidingApp() as app:
        yield app


async def test_http_policy_asks_the_application_and_caches(
    signing_keys: tuple[str, str], deciding_app: DecidingApp
) -> None:
    async with run_server(
        signing_keys,
        channel_policy="http",
        channel_policy_url=deciding_app.url,
        channel_policy_cache_seconds=60,
    ) as server:
        client, events = new_client(server.ws_url, server.token("alice"))
        await client.connect()
        connected = await events.wait_for("connected")

        allowed, allowed_events = new_subscription(client, "task:ok-1")
        await allowed.subscribe()
        await allowed_events.wait_for("subscribed")
        denied, denied_events = new_subscription(client, "task:secret")
        await denied.subscribe()
        refused = await denied_events.wait_for("unsubscribed")
        assert refused.code == 103

        # The personal channel never goes to the application.
        asked_channels = [ask["channel"] for ask in deciding_app.asked]
        assert asked_channels == ["task:ok-1", "task:secret"]
        assert deciding_app.asked[0] == {
            "user": "alice",
            "channel": "task:ok-1",
            "client": connected.client,
        }

        # A second subscribe of the same channel by the same user is answered from the cache.
        await allowed.unsubscribe()
        await allowed.subscribe()
        await allowed_events.wait_for("subscribed", count=2)
        assert len(deciding_app.asked) == 2
        await client.disconnect()


async def test_http_policy_unreachable_is_temporary(signing_keys: tuple[str, str]) -> None:
    async with run_server(
        signing_keys,
        channel_policy="http",
        channel_policy_url="http://127.0.0.1:9/nobody-listens",
        channel_policy_timeout_seconds=0.5,
    ) as server:
        client, events = new_client(server.ws_url, server.token("alice"))
        await client.connect()
        await events.wait_for("connected")
        sub, sub_events = new_subscription(client, "task:ok-2")
        await sub.subscribe()
        # Error 100 is temporary: the SDK reports it and keeps retrying instead of giving up.
        await sub_events.wait_for(
            "error", lambda ctx: getattr(ctx.error, "code", None) == 100, count=2, timeout=10
        )
        assert not sub_events.named("unsubscribed")
        await client.disconnect()


async def test_claims_policy_reads_the_token(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, channel_policy="claims") as server:
        token = server.token("alice", channels=["task:*"], project_ids=["p1"])
        client, events = new_client(server.ws_url, token)
        await client.connect()
        await events.wait_for("connected")
        results = {}
        for channel in ("task:anything", "project:p1", "project:p2", "quest:q1"):
            sub, sub_events = new_subscription(client, channel)
            await sub.subscribe()
            done = await asyncio.wait_for(_outcome(sub_events), 10)
            results[channel] = done
        assert results == {
            "task:anything": "subscribed",
            "project:p1": "subscribed",
            "project:p2": 103,
            "quest:q1": 103,
        }
        await client.disconnect()


async def _outcome(events: Any) -> object:
    while True:
        for name, ctx in events.events:
            if name == "subscribed":
                return "subscribed"
            if name == "unsubscribed":
                return ctx.code
        await asyncio.sleep(0.02)
