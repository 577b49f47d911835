"""The operator console at /console: its JSON endpoint over HTTP, and the page itself
driven end to end in Debian's headless Chromium (tests/js/console_e2e.mjs, with
playwright-core) against the real server while clients connect and events flow.

Set CONSOLE_SCREENSHOT=docs/console.png to refresh the screenshot in the docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from shim.core.cutover import Mode
from tests.conftest import ADMIN_KEY, API_KEY, RunningServer, run_server
from tests.jsclient import JS_DIR, node_binary
from tests.legacyclient import SHORT_PINGS, legacy_client
from tests.pyclient import new_client, new_subscription
from tests.rawclient import stalled_subscriber

CHROMIUM = Path(os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium"))
E2E_SCRIPT = JS_DIR / "console_e2e.mjs"
# A queue cap the stalled client reaches after a few MB of loopback buffers.
SLOW_CAP = {"client_queue_max_size_bytes": 512 * 1024, "websocket_write_timeout_seconds": 60}


def browser_available() -> bool:
    return (
        node_binary() is not None
        and CHROMIUM.is_file()
        and (JS_DIR / "node_modules" / "playwright-core" / "package.json").is_file()
    )


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"X-Admin-Key": key}


def task_event(task_id: str, seq: int) -> dict[str, Any]:
    return {
        "type": "task.updated",
        "payload": {"task_id": task_id, "status": "running", "seq": seq},
    }


async def eventually_equal(read: Any, expected: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (current := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, current
        await asyncio.sleep(0.05)


# --- clients ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def channels_client(server: RunningServer, user: str, *channels: str) -> AsyncIterator[None]:
    """A connected centrifuge-python client of `user`, subscribed to `channels`."""
    client, events = new_client(server.ws_url, server.token(user))
    await client.connect()
    try:
        await events.wait_for("connected", timeout=5)
        for channel in channels:
            sub, sub_events = new_subscription(client, channel)
            await sub.subscribe()
            await sub_events.wait_for("subscribed", timeout=5)
        yield
    finally:
        await client.disconnect()


async def flood_until_cut(server: RunningServer, channel: str, task_id: str) -> None:
    """Publish 2 KB events on `channel` until its stalled subscriber is cut off (3008)."""
    node = server.runtime.node
    before = node.subscriber_count(channel)
    filler = "x" * 2000
    deadline = asyncio.get_running_loop().time() + 20
    sent = 0
    while node.subscriber_count(channel) >= before:
        assert asyncio.get_running_loop().time() < deadline, "the stalled client was never cut"
        batch = [
            {"type": "task.updated", "payload": {"task_id": task_id, "n": n, "pad": filler}}
            for n in range(sent, sent + 100)
        ]
        response = await server.broadcast(batch)
        assert response.status_code == 200, response.text
        sent += 100


async def close_code(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code


# --- the JSON endpoint and the static files ------------------------------------------


async def test_page_and_static_files_are_served_with_a_strict_policy(
    server: RunningServer,
) -> None:
    page = await server.http.get("/console")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/console/static/console.js">' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy

    script = await server.http.get("/console/static/console.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    sdk = await server.http.get("/console/static/vendor/centrifuge.js")
    assert sdk.status_code == 200
    assert "globalThis.Centrifuge" in sdk.text
    licence = await server.http.get("/console/static/vendor/centrifuge.LICENSE")
    assert "MIT License" in licence.text
    assert (await server.http.get("/console/static/../__init__.py")).status_code == 404


async def test_overview_needs_the_admin_key(server: RunningServer) -> None:
    missing = await server.http.get("/console/api/overview")
    assert missing.status_code == 401
    wrong = await server.http.get("/console/api/overview", headers=admin("not-the-key"))
    assert wrong.status_code == 401
    api_key = await server.http.get("/console/api/overview", headers=admin(API_KEY))
    assert api_key.status_code == 401
    ok = await server.http.get("/console/api/overview", headers=admin())
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "no-store"


async def test_overview_falls_back_to_this_node_when_the_node_list_fails(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreachable() -> dict[str, dict[str, int]]:
        raise ConnectionError("redis down")

    monkeypatch.setattr(server.runtime, "nodes", unreachable)
    async with channels_client(server, "ann"):
        response = await server.http.get("/console/api/overview", headers=admin())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["nodes"] == {server.runtime.node.name: {"legacy": 0, "channels": 1}}
    assert body["totals"] == {"legacy": 0, "channels": 1}
    assert "unavailable" in body["nodes_error"]


async def test_overview_counts_clients_channels_and_slow_disconnects(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, **SHORT_PINGS, **SLOW_CAP) as server:

        async def overview() -> dict[str, Any]:
            response = await server.http.get("/console/api/overview", headers=admin())
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        empty = await overview()
        name = server.runtime.node.name
        assert empty["node"] == name
        assert empty["nodes"] == {name: {"legacy": 0, "channels": 0}}
        assert empty["nodes_error"] is None
        assert empty["totals"] == {"legacy": 0, "channels": 0}
        assert empty["channels"] == {"count": 0, "top": []}
        assert empty["slow_disconnects"] == {"legacy": 0, "channels": 0}
        assert empty["cutover"]["mode"] == server.runtime.cutover.mode.value

        async with (
            legacy_client(server.port, server.token("leg-1")),
            channels_client(server, "ann", "task:busy", "task:quiet"),
            channels_client(server, "ben", "task:busy"),
            channels_client(server, "cat", "task:busy"),
        ):

            async def top() -> list[tuple[str, int]]:
                rows = (await overview())["channels"]["top"]
                return [(row["channel"], row["subscribers"]) for row in rows]

            async def busiest() -> tuple[str, int]:
                return (await top())[0]

            await eventually_equal(busiest, ("task:busy", 3))
            rows = await top()
            # Each SDK client is also on its personal channel; the legacy client adds its own.
            assert {("task:quiet", 1), ("user:ann", 1), ("user:ben", 1), ("user:cat", 1)} <= set(
                rows
            )
            assert rows[1:] == sorted(rows[1:])  # ties by name
            assert all(count == 1 for _, count in rows[1:])
            now = await overview()
            assert now["totals"] == {"legacy": 1, "channels": 3}
            assert now["nodes"] == {name: {"legacy": 1, "channels": 3}}
            # The legacy client's subscribe_all and three personal channels count as well.
            assert now["channels"]["count"] == len(list(server.runtime.node.channels()))

            stalled = await stalled_subscriber(server.ws_url, server.token("dan"), "task:stall")
            await flood_until_cut(server, "task:stall", "stall")
            assert await close_code(stalled) == 3008
            after = await overview()
            assert after["slow_disconnects"] == {"legacy": 0, "channels": 1}
            assert {"protocol": "channels", "code": 3008, "count": 1} in after["disconnects"]


# --- the page in a real browser --------------------------------------------------------


class BrowserError(Exception):
    pass


class Browser:
    """One headless Chromium page behind tests/js/console_e2e.mjs, one command at a time."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._seq = 0
        self._stderr = bytearray()
        self._drain: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        node = node_binary()
        assert node is not None
        options = {"executablePath": str(CHROMIUM), "width": 1280, "height": 900}
        self._proc = await asyncio.create_subprocess_exec(
            node,
            str(E2E_SCRIPT),
            json.dumps(options),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(JS_DIR),
        )
        self._drain = asyncio.create_task(self._read_stderr())
        return self

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(4096):
            self._stderr += chunk
            del self._stderr[: max(0, len(self._stderr) - 32 * 1024)]

    async def call(self, cmd: str, /, *, timeout: float = 30.0, **params: Any) -> Any:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self._seq += 1
        proc.stdin.write(json.dumps({"seq": self._seq, "cmd": cmd, **params}).encode() + b"\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            raise BrowserError(f"{cmd}: the driver exited\n{self._stderr.decode(errors='replace')}")
        answer = json.loads(line)
        assert answer["seq"] == self._seq
        if not answer["ok"]:
            raise BrowserError(f"{cmd} {params}: {answer['error']}")
        return answer["result"]

    async def text(self, selector: str) -> str:
        return str(await self.call("text", selector=selector))

    async def wait_text(self, selector: str, pattern: str, timeout: float = 5.0) -> str:
        return str(
            await self.call(
                "waitText",
                selector=selector,
                pattern=pattern,
                timeout=int(timeout * 1000),
            )
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            await self.call("close", timeout=10)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        if self._drain is not None:
            await self._drain


@pytest.mark.js
async def test_console_in_chromium(signing_keys: tuple[str, str], tmp_path: Path) -> None:
    # Not a skip: `make test` installs all three, so a missing one is a broken setup.
    assert browser_available(), (
        f"needs node, {CHROMIUM} (Debian package chromium) and tests/js playwright-core"
    )
    shot = Path(os.environ.get("CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    async with (
        run_server(signing_keys, **SHORT_PINGS, **SLOW_CAP) as server,
        Browser() as page,
    ):
        runtime = server.runtime
        assert await page.call("goto", url=f"{server.url}/console") == 200
        await page.call("waitVisible", selector="#login-form")

        # A wrong key is refused and nothing is stored.
        await page.call("fill", selector="#admin-key", value="not-the-admin-key")
        await page.call("click", selector="#login-form button[type=submit]")
        await page.wait_text("#login-error", "rejected")
        assert await page.call("evaluate", expression="sessionStorage.length") == 0

        await page.call("fill", selector="#admin-key", value=ADMIN_KEY)
        await page.call("click", selector="#login-form button[type=submit]")
        await page.call("waitVisible", selector="#dashboard")
        assert await page.text("#node-name") == runtime.node.name
        assert await page.text("#count-legacy") == "0"
        assert await page.text("#count-channels") == "0"
        stored = "Object.values({...sessionStorage})"
        assert await page.call("evaluate", expression=stored) == [ADMIN_KEY]

        # Both protocols' counts follow clients connecting while the page is open.
        async with contextlib.AsyncExitStack() as clients:
            await clients.enter_async_context(legacy_client(server.port, server.token("lee")))
            await page.wait_text("#count-legacy", "^1$")
            await clients.enter_async_context(channels_client(server, "cy", "task:T1"))
            await page.wait_text("#count-channels", "^1$")
            await clients.enter_async_context(legacy_client(server.port, server.token("lou")))
            await clients.enter_async_context(channels_client(server, "cam", "task:T1"))
            await clients.enter_async_context(channels_client(server, "col", "task:T2"))
            await page.wait_text("#count-legacy", "^2$")
            await page.wait_text("#count-channels", "^3$")
            nodes = await page.wait_text("#nodes-body", "this node")
            assert runtime.node.name in nodes
            top = await page.wait_text("#top-body", "task:T1")
            assert top.index("task:T1") < top.index("task:T2")  # 2 subscribers before 1

            # Cutover: the form changes the server's state, there and back to dual (the
            # tail below needs the Centrifuge endpoint, which legacy mode closes). Never
            # `channels` here: it would drain the legacy clients this test still uses.
            start = runtime.cutover.mode
            assert start is not Mode.CENTRIFUGE
            await page.wait_text("#cutover-current", f"^{start.value}$")
            other = Mode.LEGACY if start is Mode.DUAL else Mode.DUAL
            for target, percent, allow in ((other, 25, ["alice", "bob"]), (Mode.DUAL, 10, ["al"])):
                await page.call("select", selector="#cutover-mode", value=target.value)
                await page.call("fill", selector="#cutover-percent", value=str(percent))
                await page.call("fill", selector="#cutover-allow", value="\n".join(allow))
                await page.call("click", selector="#cutover-apply")
                await page.wait_text("#cutover-result", f"Applied: mode {target.value},")
                assert runtime.cutover.mode is target
                assert runtime.cutover.channels_percent == percent
                assert runtime.cutover.allow_users == frozenset(allow)
                assert await page.text("#cutover-current") == target.value
            # A value the server refuses is reported, and the state stays as it was.
            await page.call("fill", selector="#cutover-percent", value="150")
            # (past the browser's own form validation, as a script or older browser would be)
            await page.call(
                "evaluate", expression="document.getElementById('cutover-form').noValidate = true"
            )
            await page.call("click", selector="#cutover-apply")
            await page.wait_text("#cutover-result", "Not applied: channels_percent")
            assert runtime.cutover.channels_percent == 10
            await page.call("click", selector="#cutover-reset")
            await page.wait_text("#cutover-result", "^$")

            # Live tail of a channel while events are ingested.
            await page.call("fill", selector="#tail-channel", value="task:T1")
            await page.call("click", selector="#tail-subscribe")
            await page.wait_text("#tail-status", "^tailing task:T1$")
            await page.wait_text("#count-channels", "^4$")  # the console's own socket
            for seq in range(1, 4):
                response = await server.broadcast(task_event("T1", seq))
                assert response.status_code == 200, response.text
            await page.wait_text("#tail-lines", '"seq":3')
            lines = await page.call(
                "evaluate",
                expression="[...document.querySelectorAll('#tail-lines li')]"
                ".map((li) => li.textContent)",
            )
            assert len(lines) == 3
            for seq, line in enumerate(lines, start=1):
                assert f"task:T1 #{seq}" in line
                assert '"task_id":"T1"' in line and f'"seq":{seq}' in line
            # Events of other channels stay out of this tail.
            response = await server.broadcast(task_event("T2", 1))
            assert response.status_code == 200
            await page.wait_text("#top-body", "task:T1\\s*3")  # the console subscribed too
            assert await page.call("count", selector="#tail-lines li") == 3

            # A client that stops reading is cut off; the page shows the slow disconnect.
            stalled = await stalled_subscriber(server.ws_url, server.token("sid"), "task:stall")
            await flood_until_cut(server, "task:stall", "stall")
            assert await close_code(stalled) == 3008
            await page.wait_text("#slow-channels", "^1$")
            await page.wait_text("#disconnects-body", "channels\\s*3008\\s*1")

            # Some history on the chart before the picture.
            await clients.enter_async_context(legacy_client(server.port, server.token("liv")))
            await asyncio.sleep(2)
            for seq in range(4, 7):
                await server.broadcast(task_event("T1", seq))
            await page.wait_text("#tail-lines", '"seq":6')
            await page.call("screenshot", path=str(shot))
            assert (await asyncio.to_thread(shot.read_bytes))[:8] == b"\x89PNG\r\n\x1a\n"

        # The clients left: the counts fall back (the console's own socket stays).
        await page.wait_text("#count-legacy", "^0$")
        await page.wait_text("#count-channels", "^1$")

        await page.call("click", selector="#logout")
        await page.call("waitVisible", selector="#login-form")
        assert await page.call("evaluate", expression="sessionStorage.length") == 0
        # Nothing broke in the page; the only failed requests are the two refusals above
        # (Chromium logs each as "...status of 401 (Unauthorized)" or with empty brackets).
        problems = [re.sub(r" \(.*\)$", "", p) for p in await page.call("problems")]
        refused = "console: Failed to load resource: the server responded with a status of"
        assert problems == [f"{refused} 401", f"{refused} 400"]
