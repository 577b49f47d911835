"""The fallback endpoints at the HTTP level: plain `curl` against the unidirectional
transports (what an integration without an SDK does), the emulation endpoint's
answers to bad input, which paths are on by default, the cut-off of a stalled
HTTP-streaming client beside a fast one, and the transports advertised to the
cutover's config endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect

from shim.app.fallback import (
    EMULATION_PATH,
    HTTP_STREAM_PATH,
    SSE_PATH,
    UNI_HTTP_STREAM_PATH,
    UNI_SSE_PATH,
    UNI_WEBSOCKET_PATH,
)
from shim.centrifuge import codes
from shim.centrifuge.session import CentrifugeSession
from shim.transport.stream import StreamPump
from tests.conftest import RunningServer, eventually, run_server, sessions_of

UNI = {"uni_http_stream_enabled": True, "uni_sse_enabled": True, "uni_websocket_enabled": True}


def curl() -> str:
    found = shutil.which("curl")
    # Not a skip: `make test` installs curl, so a missing one is a broken setup.
    assert found is not None, "curl is needed (make test installs it)"
    return found


@contextlib.asynccontextmanager
async def curl_stream(*args: str) -> AsyncIterator[asyncio.StreamReader]:
    """`curl -sN ...` running, its stdout to read; killed on exit."""
    proc = await asyncio.create_subprocess_exec(
        curl(), "-sN", "--max-time", "20", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        yield proc.stdout
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def json_lines(stream: asyncio.StreamReader, count: int, *, sse: bool) -> list[Any]:
    """The next `count` messages of an NDJSON or SSE stream."""
    found: list[Any] = []
    async with asyncio.timeout(10):
        while len(found) < count:
            line = (await stream.readline()).strip()
            if not line:
                assert not stream.at_eof(), f"stream ended after {found}"
                continue
            if sse:
                assert line.startswith(b"data: "), line
                line = line[len(b"data: ") :]
            found.append(orjson.loads(line))
    return found


async def broadcast_ok(server: RunningServer, body: Any) -> None:
    response = await server.broadcast(body)
    assert response.status_code == 200 and response.json()["failed"] == 0, response.text


def approval(user: str, n: int) -> dict[str, Any]:
    return {"type": "approval.required", "payload": {"user_id": user, "n": n}}


async def test_curl_reads_unidirectional_http_stream_and_sse(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, **UNI) as server:
        token = server.token("dana", channels=["project:7"])
        request = orjson.dumps({"token": token}).decode()
        async with (
            curl_stream("-X", "POST", "-d", request, server.url + UNI_HTTP_STREAM_PATH) as ndjson,
            curl_stream(
                "-G", "--data-urlencode", f"cf_connect={request}", server.url + UNI_SSE_PATH
            ) as sse,
        ):
            for stream, is_sse in ((ndjson, False), (sse, True)):
                (connect,) = await json_lines(stream, 1, sse=is_sse)
                body = connect["connect"]
                assert body["client"] and body["session"] and "pong" not in body
                # Server-side subscriptions: the personal channel and the token's channels.
                assert set(body["subs"]) == {"user:dana", "project:7"}
            await eventually(lambda: _true(len(sessions_of(server, "dana")) == 2))
            project = {"type": "project.updated", "payload": {"project_id": "7"}}
            await broadcast_ok(server, [approval("dana", 1), project, approval("erin", 2)])
            for stream, is_sse in ((ndjson, False), (sse, True)):
                first, second = await json_lines(stream, 2, sse=is_sse)
                assert first["channel"] == "user:dana" and first["pub"]["data"]["n"] == 1
                assert first["pub"]["offset"] == 1
                assert second["channel"] == "project:7"
                assert second["pub"]["data"]["project_id"] == "7"

            # The server API's subscribe reaches them as a bare subscribe push.
            api = {"user": "dana", "channel": "task:9"}
            response = await server.http.post(
                "/api/subscribe", json=api, headers={"X-API-Key": server.settings.api_key}
            )
            assert response.status_code == 200, response.text
            for stream, is_sse in ((ndjson, False), (sse, True)):
                (pushed,) = await json_lines(stream, 1, sse=is_sse)
                assert pushed["channel"] == "task:9" and "subscribe" in pushed

            # Disconnected from the server: a disconnect push, then the end of the stream.
            for session in sessions_of(server, "dana"):
                session.disconnect(codes.FORCE_DISCONNECT)
            for stream, is_sse in ((ndjson, False), (sse, True)):
                (last,) = await json_lines(stream, 1, sse=is_sse)
                assert last == {"disconnect": {"code": 3503, "reason": "force disconnect"}}
                async with asyncio.timeout(5):
                    assert (await stream.read()).strip() == b""
        await eventually(lambda: _true(not sessions_of(server, "dana")))


async def _true(value: bool) -> bool:
    return value


async def test_refused_unidirectional_connects_say_why(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, **UNI) as server:
        cases = [
            ({"token": "not-a-jwt"}, codes.INVALID_TOKEN),
            ({}, codes.DISCONNECT_PERMISSION_DENIED),  # anonymous clients are refused
            ({"token": server.token("old", ttl=-30)}, codes.CONNECTION_EXPIRED),
        ]
        for request, code in cases:
            async with curl_stream(
                "-X",
                "POST",
                "-d",
                orjson.dumps(request).decode(),
                server.url + UNI_HTTP_STREAM_PATH,
            ) as stream:
                (last,) = await json_lines(stream, 1, sse=False)
                assert last == {"disconnect": {"code": code.code, "reason": code.reason}}
        # A connect request that is not JSON never starts a stream.
        response = await server.http.post(UNI_HTTP_STREAM_PATH, content=b"{token")
        assert response.status_code == 400 and response.json()["error"]
        response = await server.http.get(UNI_SSE_PATH, params={"cf_connect": "[1]"})
        assert response.status_code == 400
        response = await server.http.post(UNI_HTTP_STREAM_PATH, content=b"x" * 70000)
        assert response.status_code == 413


async def test_unidirectional_websocket_pushes_only(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, **UNI) as server:
        url = f"ws://127.0.0.1:{server.port}{UNI_WEBSOCKET_PATH}"
        async with ws_connect(url) as ws:
            # No cf_connect: the connect request is the first message.
            await ws.send(orjson.dumps({"token": server.token("fay")}).decode())
            connect = orjson.loads(await ws.recv())
            assert connect["connect"]["subs"].keys() == {"user:fay"}
            await ws.send("anything else is read and ignored")
            await broadcast_ok(server, [approval("fay", 1), approval("fay", 2)])
            pubs = [orjson.loads(await ws.recv()) for _ in range(2)]  # one push per frame
            assert [p["pub"]["data"]["n"] for p in pubs] == [1, 2]
            (session,) = sessions_of(server, "fay")
            session.disconnect(codes.FORCE_DISCONNECT)
            with pytest.raises(Exception):  # noqa: B017 - the close frame ends recv
                await ws.recv()
            assert ws.close_code == codes.FORCE_DISCONNECT.code


async def test_emulation_endpoint_answers_bad_input_with_json(server: RunningServer) -> None:
    http = server.http
    node = server.runtime.node.name
    command = '{"id":2,"rpc":{"method":"ping"}}'
    cases: list[tuple[Any, int]] = [
        ({"session": "nope", "node": node, "data": command}, 404),  # no such session here
        ({"session": "s", "node": "another-node", "data": command}, 404),  # memory engine
        ({"session": "s", "node": node}, 400),
        ([1, 2], 400),
    ]
    for body, status in cases:
        response = await http.post(EMULATION_PATH, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]
    response = await http.post(EMULATION_PATH, content=b"{oops")
    assert response.status_code == 400
    response = await http.post(EMULATION_PATH, content=b"x" * 70000)
    assert response.status_code == 413
    assert (await http.get(EMULATION_PATH)).status_code == 405
    preflight = await http.options(EMULATION_PATH)
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert (await http.get(HTTP_STREAM_PATH)).status_code == 405
    response = await http.get(SSE_PATH)
    assert response.status_code == 400 and "cf_connect" in response.json()["error"]


async def test_what_is_served_by_default_and_advertised(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys) as server:
        # Bidirectional emulation on, unidirectional off.
        for path in (UNI_HTTP_STREAM_PATH, UNI_SSE_PATH):
            assert (await server.http.post(path, content=b"{}")).status_code == 404
        config = await server.http.get(
            "/api/v1/realtime/config", headers={"Authorization": f"Bearer {server.token('gus')}"}
        )
        assert config.status_code == 200, config.text
    async with run_server(signing_keys, sse_enabled=False, cutover_channels_percent=100) as server:
        assert (await server.http.get(SSE_PATH, params={"cf_connect": "{}"})).status_code == 404
        config = await server.http.get(
            "/api/v1/realtime/config", headers={"Authorization": f"Bearer {server.token('gus')}"}
        )
        assert config.json()["transports"] == [
            {"transport": "websocket", "endpoint": "/connection/websocket"},
            {"transport": "http_stream", "endpoint": HTTP_STREAM_PATH},
        ]


async def test_stalled_http_stream_client_is_cut_off_while_a_fast_one_keeps_up(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(
        signing_keys, client_queue_max_size_bytes=512 * 1024, websocket_write_timeout_seconds=1.0
    ) as server:
        stalled = await _stalled_stream_client(server, "stalled", "task:S")
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                connect = orjson.dumps({"id": 1, "connect": {"token": server.token("fast")}})
                async with http.stream("POST", HTTP_STREAM_PATH, content=connect) as fast:
                    lines = fast.aiter_lines()
                    reply = orjson.loads(await anext(lines))["connect"]
                    subscribe = '{"id":2,"subscribe":{"channel":"task:S"}}'
                    emulation = {"session": reply["session"], "node": reply["node"]}
                    posted = await http.post(EMULATION_PATH, json={**emulation, "data": subscribe})
                    assert posted.status_code == 204
                    assert orjson.loads(await anext(lines))["id"] == 2
                    (stalled_session,) = sessions_of(server, "stalled")

                    got: list[int] = []

                    async def read_fast() -> None:
                        async for line in lines:
                            push = orjson.loads(line)
                            if "push" in push:
                                got.append(push["push"]["pub"]["data"]["n"])

                    reader = asyncio.create_task(read_fast())
                    try:
                        total = await _publish_until_closed(server, stalled_session)
                        async with asyncio.timeout(20):
                            while len(got) < total:
                                await asyncio.sleep(0.02)
                    finally:
                        reader.cancel()
                    assert got == list(range(total))
            assert server.runtime.node.counters.disconnects.get(("channels", codes.SLOW.code))
            # Its socket was released: the server dropped the TCP connection.
            assert await _peer_closed(stalled)
            await eventually(
                lambda: _true(
                    not [p for p in server.runtime.open_sockets if isinstance(p, StreamPump)]
                )
            )
            assert not sessions_of(server, "stalled") and not sessions_of(server, "fast")
        finally:
            stalled.close()


async def _publish_until_closed(server: RunningServer, session: CentrifugeSession) -> int:
    """16 KB events to task:S in batches until `session` is cut off; how many were
    sent (bounded: loopback kernel buffers take a few MB first)."""
    filler = "x" * 16 * 1024
    total, batch = 0, 10  # 160 KB per burst: well under the cap
    deadline = asyncio.get_running_loop().time() + 20
    while not session.closed:
        assert asyncio.get_running_loop().time() < deadline, "stalled client never cut off"
        events = [
            {"type": "task.updated", "payload": {"task_id": "S", "n": n, "f": filler}}
            for n in range(total, total + batch)
        ]
        await broadcast_ok(server, events)
        total += batch
    return total


async def _stalled_stream_client(server: RunningServer, user: str, channel: str) -> socket.socket:
    """An HTTP-streaming client, subscribed to `channel`, that never reads again (a
    tiny receive buffer, so the server's writes soon block)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    body = orjson.dumps({"id": 1, "connect": {"token": server.token(user)}})
    head = (
        f"POST {HTTP_STREAM_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, head + body)
    received = b""
    async with asyncio.timeout(10):
        while b'"session":"' not in received or b"}\n" not in received:
            received += await loop.sock_recv(sock, 65536)
    reply = received[received.index(b'{"id":1') :].split(b"\n", 1)[0]
    connected = orjson.loads(reply)["connect"]
    subscribe = orjson.dumps({"id": 2, "subscribe": {"channel": channel}}).decode()
    emulation = {"session": connected["session"], "node": connected["node"], "data": subscribe}
    response = await server.http.post(EMULATION_PATH, json=emulation)
    assert response.status_code == 204
    await eventually(
        lambda: _true(any(channel in s.subscriptions for s in sessions_of(server, user)))
    )
    return sock


async def _peer_closed(sock: socket.socket) -> bool:
    """Read what is buffered until the server's side is gone (reset or EOF)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        while True:
            try:
                if not await loop.sock_recv(sock, 1 << 20):
                    return True
            except ConnectionResetError:
                return True


async def test_allowed_origins_and_the_connection_limit_apply(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(
        signing_keys, allowed_origins="https://dex.example", client_connection_limit=1, **UNI
    ) as server:
        http = server.http
        connect = orjson.dumps({"id": 1, "connect": {"token": server.token("ivy")}})
        foreign = {"Origin": "https://evil.example"}
        for path in (HTTP_STREAM_PATH, UNI_HTTP_STREAM_PATH):
            assert (await http.post(path, content=connect, headers=foreign)).status_code == 403
        refused = await http.post(EMULATION_PATH, json={"session": "s"}, headers=foreign)
        assert refused.status_code == 403
        with pytest.raises(Exception):  # noqa: B017 - the upgrade is answered 403
            await ws_connect(
                f"ws://127.0.0.1:{server.port}{UNI_WEBSOCKET_PATH}", origin="https://evil.example"
            )

        own = {"Origin": "https://dex.example"}
        preflight = await http.options(
            EMULATION_PATH, headers={**own, "Access-Control-Request-Headers": "content-type"}
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://dex.example"
        assert preflight.headers["access-control-allow-headers"] == "content-type"
        async with http.stream("POST", HTTP_STREAM_PATH, content=connect, headers=own) as stream:
            assert stream.status_code == 200
            assert stream.headers["access-control-allow-origin"] == "https://dex.example"
            assert stream.headers["access-control-allow-credentials"] == "true"
            lines = stream.aiter_lines()  # kept: a dropped iterator closes the response
            reply = orjson.loads(await anext(lines))["connect"]
            # The node holds its one connection: another stream is turned away...
            second = await http.post(HTTP_STREAM_PATH, content=connect, headers=own)
            assert second.status_code == 503
            # ...while the open one's commands still come in.
            command = '{"id":2,"rpc":{"method":"ping"}}'
            emulation = {"session": reply["session"], "node": reply["node"], "data": command}
            posted = await http.post(EMULATION_PATH, json=emulation, headers=own)
            assert posted.status_code == 204, (posted.text, reply)
            assert posted.headers["access-control-allow-origin"] == "https://dex.example"
            assert orjson.loads(await anext(lines)) == {"id": 2, "rpc": {"data": {"pong": True}}}


async def test_legacy_cutover_mode_turns_fallback_clients_away(
    signing_keys: tuple[str, str],
) -> None:
    async with run_server(signing_keys, cutover_mode="legacy", **UNI) as server:
        connect = orjson.dumps({"id": 1, "connect": {"token": server.token("jo")}})
        request = orjson.dumps({"token": server.token("jo")})
        disabled = codes.CENTRIFUGE_DISABLED
        for path, body, expected in (
            (
                HTTP_STREAM_PATH,
                connect,
                {"push": {"disconnect": {"code": 3503, "reason": disabled.reason}}},
            ),
            (
                UNI_HTTP_STREAM_PATH,
                request,
                {"disconnect": {"code": 3503, "reason": disabled.reason}},
            ),
        ):
            # A disconnect push the SDK reads as "do not reconnect", then the end.
            response = await server.http.post(path, content=body)
            assert response.status_code == 200
            assert [orjson.loads(line) for line in response.text.splitlines()] == [expected]
        assert not sessions_of(server, "jo")
        config = await server.http.get(
            "/api/v1/realtime/config", headers={"Authorization": f"Bearer {server.token('jo')}"}
        )
        assert config.json()["protocol"] == "legacy" and config.json()["transports"] == []


async def test_metrics_count_clients_by_transport(signing_keys: tuple[str, str]) -> None:
    async with run_server(signing_keys, **UNI) as server:
        http = server.http
        connect = orjson.dumps({"id": 1, "connect": {"token": server.token("lu")}})
        request = orjson.dumps({"token": server.token("lu")})
        url = f"ws://127.0.0.1:{server.port}"
        async with (
            http.stream("POST", HTTP_STREAM_PATH, content=connect) as bidirectional,
            http.stream("POST", UNI_HTTP_STREAM_PATH, content=request) as unidirectional,
            ws_connect(f"{url}/connection/websocket") as ws,
            ws_connect(f"{url}{UNI_WEBSOCKET_PATH}") as uni_ws,
        ):
            await ws.send(connect.decode())
            await uni_ws.send(request.decode())
            kept = [bidirectional.aiter_lines(), unidirectional.aiter_lines()]
            for lines in kept:
                assert "connect" in orjson.loads(await anext(lines))
            await ws.recv()
            await uni_ws.recv()
            text = (await http.get("/metrics")).text
            node = server.runtime.node.name
            for transport in ("websocket", "http_stream", "uni_http_stream", "uni_websocket"):
                line = (
                    f'dex_shim_node_num_clients_by_transport{{node="{node}",'
                    f'transport="{transport}"}} 1.0'
                )
                assert line in text, text


async def test_an_http_1_0_client_streams_without_chunks(signing_keys: tuple[str, str]) -> None:
    # HTTP/1.0 has no chunked bodies: the stream is the raw bytes until the close,
    # written through hypercorn (direct chunk writes stay off).
    async with run_server(signing_keys, **UNI) as server:
        request = orjson.dumps({"token": server.token("max")}).decode()
        async with curl_stream(
            "--http1.0", "-X", "POST", "-d", request, server.url + UNI_HTTP_STREAM_PATH
        ) as stream:
            (connect,) = await json_lines(stream, 1, sse=False)
            assert connect["connect"]["subs"].keys() == {"user:max"}
            (session,) = sessions_of(server, "max")
            assert isinstance(session.transport, StreamPump)
            assert session.transport.direct.transport is None
            await broadcast_ok(server, [approval("max", 1), approval("max", 2)])
            pubs = await json_lines(stream, 2, sse=False)
            assert [p["pub"]["data"]["n"] for p in pubs] == [1, 2]
