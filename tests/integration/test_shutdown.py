"""SIGTERM on a node: clients are told to go elsewhere, queued writes are flushed,
the process exits within its grace period."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from adapters.auth.jwt import generate_signing_key, mint_token
from tests.conftest import add_process_log, remember_secrets
from tests.pyclient import new_client, new_subscription

REPO = Path(__file__).resolve().parents[2]


async def test_sigterm_closes_clients_cleanly_after_flushing(tmp_path: Path) -> None:
    private, public = generate_signing_key("EdDSA")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    env.update(
        PYTHONPATH=str(REPO),
        DEX_SHIM_PORT="0",
        DEX_SHIM_TOKEN_KEY=public,
        DEX_SHIM_API_KEY="shutdown-test-api-key-0123456789-abcdef",
        DEX_SHIM_ADMIN_API_KEY="shutdown-test-admin-key-0123456789-abcdef",
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shim.app.cli",
            "serve",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    token = mint_token(private, "EdDSA", user="alice")
    remember_secrets(token, env["DEX_SHIM_API_KEY"], env["DEX_SHIM_ADMIN_API_KEY"])
    try:
        assert server.stdout is not None
        line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        port = int(re.search(r":(\d+) ", line).group(1))  # type: ignore[union-attr]

        client, events = new_client(f"ws://127.0.0.1:{port}/connection/websocket", token)
        await client.connect()
        sub, sub_events = new_subscription(client, "task:bye")
        await sub.subscribe()
        await sub_events.wait_for("subscribed")
        legacy = await connect(f"ws://127.0.0.1:{port}/api/v1/ws?token={token}", compression=None)
        await legacy.send('{"action":"subscribe_all"}')
        await asyncio.sleep(0.2)

        # A burst just before the signal: it must all arrive before the close frames.
        burst = [
            {"type": "task.updated", "payload": {"task_id": "bye", "n": n}} for n in range(300)
        ]
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"http://127.0.0.1:{port}/api/v1/broadcast",
                content=orjson.dumps(burst),
                headers={"X-API-Key": env["DEX_SHIM_API_KEY"]},
            )
        assert response.json()["accepted"] == 300
        server.send_signal(signal.SIGTERM)

        legacy_frames = []
        try:
            while True:
                legacy_frames.append(orjson.loads(await asyncio.wait_for(legacy.recv(), 10)))
        except ConnectionClosed:
            pass
        assert legacy.close_code == 1001
        assert [f["payload"]["n"] for f in legacy_frames] == list(range(300))

        closing = await events.wait_for("connecting", lambda ctx: ctx.code == 3001, timeout=10)
        assert closing.reason == "shutdown"
        assert [ctx.pub.data["n"] for ctx in sub_events.named("publication")] == list(range(300))
        assert await asyncio.wait_for(server.wait(), 15) == 0
        await client.disconnect()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
        add_process_log("dex-shim serve (test_shutdown)", log_path.read_text())
