"""Centrifuge protocol v2 JSON codec: literal frame vectors, error cases, fuzzing.

Expected server texts come from the examples of §13 (and §2.3, §11, §12) of
docs/spec/centrifuge-protocol.md. Where the codec controls key order
(proto field order, as Go writes it) the text is compared exactly.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.centrifuge import codes
from shim.centrifuge.codec import (
    PING,
    Command,
    ConnectRequest,
    HistoryRequest,
    PingRequest,
    PresenceRequest,
    PresenceStatsRequest,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
    close_reason,
    decode_frame,
    encode_connect_result,
    encode_disconnect_push,
    encode_error,
    encode_history_result,
    encode_join_push,
    encode_leave_push,
    encode_presence_result,
    encode_presence_stats_result,
    encode_refresh_result,
    encode_reply,
    encode_rpc_result,
    encode_sub_refresh_result,
    encode_subscribe_push,
    encode_subscribe_result,
    encode_unsubscribe_push,
    publication_dict,
    publication_push,
    subscribe_result_dict,
)
from shim.core.broker import ClientInfo, PresenceStats, Publication, StreamPosition


def encode_publication_push(channel: str, pub: Publication) -> str:
    """The hot path's bytes as text, to compare with literal JSON."""
    return publication_push(channel, pub).decode()


def strict_json(text: str) -> Any:
    """JSON.parse semantics: stdlib json without its NaN/Infinity extension."""

    def reject(constant: str) -> Any:
        raise ValueError(constant)

    return json.loads(text, parse_constant=reject)


def is_json(text: str) -> bool:
    try:
        strict_json(text)
    except ValueError:
        return False
    return True


def py_sdk_read(frame: str) -> list[Any]:
    """How centrifuge-python splits a received frame (strip, split on newline, parse each)."""
    return [json.loads(line) for line in frame.strip().split("\n")]


# --- Decoding: vectors ---------------------------------------------------------


def test_js_batches_connect_and_subscribe_in_one_frame() -> None:
    frame = (
        '{"connect":{"token":"tok","name":"js"},"id":1}\n'
        '{"subscribe":{"channel":"news","recover":true,"offset":41,"epoch":"xYzAbCdE",'
        '"recoverable":true,"flag":1},"id":2}'
    )
    assert decode_frame(frame) == [
        Command(1, ConnectRequest(token="tok", name="js")),
        Command(
            2,
            SubscribeRequest(
                channel="news", recover=True, offset=41, epoch="xYzAbCdE", recoverable=True, flag=1
            ),
        ),
    ]


def test_python_sdk_connect_one_per_frame_with_spaces() -> None:
    frame = b'{"id": 1, "connect": {"token": "t", "name": "python"}}'
    assert decode_frame(frame) == [Command(1, ConnectRequest(token="t", name="python"))]


def test_python_sdk_subscribe_with_recovery_position() -> None:
    frame = (
        '{"id": 9, "subscribe": {"channel": "news", "positioned": true, "recoverable": true,'
        ' "join_leave": true, "recover": true, "epoch": "", "offset": 0, "flag": 3,'
        ' "delta": "fossil", "data": {"a": [1, 2]}}}'
    )
    (command,) = decode_frame(frame)
    assert command == Command(
        9,
        SubscribeRequest(
            channel="news",
            positioned=True,
            recoverable=True,
            join_leave=True,
            recover=True,
            flag=3,
            delta="fossil",
            data=b'{"a":[1,2]}',
        ),
    )


def test_trailing_newline_and_blank_lines_are_tolerated() -> None:
    assert decode_frame('{"unsubscribe":{"channel":"a"},"id":3}\n') == [
        Command(3, UnsubscribeRequest("a"))
    ]
    assert decode_frame("{}\n\n\r\n{}\n") == [Command(0, None), Command(0, None)]


@pytest.mark.parametrize("frame", ["{}", '{"id":0}', b"{}", " {} \r", '{"unknown":{"x":1}}'])
def test_empty_command_is_a_pong(frame: str | bytes) -> None:
    assert decode_frame(frame) == [Command(0, None)]


def test_history_with_since() -> None:
    frame = (
        '{"history":{"channel":"news","limit":10,"since":{"offset":40,"epoch":"xYzAbCdE"}},"id":3}'
    )
    assert decode_frame(frame) == [
        Command(
            3,
            HistoryRequest(
                channel="news", limit=10, since=StreamPosition(offset=40, epoch="xYzAbCdE")
            ),
        )
    ]


def test_history_as_python_sends_it() -> None:
    frame = '{"id": 4, "history": {"channel": "news", "limit": -1, "reverse": true}}'
    assert decode_frame(frame) == [
        Command(4, HistoryRequest(channel="news", limit=-1, since=None, reverse=True))
    ]


def test_sub_refresh_without_channel_as_old_python_sdk_sends() -> None:
    assert decode_frame('{"id": 12, "sub_refresh": {"token": "jwt"}}') == [
        Command(12, SubRefreshRequest(channel="", token="jwt"))
    ]


def test_connect_subs_carry_recovery_state_keyed_by_channel() -> None:
    frame = (
        '{"id":1,"connect":{"token":"t","data":{"k":"v"},"version":"2.1",'
        '"headers":{"X-A":"b"},"subs":{"personal:42":{"recover":true,"offset":5,"epoch":"ab"}}}}'
    )
    (command,) = decode_frame(frame)
    assert command == Command(
        1,
        ConnectRequest(
            token="t",
            data=b'{"k":"v"}',
            version="2.1",
            subs={
                "personal:42": SubscribeRequest(
                    channel="personal:42", recover=True, offset=5, epoch="ab"
                )
            },
        ),
    )


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            '{"publish":{"channel":"news","data":{ "title" : "x" }},"id":4}',
            Command(4, PublishRequest("news", b'{"title":"x"}')),
        ),
        ('{"publish":{"channel":"news"},"id":4}', Command(4, PublishRequest("news", None))),
        ('{"presence":{"channel":"news"},"id":5}', Command(5, PresenceRequest("news"))),
        (
            '{"presence_stats":{"channel":"news"},"id":6}',
            Command(6, PresenceStatsRequest("news")),
        ),
        ('{"ping":{},"id":7}', Command(7, PingRequest())),
        ('{"send":{"data":"hi"}}', Command(0, SendRequest(b'"hi"'))),
        ('{"send":{"data":{"a":1}},"id":0}', Command(0, SendRequest(b'{"a":1}'))),
        (
            '{"rpc":{"method":"sum","data":[1,2]},"id":8}',
            Command(8, RPCRequest("sum", b"[1,2]")),
        ),
        ('{"refresh":{"token":"new"},"id":4294967295}', Command(4294967295, RefreshRequest("new"))),
        (
            '{"sub_refresh":{"channel":"news","token":"s"},"id":9}',
            Command(9, SubRefreshRequest("news", "s")),
        ),
        # Unknown request fields (extensions, filters) are ignored.
        (
            '{"subscribe":{"channel":"c","tf":{"op":"and"},"phase":2,"cursor":"x"},"id":10}',
            Command(10, SubscribeRequest(channel="c")),
        ),
        # null means "not set", as in Go's decoder.
        (
            '{"id":11,"connect":null,"subscribe":{"channel":"c","token":null,"data":null}}',
            Command(11, SubscribeRequest(channel="c")),
        ),
        # Several requests: Go's order wins (connect before subscribe).
        (
            '{"subscribe":{"channel":"c"},"connect":{"name":"x"},"id":12}',
            Command(12, ConnectRequest(name="x")),
        ),
    ],
)
def test_request_vectors(frame: str, expected: Command) -> None:
    assert decode_frame(frame) == [expected]


# --- Decoding: errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "\n",
        "not json",
        '{"id":1,"connect":{}',
        "[]",
        '"text"',
        "1",
        "null",
        '{}\n{"id":2,"subscribe":{"channel":"a"}}\nnope',
        # ids
        '{"id":-1,"connect":{}}',
        '{"id":1.0,"connect":{}}',
        '{"id":"1","connect":{}}',
        '{"id":true,"connect":{}}',
        '{"id":4294967296,"connect":{}}',
        # an id but no known request; a request needing a reply but no id
        '{"id":5}',
        '{"id":5,"method":1,"params":{}}',
        '{"subscribe":{"channel":"a"}}',
        '{"id":0,"connect":{}}',
        # request bodies
        '{"id":1,"connect":[]}',
        '{"id":1,"connect":"x"}',
        '{"id":1,"subscribe":{"channel":5}}',
        '{"id":1,"subscribe":{"channel":"a","offset":-1}}',
        '{"id":1,"subscribe":{"channel":"a","offset":1.5}}',
        '{"id":1,"subscribe":{"channel":"a","offset":"41"}}',
        '{"id":1,"subscribe":{"channel":"a","offset":18446744073709551616}}',
        '{"id":1,"subscribe":{"channel":"a","recover":"yes"}}',
        '{"id":1,"subscribe":{"channel":"a","recover":1}}',
        '{"id":1,"subscribe":{"channel":"a","flag":true}}',
        '{"id":1,"connect":{"token":["t"]}}',
        '{"id":1,"connect":{"subs":[]}}',
        '{"id":1,"connect":{"subs":{"a":1}}}',
        '{"id":1,"connect":{"subs":{"a":{"offset":-3}}}}',
        '{"id":1,"history":{"channel":"a","since":[40]}}',
        '{"id":1,"history":{"channel":"a","since":{"offset":-1}}}',
        '{"id":1,"history":{"channel":"a","limit":2147483648}}',
        '{"id":1,"history":{"channel":"a","reverse":"true"}}',
        '{"id":1,"rpc":{"method":7}}',
        # a lone surrogate, escaped and raw
        '{"id":1,"publish":{"channel":"\\ud800"}}',
        '{"id":1,"publish":{"channel":"\ud800"}}',
        # deeper than the payload can be re-encoded
        '{"send":{"data":' + "[" * 300 + "]" * 300 + "}}",
        b'{"id":1,"publish":{"channel":"\xff"}}',
        b"\xc3",
    ],
)
def test_protocol_errors(frame: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(frame)
    assert info.value.code == codes.BAD_PROTOCOL
    assert info.value.code.code == 3501


_REQUESTS = [
    "connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats", "history",
    "ping", "send", "rpc", "refresh", "sub_refresh",
]  # fmt: skip
_FIELDS = [
    "channel", "token", "data", "subs", "name", "version", "recover", "epoch", "offset",
    "positioned", "recoverable", "join_leave", "flag", "delta", "type", "limit", "since",
    "reverse", "method",
]  # fmt: skip

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.integers(min_value=0, max_value=50)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=8,
)
# Command-shaped objects, so that fuzzing reaches the field readers, not just the JSON parser.
_commands = st.builds(
    lambda extra, cid, key, body: {**extra, "id": cid, key: body},
    st.dictionaries(
        st.sampled_from(["id", *_REQUESTS]) | st.text(max_size=3), _json_values, max_size=2
    ),
    st.none() | st.integers(min_value=0, max_value=9) | _scalars,
    st.sampled_from(_REQUESTS),
    st.dictionaries(st.sampled_from(_FIELDS), _json_values, max_size=5) | _json_values,
)


def _decode_or_protocol_error(frame: str | bytes) -> None:
    try:
        commands = decode_frame(frame)
    except ProtocolError:
        return
    for command in commands:
        data = getattr(command.request, "data", None)
        assert data is None or b"\n" not in data


@settings(max_examples=400, deadline=None)
@given(st.text() | st.binary())
def test_arbitrary_input_raises_only_protocol_error(frame: str | bytes) -> None:
    _decode_or_protocol_error(frame)


@settings(max_examples=200, deadline=None)
@given(st.lists(_commands | _json_values, min_size=1, max_size=3), st.booleans(), st.booleans())
def test_arbitrary_json_commands_raise_only_protocol_error(
    values: list[Any], as_bytes: bool, ascii_only: bool
) -> None:
    frame = "\n".join(json.dumps(v, ensure_ascii=ascii_only) for v in values)
    _decode_or_protocol_error(frame.encode("utf-8", "surrogatepass") if as_bytes else frame)


# --- Encoding: replies -----------------------------------------------------------


def test_connect_result_spec_example_exact() -> None:
    text = encode_connect_result(
        1,
        client="5e0c2b9a-0d7c-4b8f-9f5e-2f6d0c1a7b3e",
        version="1.0.0",
        expires=True,
        ttl=3590,
        ping=25,
        pong=True,
    )
    assert text == (
        '{"id":1,"connect":{"client":"5e0c2b9a-0d7c-4b8f-9f5e-2f6d0c1a7b3e","version":"1.0.0",'
        '"expires":true,"ttl":3590,"ping":25,"pong":true}}'
    )


def test_connect_result_minimal_keeps_client_and_carries_subs() -> None:
    assert encode_connect_result(1, client="c1") == '{"id":1,"connect":{"client":"c1"}}'
    sub = subscribe_result_dict(recoverable=True, positioned=True, epoch="ep", offset=3)
    text = encode_connect_result(
        2, client="c1", data=b'{"motd": "hi"}', subs={"personal:42": sub}, ping=25, pong=True
    )
    assert strict_json(text) == {
        "id": 2,
        "connect": {
            "client": "c1",
            "data": {"motd": "hi"},
            "subs": {
                "personal:42": {
                    "recoverable": True,
                    "positioned": True,
                    "epoch": "ep",
                    "offset": 3,
                }
            },
            "ping": 25,
            "pong": True,
        },
    }


def test_subscribe_result_recovered_spec_example_exact() -> None:
    text = encode_subscribe_result(
        2,
        recoverable=True,
        epoch="xYzAbCdE",
        publications=[
            Publication(data=b'{"title":"a"}', offset=42),
            Publication(data=b'{"title":"b"}', offset=43),
        ],
        recovered=True,
        offset=41,
        positioned=True,
        was_recovering=True,
    )
    assert text == (
        '{"id":2,"subscribe":{"recoverable":true,"epoch":"xYzAbCdE","publications":'
        '[{"data":{"title":"a"},"offset":42},{"data":{"title":"b"},"offset":43}],'
        '"recovered":true,"offset":41,"positioned":true,"was_recovering":true}}'
    )


def test_subscribe_result_first_time_and_failed_recovery_spec_examples() -> None:
    first = encode_subscribe_result(
        2, recoverable=True, positioned=True, epoch="xYzAbCdE", offset=41
    )
    assert strict_json(first) == strict_json(
        '{"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"xYzAbCdE","offset":41}}'
    )
    failed = encode_subscribe_result(
        2, recoverable=True, positioned=True, epoch="NeWePoCh", offset=3, was_recovering=True
    )
    assert strict_json(failed) == strict_json(
        '{"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"NeWePoCh",'
        '"offset":3,"was_recovering":true}}'
    )


def test_plain_subscribe_reply_still_has_its_result_key() -> None:
    assert encode_subscribe_result(2) == '{"id":2,"subscribe":{}}'


def test_expiring_results_always_carry_ttl() -> None:
    assert encode_subscribe_result(3, expires=True, ttl=0, data=b"[1]") == (
        '{"id":3,"subscribe":{"expires":true,"ttl":0,"data":[1]}}'
    )
    assert encode_sub_refresh_result(4, expires=True, ttl=0) == (
        '{"id":4,"sub_refresh":{"expires":true,"ttl":0}}'
    )


def test_history_result_spec_example_exact() -> None:
    pubs = [
        Publication(data=b'{"title":"%s"}' % title.encode(), offset=offset)
        for title, offset in [("z", 41), ("a", 42), ("b", 43), ("c", 44)]
    ]
    text = encode_history_result(
        3, publications=pubs, position=StreamPosition(offset=44, epoch="xYzAbCdE")
    )
    assert text == (
        '{"id":3,"history":{"publications":[{"data":{"title":"z"},"offset":41},'
        '{"data":{"title":"a"},"offset":42},{"data":{"title":"b"},"offset":43},'
        '{"data":{"title":"c"},"offset":44}],"epoch":"xYzAbCdE","offset":44}}'
    )


def test_history_result_without_publications() -> None:
    text = encode_history_result(5, publications=[], position=StreamPosition(0, "ep"))
    assert text == '{"id":5,"history":{"publications":[],"epoch":"ep"}}'


def test_error_reply_spec_example_exact() -> None:
    assert encode_error(4, codes.PERMISSION_DENIED) == (
        '{"id":4,"error":{"code":103,"message":"permission denied"}}'
    )


def test_error_reply_custom_message_and_temporary() -> None:
    assert encode_error(9, codes.INTERNAL, "broker down") == (
        '{"id":9,"error":{"code":100,"message":"broker down","temporary":true}}'
    )


def test_refresh_result_spec_example_exact() -> None:
    assert encode_refresh_result(5, expires=True, ttl=3600) == (
        '{"id":5,"refresh":{"expires":true,"ttl":3600}}'
    )
    assert encode_refresh_result(6, client="c2", version="1.0.0") == (
        '{"id":6,"refresh":{"client":"c2","version":"1.0.0"}}'
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [("unsubscribe", '{"id":6,"unsubscribe":{}}'), ("publish", '{"id":6,"publish":{}}')],
)
def test_empty_results_keep_their_key(name: str, expected: str) -> None:
    assert encode_reply(6, name, {}) == expected
    assert "error" not in strict_json(expected)


def test_generic_reply_accepts_any_mapping() -> None:
    assert encode_reply(7, "ping", MappingProxyType({})) == '{"id":7,"ping":{}}'


def test_presence_result_keyed_by_client_id() -> None:
    info = ClientInfo(user="42", client="c-1", conn_info=b'{"name": "Ann"}', chan_info=b"[7]")
    text = encode_presence_result(8, presence={"c-1": info})
    assert text == (
        '{"id":8,"presence":{"presence":{"c-1":{"user":"42","client":"c-1",'
        '"conn_info":{"name": "Ann"},"chan_info":[7]}}}}'
    )
    assert encode_presence_result(9, presence={}) == '{"id":9,"presence":{"presence":{}}}'


def test_presence_stats_zeros_are_explicit() -> None:
    assert encode_presence_stats_result(10, stats=PresenceStats(3, 2)) == (
        '{"id":10,"presence_stats":{"num_clients":3,"num_users":2}}'
    )
    assert encode_presence_stats_result(11, stats=PresenceStats(0, 0)) == (
        '{"id":11,"presence_stats":{"num_clients":0,"num_users":0}}'
    )


def test_rpc_result() -> None:
    assert encode_rpc_result(12, data=b'{"sum":3}') == '{"id":12,"rpc":{"data":{"sum":3}}}'
    assert encode_rpc_result(13) == '{"id":13,"rpc":{}}'


# --- Encoding: pushes ----------------------------------------------------------


def test_publication_push_spec_examples_exact() -> None:
    pub = Publication(data=b'{"title":"c"}', offset=44, info=ClientInfo("7", "c4d9…"))
    assert encode_publication_push("news", pub) == (
        '{"push":{"channel":"news","pub":{"data":{"title":"c"},'
        '"info":{"user":"7","client":"c4d9…"},"offset":44}}}'
    )
    assert encode_publication_push("news", Publication(data=b'{"x":1}', offset=7)) == (
        '{"push":{"channel":"news","pub":{"data":{"x":1},"offset":7}}}'
    )


def test_publication_push_leaves_out_time_and_empty_fields() -> None:
    pub = Publication(data=b"", offset=0, time_ms=1_700_000_000_000)
    assert encode_publication_push("a", pub) == '{"push":{"channel":"a","pub":{}}}'
    body = publication_dict(Publication(data=b" 5 ", offset=2, time_ms=1))
    assert encode_reply(1, "rpc", {"pub": body}) == '{"id":1,"rpc":{"pub":{"data": 5 ,"offset":2}}}'


def test_payload_with_raw_newlines_leaves_no_raw_newline() -> None:
    pub = Publication(
        data=b'{\n  "title": "line\\nbreak",\r\n  "n": [1,\n 2]\n}\n',
        offset=3,
        info=ClientInfo("7", "c", conn_info=b'{\n"a": 1}', chan_info=b"\n[2]\n"),
    )
    text = encode_publication_push("news", pub)
    assert "\n" not in text
    frame = "\n".join([text, PING, text])
    assert py_sdk_read(frame) == [
        {
            "push": {
                "channel": "news",
                "pub": {
                    "data": {"title": "line\nbreak", "n": [1, 2]},
                    "info": {"user": "7", "client": "c", "conn_info": {"a": 1}, "chan_info": [2]},
                    "offset": 3,
                },
            }
        },
        {},
        {
            "push": {
                "channel": "news",
                "pub": {
                    "data": {"title": "line\nbreak", "n": [1, 2]},
                    "info": {"user": "7", "client": "c", "conn_info": {"a": 1}, "chan_info": [2]},
                    "offset": 3,
                },
            }
        },
    ]
    sub = encode_subscribe_result(1, publications=[pub], data=b'{\n"x": 1\n}')
    assert "\n" not in sub


def test_channel_names_are_escaped() -> None:
    text = encode_publication_push('we"ird\n\\', Publication(data=b"1"))
    assert "\n" not in text
    assert strict_json(text)["push"]["channel"] == 'we"ird\n\\'


def test_published_payload_round_trips_to_subscribers() -> None:
    (command,) = decode_frame('{"publish":{"channel":"news","data":{ "title" : "x" }},"id":4}')
    assert isinstance(command.request, PublishRequest)
    assert command.request.data is not None
    pub = Publication(data=command.request.data, offset=1, info=ClientInfo("42", "c"))
    assert encode_publication_push(command.request.channel, pub) == (
        '{"push":{"channel":"news","pub":{"data":{"title":"x"},'
        '"info":{"user":"42","client":"c"},"offset":1}}}'
    )


def test_join_and_leave_push() -> None:
    assert encode_join_push("news", ClientInfo("9", "aa…")) == (
        '{"push":{"channel":"news","join":{"info":{"user":"9","client":"aa…"}}}}'
    )
    assert encode_leave_push("news", ClientInfo("", "")) == (
        '{"push":{"channel":"news","leave":{"info":{"user":"","client":""}}}}'
    )


def test_unsubscribe_push_spec_example_exact() -> None:
    assert encode_unsubscribe_push("news", codes.UNSUBSCRIBE_SERVER) == (
        '{"push":{"channel":"news","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}'
    )
    empty_reason = codes.UnsubscribeCode(2500, "")
    assert encode_unsubscribe_push("n", empty_reason) == (
        '{"push":{"channel":"n","unsubscribe":{"code":2500,"reason":""}}}'
    )


def test_disconnect_push() -> None:
    assert encode_disconnect_push(codes.SHUTDOWN) == (
        '{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}'
    )


def test_subscribe_push() -> None:
    text = encode_subscribe_push(
        "personal:42", recoverable=True, epoch="ep", offset=9, positioned=True, data=b"{}"
    )
    assert text == (
        '{"push":{"channel":"personal:42","subscribe":{"recoverable":true,"epoch":"ep",'
        '"offset":9,"positioned":true,"data":{}}}}'
    )
    assert encode_subscribe_push("c") == '{"push":{"channel":"c","subscribe":{}}}'


def test_ping_is_an_empty_reply() -> None:
    assert PING == "{}"


# --- Close reasons -------------------------------------------------------------

_ALL_DISCONNECT_CODES = [v for v in vars(codes).values() if isinstance(v, codes.DisconnectCode)]


def test_every_disconnect_code_is_covered() -> None:
    assert codes.SHUTDOWN in _ALL_DISCONNECT_CODES
    assert len(_ALL_DISCONNECT_CODES) >= 17


@pytest.mark.parametrize("code", _ALL_DISCONNECT_CODES, ids=lambda c: str(c.code))
def test_close_reason_of_every_code_fits_and_is_not_json(code: codes.DisconnectCode) -> None:
    reason = close_reason(code)
    assert len(reason.encode()) <= 123
    assert not is_json(reason)
    assert reason == code.reason


@pytest.mark.parametrize("reason", ["123", "true", "null", ' "x" ', "{}", "[1]", "-0", "1" * 300])
def test_close_reason_never_json_text(reason: str) -> None:
    text = close_reason(codes.DisconnectCode(4000, reason))
    assert not is_json(text)
    assert len(text.encode()) <= 123
    assert text.startswith(reason[:100])


def test_close_reason_truncates_on_a_character_boundary() -> None:
    text = close_reason(codes.DisconnectCode(4500, "é" * 100))
    assert text == "é" * 61
    assert len(text.encode()) == 122


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_close_reason_fuzz(reason: str) -> None:
    text = close_reason(codes.DisconnectCode(4000, reason))
    assert len(text.encode()) <= 123
    assert not is_json(text)
