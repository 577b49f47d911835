"""Abuse scenario (issue 10): every probe against one real `dex-shim serve`, while a
bystander on each protocol receives a steady stream.

    python -m loadtests.abuse            # every probe, 3 s windows (about 3 minutes)
    python -m loadtests.abuse --quick    # the short version the test suite runs (< 60 s)
    python -m loadtests.abuse --json     # JSON on stdout, the table on stderr

Three bystander processes: one publishes an event every 20 ms through the ingest
endpoint, one reads it as a legacy `*` client, one as a centrifuge-python SDK client
subscribed to its channel; each event carries its send time. For each probe:
a baseline window, the probe, a drain, then the node's RSS until it settles. The
table has the probe's outcome, the bystanders' p99 delivery latency during the probe
against the window before it, events lost, and RSS before / after settling.

Before the probes, CONTROL_WINDOWS idle control rows measure the same windows with
nothing done: the median of their bystander p99 is the run's noise floor, the p99 a
bystander reaches on this machine with no probe at all (a single baseline window
holds 150 samples, so its p99 is close to its second-worst delivery, and a quiet
one would otherwise make the limit tighter than idle noise). The control rows are
judged like the probes.

Verdict (exit 1 on failure): each probe's outcome is the expected one, no bystander
lost an event, each bystander's p99 stayed within 2x of its baseline (a baseline
under the measured noise floor counts as the floor), and RSS came back within 20 %
of its value before the probe. `--rounds N` runs the probe list N times on one
node: RSS that settles at the same level each round is bounded by configuration.
Traffic goes to 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from adapters.auth.jwt import mint_token
from loadtests.measure_core import parse_vmrss_kib, percentile
from tests.multinode import ALGORITHM, ClusterKeys, _server_command, node_env

BYSTANDER_CHANNEL_TASK = "bystander"
PUBLISH_INTERVAL = 0.02
# Idle control windows before the probes (their median p99 is the noise floor).
CONTROL_WINDOWS = 3
CONTROL = "idle (control)"
P99_FACTOR = 2.0
# Extra milliseconds allowed over 2x the baseline (0 for the command; the test suite
# passes an allowance for its shared, loaded machine, as the slow-client scenario does).
DEFAULT_SLACK_MS = 0.0
RSS_FACTOR = 1.2
ALLOWED_ORIGIN = "https://dex.example"
# A bystander's report (every sample of the run) is one JSON line.
REPORT_LIMIT_BYTES = 64 * 1024 * 1024
_READY_RE = re.compile(r"dex-shim listening on http://[^:]+:(\d+)")

# The node's settings for the run: its limits, and reads authorized by token claims
# (the bystanders' channel stays under the publish rate).
NODE_SETTINGS = {
    # Reads are authorized by the token's `channels` claim (wildcards like task:*).
    "channel_policy": "claims",
    "client_user_connection_limit": "10",
    "channel_publish_rate_limit": "100",
    "channel_publish_burst": "200",
    "allowed_origins": ALLOWED_ORIGIN,
    "legacy_ping_interval_seconds": "5",
}


@dataclass(slots=True)
class Options:
    quick: bool
    baseline_seconds: float
    probe_seconds: float
    drain_seconds: float
    settle_seconds: float
    json: bool = False
    slack_ms: float = DEFAULT_SLACK_MS


def options_for(quick: bool, as_json: bool = False) -> Options:
    if quick:
        return Options(True, 0.8, 0.8, 0.5, 3.0, as_json)
    return Options(False, 3.0, 3.0, 1.5, 12.0, as_json)


# --- the bystander process ------------------------------------------------------------------


@dataclass(slots=True)
class Samples:
    """What one bystander process saw: a reader's latencies, or the publisher's
    accepted publications."""

    # seq -> latency in ns (readers).
    received: dict[int, int] = field(default_factory=dict)
    # seq -> send time in ns of accepted publications (publisher).
    sent: dict[int, int] = field(default_factory=dict)
    publish_errors: int = 0
    disconnects: int = 0

    def note(self, payload: Any) -> None:
        if isinstance(payload, dict) and payload.get("task_id") == BYSTANDER_CHANNEL_TASK:
            seq, sent_ns = payload.get("seq"), payload.get("sent_ns")
            if isinstance(seq, int) and isinstance(sent_ns, int):
                self.received.setdefault(seq, time.time_ns() - sent_ns)

    def report(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "sent": self.sent,
            "publish_errors": self.publish_errors,
            "disconnects": self.disconnects,
        }


def window_stats(
    sent: dict[int, int], received: dict[int, int], start_ns: int, end_ns: int
) -> dict[str, Any]:
    """p99 latency and losses of the publications sent within [start_ns, end_ns)."""
    seqs = [seq for seq, at in sent.items() if start_ns <= at < end_ns]
    latencies = sorted(received[s] for s in seqs if s in received)
    return {
        "published": len(seqs),
        "p99_ms": percentile(latencies, 99) / 1e6 if latencies else None,
        "lost": sum(1 for s in seqs if s not in received),
    }


async def _publisher(port: int, api_key: str, samples: Samples, stop: asyncio.Event) -> None:
    seq = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        while not stop.is_set():
            seq += 1
            sent_ns = time.time_ns()
            event = {
                "type": "task.updated",
                "task_id": BYSTANDER_CHANNEL_TASK,
                "payload": {"task_id": BYSTANDER_CHANNEL_TASK, "seq": seq, "sent_ns": sent_ns},
            }
            try:
                answer = await http.post(
                    "/api/v1/broadcast", json=event, headers={"X-API-Key": api_key}
                )
                if answer.status_code == 200 and answer.json()["accepted"] == 1:
                    samples.sent[seq] = sent_ns
                else:
                    samples.publish_errors += 1
            except httpx.HTTPError:
                samples.publish_errors += 1
            next_at += PUBLISH_INTERVAL
            await asyncio.sleep(max(0.0, next_at - loop.time()))


async def _legacy_reader(port: int, token: str, samples: Samples, stop: asyncio.Event) -> None:
    url = f"ws://127.0.0.1:{port}/api/v1/ws?token={token}"
    while not stop.is_set():
        try:
            async with connect(url, proxy=None, max_size=None, origin=None) as ws:
                await ws.send('{"action":"subscribe_all"}')
                async for frame in ws:
                    message = orjson.loads(frame)
                    samples.note(message.get("payload"))
        except (ConnectionClosed, OSError, InvalidStatus):
            pass
        if not stop.is_set():
            samples.disconnects += 1
            await asyncio.sleep(0.5)


async def _channel_reader(port: int, token: str, samples: Samples, stop: asyncio.Event) -> None:
    from centrifuge import (  # type: ignore[import-untyped]
        Client,
        ClientEventHandler,
        DisconnectedContext,
        PublicationContext,
        SubscriptionEventHandler,
    )

    class Events(ClientEventHandler):  # type: ignore[misc]
        async def on_disconnected(self, ctx: DisconnectedContext) -> None:
            samples.disconnects += 1

    class SubEvents(SubscriptionEventHandler):  # type: ignore[misc]
        async def on_publication(self, ctx: PublicationContext) -> None:
            samples.note(ctx.pub.data)

    client = Client(
        f"ws://127.0.0.1:{port}/connection/websocket",
        events=Events(),
        token=token,
        proxy=None,
        max_reconnect_delay=0.5,
    )
    sub = client.new_subscription(f"task:{BYSTANDER_CHANNEL_TASK}", events=SubEvents())
    await client.connect()
    await sub.subscribe()
    await stop.wait()
    await client.disconnect()


BYSTANDER_ROLES = ("legacy", "channels", "publisher")


async def bystander_main(port: int, role: str) -> None:
    """One bystander role in its own process (so one reader's work never delays the
    other's measurements): run until stdin closes; a `report` line is answered with
    everything seen so far, as one JSON line."""
    api_key = os.environ["DEX_ABUSE_API_KEY"]
    signing_key = os.environ["DEX_ABUSE_SIGNING_KEY"]
    samples = Samples()
    stop = asyncio.Event()
    token = mint_token(
        signing_key,
        ALGORITHM,
        user=f"bystander-{role}",
        ttl_seconds=3600,
        # A grant, not a server-side subscription (exact names in `channels` are both).
        extra={"channels": ["task:*"]},
    )
    if role == "legacy":
        task = asyncio.create_task(_legacy_reader(port, token, samples, stop))
    elif role == "channels":
        task = asyncio.create_task(_channel_reader(port, token, samples, stop))
    else:
        task = asyncio.create_task(_publisher(port, api_key, samples, stop))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await asyncio.sleep(0.5)  # connected and subscribed
    print("ready", flush=True)
    while line := await reader.readline():
        if line.strip() == b"report":
            report = orjson.dumps(samples.report(), option=orjson.OPT_NON_STR_KEYS)
            sys.stdout.write(report.decode() + "\n")
            sys.stdout.flush()
    stop.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- the node and the bystander, from the orchestrator ----------------------------------------


@dataclass(slots=True)
class Run:
    port: int
    metrics_port: int
    pid: int
    keys: ClusterKeys
    options: Options
    http: httpx.AsyncClient
    bystanders: dict[str, asyncio.subprocess.Process]
    # Request bodies a probe builds before its baseline window (see PREPARE), so the
    # scenario's own CPU work is not measured as the node's.
    prepared: dict[str, Any] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def legacy_url(self, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/ws?token={token}"

    def token(self, user: str, **extra: Any) -> str:
        """A token whose claims let it read every task channel (unless `channels` is given)."""
        extra.setdefault("channels", ["task:*"])
        return self.keys.token(user, **extra)

    def rss_kib(self) -> int:
        return parse_vmrss_kib(Path(f"/proc/{self.pid}/status").read_text())

    async def report(self, role: str) -> dict[str, Any]:
        process = self.bystanders[role]
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"report\n")
        await process.stdin.drain()
        answer: dict[str, Any] = orjson.loads(await process.stdout.readline())
        return answer

    async def windows(self, *spans: tuple[int, int]) -> list[dict[str, dict[str, Any]]]:
        """Per span, per reader: p99 and losses of what was published in it."""
        published = await self.report("publisher")
        sent = {int(k): v for k, v in published["sent"].items()}
        readers = {}
        for role in ("legacy", "channels"):
            seen = await self.report(role)
            readers[role] = ({int(k): v for k, v in seen["received"].items()}, seen)
        return [
            {
                role: {
                    **window_stats(sent, received, start, end),
                    "disconnects": seen["disconnects"],
                }
                for role, (received, seen) in readers.items()
            }
            for start, end in spans
        ]

    async def metrics(self) -> dict[str, float]:
        """Every sample of the internal /metrics, by its name and labels."""
        async with httpx.AsyncClient(timeout=10) as internal:
            text = (await internal.get(f"http://127.0.0.1:{self.metrics_port}/metrics")).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    async def refused(self, limit: str) -> int:
        return int(
            (await self.metrics()).get(f'dex_shim_limits_refused_total{{limit="{limit}"}}', 0)
        )

    async def broadcast(self, body: bytes | Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return await self.http.post(
            "/api/v1/broadcast",
            content=content,
            headers={"X-API-Key": self.keys.api_key, "Content-Type": "application/json"},
        )

    async def api(self, method: str, body: Any) -> httpx.Response:
        return await self.http.post(
            f"/api/{method}", json=body, headers={"X-API-Key": self.keys.api_key}
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def started_run(options: Options, workdir: Path) -> AsyncIterator[Run]:
    keys = ClusterKeys.generate()
    metrics_port = _free_port()
    settings = {**NODE_SETTINGS, "metrics_listen": f"127.0.0.1:{metrics_port}"}
    settings["client_connection_limit"] = "80" if options.quick else "300"
    log_path = workdir / "node.log"
    with log_path.open("wb") as log:
        node = await asyncio.create_subprocess_exec(
            *_server_command(),
            cwd=workdir,
            env=node_env(keys, workdir, settings=settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    bystanders: dict[str, asyncio.subprocess.Process] = {}
    try:
        assert node.stdout is not None
        async with asyncio.timeout(30):
            while not (found := _READY_RE.search((await node.stdout.readline()).decode())):
                if node.returncode is not None:
                    raise RuntimeError(f"dex-shim exited:\n{log_path.read_text()}")
        port = int(found.group(1))
        env = {
            **os.environ,
            "DEX_ABUSE_API_KEY": keys.api_key,
            "DEX_ABUSE_SIGNING_KEY": keys.signing_key,
        }
        for role in BYSTANDER_ROLES:  # the readers first: subscribed before publishing
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "loadtests.abuse",
                "--bystander",
                str(port),
                "--role",
                role,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=REPORT_LIMIT_BYTES,
            )
            bystanders[role] = process
            assert process.stdout is not None
            async with asyncio.timeout(30):
                assert (await process.stdout.readline()).strip() == b"ready"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield Run(port, metrics_port, node.pid, keys, options, http, bystanders)
    finally:
        for process in bystanders.values():
            if process.returncode is None:
                assert process.stdin is not None
                process.stdin.close()
                try:
                    async with asyncio.timeout(10):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
        if node.returncode is None:
            node.terminate()
            try:
                async with asyncio.timeout(15):
                    await node.wait()
            except TimeoutError:
                node.kill()
                await node.wait()


# --- probes ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    text: str
    expected: bool


Probe = Callable[[Run], Awaitable[Outcome]]


async def _drain(ws: ClientConnection) -> int:
    """Read until the server closes; its close code (1006 without a close frame)."""
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass
    return ws.close_code or 1006


async def _disconnects(run: Run, protocol: str, code: int) -> float:
    name = f'dex_shim_client_num_server_disconnects_total{{code="{code}",protocol="{protocol}"}}'
    return (await run.metrics()).get(name, 0.0)


async def command_flood(run: Run) -> Outcome:
    """RPC pings as fast as one client can send them (the issue held a core for 27 s).
    The node closes it with 3013 and stops reading it; the flooder itself may only see
    its connection reset (it is busy sending), so the node's count is the proof."""
    before = await _disconnects(run, "channels", 3013)
    sent = 0
    async with connect(run.ws_url, proxy=None, max_queue=None) as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": run.token("flooder")}}).decode())
        drained = asyncio.create_task(_drain(ws))
        deadline = time.monotonic() + 10
        with contextlib.suppress(ConnectionClosed):
            while not drained.done() and time.monotonic() < deadline:
                frame = "\n".join(
                    f'{{"id":{sent + n + 2},"rpc":{{"method":"ping"}}}}' for n in range(50)
                )
                await ws.send(frame)
                sent += 50
        code = await asyncio.wait_for(drained, 10)
    closed = await _disconnects(run, "channels", 3013) - before
    return Outcome(
        f"node closed it 3013 ({int(closed)}x; client saw {code}) after {sent} commands sent",
        closed == 1 and code in (3013, 1006),
    )


async def legacy_frame_flood(run: Run) -> Outcome:
    before = await _disconnects(run, "legacy", 3013)
    sent = 0
    async with connect(run.legacy_url(run.token("legacy-flooder")), proxy=None) as ws:
        drained = asyncio.create_task(_drain(ws))
        deadline = time.monotonic() + 10
        with contextlib.suppress(ConnectionClosed):
            while not drained.done() and time.monotonic() < deadline:
                await ws.send('{"action":"subscribe","task_id":"flood"}')
                sent += 1
                if sent % 100 == 0:
                    await asyncio.sleep(0)
        code = await asyncio.wait_for(drained, 10)
    closed = await _disconnects(run, "legacy", 3013) - before
    return Outcome(
        f"node closed it 3013 ({int(closed)}x; client saw {code}) after {sent} frames sent",
        closed == 1 and code in (3013, 1006),
    )


async def fresh_channel_churn(run: Run) -> Outcome:
    """Subscribe/unsubscribe fresh channel names from several connections, each within
    the command rate (the issue grew the engine by 55 MB this way)."""
    before = (await run.metrics()).get("dex_shim_memory_streams", 0.0)
    clients = 5 if run.options.quick else 20
    deadline = time.monotonic() + run.options.probe_seconds
    done = 0
    failed = 0

    async def churn(index: int) -> None:
        nonlocal done, failed
        async with connect(run.ws_url, proxy=None, max_size=None) as ws:
            await ws.send(
                orjson.dumps({"id": 1, "connect": {"token": run.token(f"churn-{index}")}}).decode()
            )
            await ws.recv()
            next_id = 2
            while time.monotonic() < deadline:
                commands = []
                for _ in range(20):
                    channel = f"task:fresh-{secrets.token_hex(8)}"
                    commands.append({"id": next_id, "subscribe": {"channel": channel}})
                    commands.append({"id": next_id + 1, "unsubscribe": {"channel": channel}})
                    next_id += 2
                await ws.send("\n".join(orjson.dumps(c).decode() for c in commands))
                replies = 0
                while replies < len(commands):
                    for line in str(await ws.recv()).split("\n"):
                        message = orjson.loads(line)
                        if "id" in message:
                            replies += 1
                            if "error" in message:
                                failed += 1
                done += 20
                await asyncio.sleep(0.45)  # 40 commands a round: under 100/s

    await asyncio.gather(*(churn(n) for n in range(clients)))
    after = (await run.metrics()).get("dex_shim_memory_streams", 0.0)
    return Outcome(
        f"{done} fresh channels subscribed; streams kept {int(before)} -> {int(after)}",
        failed == 0 and after <= before + 2,
    )


async def legacy_subscriptions(run: Run) -> Outcome:
    """More subscriptions than client_channel_limit, and a 4,000-character id."""
    ignored_before = await run.refused("legacy_subscription")
    async with connect(run.legacy_url(run.token("collector")), proxy=None) as ws:
        await ws.send(orjson.dumps({"action": "subscribe", "task_id": "x" * 4000}).decode())
        for n in range(150):
            await ws.send(orjson.dumps({"action": "subscribe", "task_id": f"many-{n}"}).decode())
        await asyncio.sleep(0.3)
        ignored = await run.refused("legacy_subscription") - ignored_before
        still_open = ws.close_code is None
    return Outcome(
        f"151 subscribes: 128 held, {ignored} ignored; socket open: {still_open}",
        ignored == 23 and still_open,
    )


def _bulk(count: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"type": "task.updated", "task_id": f"{tag}-{n % 50}", "payload": {"n": n}}
        for n in range(count)
    ]


def _prepare_huge_ingest() -> Any:
    return orjson.dumps(_bulk(100_000, "bulk")), orjson.dumps(_bulk(1000, "bulk"))


async def huge_ingest(run: Run) -> Outcome:
    """One 100,000-item request (the issue's 6 MiB that blocked the loop for 6 s), then
    batches at the cap."""
    big_body, batch_body = run.prepared["100,000-item ingest"]
    started = time.monotonic()
    big = await run.broadcast(big_body)
    refused_ms = (time.monotonic() - started) * 1000
    batches = 1 if run.options.quick else 2
    accepted = 0
    for _ in range(batches):
        answer = await run.broadcast(batch_body)
        accepted += answer.json().get("accepted", 0) if answer.status_code == 200 else 0
    return Outcome(
        f"100,000 items ({len(big_body) / 2**20:.1f} MiB): HTTP {big.status_code} in "
        f"{refused_ms:.0f} ms; {batches} x 1,000 items: {accepted} accepted",
        big.status_code == 413 and accepted == batches * 1000,
    )


def _deep_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


async def deep_nesting(run: Run) -> Outcome:
    deep_item = b'{"type":"task.updated","task_id":"deep","payload":' + _deep_json(300) + b"}"
    body = b"[" + b",".join([deep_item] * 50 + [orjson.dumps(_bulk(1, "deep")[0])]) + b"]"
    answer = await run.broadcast(body)
    counts = answer.json() if answer.status_code == 200 else {}
    api = await run.http.post(
        "/api/publish",
        content=b'{"channel":"task:deep","data":' + _deep_json(300) + b"}",
        headers={"X-API-Key": run.keys.api_key},
    )
    return Outcome(
        f"ingest HTTP {answer.status_code}: {counts.get('refused')} refused, "
        f"{counts.get('accepted')} accepted; server API HTTP {api.status_code}",
        answer.status_code == 200
        and counts.get("refused") == 50
        and counts.get("accepted") == 1
        and api.status_code == 400,
    )


async def channel_publish_flood(run: Run) -> Outcome:
    accepted = refused = 0
    batch = orjson.dumps(
        [
            {"type": "task.updated", "task_id": "hot", "payload": {"task_id": "hot", "n": n}}
            for n in range(1000)
        ]
    )
    for _ in range(3):
        answer = (await run.broadcast(batch)).json()
        accepted += answer["accepted"]
        refused += answer["refused"]
    publish = {"publish": {"channel": "task:hot", "data": {}}}
    replies = (await run.api("batch", {"commands": [publish] * 300})).json()["replies"]
    limited = sum(1 for r in replies if r.get("error", {}).get("code") == 111)
    return Outcome(
        f"3,000 items into one channel: {accepted} accepted, {refused} refused; "
        f"300 server API publishes: {limited} refused 111",
        refused > 0 and accepted + refused == 3000 and limited > 0,
    )


async def user_connections(run: Run) -> Outcome:
    token = run.token("greedy")
    codes: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(15):
            ws = await stack.enter_async_context(connect(run.ws_url, proxy=None))
            await ws.send(orjson.dumps({"id": 1, "connect": {"token": token}}).decode())
            try:
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                codes.append(0 if "connect" in reply else -1)
            except ConnectionClosed:
                codes.append(ws.close_code or 1006)
        legacy = []
        for _ in range(3):
            try:
                async with connect(run.legacy_url(token), proxy=None):
                    legacy.append(101)
            except InvalidStatus as exc:
                legacy.append(exc.response.status_code)
    held = codes.count(0)
    limited = codes.count(3504)
    return Outcome(
        f"15 connects of one user: {held} held, {limited} closed 3504; legacy upgrades {legacy}",
        held == 10 and limited == 5 and legacy == [503] * 3,
    )


async def node_connections(run: Run) -> Outcome:
    limit = 80 if run.options.quick else 300
    accepted = refused = 0
    async with contextlib.AsyncExitStack() as stack:
        for n in range(limit + 10):
            try:
                await stack.enter_async_context(
                    connect(run.legacy_url(run.token(f"crowd-{n}")), proxy=None)
                )
                accepted += 1
            except InvalidStatus as exc:
                refused += exc.response.status_code == 503
    return Outcome(
        f"{limit + 10} upgrades at a limit of {limit}: {accepted} accepted, {refused} refused 503",
        refused >= 10 and accepted + refused == limit + 10,
    )


async def foreign_origin(run: Run) -> Outcome:
    statuses = []
    for url in (run.ws_url, run.legacy_url(run.token("visitor"))):
        for _ in range(25):
            try:
                async with connect(url, proxy=None, origin="https://evil.example"):  # type: ignore[arg-type]
                    statuses.append(101)
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
    async with connect(run.ws_url, proxy=None, origin=ALLOWED_ORIGIN):  # type: ignore[arg-type]
        allowed = True
    return Outcome(
        f"50 upgrades from a foreign Origin: {statuses.count(403)} refused 403; allowed origin served",
        statuses == [403] * 50 and allowed,
    )


async def smuggling(run: Run) -> Outcome:
    refused = 0
    before = (await run.metrics()).get(
        'dex_shim_ingest_events_total{result="accepted",type="smuggled.event"}', 0.0
    )
    body = b'{"type":"smuggled.event","payload":{}}'
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        writer.write(
            b"POST /api/v1/broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
            + run.keys.api_key.encode()
            + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        refused += answer.startswith(b"HTTP/1.1 400")
    after = (await run.metrics()).get(
        'dex_shim_ingest_events_total{result="accepted",type="smuggled.event"}', 0.0
    )
    return Outcome(
        f"20 requests with Content-Length and Transfer-Encoding: {refused} refused 400, "
        f"{int(after - before)} ingested",
        refused == 20 and after == before,
    )


async def admin_key_login(run: Run) -> Outcome:
    async with connect(run.ws_url, proxy=None) as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": run.keys.admin_key}}).decode())
        code = await asyncio.wait_for(_drain(ws), 5)
    minted = await run.http.post("/console/api/token")
    return Outcome(
        f"admin key as connect token: closed {code}; console credential without the key: "
        f"HTTP {minted.status_code}",
        code == 3500 and minted.status_code == 401,
    )


async def api_batch(run: Run) -> Outcome:
    publish = {"publish": {"channel": "task:batch", "data": {}}}
    huge = await run.api("batch", {"commands": [publish] * 5000})
    capped = await run.api("batch", {"commands": [publish] * 1000})
    replies = len(capped.json().get("replies", [])) if capped.status_code == 200 else 0
    return Outcome(
        f"batch of 5,000: HTTP {huge.status_code}; batch of 1,000: {replies} replies",
        huge.status_code == 413 and replies == 1000,
    )


async def token_without_user(run: Run) -> Outcome:
    anonymous = mint_token(run.keys.signing_key, ALGORITHM, user="", ttl_seconds=600)
    try:
        async with connect(run.legacy_url(anonymous), proxy=None):
            status = 101
    except InvalidStatus as exc:
        status = exc.response.status_code
    config = await run.http.get(
        "/api/v1/realtime/config", headers={"Authorization": f"Bearer {anonymous}"}
    )
    return Outcome(
        f"signed token without sub/user_id: upgrade HTTP {status}, config HTTP {config.status_code}",
        status == 401 and config.status_code == 401,
    )


def _server_socket_states(port: int, peer_port: int) -> list[str]:
    """TCP states (hex, /proc/net/tcp) of the node's side of one client connection."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == port and (
                    int(remote.rsplit(":", 1)[1], 16) == peer_port
                ):
                    states.append(state)
    return states


async def zero_window_reader(run: Run) -> Outcome:
    """A Centrifuge client that stops reading while its channels are flooded: cut off
    as slow, and its connection gone from the node within the write timeout (not left
    ESTABLISHED with the kernel's queue). The flood goes through the server API with
    skip_history, to channels only this client reads, so no history is kept."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", run.port))
    peer_port = sock.getsockname()[1]
    channels = [f"task:stall-{n}" for n in range(100)]
    ws = await connect(run.ws_url, sock=sock, proxy=None, max_queue=1, max_size=None)
    commands = [{"id": 1, "connect": {"token": run.token("stalled")}}] + [
        {"id": n + 2, "subscribe": {"channel": c}} for n, c in enumerate(channels)
    ]
    await ws.send("\n".join(orjson.dumps(c).decode() for c in commands))
    await asyncio.sleep(0.5)
    ws.transport.pause_reading()  # nothing more leaves the kernel: the window closes
    started = time.monotonic()
    data = {"pad": "p" * 15000}
    rounds = 0
    gone_after = None
    while time.monotonic() - started < 20:
        if rounds < 10:
            broadcast = {"channels": channels, "data": data, "skip_history": True}
            await run.api("broadcast", broadcast)
            rounds += 1
        if "01" not in _server_socket_states(run.port, peer_port):
            gone_after = time.monotonic() - started
            break
        await asyncio.sleep(0.05)
    ws.transport.abort()
    sent_mib = rounds * len(channels) * 15050 / 2**20
    return Outcome(
        f"stalled reader ({sent_mib:.0f} MiB sent at it): node side "
        + (f"gone after {gone_after:.1f} s" if gone_after else "still ESTABLISHED"),
        gone_after is not None,
    )


async def short_keys(run: Run) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    env["DEX_SHIM_API_KEY"] = "sixteen-byte-key"
    check = await asyncio.create_subprocess_exec(
        *_server_command()[:-1],
        "checkconfig",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(check.communicate(), 30)
    message = err.decode().strip().splitlines()[-1] if err else ""
    return Outcome(
        f"16-byte api_key: exit {check.returncode} ({message})",
        check.returncode not in (0, None) and "at least 32 bytes" in message,
    )


async def public_metrics(run: Run) -> Outcome:
    public = await run.http.get("/metrics")
    internal = await run.metrics()
    return Outcome(
        f"/metrics on the public port: HTTP {public.status_code}; internal listener: "
        f"{len(internal)} samples",
        public.status_code == 404 and len(internal) > 10,
    )


async def _frames_within(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for frame in ws:
                frames.append(orjson.loads(frame))
    return frames


async def legacy_read_authorization(run: Run) -> Outcome:
    """A token that grants nothing subscribes to task:secret and to `*` on the legacy
    protocol (the issue's item 1); one granted task:secret reads it."""
    nothing = run.token("nosy", channels=[])
    granted = run.token("owner", channels=["task:secret"])
    secret = {"type": "task.updated", "task_id": "secret", "payload": {"task_id": "secret"}}
    async with (
        connect(run.legacy_url(nothing), proxy=None) as named,
        connect(run.legacy_url(nothing), proxy=None) as everything,
        connect(run.legacy_url(granted), proxy=None) as owner,
        connect(run.ws_url, proxy=None) as channel_client,
    ):
        await named.send('{"action":"subscribe","task_id":"secret"}')
        await everything.send('{"action":"subscribe_all"}')
        await owner.send('{"action":"subscribe","task_id":"secret"}')
        await channel_client.send(
            "\n".join(
                [
                    orjson.dumps({"id": 1, "connect": {"token": nothing}}).decode(),
                    orjson.dumps({"id": 2, "subscribe": {"channel": "task:secret"}}).decode(),
                ]
            )
        )
        replies = [orjson.loads(line) for line in str(await channel_client.recv()).split("\n")]
        while len(replies) < 2:
            replies += [orjson.loads(line) for line in str(await channel_client.recv()).split("\n")]
        await asyncio.sleep(0.3)
        await run.broadcast(secret)
        seen = [await _frames_within(ws, 0.7) for ws in (named, everything, owner)]
    leaked = sum(1 for frames in seen[:2] for f in frames if f.get("task_id") == "secret")
    delivered = sum(1 for f in seen[2] if f.get("task_id") == "secret")
    code = next((r.get("error", {}).get("code") for r in replies if r.get("id") == 2), None)
    return Outcome(
        f"ungranted legacy subscribe and *: {leaked} events; granted: {delivered}; "
        f"channel subscribe error {code}",
        leaked == 0 and delivered == 1 and code == 103,
    )


async def personal_events(run: Run) -> Outcome:
    """An approval for bob reaches bob only, on both protocols (the issue's item 3)."""
    approval = {
        "type": "approval.requested",
        "payload": {"user_id": "bob", "approval_id": "a1", "title": "deploy?"},
    }
    alice = run.token("alice", channels=["global", "task:*"])
    bob = run.token("bob")
    async with (
        connect(run.legacy_url(alice), proxy=None) as alice_legacy,
        connect(run.legacy_url(bob), proxy=None) as bob_legacy,
        connect(run.ws_url, proxy=None) as alice_channels,
    ):
        for ws in (alice_legacy, bob_legacy):
            await ws.send('{"action":"subscribe_all"}')
        await alice_channels.send(orjson.dumps({"id": 1, "connect": {"token": alice}}).decode())
        await alice_channels.recv()
        await alice_channels.send(
            orjson.dumps({"id": 2, "subscribe": {"channel": "global"}}).decode()
        )
        await alice_channels.recv()
        await asyncio.sleep(0.3)
        await run.broadcast(approval)
        frames = [await _frames_within(ws, 0.7) for ws in (alice_legacy, bob_legacy)]
        pushes = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                async for frame in alice_channels:
                    pushes += [orjson.loads(line) for line in str(frame).split("\n")]
    to_alice = sum(1 for f in frames[0] if f.get("type") == "approval.requested")
    to_bob = sum(1 for f in frames[1] if f.get("type") == "approval.requested")
    on_global = sum(1 for p in pushes if "approval" in str(p.get("push", {}).get("pub", "")))
    return Outcome(
        f"approval for bob: bob's legacy * got {to_bob}, alice's legacy * {to_alice}, "
        f"alice on global {on_global}",
        to_bob == 1 and to_alice == 0 and on_global == 0,
    )


PROBES: dict[str, Probe] = {
    "command flood (channels)": command_flood,
    "frame flood (legacy)": legacy_frame_flood,
    "fresh channel churn": fresh_channel_churn,
    "legacy subscriptions": legacy_subscriptions,
    "100,000-item ingest": huge_ingest,
    "deep nesting": deep_nesting,
    "channel publish flood": channel_publish_flood,
    "connections per user": user_connections,
    "connections per node": node_connections,
    "foreign origin": foreign_origin,
    "CL + TE smuggling": smuggling,
    "admin key as login": admin_key_login,
    "server API batch": api_batch,
    "token without user id": token_without_user,
    "legacy read authorization": legacy_read_authorization,
    "personal events via global": personal_events,
    "zero-window reader": zero_window_reader,
    "short keys at start": short_keys,
    "public /metrics": public_metrics,
}
PREPARE: dict[str, Callable[[], Any]] = {"100,000-item ingest": _prepare_huge_ingest}
QUICK = (
    "command flood (channels)",
    "frame flood (legacy)",
    "fresh channel churn",
    "100,000-item ingest",
    "deep nesting",
    "channel publish flood",
    "connections per user",
    "foreign origin",
    "CL + TE smuggling",
    "zero-window reader",
    "legacy read authorization",
    "personal events via global",
)


# --- results and verdict ----------------------------------------------------------------------


@dataclass(slots=True)
class ProbeResult:
    probe: str
    outcome: str
    expected: bool
    p99_before_ms: dict[str, float | None]
    p99_during_ms: dict[str, float | None]
    lost: dict[str, int]
    rss_before_kib: int
    rss_after_kib: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def p99_limit_ms(before: float, slack_ms: float, floor_ms: float = 0.0) -> float:
    """The most a bystander's p99 may be during a probe, given the one before it and
    the run's noise floor (the median p99 of the idle control windows)."""
    baseline = max(before, floor_ms)
    return max(P99_FACTOR * baseline, baseline + slack_ms)


def noise_floor(controls: Sequence[ProbeResult]) -> dict[str, float]:
    """Per bystander, the median p99 of the control windows (0 without any)."""
    floors = {}
    for protocol in ("legacy", "channels"):
        values = [r.p99_during_ms[protocol] for r in controls]
        known = [v for v in values if v is not None]
        floors[protocol] = statistics.median(known) if known else 0.0
    return floors


def judge(
    result: ProbeResult,
    slack_ms: float = DEFAULT_SLACK_MS,
    floor_ms: dict[str, float] | None = None,
) -> None:
    """Fill `failures` by the scenario's rules."""
    if not result.expected:
        result.failures.append("unexpected outcome")
    for protocol, lost in result.lost.items():
        if lost:
            result.failures.append(f"{protocol} bystander lost {lost}")
    for protocol, during in result.p99_during_ms.items():
        before = result.p99_before_ms.get(protocol)
        if during is None or before is None:
            result.failures.append(f"{protocol} bystander got nothing")
            continue
        limit = p99_limit_ms(before, slack_ms, (floor_ms or {}).get(protocol, 0.0))
        if during > limit:
            result.failures.append(f"{protocol} p99 {during:.1f} ms > {limit:.1f} ms")
    if result.rss_after_kib > RSS_FACTOR * result.rss_before_kib:
        result.failures.append("RSS not back within 20 %")


async def settle_rss(run: Run, before: int) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + run.options.settle_seconds
    while True:
        rss = run.rss_kib()
        if rss <= RSS_FACTOR * before or loop.time() >= deadline:
            return rss
        await asyncio.sleep(0.5)


async def run_probe(run: Run, name: str, probe: Probe) -> ProbeResult:
    options = run.options
    prepare = PREPARE.get(name)
    if prepare is not None:
        run.prepared[name] = prepare()
    base_start = time.time_ns()
    await asyncio.sleep(options.baseline_seconds)
    base_end = time.time_ns()
    rss_before = run.rss_kib()
    started = time.time_ns()
    probing = asyncio.create_task(probe(run))
    # The window covers the probe and at least probe_seconds of it.
    await asyncio.sleep(options.probe_seconds)
    try:
        outcome = await asyncio.wait_for(probing, 60)
    except Exception as exc:  # a probe that breaks is a failed probe, not a crash
        outcome = Outcome(f"probe failed: {exc!r}", False)
    ended = time.time_ns()
    await asyncio.sleep(options.drain_seconds)
    before, during = await run.windows((base_start, base_end), (started, ended))
    rss_after = await settle_rss(run, rss_before)
    result = ProbeResult(
        probe=name,
        outcome=outcome.text,
        expected=outcome.expected,
        p99_before_ms={p: before[p]["p99_ms"] for p in ("legacy", "channels")},
        p99_during_ms={p: during[p]["p99_ms"] for p in ("legacy", "channels")},
        lost={p: during[p]["lost"] + before[p]["lost"] for p in ("legacy", "channels")},
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
    )
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(results: Sequence[ProbeResult]) -> str:
    rows = [
        (
            "probe",
            "outcome",
            "p99 legacy ms (during/before)",
            "p99 channels ms (during/before)",
            "lost",
            "RSS MiB before/after",
            "verdict",
        )
    ]
    for r in results:
        rows.append(
            (
                r.probe,
                r.outcome,
                f"{_ms(r.p99_during_ms['legacy'])} / {_ms(r.p99_before_ms['legacy'])}",
                f"{_ms(r.p99_during_ms['channels'])} / {_ms(r.p99_before_ms['channels'])}",
                str(sum(r.lost.values())),
                f"{r.rss_before_kib / 1024:.1f} / {r.rss_after_kib / 1024:.1f}",
                "ok" if r.passed else "FAIL: " + "; ".join(r.failures),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


async def idle(run: Run) -> Outcome:
    """The control: nothing is done while the window is measured."""
    return Outcome("nothing done", True)


async def scenario(
    options: Options, names: Sequence[str], rounds: int = 1
) -> tuple[list[ProbeResult], dict[str, float]]:
    """The control rows, then every probe (`rounds` times), each judged against the
    noise floor the control rows measured; and that floor."""
    with tempfile.TemporaryDirectory(prefix="dex-abuse-") as tmp:
        async with started_run(options, Path(tmp)) as run:
            await asyncio.sleep(1.0)  # warm-up: both bystanders receiving
            controls = [await run_probe(run, CONTROL, idle) for _ in range(CONTROL_WINDOWS)]
            floor = noise_floor(controls)
            print(f"noise floor (median control p99): {floor}", file=sys.stderr, flush=True)
            results = []
            for result in controls:
                judge(result, options.slack_ms, floor)
                results.append(result)
            for round_number in range(rounds):
                for name in names:
                    result = await run_probe(run, name, PROBES[name])
                    if rounds > 1:
                        result.probe = f"{name} #{round_number + 1}"
                    judge(result, options.slack_ms, floor)
                    print(
                        f"{result.probe}: {result.outcome} -> "
                        f"{'ok' if result.passed else result.failures}",
                        file=sys.stderr,
                        flush=True,
                    )
                    results.append(result)
            return results, floor


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.abuse", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the in-suite short version")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument(
        "--slack-ms",
        type=float,
        default=DEFAULT_SLACK_MS,
        help="p99 may also be up to baseline + this (default 0: 2x baseline only)",
    )
    parser.add_argument("--probe", action="append", choices=sorted(PROBES), help="only these")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the probe list this many times on one node"
    )
    parser.add_argument("--bystander", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=BYSTANDER_ROLES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bystander is not None:
        asyncio.run(bystander_main(args.bystander, args.role))
        return 0
    options = options_for(args.quick, args.json)
    options.slack_ms = args.slack_ms
    names = args.probe or (QUICK if args.quick else tuple(PROBES))
    results, floor = asyncio.run(scenario(options, names, args.rounds))
    passed = all(r.passed for r in results)
    floors = ", ".join(f"{p} {v:.1f} ms" for p, v in floor.items())
    summary = (
        f"verdict: {'PASS' if passed else 'FAIL'} ({sum(r.passed for r in results)}"
        f"/{len(results)} rows; zero loss, p99 <= {P99_FACTOR}x baseline "
        f"(noise floor, the median p99 of {CONTROL_WINDOWS} idle control windows: {floors}; "
        f"slack {options.slack_ms:g} ms), RSS back within 20 %; shared machine)"
    )
    # With --json, stdout is the JSON alone and the table goes to stderr.
    table = sys.stderr if args.json else sys.stdout
    print(render(results) + "\n\n" + summary, file=table)
    if args.json:
        report = {
            "passed": passed,
            "slack_ms": options.slack_ms,
            "noise_floor_ms": floor,
            "probes": [{**asdict(r), "passed": r.passed} for r in results],
        }
        print(json.dumps(report, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
