"""The client kit (clients/js) against the shim: the server's kit opt-ins, a browser
page flipped between protocols, and the short rehearsal.

The page test runs headless Chromium on a page that uses the kit's drop-in hook
and useChannel, against a real `dex-shim serve`, while events are ingested and an
admin moves the user between protocols back and forth.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import centrifuge.protocol.client_pb2 as sdk  # type: ignore[import-untyped]
import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from loadtests.rehearsal import NODE_SETTINGS, Plan, rehearse, render, simulated_users
from shim.centrifuge import pbcodec
from shim.core.config import load_settings
from tests.conftest import ADMIN_KEY, RunningServer
from tests.integration.test_console import Browser, browser_available
from tests.legacyclient import legacy_url
from tests.multinode import ClusterKeys, NodeProcess, spawn_node
from tests.rawcentrifuge import raw_client

KIT = Path(__file__).resolve().parents[2] / "clients" / "js"
PAGE_DIR = KIT / "test" / "page"
PAGE_BUNDLE = KIT / "dist-test" / "page.js"


def kit_built() -> bool:
    return (KIT / "dist" / "index.js").is_file() and PAGE_BUNDLE.is_file()


async def frames_until(ws: ClientConnection, kind: str, timeout: float = 5.0) -> list[str]:
    """Text frames received up to and including the first of type `kind`."""
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            assert isinstance(frame, str)
            seen.append(frame)
            if orjson.loads(frame)["type"] == kind:
                return seen


async def global_notice(ws: ClientConnection) -> dict[str, Any]:
    """The payload of the next position notice about the global stream."""
    while True:
        notice = orjson.loads((await frames_until(ws, "shim.position"))[-1])["payload"]
        if notice["channel"] == "global":
            return dict(notice)


async def test_position_notice_places_legacy_frames_without_changing_them(
    server: RunningServer,
) -> None:
    token = server.token("kit-user")
    async with (
        connect(legacy_url(server.port, token), compression=None) as kit,
        connect(legacy_url(server.port, token), compression=None) as hook,
    ):
        await hook.send('{"action":"subscribe_all"}')
        await kit.send('{"action":"subscribe_all"}')
        await kit.send('{"action":"position"}')
        start = orjson.loads((await frames_until(kit, "shim.position"))[-1])
        # First where the personal channel stands (nothing published there yet)...
        assert start["payload"]["channel"] == "user:kit-user"
        assert start["payload"]["offset"] == 0 and start["payload"]["start"] is True
        first = await global_notice(kit)
        # ...then the global stream: nothing was published yet, the position is not known.
        assert first == {"channel": "global", "offset": None, "epoch": None, "top": 0}
        event = {"type": "task.updated", "payload": {"task_id": "t1", "n": 1}, "task_id": "t1"}
        assert (await server.broadcast(event)).status_code == 200
        kit_frames = await frames_until(kit, "task.updated")
        hook_frame = await asyncio.wait_for(hook.recv(), 5)
        assert kit_frames[-1] == hook_frame, "event frames are byte-identical for kit clients"
        # The first event after the node subscribed is announced as a new stream.
        assert [orjson.loads(f)["payload"]["offset"] for f in kit_frames[:-1]] == [0]
        await kit.send('{"action":"position"}')
        placed = await global_notice(kit)
        history = await server.runtime.broker.history("global", limit=0)
        assert placed == {
            "channel": "global",
            "offset": history.position.offset,
            "epoch": history.position.epoch,
            "top": history.position.offset,  # the engine's top: this node is not behind
        }
        # A server API publication to global is not a legacy event: the kit client is
        # told the stream moved on, the hook sees nothing.
        response = await server.http.post(
            "/api/publish",
            json={"channel": "global", "data": {"x": 1}},
            headers={"X-API-Key": server.settings.api_key},
        )
        assert response.status_code == 200, response.text
        moved = await global_notice(kit)
        assert moved["offset"] == placed["offset"] + 1
        assert (await server.broadcast(event)).status_code == 200
        assert orjson.loads(await asyncio.wait_for(kit.recv(), 5))["type"] == "task.updated"
        assert orjson.loads(await asyncio.wait_for(hook.recv(), 5))["type"] == "task.updated"
        # A flag change: a notice to the kit client only.
        response = await server.http.post(
            "/api/v1/admin/cutover",
            json={"channels_percent": 5},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        assert response.status_code == 200
        notice = orjson.loads(await asyncio.wait_for(kit.recv(), 5))
        assert notice["type"] == "shim.cutover"
        assert notice["payload"] == {"cutover_version": server.runtime.cutover.version}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hook.recv(), 0.5)


async def test_publications_carry_legacy_top_level_ids_as_tags(server: RunningServer) -> None:
    async with connect(server.ws_url, compression=None) as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": server.token()}}).decode())
        await asyncio.wait_for(ws.recv(), 5)
        await ws.send('{"id":2,"subscribe":{"channel":"global"}}')
        await asyncio.wait_for(ws.recv(), 5)
        body = {"type": "session.started", "payload": {"session_id": "s1"}, "task_id": "t9"}
        assert (await server.broadcast(body)).status_code == 200
        push = orjson.loads(await asyncio.wait_for(ws.recv(), 5))["push"]["pub"]
        assert push["tags"] == {"task_id": "t9"}
        assert orjson.loads(orjson.dumps(push["data"]))["session_id"] == "s1"
        # Centrifuge clients hear flag changes as an asynchronous message.
        await server.http.post(
            "/api/v1/admin/cutover",
            json={"channels_percent": 1},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        message = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert message == {
            "push": {"message": {"data": {"cutover_version": server.runtime.cutover.version}}}
        }


async def test_protobuf_clients_hear_flag_changes_in_protobuf(server: RunningServer) -> None:
    async with raw_client(server.ws_url, server.token(), "protobuf") as client:
        response = await server.http.post(
            "/api/v1/admin/cutover",
            json={"channels_percent": 1},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        assert response.status_code == 200
        frame = await asyncio.wait_for(client.ws.recv(), 5)
        assert isinstance(frame, bytes)
        (raw,) = pbcodec.split_frame(frame)
        message = sdk.Reply.FromString(raw).push.message
        assert orjson.loads(message.data) == {"cutover_version": server.runtime.cutover.version}
        # The connection goes on: a subscribe is answered.
        await client.send({"id": 2, "subscribe": {"channel": "global"}})
        assert "subscribe" in (await client.replies())[0]


async def test_realtime_config_serves_the_route_table(server: RunningServer) -> None:
    response = await server.http.get(
        "/api/v1/realtime/config", headers={"Authorization": f"Bearer {server.token()}"}
    )
    routing = response.json()["routing"]
    assert routing["global_channel"] == "global"
    assert routing["default_channel"] == "system"
    task = next(r for r in routing["routes"] if r["match"] == "task.")
    assert task == {
        "match": "task.",
        "channels": ["task:{task_id}", "project:{project_id}"],
        "optional": ["project:{project_id}"],
        "fallback": "",
    }


# -- the browser page ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def page_server(node: NodeProcess) -> AsyncIterator[int]:
    """The test page's origin: its files, and the config endpoint passed to the node
    (as a reverse proxy in front of the app would); the sockets go to the node."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = request.split(" ", 2)[1]
            headers = dict(
                line.split(": ", 1) for line in request.split("\r\n")[1:] if ": " in line
            )
            if path.startswith("/api/v1/realtime/config"):
                auth = headers.get("Authorization") or headers.get("authorization") or ""
                upstream = await node.http.get(path, headers={"Authorization": auth})
                status, body, kind = upstream.status_code, upstream.content, "application/json"
            elif path.startswith("/index.html"):
                status, body, kind = 200, (PAGE_DIR / "index.html").read_bytes(), "text/html"
            elif path == "/page.js":
                status, body, kind = 200, PAGE_BUNDLE.read_bytes(), "text/javascript"
            elif path == "/favicon.ico":
                status, body, kind = 200, b"", "image/x-icon"
            else:
                status, body, kind = 404, b"{}", "application/json"
            head = (
                f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def flip_event(seq: int) -> dict[str, Any]:
    """Task events of t1 and t2 (t1's also with a top-level task_id), and quest events."""
    if seq % 3 == 0:
        return {"type": "quest.content_delta", "payload": {"quest_id": "q1", "seq": seq}}
    task = "t1" if seq % 3 == 1 else "t2"
    body: dict[str, Any] = {"type": "task.updated", "payload": {"task_id": task, "seq": seq}}
    if task == "t1":
        body["task_id"] = "t1"
    return body


async def test_a_page_flipped_between_protocols_gets_every_event_once_in_order(
    tmp_path: Path,
) -> None:
    assert browser_available(), (
        "needs node, tests/js packages and Chromium (make test installs them)"
    )
    assert kit_built(), "make kit builds clients/js (make test does)"
    keys = ClusterKeys.generate()
    node = await spawn_node("kit-page", keys, tmp_path / "node")
    user = "page-user"
    ingested: list[dict[str, Any]] = []
    try:
        await node.wait_ready()
        async with page_server(node) as port, Browser() as browser:
            query = f"shim={node.url}&token={keys.token(user)}&channel=task:t1&jitter=100"
            await browser.call("goto", url=f"http://127.0.0.1:{port}/index.html?{query}")
            await browser.wait_text("#state", "^connected$", timeout=10)

            stop = asyncio.Event()

            async def ingest() -> None:
                seq = 0
                while not stop.is_set():
                    seq += 1
                    body = flip_event(seq)
                    response = await node.broadcast(body)
                    assert response.status_code == 200
                    ingested.append(body)
                    await asyncio.sleep(0.02)

            async def admin(change: dict[str, Any]) -> None:
                async with httpx.AsyncClient(timeout=10) as http:
                    response = await http.post(
                        f"{node.url}/api/v1/admin/cutover",
                        json=change,
                        headers={"X-Admin-Key": keys.admin_key},
                    )
                    response.raise_for_status()

            producer = asyncio.create_task(ingest())
            try:
                protocols = []
                for allow in ([user], [], [user], [], [user], []):
                    await asyncio.sleep(1.2)
                    await admin({"allow_users": allow})
                    protocols.append(
                        await browser.call("evaluate", expression="kitMetrics().protocol")
                    )
                await asyncio.sleep(1.2)
            finally:
                stop.set()
                await producer

            count = len(ingested)

            async def received() -> int:
                return int(await browser.call("evaluate", expression="recorded.dropIn.length"))

            async with asyncio.timeout(15):
                while await received() < count:
                    await asyncio.sleep(0.1)
            drop_in = await browser.call("evaluate", expression="recorded.dropIn")
            channel = await browser.call("evaluate", expression="recorded.channel")
            metrics = await browser.call("evaluate", expression="kitMetrics()")
            problems = await browser.call("problems")
    finally:
        await node.stop()
        await node.http.aclose()

    # The drop-in's handlers got the legacy message of every event, once, in order.
    seqs = [m["payload"]["seq"] for m in drop_in]
    assert seqs == list(range(1, count + 1)), (
        f"missing {sorted(set(range(1, count + 1)) - set(seqs))[:20]}, "
        f"repeated {[s for i, s in enumerate(seqs) if s in seqs[:i]][:20]}, metrics {metrics}"
    )
    for message, body in zip(drop_in, ingested, strict=True):
        expected = {k: v for k, v in body.items()}
        assert {k: v for k, v in message.items() if k != "timestamp"} == expected
        assert isinstance(message["timestamp"], str)
    # useChannel("task:t1") got exactly t1's events, as channel data, in order.
    t1 = [b["payload"]["seq"] for b in ingested if b["payload"].get("task_id") == "t1"]
    assert [d["seq"] for d in channel] == t1
    assert all(d["type"] == "task.updated" and d["task_id"] == "t1" for d in channel)
    # Both directions were exercised, each handover completed, never more than two sockets.
    assert "channels" in protocols and "legacy" in protocols
    assert metrics["switches"] == 6, metrics
    assert metrics["gaps"] == 0, metrics
    assert metrics["peakConnections"] == 2, metrics
    assert metrics["connections"] == 1, metrics
    assert not problems, problems


async def test_short_rehearsal_hands_everyone_over_and_back_losing_nothing() -> None:
    """The rehearsal at in-suite size: two nodes on Redis, one restarted mid-run."""
    assert kit_built(), "make kit builds clients/js (make test does)"
    plan = Plan(users=30, rate=20.0, hold_seconds=0.5, settle_timeout=30.0, notice_jitter_ms=300)
    results = await rehearse(2, plan, log=lambda line: None)
    table = render("short rehearsal", results)
    assert [r.name for r in results] == ["0%", "10%", "50%", "100%", "channels", "legacy"]
    assert all(r.ok for r in results), table
    assert any(r.restarted for r in results)
    assert sum(r.switches for r in results) > 0
    assert all(r.peak_connections <= 2 for r in results), table


def test_the_rehearsal_keeps_enough_global_history_for_a_node_restart() -> None:
    """`global` has no `:`: its history is the default namespace's. A namespace named
    "global" never applied, and 100 publications (2 s at 50/s) did not span a restart."""
    env = {"DEX_SHIM_" + name.upper(): value for name, value in NODE_SETTINGS.items()}
    options = load_settings(env=env).namespace_for("global")
    assert options is not None and options.history_size >= 10_000


async def test_the_kit_on_node_gets_frames_written_together_in_order(tmp_path: Path) -> None:
    """Centrifuge frames of several publications, written to the socket together
    (small frames, a write delay), arrive in one TCP read: centrifuge-js under Node
    then interleaved their replies, and the kit took a reordered offset for a
    skipped one. Every event reaches the kit once, in order, with no hole."""
    assert kit_built(), "make kit builds clients/js (make test does)"
    keys = ClusterKeys.generate()
    settings = {
        "cutover_mode": "channels",
        "websocket_max_frame_bytes": "700",
        "client_write_delay_seconds": "0.05",
    }
    node = await spawn_node("kit-burst", keys, tmp_path / "node", settings=settings)
    try:
        await node.wait_ready()
        async with simulated_users() as users:
            user = {"name": "burst", "baseUrl": node.url, "token": keys.token("burst")}
            await users.call("start", users=[user], options={"configPollMs": 0})
            async with asyncio.timeout(15):
                while (await users.call("status"))["protocols"]["channels"] != 1:
                    await asyncio.sleep(0.05)
            seq = 0
            for _burst in range(5):
                events = []
                for _ in range(40):
                    seq += 1
                    payload = {"task_id": "t1", "seq": seq}
                    events.append({"type": "task.updated", "payload": payload})
                response = await node.http.post(
                    "/api/v1/broadcast", json=events, headers={"X-API-Key": keys.api_key}
                )
                assert response.status_code == 200 and response.json()["accepted"] == 40
                await asyncio.sleep(0.2)
            async with asyncio.timeout(15):
                while (await users.call("check", upTo=seq))["behind"]:
                    await asyncio.sleep(0.05)
            check = await users.call("check", upTo=seq)
            metrics = await users.call("metrics")
    finally:
        await node.stop()
        await node.http.aclose()
    assert (check["lost"], check["duplicated"], check["outOfOrder"]) == (0, 0, 0), check
    assert metrics["holes"] == 0 and metrics["gaps"] == 0, metrics
