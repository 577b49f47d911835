"""Emulation across nodes: a centrifuge-js client streams from node A while every
command it sends lands on node B (as behind a load balancer that spreads requests),
and B relays them to A over Redis. Two real `dex-shim serve` processes, a
throwaway redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

import httpx
import pytest

from shim.app.fallback import EMULATION_PATH, HTTP_STREAM_PATH, SSE_PATH
from tests.integration.test_js_sdk import FAST, on, subscribe, task_event, wait_until
from tests.jsclient import JsClient
from tests.multinode import start_nodes
from tests.redis_cluster import RedisClusterProcesses
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.js]


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest.mark.parametrize(
    ("transport", "protobuf"),
    [("http_stream", False), ("sse", False), ("http_stream", True)],
    ids=["http_stream", "sse", "http_stream-protobuf"],
)
async def test_commands_landing_on_another_node_reach_the_session(
    redis: RedisServer, transport: str, protobuf: bool
) -> None:
    await commands_reach_the_session_across_nodes([redis.url], {}, transport, protobuf=protobuf)


async def test_commands_reach_the_session_across_nodes_on_a_redis_cluster() -> None:
    with RedisClusterProcesses() as cluster:
        await commands_reach_the_session_across_nodes(
            cluster.seed_urls, {"redis_cluster": "true"}, "http_stream"
        )


async def commands_reach_the_session_across_nodes(
    redis_urls: Sequence[str],
    settings: Mapping[str, str],
    transport: str,
    *,
    protobuf: bool = False,
) -> None:
    async with start_nodes(2, redis_urls, settings=settings) as (a, b):
        path = HTTP_STREAM_PATH if transport == "http_stream" else SSE_PATH
        options = {
            "transports": [{"transport": transport, "endpoint": a.url + path}],
            "emulationEndpoint": b.url + EMULATION_PATH,  # every command goes to B
            "websocket": False,
            "protobuf": protobuf,
            **FAST,
        }
        async with JsClient("", a.token("hana"), **options) as js:
            await js.call("connect")
            connected = await js.wait_event("connected", timeout=10)
            assert connected["transport"] == transport

            # Subscribe, RPC, presence and history: sent to B, answered on A's stream.
            await subscribe(js, "task:M", recoverable=True)
            assert await js.call("rpc", method="ping") == {"data": {"pong": True}}
            presence = await js.call("presence", channel="task:M")
            assert [c["user"] for c in presence["clients"].values()] == ["hana"]

            response = await b.broadcast([task_event("M", 1), task_event("M", 2)])
            assert response.status_code == 200, response.text
            await wait_until(lambda: len(js.find_events(on("task:M", "sub.publication"))) >= 2)
            pubs = js.find_events(on("task:M", "sub.publication"))
            assert [p["data"]["seq"] for p in pubs] == [1, 2]
            history = await js.call("history", channel="task:M", limit=5)
            assert [p["data"]["seq"] for p in history["publications"]] == [1, 2]

        # A node name nobody listens on, and a session B does not hold, are told apart.
        async with httpx.AsyncClient(base_url=b.url) as http:
            command = '{"id":9,"rpc":{"method":"ping"}}'
            gone = {"session": "s", "node": "no-such-node", "data": command}
            response = await http.post(EMULATION_PATH, json=gone)
            assert response.status_code == 404
            assert response.json() == {"error": "node not found"}
