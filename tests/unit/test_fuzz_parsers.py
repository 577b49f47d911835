"""Property tests of the pure codecs and parsers: any input ends in a result or the
parser's own error, never another exception; what they accept encodes again.

The same inputs go through a running node in tests/integration/test_fuzz_node.py.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legacy.commands import LegacyCommand, MalformedCommand, parse_command
from legacy.wire import encode_legacy_frame
from shim.centrifuge import codec, codes
from shim.core.broadcast import (
    Accepted,
    BroadcastError,
    Refused,
    channel_data,
    parse_broadcast,
)
from shim.core.broker import ClientInfo, Publication
from shim.core.events import Event
from tests.fuzz_strategies import (
    BROADCAST_BODIES,
    CENTRIFUGE_FRAMES,
    LEGACY_FRAMES,
    json_values,
)

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
PROTOCOL_CLOSE_CODES = {codes.BAD_PROTOCOL.code}


@FUZZ
@given(CENTRIFUGE_FRAMES | st.binary(max_size=200))
def test_centrifuge_frames_decode_to_commands_or_a_protocol_error(frame: str | bytes) -> None:
    try:
        commands = codec.decode_frame(frame)
    except codec.ProtocolError as exc:
        assert exc.code.code in PROTOCOL_CLOSE_CODES
        return
    assert commands
    for command in commands:
        assert isinstance(command, codec.Command)
        assert 0 <= command.id < 2**32
        # Raw payloads were re-encoded compactly: one line each, valid JSON.
        for raw in _raw_fields(command.request):
            assert b"\n" not in raw
            orjson.loads(raw)


def _raw_fields(request: object) -> list[bytes]:
    found = []
    for name in ("data",):
        value = getattr(request, name, None)
        if isinstance(value, bytes):
            found.append(value)
    return found


@FUZZ
@given(
    command_id=st.integers(min_value=1, max_value=2**32 - 1),
    result=st.dictionaries(st.text(max_size=8), json_values(10), max_size=4),
    error_message=st.text(max_size=50),
)
def test_centrifuge_replies_are_one_json_line(
    command_id: int, result: dict[str, Any], error_message: str
) -> None:
    for line in (
        codec.encode_reply(command_id, "rpc", result),
        codec.encode_error(command_id, codes.BAD_REQUEST, error_message),
    ):
        assert "\n" not in line
        assert orjson.loads(line)["id"] == command_id


@FUZZ
@given(data=json_values(15), channel=st.text(min_size=1, max_size=30), user=st.text(max_size=10))
def test_publication_pushes_carry_any_json_data(data: Any, channel: str, user: str) -> None:
    raw = orjson.dumps(data)
    info = ClientInfo(user=user, client="c1")
    push = codec.publication_push(channel, Publication(data=raw, offset=3, info=info))
    assert b"\n" not in push
    decoded = orjson.loads(push)["push"]
    assert decoded["channel"] == channel
    assert decoded["pub"]["data"] == data


@FUZZ
@given(LEGACY_FRAMES | st.binary(max_size=200))
def test_legacy_frames_parse_to_a_command_or_malformed(frame: str | bytes) -> None:
    try:
        command = parse_command(frame)
    except MalformedCommand:
        return
    assert isinstance(command, LegacyCommand)
    assert all(isinstance(v, str) for v in (command.action, command.task_id, command.project_id))


@FUZZ
@given(BROADCAST_BODIES)
def test_broadcast_bodies_give_per_item_results_that_encode(body: bytes) -> None:
    try:
        items = parse_broadcast(body, max_item_bytes=64 * 1024, max_items=1000)
    except BroadcastError:
        return
    for position, item in enumerate(items):
        assert item.index == position
        assert isinstance(item, Accepted | Refused)
        if isinstance(item, Accepted):
            # Everything accepted can be sent on both protocols.
            frame = encode_legacy_frame(item.event)
            assert orjson.loads(frame)["type"] == item.event.type
            assert orjson.loads(channel_data(item.event))["type"] == item.event.type
        else:
            assert item.error


@FUZZ
@given(payload=st.dictionaries(st.text(max_size=8), json_values(20), max_size=5))
def test_legacy_frames_encode_any_payload_and_read_back_equal(payload: dict[str, Any]) -> None:
    event = Event(id="e1", type="task.updated", payload=payload, timestamp="2026-01-01T00:00:00Z")
    frame = encode_legacy_frame(event)
    assert "\n" not in frame
    # Go writes floats below 1e21 without an exponent (61313577782947630): numbers
    # are compared as the float64 a JSON reader makes of them.
    written = json.loads(frame, parse_int=float)["payload"]
    assert written == json.loads(orjson.dumps(payload), parse_int=float)
