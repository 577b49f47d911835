"""Shared fixtures: a real hypercorn server on an ephemeral loopback port, running
this process's event loop, with keys and an API key for the tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from adapters.auth.jwt import generate_signing_key, mint_token
from shim.app.asgi import create_app
from shim.app.runtime import Runtime
from shim.app.server import serve_app
from shim.centrifuge.session import CentrifugeSession
from shim.core.config import Settings, load_settings
from shim.transport.server import bind_socket
from tests.multinode import KEEPALIVE_UNDER_SERVERS

API_KEY = "test-api-key-0123456789-abcdefghijklmnop"
ADMIN_KEY = "test-admin-key-0123456789-abcdefghijklmnop"
# Property tests judge outcomes, not speed: a shared, loaded machine must not turn
# hypothesis's per-example deadline into a failure.
hypothesis_settings.register_profile("suite", deadline=None)
hypothesis_settings.load_profile("suite")

# Every token minted by the suite: none may appear in the logs of the whole run.
MINTED_TOKENS: set[str] = set()
# Vendored from the product spec (see tests/data/README.md): a bare clone tests on its own.
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def signing_keys() -> tuple[str, str]:
    return generate_signing_key("EdDSA")


@dataclass
class RunningServer:
    runtime: Runtime
    port: int
    signing_key: str
    http: httpx.AsyncClient
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def token(self, user: str = "user-1", ttl: int | None = 3600, **extra: Any) -> str:
        token = mint_token(self.signing_key, "EdDSA", user=user, ttl_seconds=ttl, extra=extra)
        MINTED_TOKENS.add(token)
        return token

    async def broadcast(self, body: Any) -> httpx.Response:
        return await self.http.post("/api/v1/broadcast", json=body, headers={"X-API-Key": API_KEY})


def sessions_of(server: RunningServer, user: str) -> list[CentrifugeSession]:
    """The server's Centrifuge sessions of `user`."""
    return [
        s
        for s in server.runtime.node.sessions
        if isinstance(s, CentrifugeSession)
        and s.credentials is not None
        and s.credentials.user == user
    ]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until `check` holds (server-side bookkeeping that runs in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def run_server(
    signing_keys: tuple[str, str], **overrides: Any
) -> AsyncIterator[RunningServer]:
    private, public = signing_keys
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "token_key": public,
        "api_key": API_KEY,
        "admin_api_key": ADMIN_KEY,
        "use_uvloop": False,
    }
    values.update(overrides)
    settings = load_settings(env={}, **values)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    runtime = Runtime(settings)
    app = create_app(runtime)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_app(app, sock, stop.wait))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=10, limits=KEEPALIVE_UNDER_SERVERS
    ) as http:
        for _ in range(200):
            if task.done():
                task.result()
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health")).status_code == 200 and runtime.started:
                    break
            await asyncio.sleep(0.02)
        else:
            raise RuntimeError("server did not start")
        server = RunningServer(runtime, port, private, http)
        try:
            yield server
        finally:
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, 15)


@pytest.fixture
async def server(signing_keys: tuple[str, str]) -> AsyncIterator[RunningServer]:
    async with run_server(signing_keys) as running:
        yield running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def corpus() -> Iterator[list[dict[str, Any]]]:
    import orjson

    path = DATA / "legacy-broadcasts.json"
    yield orjson.loads(path.read_bytes())


# --- the whole run's logs, as production would write them ---------------------------
#
# In-process servers log through the root logger: a capture handler keeps every record
# as a JSON line with nothing redacted, and at the end each line goes through the
# redaction `dex-shim serve` would configure for those servers' settings. `dex-shim`
# processes started by tests already log through production; their stderr is handed
# in with `add_process_log`. A token or key in any of it fails the run.

_RUN_LOG: dict[str, Any] = {}
_PROCESS_LOGS: list[tuple[str, str]] = []


def remember_secrets(*values: str) -> None:
    """Also search the run's logs for these (keys and tokens a test made itself)."""
    MINTED_TOKENS.update(v for v in values if v)


def add_process_log(label: str, text: str) -> None:
    """The log output of a `dex-shim` process a test ran, searched at the end of the run."""
    _PROCESS_LOGS.append((label, text))


def leaked(secrets: set[str], text: str) -> set[str]:
    """Secrets in `text`, as written or as a JSON string would hold them."""
    import re

    import orjson

    # Thousands of tokens: each "eyJ..." run in the text is looked up by prefix instead
    # of searching the text once per token.
    tokens = {s for s in secrets if s.startswith("eyJ")}
    lengths = {len(t) for t in tokens}
    found = {
        run[:length]
        for run in re.findall(r"(?=(eyJ[A-Za-z0-9_.-]+))", text)
        for length in lengths
        if run[:length] in tokens
    }
    for secret in secrets - tokens:
        if secret in text or orjson.dumps(secret).decode()[1:-1] in text:
            found.add(secret)
    return found


def pytest_configure(config: pytest.Config) -> None:
    import logging
    import tempfile

    from shim.app.logs import JsonFormatter

    handle = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    handler = logging.StreamHandler(handle)
    handler.setFormatter(JsonFormatter(lambda text: text))  # raw: nothing redacted here
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _RUN_LOG.update(handle=handle, handler=handler)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Grep what production would have logged, in-process and in `dex-shim` processes,
    for every token and key the tests used; a hit fails the run."""
    import logging
    import os

    from shim.app.cli import log_secrets
    from shim.app.logs import Redactor

    handle, handler = _RUN_LOG.get("handle"), _RUN_LOG.get("handler")
    if handle is None:
        return
    logging.getLogger().removeHandler(handler)
    handle.flush()
    handle.seek(0)
    raw = handle.read()
    handle.close()
    os.unlink(handle.name)
    # The settings every in-process server shares (run_server), through the CLI's redaction.
    production = Redactor(
        log_secrets(load_settings(env={}, api_key=API_KEY, admin_api_key=ADMIN_KEY))
    )
    secrets = MINTED_TOKENS | {API_KEY, ADMIN_KEY}
    rendered = "\n".join(production(line) for line in raw.splitlines())
    found = {"in-process logs": leaked(secrets, rendered)}
    for label, text in _PROCESS_LOGS:
        found[label] = found.get(label, set()) | leaked(secrets, text)
    hits = {label: len(leaks) for label, leaks in found.items() if leaks}
    print(
        f"\nlog grep: {len(secrets)} secrets searched in {raw.count(chr(10))} in-process lines"
        f" ({len(leaked(secrets, raw))} present before redaction) and {len(_PROCESS_LOGS)}"
        " process logs"
    )
    if hits:
        print(f"SECRETS IN LOGS: {hits}")
        session.exitstatus = 1
