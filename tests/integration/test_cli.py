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
import websockets

from tests.conftest import add_process_log, remember_secrets
from tests.pyclient import new_client, new_subscription

DEX_SHIM = [sys.executable, "-m", "shim.app.cli"]
REPO = Path(__file__).resolve().parents[2]


def _env(workdir: Path, settings: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    env["PYTHONPATH"] = str(REPO)
    env["DEX_SHIM_PORT"] = "0"
    env.update(settings or {})
    return env


async def _run(workdir: Path, *args: str, settings: dict[str, str] | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        *DEX_SHIM,
        *args,
        cwd=workdir,
        env=_env(workdir, settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    add_process_log(f"dex-shim {args[0]} (stderr)", err.decode())
    return out.decode()


async def test_serve_and_token_work_together_without_setup(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            *DEX_SHIM,
            "serve",
            cwd=tmp_path,
            env=_env(tmp_path, {"DEX_SHIM_ACCESS_LOG": "true"}),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    try:
        assert server.stdout is not None
        line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))

        token = (await _run(tmp_path, "token", "--user", "alice")).strip()
        api_key = (tmp_path / ".dex-shim" / "api-key").read_text().strip()
        admin_key = (tmp_path / ".dex-shim" / "admin-key").read_text().strip()
        remember_secrets(token, api_key, admin_key)

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
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/api/v1/ws?token={token}", compression=None
        ) as legacy:
            await legacy.send('{"action":"subscribe_all"}')
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(server.wait(), 30)
    assert code == 0
    # The development keys made at start and the token never reach the log, though the
    # access log saw the legacy upgrade that carried it.
    log = log_path.read_text()
    add_process_log("dex-shim serve (test_cli)", log)
    assert 'GET /api/v1/ws 1.1\\" 101' in log
    for secret in (token, api_key, admin_key):
        assert secret not in log


async def test_checkconfig_prints_each_setting_with_its_default(tmp_path: Path) -> None:
    out = await _run(tmp_path, "checkconfig")
    assert re.search(r"^client_queue_max_size_bytes = 2097152 +# default 2097152; ", out, re.M)
    assert re.search(r"^port = 0 +# default 8000; ", out, re.M)  # DEX_SHIM_PORT applied


async def test_checkconfig_says_whether_secrets_are_set_but_never_prints_them(
    tmp_path: Path,
) -> None:
    secrets = {
        "DEX_SHIM_API_KEY": "checkconfig-api-key-0123456789-abcdefghijkl",
        "DEX_SHIM_ADMIN_API_KEY": "checkconfig-admin-key-0123456789-abcdefghijkl",
        "DEX_SHIM_TOKEN_ALGORITHM": "HS256",
        "DEX_SHIM_TOKEN_KEY": "checkconfig-hs256-secret-0123456789",
        "DEX_SHIM_REDIS_URL": "redis://:checkconfig-redis-pass@127.0.0.1:6390/0",
    }
    out = await _run(tmp_path, "checkconfig", settings=secrets)
    for name in ("api_key", "admin_api_key", "token_key"):
        assert re.search(rf"^{name} = set \(redacted\) +# default ''; ", out, re.M), name
    assert re.search(r"^redis_url = 'redis://:\[redacted\]@127\.0\.0\.1:6390/0' ", out, re.M)
    assert re.search(r"^token_algorithm = 'HS256' ", out, re.M)
    for value in secrets.values():
        if value != "HS256":
            assert value not in out

    # Unset, they print as the empty string they are.
    out = await _run(tmp_path, "checkconfig")
    assert re.search(r"^api_key = '' +# default ''; ", out, re.M)
