"""The `dex-shim` command as an operator runs it: serve with no set-up, mint a
development token that the served node accepts, print the configuration."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx

from tests.pyclient import new_client, new_subscription

DEX_SHIM = [sys.executable, "-m", "shim.cli"]
REPO = Path(__file__).resolve().parents[2]


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    env["PYTHONPATH"] = str(REPO)
    env["DEX_SHIM_PORT"] = "0"
    return env


async def _run(workdir: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *DEX_SHIM,
        *args,
        cwd=workdir,
        env=_env(workdir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_serve_and_token_work_together_without_setup(tmp_path: Path) -> None:
    server = await asyncio.create_subprocess_exec(
        *DEX_SHIM,
        "serve",
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))

        token = (await _run(tmp_path, "token", "--user", "alice")).strip()
        api_key = (tmp_path / ".dex-shim" / "api-key").read_text().strip()

        client, events = new_client(f"ws://127.0.0.1:{port}/connection/websocket", token)
        await client.connect()
        connected = await events.wait_for("connected")
        assert connected.client
        sub, sub_events = new_subscription(client, "task:cli")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"http://127.0.0.1:{port}/api/v1/broadcast",
                json={"type": "task.updated", "payload": {"task_id": "cli", "status": "done"}},
                headers={"X-API-Key": api_key},
            )
        assert response.status_code == 200, response.text
        publication = await sub_events.wait_for("publication")
        assert publication.pub.data["status"] == "done"

        # The operator's commands against the running node.
        node = f"http://127.0.0.1:{port}"
        out = await _run(
            tmp_path, "publish", "task.updated", '{"task_id":"cli","status":"again"}', "--url", node
        )
        assert '"accepted":1' in out
        publication = await sub_events.wait_for("publication", count=2)
        assert publication.pub.data["status"] == "again"
        out = await _run(tmp_path, "cutover", "--percent", "25", "--allow", "alice", "--url", node)
        assert '"channels_percent":25.0' in out and '"allow_users":["alice"]' in out
        out = await _run(tmp_path, "cutover", "--url", node)
        assert '"channels":1' in out  # this client, counted as a channel-protocol connection
        await client.disconnect()
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(server.wait(), 30)
    assert code == 0


async def test_checkconfig_prints_each_setting_with_its_default(tmp_path: Path) -> None:
    out = await _run(tmp_path, "checkconfig")
    assert re.search(r"^client_queue_max_size_bytes = 2097152 +# default 2097152; ", out, re.M)
    assert re.search(r"^port = 0 +# default 8000; ", out, re.M)  # DEX_SHIM_PORT applied
