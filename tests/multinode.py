"""Real `dex-shim serve` processes for multi-node tests and measurements.

Each node is its own process, configured only through DEX_SHIM_* variables (as an
operator would), in its own temporary working directory, sharing one set of keys
with the other nodes of its cluster. Nodes are stopped (then killed) on exit.

    keys = ClusterKeys.generate()
    async with start_nodes(2, [redis.url], keys=keys) as (a, b):
        await b.broadcast({"type": "task.updated", "payload": {"task_id": "1"}})

`Balancer` is a TCP load balancer in front of nodes, so a client keeps one URL while
the node behind it changes (what a browser behind a real load balancer sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapters.auth.jwt import generate_signing_key, mint_token

REPO = Path(__file__).resolve().parents[1]
ALGORITHM = "EdDSA"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
_READY_RE = re.compile(r"dex-shim listening on http://[^:]+:(\d+)")
# Legacy ping loops hold up a graceful shutdown by up to one interval (see
# tests/legacyclient.py SHORT_PINGS), so nodes started here ping every second.
# hypercorn closes an idle keep-alive connection after 5 s and httpx keeps one for 5 s:
# a request sent at that instant meets a closed socket, so test clients drop them sooner.
KEEPALIVE_UNDER_SERVERS = httpx.Limits(keepalive_expiry=2.0)
DEFAULT_SETTINGS: Mapping[str, str] = {"legacy_ping_interval_seconds": "1"}


@dataclass(slots=True, frozen=True)
class ClusterKeys:
    """The secrets every node of one cluster must share."""

    signing_key: str
    verification_key: str
    api_key: str
    admin_key: str

    @classmethod
    def generate(cls) -> ClusterKeys:
        signing, verification = generate_signing_key(ALGORITHM)
        keys = cls(signing, verification, secrets.token_urlsafe(24), secrets.token_urlsafe(24))
        _for_log_grep(secrets=(keys.signing_key, keys.api_key, keys.admin_key))
        return keys

    def token(self, user: str, ttl_seconds: int | None = 3600, **extra: Any) -> str:
        token = mint_token(
            self.signing_key, ALGORITHM, user=user, ttl_seconds=ttl_seconds, extra=extra
        )
        _for_log_grep(secrets=(token,))
        return token


def _for_log_grep(*, secrets: Sequence[str] = (), log: Path | None = None) -> None:
    """Hand keys, tokens and node logs to the run-wide secret grep of tests/conftest.py,
    when running under pytest (loadtests use this module without it)."""
    conftest = sys.modules.get("tests.conftest")
    if conftest is None:
        return
    conftest.remember_secrets(*secrets)
    if log is not None and log.exists():
        conftest.add_process_log(str(log), log.read_text(errors="replace"))


def node_env(
    keys: ClusterKeys,
    workdir: Path,
    *,
    redis_urls: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one node. Without `redis_urls` the engine is left unset
    (the default); with them it is "redis" on those URLs, in that order."""
    # The caller's own DEX_SHIM_* settings must not leak into the nodes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(
        {
            "DEX_SHIM_HOST": "127.0.0.1",
            "DEX_SHIM_PORT": "0",
            "DEX_SHIM_TOKEN_ALGORITHM": ALGORITHM,
            "DEX_SHIM_TOKEN_KEY": keys.verification_key,
            "DEX_SHIM_API_KEY": keys.api_key,
            "DEX_SHIM_ADMIN_API_KEY": keys.admin_key,
            "DEX_SHIM_DEV_DIR": str(workdir / ".dex-shim"),
        }
    )
    if redis_urls:
        env["DEX_SHIM_ENGINE"] = "redis"
        env["DEX_SHIM_REDIS_URL"] = ",".join(redis_urls)
    for name, value in {**DEFAULT_SETTINGS, **(settings or {})}.items():
        env["DEX_SHIM_" + name.upper()] = value
    return env


@dataclass(slots=True)
class NodeProcess:
    name: str
    process: asyncio.subprocess.Process
    port: int
    keys: ClusterKeys
    log_path: Path
    http: httpx.AsyncClient
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The Centrifuge endpoint."""
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def token(self, user: str, ttl_seconds: int | None = 3600, **extra: Any) -> str:
        return self.keys.token(user, ttl_seconds, **extra)

    async def broadcast(self, body: Any) -> httpx.Response:
        """POST /api/v1/broadcast as the backend does."""
        return await self.http.post(
            "/api/v1/broadcast", json=body, headers={"X-API-Key": self.keys.api_key}
        )

    async def ready(self) -> httpx.Response:
        return await self.http.get("/ready")

    async def wait_ready(self, ready: bool = True, timeout: float = 10.0) -> httpx.Response:
        """Poll GET /ready until it answers 200 (ready) or 503 (not ready)."""
        wanted = 200 if ready else 503
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    response = await self.ready()
                    if response.status_code == wanted:
                        return response
                await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to clients or Redis."""
        if self.running:
            self.process.kill()
        await self.process.wait()
        _for_log_grep(log=self.log_path)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_SECONDS."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        _for_log_grep(log=self.log_path)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        await self.http.aclose()


def _server_command() -> list[str]:
    script = Path(sys.executable).with_name("dex-shim")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "shim.app.cli", "serve"]


def _log_file(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir / "node.log"


async def _drain(stream: asyncio.StreamReader) -> None:
    # Keep reading stdout so a chatty node never blocks on a full pipe.
    while await stream.read(65536):
        pass


async def spawn_node(
    name: str,
    keys: ClusterKeys,
    workdir: Path,
    *,
    redis_urls: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> NodeProcess:
    """Start one node (`dex-shim serve` plus `args`) and return once it printed its
    listening line."""
    log_path = _log_file(workdir)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *_server_command(),
            *args,
            cwd=workdir,
            env=node_env(keys, workdir, redis_urls=redis_urls, settings=settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_SECONDS):
            while True:
                line = (await process.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(
                        f"node {name} exited before listening:\n{log_path.read_text()}"
                    )
                match = _READY_RE.search(line)
                if match:
                    port = int(match.group(1))
                    break
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=10, limits=KEEPALIVE_UNDER_SERVERS
    )
    node = NodeProcess(name, process, port, keys, log_path, http)
    node._drain = asyncio.create_task(_drain(process.stdout))
    return node


@contextlib.asynccontextmanager
async def start_nodes(
    count: int,
    redis_urls: Sequence[str] = (),
    *,
    keys: ClusterKeys | None = None,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[list[NodeProcess]]:
    """`count` nodes started at once against `redis_urls` (the same list, in the same
    order, for every node), each in its own temporary directory; stopped on exit."""
    keys = keys or ClusterKeys.generate()
    with tempfile.TemporaryDirectory(prefix="dex-multinode-") as tmp:
        outcomes = await asyncio.gather(
            *(
                spawn_node(
                    f"node-{index}",
                    keys,
                    Path(tmp) / f"node-{index}",
                    redis_urls=redis_urls,
                    settings=settings,
                )
                for index in range(count)
            ),
            return_exceptions=True,
        )
        nodes = [o for o in outcomes if isinstance(o, NodeProcess)]
        try:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            yield nodes
        finally:
            await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)


class Balancer:
    """A TCP load balancer on a free loopback port. Each new connection goes to the
    current backend port; `switch` changes it for later connections only, like a load
    balancer that took a dead node out of rotation."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def switch(self, backend_port: int) -> None:
        self.backend_port = backend_port

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, (writer, up_writer)))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            # One side ended (a node died, a client left): end the other side too.
            for end in both:
                end.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Balancer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
