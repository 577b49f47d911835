"""Property tests through a running `dex-shim serve`: generated server API bodies,
ingest bodies and frames on both WebSocket protocols. Every input must end in a
defined answer (an HTTP status with a JSON body, a reply or error other than 100
"internal", a refused item, a defined close code), the connection must still work
when it was not closed, and the node must log no error or traceback.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.fuzz_strategies import (
    ANY_FIELD,
    BROADCAST_BODIES,
    CENTRIFUGE_FRAMES,
    LEGACY_FRAMES,
    encode_body,
)
from tests.multinode import ClusterKeys, _for_log_grep, _server_command, node_env

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
# What a fuzzed Centrifuge connection may be closed with: bad request, invalid
# token, message too big, too many requests.
CENTRIFUGE_CLOSES = {3501, 3500, 1009, 3013}
LEGACY_CLOSES = {1009, 3013}
TIMEOUT = 5.0


@dataclass(slots=True)
class Node:
    port: int
    keys: ClusterKeys
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    keys = ClusterKeys.generate()
    with tempfile.TemporaryDirectory(prefix="dex-fuzz-") as tmp:
        workdir = Path(tmp)
        log = workdir / "node.log"
        # Generated inputs arrive fast: no command rate limit here (tested elsewhere).
        env = node_env(keys, workdir, settings={"client_command_rate_limit": "0"})
        with log.open("wb") as err:
            process = subprocess.Popen(
                _server_command(), cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=err
            )
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            found = re.search(r"listening on http://[^:]+:(\d+)", line)
            assert found, f"node did not start: {line!r}\n{log.read_text()}"
            yield Node(int(found.group(1)), keys, log)
        finally:
            if process.stdout is not None:
                process.stdout.close()
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            text = log.read_text(errors="replace")
            _for_log_grep(log=log)
            problems = [
                line
                for line in text.splitlines()
                if "Traceback" in line or '"level":"error"' in line or '"exception":' in line
            ]
            assert not problems, "\n".join(problems[:5])


def _no_internal_error(answer: Any) -> None:
    """No `{"error": {"code": 100}}` anywhere in an answer."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict):
            assert error.get("code") != 100, answer
        for value in answer.values():
            _no_internal_error(value)
    elif isinstance(answer, list):
        for value in answer:
            _no_internal_error(value)


# --- HTTP ---------------------------------------------------------------------------------

API_METHODS = (
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "presence",
    "presence_stats",
    "history",
    "history_remove",
    "channels",
    "info",
    "batch",
    "nonsense",
)
API_FIELDS = (
    "channel",
    "channels",
    "data",
    "user",
    "client",
    "limit",
    "since",
    "reverse",
    "skip_history",
    "idempotency_key",
    "disconnect",
    "commands",
    "parallel",
    "pattern",
    "info",
    "expire_at",
    "whitelist",
)
API_CHANNELS = st.sampled_from(["task:1", "user:u", "global", "nope:1", "", "x" * 300])


@st.composite
def api_bodies(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = draw(st.dictionaries(st.sampled_from(API_FIELDS), ANY_FIELD, max_size=5))
    if draw(st.booleans()):
        body["channel"] = draw(API_CHANNELS)
    if draw(st.booleans()):
        commands = draw(
            st.lists(
                st.dictionaries(
                    st.sampled_from(API_METHODS),
                    st.dictionaries(st.sampled_from(API_FIELDS), ANY_FIELD, max_size=3) | ANY_FIELD,
                    max_size=2,
                ),
                max_size=4,
            )
        )
        body["commands"] = commands
    return encode_body(body)


@FUZZ
@given(
    method=st.sampled_from(API_METHODS),
    body=api_bodies() | st.binary(max_size=60) | ANY_FIELD.map(encode_body),
)
def test_server_api_answers_every_body(node: Node, method: str, body: bytes) -> None:
    response = httpx.post(
        f"{node.url}/api/{method}",
        content=body,
        headers={"X-API-Key": node.keys.api_key, "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code in (200, 400, 404, 413), response.text
    answer = response.json()
    assert isinstance(answer, dict)
    if response.status_code == 200:
        assert {"result", "error", "replies"} & set(answer), answer
    _no_internal_error(answer)


@FUZZ
@given(BROADCAST_BODIES)
def test_ingest_answers_every_body_with_per_item_results(node: Node, body: bytes) -> None:
    response = httpx.post(
        f"{node.url}/api/v1/broadcast",
        content=body,
        headers={"X-API-Key": node.keys.api_key},
        timeout=TIMEOUT,
    )
    assert response.status_code in (200, 400, 413), response.text
    answer = response.json()
    if response.status_code != 200:
        assert isinstance(answer["error"], str)
        return
    results = answer["results"]
    assert answer["failed"] == 0
    assert answer["accepted"] + answer["refused"] == len(results)
    assert [r["index"] for r in results] == list(range(len(results)))
    assert all(r["status"] in ("accepted", "refused") for r in results)


# --- WebSocket ------------------------------------------------------------------------------


def _lines(ws: ClientConnection) -> Iterator[dict[str, Any]]:
    while True:
        frame = ws.recv(timeout=TIMEOUT)
        assert isinstance(frame, str)
        for line in frame.split("\n"):
            yield orjson.loads(line)


@contextlib.contextmanager
def _socket(url: str) -> Iterator[ClientConnection]:
    with connect(url, proxy=None, open_timeout=TIMEOUT, close_timeout=1) as ws:
        yield ws


@FUZZ
@given(frame=CENTRIFUGE_FRAMES, connect_first=st.booleans())
def test_centrifuge_endpoint_answers_or_closes_with_a_defined_code(
    node: Node, frame: str, connect_first: bool
) -> None:
    with _socket(f"ws://127.0.0.1:{node.port}/connection/websocket") as ws:
        if connect_first:
            token = node.keys.token(f"fuzz-{uuid.uuid4().hex[:6]}")
            ws.send(orjson.dumps({"id": 1, "connect": {"token": token}}).decode())
            assert "connect" in next(_lines(ws))
        try:
            ws.send(frame)
            # A well-formed command after the fuzzed frame: its reply shows the
            # connection still works (or the close shows why not).
            probe = 4_000_000_000
            ws.send(orjson.dumps({"id": probe, "rpc": {"method": "ping"}}).decode())
            for message in _lines(ws):
                _no_internal_error(message)
                if message.get("id") == probe:
                    assert connect_first, message  # before connect only connect is served
                    assert message["rpc"] == {"data": {"pong": True}}
                    return
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            assert closed.rcvd.code in CENTRIFUGE_CLOSES, closed.rcvd


@FUZZ
@given(frames=st.lists(LEGACY_FRAMES, min_size=1, max_size=3))
def test_legacy_endpoint_ignores_or_closes_with_a_defined_code(
    node: Node, frames: list[str]
) -> None:
    token = node.keys.token(f"fuzz-{uuid.uuid4().hex[:6]}")
    task = uuid.uuid4().hex[:8]
    with _socket(f"ws://127.0.0.1:{node.port}/api/v1/ws?token={token}") as ws:
        try:
            for frame in frames:
                ws.send(frame)
            # Still a working legacy client: it subscribes and receives an event.
            ws.send(orjson.dumps({"action": "unsubscribe_all"}).decode())
            ws.send(orjson.dumps({"action": "subscribe", "task_id": task}).decode())
            event = {"type": "task.updated", "task_id": task, "payload": {"task_id": task}}
            # The hub never answers a command: the event is sent until the subscribe
            # has surely been handled (bounded).
            for _attempt in range(20):
                answer = httpx.post(
                    f"http://127.0.0.1:{node.port}/api/v1/broadcast",
                    json=event,
                    headers={"X-API-Key": node.keys.api_key},
                    timeout=TIMEOUT,
                )
                assert answer.json()["accepted"] == 1
                with contextlib.suppress(TimeoutError):
                    while True:
                        message = orjson.loads(ws.recv(timeout=0.25))
                        if message.get("task_id") == task:
                            return
            raise AssertionError("the legacy client no longer receives its subscription")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            assert closed.rcvd.code in LEGACY_CLOSES, closed.rcvd
