"""What each transport costs beside WebSocket, measured in one run: memory per idle
connection and publish-to-receive latency, for `websocket`, the emulated
`http_stream` and `sse`, and the unidirectional `uni_websocket`, `uni_http_stream`
and `uni_sse`.

Each transport gets its own fresh `dex-shim serve` process (so memory one phase
freed cannot flatter the next), one after the other:
1. N idle clients connected and subscribed to one channel (emulated ones through
   POST /emulation, unidirectional ones through the token's `channels`), the
   server's VmRSS before and after, divided by N; then a few publications to them.
2. S subscribers of another channel, M publications spaced `interval` apart through
   POST /api/v1/broadcast, each carrying its send time; p50/p99 of the delays.
Ratios are to the WebSocket row of the same run (the machine is shared: absolute
numbers move between runs, ratios much less).

Run: `python -m loadtests.measure_transports [--connections N] [--subscribers S] ...`.
All traffic stays on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from adapters.auth.jwt import mint_token
from loadtests.measure_core import (
    ALGORITHM,
    Options,
    Publisher,
    ServerProcess,
    Tally,
    close_clients,
    open_gated,
    percentile,
    raise_fd_limit,
    report,
    run_client_loop,
    sent_times,
    settled_rss,
    spawned_server,
    wait_deliveries,
)

TRANSPORTS = ("websocket", "http_stream", "sse", "uni_websocket", "uni_http_stream", "uni_sse")
IDLE_KEY = "idle"
LATENCY_KEY = "latency"
# Every transport served by every phase's server: only the measured one is used.
SERVER_SETTINGS = (
    ("uni_websocket_enabled", "true"),
    ("uni_http_stream_enabled", "true"),
    ("uni_sse_enabled", "true"),
)


# --- clients --------------------------------------------------------------------


class Client(ABC):
    """One connection of any transport: connected and subscribed once `open` returns,
    then it notes each publication's delay and answers pings (emulated ones through
    POST /emulation, unidirectional ones need not)."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.closing = False
        self.reader: asyncio.Task[None] | None = None

    def seen(self, text: str) -> None:
        now = time.time_ns()
        for sent in sent_times(text):
            self.tally.add(now - sent)

    async def close(self) -> None:
        self.closing = True
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        await self._close_connection()

    @abstractmethod
    async def _close_connection(self) -> None: ...


class WebSocketClient(Client):
    def __init__(self, tally: Tally, ws: ClientConnection, *, answers_pings: bool) -> None:
        super().__init__(tally)
        self.ws = ws
        self.answers_pings = answers_pings

    @classmethod
    async def open(cls, server: ServerProcess, token: str, channel: str, tally: Tally) -> Client:
        ws = await connect(server.ws_url, ping_interval=None, open_timeout=20, max_size=2**20)
        client = cls(tally, ws, answers_pings=True)
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": token}}).decode())
        await ws.send(orjson.dumps({"id": 2, "subscribe": {"channel": channel}}).decode())
        await client._until(lambda text: '"id":2' in text)
        client.reader = asyncio.create_task(client._read())
        return client

    @classmethod
    async def open_uni(
        cls, server: ServerProcess, token: str, _channel: str, tally: Tally
    ) -> Client:
        request = quote(orjson.dumps({"token": token}).decode())
        url = f"ws://127.0.0.1:{server.port}/connection/uni_websocket?cf_connect={request}"
        ws = await connect(url, ping_interval=None, open_timeout=20, max_size=2**20)
        client = cls(tally, ws, answers_pings=False)
        await client._until(lambda text: '"connect":' in text)
        client.reader = asyncio.create_task(client._read())
        return client

    async def _until(self, done: Any) -> None:
        async with asyncio.timeout(20):
            while True:
                text = str(await self.ws.recv())
                self.seen(text)
                if done(text):
                    return

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                text = str(frame)
                if self.answers_pings and "{}" in text.split("\n"):
                    await self.ws.send("{}")
                self.seen(text)
        if not self.closing:
            self.tally.dropped += 1

    async def _close_connection(self) -> None:
        with contextlib.suppress(WebSocketException, OSError):
            await self.ws.close()


class StreamClient(Client):
    """An HTTP-streaming or SSE response read off a bare socket (one coroutine, no
    HTTP library per connection: a thousand of them stay cheap on the client side)."""

    def __init__(
        self,
        tally: Tally,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        sse: bool,
        emulation: tuple[httpx.AsyncClient, str] | None,
    ) -> None:
        super().__init__(tally)
        self._reader = reader
        self._writer = writer
        self._sse = sse
        self._emulation = emulation  # (client, URL) for pongs of emulated clients
        self._pending = b""
        self.session = ""
        self.node = ""

    @classmethod
    async def open_stream(
        cls,
        server: ServerProcess,
        transport: str,
        token: str,
        channel: str,
        tally: Tally,
        http: httpx.AsyncClient,
    ) -> Client:
        sse = transport.endswith("sse")
        uni = transport.startswith("uni_")
        connect_body = (
            orjson.dumps({"token": token})
            if uni
            else orjson.dumps({"id": 1, "connect": {"token": token}})
        )
        path = f"/connection/{transport}"
        if sse:
            head = f"GET {path}?cf_connect={quote(connect_body.decode())} HTTP/1.1\r\n"
            body = b""
        else:
            head = f"POST {path} HTTP/1.1\r\nContent-Length: {len(connect_body)}\r\n"
            body = connect_body
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"{head}Host: 127.0.0.1\r\n\r\n".encode() + body)
        emulation = None if uni else (http, f"{server.http_url}/emulation")
        client = cls(tally, reader, writer, sse=sse, emulation=emulation)
        # Generous: a loaded machine (other work on it) answers slowly, not wrongly.
        async with asyncio.timeout(60):
            status = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in status.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"{transport}: {status.splitlines()[0]!r}")
            connected = await client._next_message(lambda m: '"connect":' in m)
            reply = orjson.loads(connected)["connect"]
            client.session, client.node = reply.get("session", ""), reply.get("node", "")
            if not uni:
                await client._emulate(f'{{"id":2,"subscribe":{{"channel":"{channel}"}}}}')
                await client._next_message(lambda m: m.startswith('{"id":2'))
        client.reader = asyncio.create_task(client._read())
        return client

    async def _emulate(self, data: str) -> None:
        assert self._emulation is not None
        http, url = self._emulation
        body = {"session": self.session, "node": self.node, "data": data}
        response = await http.post(url, json=body)
        if response.status_code != 204:
            raise RuntimeError(f"emulation refused: {response.status_code} {response.text}")

    async def _chunk(self) -> bytes:
        """The next chunk of the chunked response body (empty at its end)."""
        size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
        data = await self._reader.readexactly(size + 2)
        return data[:-2]

    async def _messages(self) -> list[str]:
        """Whole messages that arrived with the next chunk."""
        chunk = await self._chunk()
        if not chunk:
            raise ConnectionResetError("stream ended")
        self._pending += chunk
        lines = self._pending.split(b"\n")
        self._pending = lines.pop()
        messages = []
        for line in lines:
            if self._sse:
                if line.startswith(b"data: "):
                    messages.append(line[6:].decode())
            elif line:
                messages.append(line.decode())
        return messages

    async def _next_message(self, wanted: Any) -> str:
        while True:
            for message in await self._messages():
                self.seen(message)
                if wanted(message):
                    return message

    async def _read(self) -> None:
        try:
            while True:
                for message in await self._messages():
                    if message == "{}" and self._emulation is not None:
                        await self._emulate("{}")
                    self.seen(message)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            if not self.closing:
                self.tally.dropped += 1

    async def _close_connection(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


async def open_client(
    transport: str,
    server: ServerProcess,
    user: str,
    channel: str,
    tally: Tally,
    http: httpx.AsyncClient,
) -> Client:
    uni = transport.startswith("uni_")
    extra = {"channels": [channel]} if uni else {}
    token = mint_token(server.signing_key, ALGORITHM, user=user, ttl_seconds=3600, extra=extra)
    if transport == "websocket":
        return await WebSocketClient.open(server, token, channel, tally)
    if transport == "uni_websocket":
        return await WebSocketClient.open_uni(server, token, channel, tally)
    return await StreamClient.open_stream(server, transport, token, channel, tally, http)


async def open_clients(
    transport: str,
    server: ServerProcess,
    http: httpx.AsyncClient,
    *,
    count: int,
    channel: str,
    prefix: str,
    tally: Tally,
    options: Options,
) -> list[Client]:
    async def one(index: int) -> Client:
        return await open_client(transport, server, f"{prefix}-{index}", channel, tally, http)

    return await open_gated(count, options.connect_concurrency, one, transport)


# --- one transport ----------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TransportResult:
    transport: str
    connections: int
    idle_kib: float
    settled: bool
    subscribers: int
    publications: int
    delivered: int
    expected: int
    p50_ms: float
    p99_ms: float
    dropped: int
    rounds: int = 1

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.delivered)


async def measure_transport(transport: str, workdir: Path, options: Options) -> TransportResult:
    async with (
        spawned_server(workdir, compression=False, options=options) as server,
        httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as http,
    ):
        publisher = Publisher(server, http)
        warm_tally = Tally()
        warm = await open_clients(
            transport,
            server,
            http,
            count=min(10, options.connections),
            channel=f"task:{IDLE_KEY}",
            prefix="warm",
            tally=warm_tally,
            options=options,
        )
        await publisher.publish(IDLE_KEY, measured=True, seq=-1)
        await wait_deliveries(warm_tally, len(warm), options.delivery_timeout)
        await close_clients(warm)

        before, settled_before = await settled_rss(server, options)
        idle_tally = Tally()
        idle = await open_clients(
            transport,
            server,
            http,
            count=options.connections,
            channel=f"task:{IDLE_KEY}",
            prefix="idle",
            tally=idle_tally,
            options=options,
        )
        try:
            connected, settled_after = await settled_rss(server, options)
        finally:
            await close_clients(idle)

        tally = Tally()
        subscribers = await open_clients(
            transport,
            server,
            http,
            count=options.subscribers,
            channel=f"task:{LATENCY_KEY}",
            prefix="sub",
            tally=tally,
            options=options,
        )
        try:
            await publisher.publish(LATENCY_KEY, measured=False, seq=-1)
            await asyncio.sleep(0.2)
            await publisher.publish_spaced(
                LATENCY_KEY, options.publications, options.interval_ms / 1000
            )
            expected = options.subscribers * options.publications
            await wait_deliveries(tally, expected, options.delivery_timeout)
        finally:
            await close_clients(subscribers)
    latencies = sorted(tally.latencies_ns)
    return TransportResult(
        transport=transport,
        connections=options.connections,
        idle_kib=(connected - before) / options.connections,
        settled=settled_before and settled_after,
        subscribers=options.subscribers,
        publications=options.publications,
        delivered=tally.deliveries,
        expected=expected,
        p50_ms=percentile(latencies, 50) / 1e6 if latencies else float("nan"),
        p99_ms=percentile(latencies, 99) / 1e6 if latencies else float("nan"),
        dropped=tally.dropped + idle_tally.dropped,
    )


async def run_measurements(
    options: Options, transports: Sequence[str], rounds: int
) -> list[TransportResult]:
    """`rounds` passes over the transports, each pass starting one transport later
    (so no transport always runs first or last); the median of each figure."""
    raise_fd_limit(max(options.connections, options.subscribers) * 2 + 512)
    runs: dict[str, list[TransportResult]] = {t: [] for t in transports}
    with tempfile.TemporaryDirectory(prefix="dex-shim-transports-") as tmp:
        for round_index in range(rounds):
            shift = round_index % len(transports)
            for transport in [*transports[shift:], *transports[:shift]]:
                workdir = Path(tmp) / f"{transport}-{round_index}"
                workdir.mkdir()
                runs[transport].append(await measure_transport(transport, workdir, options))
    return [median_result(runs[t]) for t in transports]


def median_result(runs: Sequence[TransportResult]) -> TransportResult:
    """The median of each figure over rounds; deliveries summed (a loss anywhere shows)."""
    first = runs[0]
    return replace(
        first,
        idle_kib=statistics.median(r.idle_kib for r in runs),
        settled=all(r.settled for r in runs),
        delivered=sum(r.delivered for r in runs),
        expected=sum(r.expected for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        dropped=sum(r.dropped for r in runs),
        rounds=len(runs),
    )


def render_table(results: Sequence[TransportResult]) -> str:
    base = next((r for r in results if r.transport == "websocket"), None)

    def ratio(value: float, reference: float | None) -> str:
        return f"{value / reference:.2f}x" if reference else "-"

    rows = [
        "| transport | KiB per idle connection | vs websocket | p50 ms | p99 ms | p50 vs ws "
        "| delivered |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.transport} | {r.idle_kib:.1f}{'' if r.settled else ' (unsettled)'} "
            f"| {ratio(r.idle_kib, base.idle_kib if base else None)} "
            f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {ratio(r.p50_ms, base.p50_ms if base else None)} "
            f"| {r.delivered}/{r.expected} |"
        )
    first = results[0] if results else None
    if first is not None:
        rows.append(
            f"\n{first.connections} idle connections per transport; {first.subscribers} "
            f"subscribers x {first.publications} publications for latency; one fresh server "
            f"per transport, one after the other, in one run; medians of {first.rounds} "
            "round(s)."
        )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> tuple[Options, list[str], int, bool]:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.measure_transports", description=__doc__
    )
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument("--subscribers", type=int, default=defaults.subscribers)
    parser.add_argument("--publications", type=int, default=defaults.publications)
    parser.add_argument("--interval-ms", type=float, default=defaults.interval_ms)
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="comma-separated, in run order"
    )
    parser.add_argument("--rounds", type=int, default=3, help="passes, medians reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or not transports:
        parser.error(f"--transports: choose from {', '.join(TRANSPORTS)}")
    for name in ("connections", "subscribers", "publications", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    options = replace(
        defaults,
        connections=args.connections,
        subscribers=args.subscribers,
        publications=args.publications,
        interval_ms=args.interval_ms,
        server_settings=SERVER_SETTINGS,
    )
    return options, transports, args.rounds, bool(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    options, transports, rounds, json_output = parse_args(argv)
    results = run_client_loop(run_measurements(options, transports, rounds))
    body = (
        [{"lost": r.lost, **{f: getattr(r, f) for f in r.__dataclass_fields__}} for r in results]
        if json_output
        else None
    )
    return report(body, render_table(results), sum(r.lost for r in results))


if __name__ == "__main__":
    sys.exit(main())
