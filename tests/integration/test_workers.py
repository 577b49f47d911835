"""`dex-shim serve --workers N` as an operator runs it: N processes on one port
(SO_REUSEPORT) sharing publications through the Redis engine, a dead worker
replaced, a clean stop; refused with a clear message on the memory engine."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.multinode import ClusterKeys, node_env, spawn_node
from tests.pyclient import new_client, new_subscription
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

CLIENTS = 16


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return {int(p) for p in handle.read().split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _nodes_with_clients(url: str, admin_key: str, want: int) -> dict[str, dict[str, int]]:
    """Poll the cutover report until `want` nodes each report channel clients (every
    node writes its counts to Redis every few seconds)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http, asyncio.timeout(30):
        while True:
            report = (
                await http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": admin_key})
            ).json()
            busy = {n: c for n, c in report["nodes"].items() if c.get("channels", 0) > 0}
            if len(busy) >= want:
                return dict(report["nodes"])
            await asyncio.sleep(0.5)


async def test_workers_are_refused_on_the_memory_engine(tmp_path: Path) -> None:
    env = node_env(ClusterKeys.generate(), tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shim.app.cli",
        "serve",
        "--workers",
        "2",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"listening" not in out
    assert "--workers 2 needs the Redis engine" in err.decode()
    assert "DEX_SHIM_REDIS_URL" in err.decode()


async def test_two_workers_share_one_port_and_every_publication(tmp_path: Path) -> None:
    keys = ClusterKeys.generate()
    async with RedisServer() as redis:
        node = await spawn_node(
            "workers", keys, tmp_path, redis_urls=[redis.url], args=["--workers", "2"]
        )
        try:
            workers = _children(node.pid)
            assert len(workers) == 2
            clients = []
            for index in range(CLIENTS):
                client, _events = new_client(node.ws_url, keys.token(f"user-{index}"))
                sub, sub_events = new_subscription(client, "task:shared")
                await client.connect()
                await sub.subscribe()
                await sub_events.wait_for("subscribed")
                clients.append((client, sub_events))
            # The kernel spread the connections: both workers hold subscribers.
            nodes = await _nodes_with_clients(node.url, keys.admin_key, want=2)
            assert sum(c["channels"] for c in nodes.values()) == CLIENTS

            # One POST lands on one worker; subscribers on both get it (via Redis).
            for seq in range(3):
                response = await node.broadcast(
                    {"type": "task.updated", "payload": {"task_id": "shared", "seq": seq}}
                )
                assert response.status_code == 200, response.text
            for _client, events in clients:
                for seq in range(3):
                    pub = await events.wait_for("publication", count=seq + 1)
                    assert pub.pub.data["seq"] == seq

            # A worker that dies is replaced on the same port; service goes on.
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            async with asyncio.timeout(30):
                while True:
                    now = _children(node.pid)
                    if len(now) == 2 and victim not in now:
                        break
                    await asyncio.sleep(0.1)
            replacement = (now - workers).pop()
            for client, _events in clients:
                await client.disconnect()
            late, _ = new_client(node.ws_url, keys.token("late"))
            late_sub, late_events = new_subscription(late, "task:shared")
            await late.connect()
            await late_sub.subscribe()
            await late_events.wait_for("subscribed", timeout=20)
            response = await node.broadcast(
                {"type": "task.updated", "payload": {"task_id": "shared", "seq": "late"}}
            )
            assert response.status_code == 200
            assert (await late_events.wait_for("publication")).pub.data["seq"] == "late"
            await late.disconnect()

            node.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await node.process.wait()
            assert code == 0, node.log_tail()
            assert not any(_alive(pid) for pid in (*workers, replacement))
        finally:
            await node.stop()
    assert f"(pid {victim}) exited with -9: restarting it" in node.log_path.read_text()
