"""No token, API key or secret in any log line: the redaction, and a server run that
logs every kind of request with tokens in URLs, headers and frames."""

from __future__ import annotations

import io
import logging

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shim.logs import REDACTED, JsonFormatter, Redactor
from tests.conftest import ADMIN_KEY, API_KEY, run_server

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    "line",
    [
        f"GET /api/v1/ws?token={JWT} HTTP/1.1",
        "GET /api/v1/ws?x=1&token=opaque-session-token-123&y=2",
        f"Authorization: Bearer {JWT}",
        f"Authorization: apikey {API_KEY}",
        f"failed to decode {JWT}: bad signature",
        f"key was {API_KEY}",
    ],
)
def test_redactor_removes_tokens_and_keys(line: str) -> None:
    redacted = Redactor([API_KEY])(line)
    assert JWT not in redacted
    assert API_KEY not in redacted
    assert "opaque-session-token-123" not in redacted
    assert REDACTED in redacted


def test_json_lines_carry_bound_context() -> None:
    record = logging.LogRecord("shim.centrifuge", logging.INFO, __file__, 1, "slow", (), None)
    record.client = "c-1"
    record.user = "alice"
    record.code = 3008
    line = orjson.loads(JsonFormatter(Redactor()).format(record))
    assert line["message"] == "slow"
    assert (line["client"], line["user"], line["code"]) == ("c-1", "alice", 3008)


async def test_a_server_run_logs_no_secret(signing_keys: tuple[str, str]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(Redactor([API_KEY, ADMIN_KEY])))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    used: list[str] = []
    try:
        async with run_server(signing_keys, access_log=True) as server:
            good = server.token("alice")
            expired = server.token("alice", ttl=-10)
            forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
            used += [good, expired, forged]
            base = f"ws://127.0.0.1:{server.port}"

            # Legacy: token in the URL (valid, expired, forged) and in a header.
            async with connect(f"{base}/api/v1/ws?token={good}", compression=None) as ws:
                await ws.send('{"action":"subscribe_all"}')
            for bad in (expired, forged):
                with pytest.raises(InvalidStatus):
                    await connect(f"{base}/api/v1/ws?token={bad}", compression=None)
            async with connect(
                f"{base}/api/v1/ws", additional_headers={"Authorization": f"Bearer {good}"}
            ) as ws:
                await ws.send("not json")
            await server.http.get(f"/api/v1/ws?token={good}")
            await server.http.get(f"/api/v1/realtime/config?token={good}")

            # Centrifuge: tokens inside frames (connect, refresh, a forged one).
            async with connect(server.ws_url, compression=None) as ws:
                await ws.send(orjson.dumps({"id": 1, "connect": {"token": good}}).decode())
                await ws.recv()
                await ws.send(orjson.dumps({"id": 2, "refresh": {"token": forged}}).decode())
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
            async with connect(server.ws_url, compression=None) as ws:
                await ws.send(orjson.dumps({"id": 1, "connect": {"token": forged}}).decode())
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()

            # Keys in headers, right and wrong.
            await server.broadcast({"type": "task.updated", "payload": {"task_id": "t"}})
            await server.http.post(
                "/api/v1/broadcast", json=[], headers={"X-API-Key": API_KEY + "-wrong"}
            )
            await server.http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": ADMIN_KEY})
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    output = stream.getvalue()
    assert "/api/v1/ws?token=" + REDACTED in output  # the access log saw the URL, redacted
    assert '"code":3500' in output  # the forged tokens were logged about, without them
    for secret in [*used, API_KEY, ADMIN_KEY]:
        assert secret not in output
