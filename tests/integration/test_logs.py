"""No token, API key or secret in any log line: the redaction, and a server run that
logs every kind of request with tokens in URLs, headers and frames."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shim.app.cli import log_secrets
from shim.app.logs import REDACTED, JsonFormatter, Redactor, TextFormatter
from shim.core.config import Settings
from tests.conftest import ADMIN_KEY, API_KEY, run_server
from tests.legacyclient import SHORT_PINGS, open_legacy
from tests.pyclient import new_client, new_subscription

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
    record.shard = "redis://127.0.0.1:6380/0"
    line = orjson.loads(JsonFormatter(Redactor()).format(record))
    assert line["message"] == "slow"
    assert (line["client"], line["user"], line["code"]) == ("c-1", "alice", 3008)
    assert line["shard"] == "redis://127.0.0.1:6380/0"


@contextlib.contextmanager
def raw_capture(level: int = logging.DEBUG) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Every record as a JSON line and as a text line, nothing redacted: what each
    production formatter is handed before its redaction."""
    as_json, as_text = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(as_json), logging.StreamHandler(as_text)]
    handlers[0].setFormatter(JsonFormatter(lambda text: text))
    handlers[1].setFormatter(TextFormatter(lambda text: text))
    root = logging.getLogger()
    previous_level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    try:
        yield as_json, as_text
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(previous_level)


def production(settings: Settings, raw: str) -> str:
    """`raw` lines as `dex-shim serve` with these settings would write them."""
    redact = Redactor(log_secrets(settings))
    return "\n".join(redact(line) for line in raw.splitlines())


async def test_a_server_run_logs_no_secret(signing_keys: tuple[str, str]) -> None:
    used: list[str] = []
    with raw_capture() as (as_json, as_text):
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

            # Keys in headers, right and wrong, and in a URL query no pattern knows,
            # which the HTTP client logs in full as libraries do: only the configured
            # keys themselves can take them out of that line.
            await server.broadcast({"type": "task.updated", "payload": {"task_id": "t"}})
            await server.http.post(
                "/api/v1/broadcast", json=[], headers={"X-API-Key": API_KEY + "-wrong"}
            )
            await server.http.get("/api/v1/admin/cutover", headers={"X-Admin-Key": ADMIN_KEY})
            await server.http.get(f"/health?q={API_KEY}&r={ADMIN_KEY}")
            settings = server.settings

    for raw in (as_json.getvalue(), as_text.getvalue()):
        # The records did hold the secrets: what follows checks the redaction, not luck.
        assert good in raw and API_KEY in raw and ADMIN_KEY in raw
        output = production(settings, raw)
        assert "GET /api/v1/ws 1.1" in output  # hypercorn's access log saw the upgrades
        assert "/api/v1/ws?token=" + REDACTED in output  # the HTTP client's line, redacted
        assert "/health?q=" + REDACTED in output
        for secret in [*used, API_KEY, ADMIN_KEY]:
            assert secret not in output
    assert '"code":3500' in production(settings, as_json.getvalue())  # forged, logged without it


async def test_session_log_lines_carry_client_and_user(signing_keys: tuple[str, str]) -> None:
    with raw_capture(logging.INFO) as (as_json, _as_text):
        async with run_server(signing_keys, **SHORT_PINGS) as server:
            client, events = new_client(server.ws_url, server.token("alice"))
            await client.connect()
            client_id = (await events.wait_for("connected")).client
            refused, refused_events = new_subscription(client, "user:bob")
            await refused.subscribe()
            await refused_events.wait_for("unsubscribed")
            legacy = await open_legacy(server.port, server.token("bob"))
            await legacy.send("not json")
            # Disconnects the server makes: both clients, on stopping.
    lines = [orjson.loads(line) for line in as_json.getvalue().splitlines()]
    mine = [line for line in lines if line.get("client") == client_id]
    by_message = {line["message"].split(":")[0]: line for line in mine}
    assert by_message["subscribe refused"]["channel"] == "user:bob"
    disconnect = by_message["disconnecting"]
    assert disconnect["message"] == "disconnecting: shutdown"
    assert (disconnect["user"], disconnect["code"], disconnect["logger"]) == (
        "alice",
        3001,
        "shim.centrifuge",
    )
    assert all(line["user"] == "alice" for line in mine)
    legacy_lines = [line for line in lines if line.get("protocol") == "legacy"]
    assert [(line["user"], line["code"]) for line in legacy_lines] == [("bob", 1001)]
