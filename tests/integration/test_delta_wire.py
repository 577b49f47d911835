"""Fossil delta on the wire, read by a plain WebSocket client in both codecs: bytes
for Dex's growing assistant message with and without delta, the deltas rebuilt with
centrifuge-python's own applier, and what Centrifugo does with a bad `delta`.

    pytest -s tests/integration/test_delta_wire.py -k bytes   # prints the figures
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from centrifuge.fossil import apply_delta  # type: ignore[import-untyped]
from websockets.exceptions import ConnectionClosed

from tests.conftest import RunningServer, run_server
from tests.conventions import with_quest_delta
from tests.rawcentrifuge import raw_client
from tests.streams import content_event

UPDATES = 200
TIMEOUT = 10.0


async def stream_bytes(server: RunningServer, codec: str, delta: bool) -> int:
    """Wire bytes a subscriber of quest:m reads for UPDATES growing updates; checks
    that every update rebuilds to the published text."""
    channel = f"quest:m-{codec}-{delta}"
    async with raw_client(server.ws_url, server.token("alice"), codec) as client:
        subscribe: dict[str, Any] = {"channel": channel}
        if delta:
            subscribe["delta"] = "fossil"
        await client.send({"id": 2, "subscribe": subscribe})
        reply = (await client.replies())[0]
        assert bool(reply["subscribe"].get("delta")) is delta
        client.wire_bytes = 0
        events = [content_event(channel.partition(":")[2], step) for step in range(1, UPDATES + 1)]
        for start in range(0, UPDATES, 20):  # as the backend posts them, in small batches
            response = await server.broadcast(events[start : start + 20])
            assert response.status_code == 200, response.text

        previous = b""
        kinds = []
        while len(kinds) < UPDATES:
            for item in await client.replies():
                pub = item["push"]["pub"]
                data = pub["data"]
                raw = data.encode() if isinstance(data, str) else data
                if not delta and isinstance(data, dict):  # JSON without delta: embedded
                    raw = orjson.dumps(data)
                current = apply_delta(previous, raw) if pub.get("delta") else raw
                expected = events[len(kinds)]["payload"]["content"]
                assert orjson.loads(current)["content"] == expected
                previous = current
                kinds.append(bool(pub.get("delta")))
        assert kinds == [False] + [delta] * (UPDATES - 1)
        return client.wire_bytes


async def test_bytes_for_200_growing_updates_with_and_without_delta(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, namespaces=with_quest_delta()) as server:
        figures = {}
        for codec in ("json", "protobuf"):
            full = await stream_bytes(server, codec, delta=False)
            deltas = await stream_bytes(server, codec, delta=True)
            figures[codec] = (full, deltas, 1 - deltas / full)
            assert deltas <= 0.1 * full, figures  # the goal: at least 90 % fewer bytes
    for codec, (full, deltas, saved) in figures.items():
        print(
            f"{codec}: {UPDATES} updates, {full} B without delta, {deltas} B with, {saved:.1%} fewer"
        )


@pytest.mark.parametrize("codec", ["json", "protobuf"])
async def test_unknown_delta_type_closes_with_3501(server: RunningServer, codec: str) -> None:
    async with raw_client(server.ws_url, server.token("alice"), codec) as client:
        await client.send({"id": 2, "subscribe": {"channel": "quest:x", "delta": "zstd"}})
        with pytest.raises(ConnectionClosed) as closed:
            await client.replies()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


@pytest.mark.parametrize("codec", ["json", "protobuf"])
async def test_delta_not_allowed_is_not_negotiated(server: RunningServer, codec: str) -> None:
    async with raw_client(server.ws_url, server.token("alice"), codec) as client:
        await client.send({"id": 2, "subscribe": {"channel": "quest:y", "delta": "fossil"}})
        assert not (await client.replies())[0]["subscribe"].get("delta")
