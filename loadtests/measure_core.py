"""Core measurements of a real `dex-shim serve` process, compression off and on.

1. Memory per idle Centrifuge connection: the server's VmRSS before and after N
   connected, subscribed, idle clients, and again after a few publications (deflate
   contexts are allocated on first use), divided by N.
2. Publish-to-receive latency: M publications through POST /api/v1/broadcast to S
   subscribers of one channel, each carrying its send time.

Run: `python -m loadtests.measure_core [--connections N] [--subscribers S] ...`.
All traffic stays on 127.0.0.1; every wait has a deadline. The server runs as its
own process, so only its memory is counted, never the clients'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from adapters.auth.jwt import generate_signing_key, mint_token
from shim.core.config import ENV_PREFIX

ALGORITHM = "EdDSA"
IDLE_CHANNEL_KEY = "idle"  # task:idle, via the default `task.` route
LATENCY_CHANNEL_KEY = "latency"
# Every measured publication carries this field; clients find it by regex, never by
# decoding whole frames (one frame may hold several messages joined by "\n").
SENT_FIELD = "sent_ns"
_SENT_RE = re.compile(r'"sent_ns":(\d+)')
# Settings each run sets itself; `--set` may not override them.
RESERVED_SETTINGS = frozenset(
    {"host", "port", "token_algorithm", "token_key", "api_key", "websocket_compression"}
)
_READY_RE = re.compile(r"dex-shim listening on http://[^:]+:(\d+)")
# Roughly the size of a small task update, so deflate has something to chew on.
_FILLER = "status changed; " * 12


# --- pure helpers -------------------------------------------------------------


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (0 < q <= 100) of values sorted ascending."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q}")
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[rank - 1]


def parse_vmrss_kib(status_text: str) -> int:
    """VmRSS in KiB from the text of /proc/<pid>/status."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line (process gone or a kernel thread)")


def sent_times(frame: str) -> list[int]:
    """The send times carried by the publications of one frame."""
    return [int(m.group(1)) for m in _SENT_RE.finditer(frame)]


def ping_count(frame: str) -> int:
    """Server pings (`{}` lines) in one frame; each needs a `{}` answer."""
    if frame == "{}":
        return 1
    if "\n" not in frame:
        return 0
    return sum(1 for line in frame.split("\n") if line == "{}")


# --- results ------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class MemoryResult:
    compression: bool
    connections: int
    # Clients whose handshake agreed permessage-deflate (all offered it).
    negotiated: int
    rss_before_kib: int
    rss_connected_kib: int
    rss_messaged_kib: int
    messages: int
    delivered: int
    # False when the RSS was still moving at the settle deadline.
    settled: bool

    @property
    def expected(self) -> int:
        return self.connections * self.messages

    @property
    def per_connection_connected_kib(self) -> float:
        return (self.rss_connected_kib - self.rss_before_kib) / self.connections

    @property
    def per_connection_messaged_kib(self) -> float:
        return (self.rss_messaged_kib - self.rss_before_kib) / self.connections


@dataclass(slots=True, frozen=True)
class LatencyResult:
    compression: bool
    subscribers: int
    publications: int
    delivered: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # Round trip of the measured POSTs (the backend's wait), for scale.
    post_p50_ms: float

    @property
    def expected(self) -> int:
        return self.subscribers * self.publications


@dataclass(slots=True, frozen=True)
class ModeResult:
    memory: MemoryResult
    latency: LatencyResult

    @property
    def lost(self) -> int:
        return (self.memory.expected - self.memory.delivered) + (
            self.latency.expected - self.latency.delivered
        )


def latency_result(
    compression: bool,
    subscribers: int,
    publications: int,
    latencies_ns: Sequence[int],
    post_round_trips_ns: Sequence[int],
) -> LatencyResult:
    ordered = sorted(latencies_ns)
    posts = sorted(post_round_trips_ns)

    def ms(q: float, values: list[int] = ordered) -> float:
        return percentile(values, q) / 1e6 if values else math.nan

    return LatencyResult(
        compression=compression,
        subscribers=subscribers,
        publications=publications,
        delivered=len(ordered),
        p50_ms=ms(50),
        p95_ms=ms(95),
        p99_ms=ms(99),
        max_ms=ms(100),
        post_p50_ms=ms(50, posts),
    )


def as_json(results: Sequence[ModeResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for result in results:
        memory = asdict(result.memory)
        memory["per_connection_connected_kib"] = round(
            result.memory.per_connection_connected_kib, 2
        )
        memory["per_connection_messaged_kib"] = round(result.memory.per_connection_messaged_kib, 2)
        memory["expected"] = result.memory.expected
        latency = asdict(result.latency)
        latency["expected"] = result.latency.expected
        key = "compression_on" if result.memory.compression else "compression_off"
        out[key] = {"memory": memory, "latency": latency, "lost": result.lost}
    return out


def render_table(results: Sequence[ModeResult]) -> str:
    """Markdown table, one column per compression mode."""
    heads = ["compression " + ("on" if r.memory.compression else "off") for r in results]
    rows: list[tuple[str, list[str]]] = [
        (
            "server RSS after warm-up (MiB)",
            [f"{r.memory.rss_before_kib / 1024:.1f}" for r in results],
        ),
        (
            "idle connections (permessage-deflate agreed)",
            [f"{r.memory.connections} ({r.memory.negotiated})" for r in results],
        ),
        (
            "RSS per idle connection, after connect+subscribe (KiB)",
            [f"{r.memory.per_connection_connected_kib:.1f}" for r in results],
        ),
        (
            "RSS per idle connection, after first messages (KiB)",
            [f"{r.memory.per_connection_messaged_kib:.1f}" for r in results],
        ),
        (
            "first messages delivered",
            [f"{r.memory.delivered}/{r.memory.expected}" for r in results],
        ),
        ("latency p50 (ms)", [f"{r.latency.p50_ms:.2f}" for r in results]),
        ("latency p95 (ms)", [f"{r.latency.p95_ms:.2f}" for r in results]),
        ("latency p99 (ms)", [f"{r.latency.p99_ms:.2f}" for r in results]),
        ("latency max (ms)", [f"{r.latency.max_ms:.2f}" for r in results]),
        ("broadcast POST round trip p50 (ms)", [f"{r.latency.post_p50_ms:.2f}" for r in results]),
        (
            "publications delivered (subscribers x publications)",
            [f"{r.latency.delivered}/{r.latency.expected}" for r in results],
        ),
    ]
    lines = ["| measure | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    if not all(r.memory.settled for r in results):
        lines.append("")
        lines.append(
            "(RSS had not settled at the deadline in some phase; rerun on a quieter machine)"
        )
    return "\n".join(lines)


# --- options ------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Options:
    connections: int = 1000
    subscribers: int = 100
    publications: int = 200
    interval_ms: float = 20.0
    # Publications sent to the idle connections before the second memory reading.
    first_messages: int = 3
    connect_concurrency: int = 50
    # RSS is "settled" when `settle_window` samples `settle_interval` apart agree.
    settle_interval: float = 0.5
    settle_window: int = 4
    settle_timeout: float = 20.0
    # Deadline for all deliveries after the last publication of a phase.
    delivery_timeout: float = 20.0
    server_start_timeout: float = 30.0
    # Extra server settings (field name -> value), the same for both modes.
    server_settings: tuple[tuple[str, str], ...] = ()


# --- the server process -------------------------------------------------------


@dataclass(slots=True)
class ServerProcess:
    process: asyncio.subprocess.Process
    port: int
    api_key: str
    signing_key: str
    log_path: Path
    compression: bool

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        return parse_vmrss_kib(Path(f"/proc/{self.process.pid}/status").read_text())

    def token(self, user: str) -> str:
        return mint_token(self.signing_key, ALGORITHM, user=user, ttl_seconds=3600)


def _server_command() -> list[str]:
    script = Path(sys.executable).with_name("dex-shim")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "shim.app.cli", "serve"]


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.asynccontextmanager
async def spawned_server(
    workdir: Path, *, compression: bool, options: Options
) -> AsyncIterator[ServerProcess]:
    """`dex-shim serve` on a free loopback port, with fresh keys; stopped on exit."""
    signing_key, verification_key = generate_signing_key(ALGORITHM)
    api_key = secrets.token_urlsafe(24)
    # The operator's own DEX_SHIM_* settings would make runs incomparable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    env.update(
        {
            "DEX_SHIM_HOST": "127.0.0.1",
            "DEX_SHIM_PORT": "0",
            "DEX_SHIM_TOKEN_ALGORITHM": ALGORITHM,
            "DEX_SHIM_TOKEN_KEY": verification_key,
            "DEX_SHIM_API_KEY": api_key,
            "DEX_SHIM_WEBSOCKET_COMPRESSION": "true" if compression else "false",
            "DEX_SHIM_DEV_DIR": str(workdir / ".dex-shim"),
        }
    )
    env.update({ENV_PREFIX + name.upper(): value for name, value in options.server_settings})
    log_path = workdir / f"server-compression-{'on' if compression else 'off'}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *_server_command(),
            cwd=workdir,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    try:
        port = await _wait_ready(process, options.server_start_timeout, log_path)
        yield ServerProcess(process, port, api_key, signing_key, log_path, compression)
    finally:
        await _stop(process)


async def _wait_ready(process: asyncio.subprocess.Process, timeout: float, log_path: Path) -> int:
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await process.stdout.readline()
                if not line:
                    raise RuntimeError(f"dex-shim exited before listening:\n{_log_tail(log_path)}")
                match = _READY_RE.search(line.decode(errors="replace"))
                if match:
                    return int(match.group(1))
    except TimeoutError:
        raise RuntimeError(
            f"dex-shim not listening after {timeout}s:\n{_log_tail(log_path)}"
        ) from None


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def settled_rss(server: ServerProcess, options: Options) -> tuple[int, bool]:
    """The server's VmRSS once it stops moving, and whether it did before the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.settle_timeout
    samples: list[int] = []
    while True:
        samples.append(server.rss_kib())
        recent = samples[-options.settle_window :]
        # Tolerance: 64 KiB or 0.2 % of the RSS, whichever is larger.
        if len(recent) == options.settle_window and max(recent) - min(recent) <= max(
            64, recent[-1] // 500
        ):
            return recent[-1], True
        if loop.time() >= deadline:
            return samples[-1], False
        await asyncio.sleep(options.settle_interval)


# --- clients ------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """What all clients of one phase received (one event loop: no locking)."""

    deliveries: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    dropped: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    # Set once `target` deliveries arrived (target 0: nobody is waiting).
    target: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, latency_ns: int) -> None:
        self.deliveries += 1
        self.latencies_ns.append(latency_ns)
        if self.target and self.deliveries >= self.target:
            self.reached.set()


class CentrifugeClient:
    """A bare Centrifuge JSON client: connect, subscribe to one channel, then only
    answer pings and note each publication's delay."""

    def __init__(self, ws: ClientConnection, tally: Tally) -> None:
        self.ws = ws
        self.tally = tally
        self.closing = False
        self.reader: asyncio.Task[None] | None = None

    @property
    def deflate(self) -> bool:
        response = self.ws.response
        header = response.headers.get("Sec-WebSocket-Extensions", "") if response else ""
        return "permessage-deflate" in header

    @classmethod
    async def open(cls, url: str, token: str, channel: str, tally: Tally) -> CentrifugeClient:
        ws = await connect(
            url,
            compression="deflate",  # offered; the server's setting decides
            ping_interval=None,  # idle means idle: only the server's app-level pings
            open_timeout=20,
            close_timeout=5,
            max_size=2**20,
        )
        client = cls(ws, tally)
        try:
            await client._command(1, {"connect": {"token": token, "name": "measure"}})
            await client._command(2, {"subscribe": {"channel": channel}})
        except BaseException:
            await ws.close()
            raise
        client.reader = asyncio.create_task(client._read())
        return client

    async def _command(self, command_id: int, body: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps({"id": command_id, **body}).decode())
        async with asyncio.timeout(20):
            answered = False
            while not answered:
                frame = await self.ws.recv()
                now = time.time_ns()
                text = frame if isinstance(frame, str) else frame.decode()
                # The whole frame is read: a publication may share it with the reply.
                for line in text.split("\n"):
                    if line == "{}":
                        await self.ws.send("{}")
                        continue
                    reply = orjson.loads(line)
                    if reply.get("id") == command_id:
                        if "error" in reply:
                            raise RuntimeError(f"command {command_id} refused: {reply['error']}")
                        answered = True
                    for sent in sent_times(line):
                        self.tally.add(now - sent)

    async def _read(self) -> None:
        tally = self.tally
        ws = self.ws
        try:
            async for frame in ws:
                now = time.time_ns()
                text = frame if isinstance(frame, str) else frame.decode()
                for _ in range(ping_count(text)):
                    await ws.send("{}")
                for sent in sent_times(text):
                    tally.add(now - sent)
        except ConnectionClosed:
            pass
        if not self.closing:
            tally.dropped += 1
            code = ws.close_code or 0
            tally.close_codes[code] = tally.close_codes.get(code, 0) + 1

    async def close(self) -> None:
        self.closing = True
        with contextlib.suppress(WebSocketException, OSError):
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


async def open_gated(
    count: int, concurrency: int, open_one: Callable[[int], Awaitable[C]], what: str
) -> list[C]:
    """`count` clients from `open_one(index)`, at most `concurrency` handshakes in
    flight so the listen backlog never overflows; one failure closes the others."""
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> C:
        async with gate:
            return await open_one(index)

    outcomes = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    clients = [o for o in outcomes if not isinstance(o, BaseException)]
    if failures:
        await close_clients(clients)
        raise RuntimeError(f"{what}: {len(failures)} of {count} failed to open") from failures[0]
    return clients


async def close_clients(clients: Sequence[Closable]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def open_clients(
    server: ServerProcess,
    *,
    count: int,
    channel: str,
    user_prefix: str,
    tally: Tally,
    options: Options,
) -> list[CentrifugeClient]:
    """`count` connected, subscribed clients, each its own user."""

    async def one(index: int) -> CentrifugeClient:
        token = server.token(f"{user_prefix}-{index}")
        return await CentrifugeClient.open(server.ws_url, token, channel, tally)

    return await open_gated(count, options.connect_concurrency, one, "clients")


class Publisher:
    """The backend's side: POST /api/v1/broadcast, one task.updated event per call."""

    def __init__(self, server: ServerProcess, http: httpx.AsyncClient) -> None:
        self.server = server
        self.http = http
        self.round_trips_ns: list[int] = []

    async def publish(self, task_key: str, *, measured: bool, seq: int) -> None:
        payload: dict[str, Any] = {"task_id": task_key, "seq": seq, "note": _FILLER}
        if measured:
            payload[SENT_FIELD] = time.time_ns()
        resp = await self.http.post(
            f"{self.server.http_url}/api/v1/broadcast",
            content=orjson.dumps({"type": "task.updated", "payload": payload}),
            headers={"X-API-Key": self.server.api_key, "Content-Type": "application/json"},
        )
        if resp.status_code != 200 or resp.json().get("accepted") != 1:
            raise RuntimeError(f"broadcast refused: {resp.status_code} {resp.text}")

    async def publish_spaced(self, task_key: str, count: int, interval_s: float) -> None:
        """`count` measured publications on a fixed schedule (late ones go at once)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seq in range(count):
            delay = start + seq * interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            began = time.perf_counter_ns()
            await self.publish(task_key, measured=True, seq=seq)
            self.round_trips_ns.append(time.perf_counter_ns() - began)


async def wait_deliveries(tally: Tally, expected: int, timeout: float) -> None:
    """Until `expected` deliveries arrived or the deadline passed (then the count shows loss)."""
    tally.target = expected
    if tally.deliveries >= expected:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await tally.reached.wait()


# --- phases -------------------------------------------------------------------


async def _warm_up(server: ServerProcess, publisher: Publisher, options: Options) -> None:
    """Touch every code path once (handshake, token check, subscribe, publish, deflate)
    so lazy imports and first allocations do not count against the measured clients."""
    tally = Tally()
    count = min(10, options.connections)
    clients = await open_clients(
        server,
        count=count,
        channel=f"task:{IDLE_CHANNEL_KEY}",
        user_prefix="warm",
        tally=tally,
        options=options,
    )
    try:
        await publisher.publish(IDLE_CHANNEL_KEY, measured=True, seq=-1)
        await wait_deliveries(tally, count, options.delivery_timeout)
    finally:
        await close_clients(clients)


async def measure_memory(
    server: ServerProcess, publisher: Publisher, options: Options
) -> MemoryResult:
    await _warm_up(server, publisher, options)
    before, settled_before = await settled_rss(server, options)
    tally = Tally()
    clients = await open_clients(
        server,
        count=options.connections,
        channel=f"task:{IDLE_CHANNEL_KEY}",
        user_prefix="idle",
        tally=tally,
        options=options,
    )
    try:
        connected, settled_connected = await settled_rss(server, options)
        for seq in range(options.first_messages):
            await publisher.publish(IDLE_CHANNEL_KEY, measured=True, seq=seq)
        await wait_deliveries(
            tally, options.connections * options.first_messages, options.delivery_timeout
        )
        messaged, settled_messaged = await settled_rss(server, options)
        negotiated = sum(1 for c in clients if c.deflate)
    finally:
        await close_clients(clients)
    return MemoryResult(
        compression=server.compression,
        connections=options.connections,
        negotiated=negotiated,
        rss_before_kib=before,
        rss_connected_kib=connected,
        rss_messaged_kib=messaged,
        messages=options.first_messages,
        delivered=tally.deliveries,
        settled=settled_before and settled_connected and settled_messaged,
    )


async def measure_latency(
    server: ServerProcess, publisher: Publisher, options: Options
) -> LatencyResult:
    tally = Tally()
    clients = await open_clients(
        server,
        count=options.subscribers,
        channel=f"task:{LATENCY_CHANNEL_KEY}",
        user_prefix="sub",
        tally=tally,
        options=options,
    )
    try:
        publisher.round_trips_ns.clear()
        # One unmeasured publication first: the HTTP connection and the channel's
        # first fan-out are set-up costs, not latency.
        await publisher.publish(LATENCY_CHANNEL_KEY, measured=False, seq=-1)
        await asyncio.sleep(0.2)
        await publisher.publish_spaced(
            LATENCY_CHANNEL_KEY, options.publications, options.interval_ms / 1000
        )
        await wait_deliveries(
            tally, options.subscribers * options.publications, options.delivery_timeout
        )
    finally:
        await close_clients(clients)
    return latency_result(
        server.compression,
        options.subscribers,
        options.publications,
        tally.latencies_ns,
        publisher.round_trips_ns,
    )


async def measure_mode(workdir: Path, compression: bool, options: Options) -> ModeResult:
    async with (
        spawned_server(workdir, compression=compression, options=options) as server,
        httpx.AsyncClient(timeout=10) as http,
    ):
        publisher = Publisher(server, http)
        memory = await measure_memory(server, publisher, options)
        latency = await measure_latency(server, publisher, options)
    return ModeResult(memory, latency)


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft fd limit (the server inherits it) to `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"need {needed} file descriptors, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def run_measurements(options: Options) -> list[ModeResult]:
    """Both modes, one after the other (never two servers at once), in a temp dir."""
    raise_fd_limit(max(options.connections, options.subscribers) + 512)
    results = []
    with tempfile.TemporaryDirectory(prefix="dex-shim-measure-") as tmp:
        for compression in (False, True):
            results.append(await measure_mode(Path(tmp), compression, options))
    return results


# --- command line -------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Options, bool]:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m loadtests.measure_core", description=__doc__)
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument("--subscribers", type=int, default=defaults.subscribers)
    parser.add_argument("--publications", type=int, default=defaults.publications)
    parser.add_argument("--interval-ms", type=float, default=defaults.interval_ms)
    parser.add_argument("--first-messages", type=int, default=defaults.first_messages)
    parser.add_argument("--connect-concurrency", type=int, default=defaults.connect_concurrency)
    parser.add_argument("--settle-timeout", type=float, default=defaults.settle_timeout)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra server setting for both modes, e.g. client_ping_interval_seconds=5",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("connections", "subscribers", "publications", "connect_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    settings = []
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        name = name.strip().lower()
        if name in RESERVED_SETTINGS:
            parser.error(f"--set cannot change {name}: the measurement sets it")
        settings.append((name, value))
    options = Options(
        connections=args.connections,
        subscribers=args.subscribers,
        publications=args.publications,
        interval_ms=args.interval_ms,
        first_messages=max(1, args.first_messages),
        connect_concurrency=args.connect_concurrency,
        settle_timeout=args.settle_timeout,
        server_settings=tuple(settings),
    )
    return options, bool(args.json)


T = TypeVar("T")


def run_client_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a measuring client on uvloop when installed: cheaper clients disturb the
    servers less (they share the machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _run(options: Options) -> list[ModeResult]:
    return run_client_loop(run_measurements(options))


def report(json_body: Any | None, table: str, lost: int) -> int:
    """Print the JSON body (when asked for) or the table; exit status 1 on any loss."""
    if json_body is not None:
        print(orjson.dumps(json_body, option=orjson.OPT_INDENT_2).decode())
    else:
        print(table)
    if lost:
        print(f"LOST {lost} deliveries", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options, json_output = parse_args(argv)
    results = _run(options)
    body = as_json(results) if json_output else None
    return report(body, render_table(results), sum(r.lost for r in results))


if __name__ == "__main__":
    sys.exit(main())
