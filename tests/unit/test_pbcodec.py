"""Centrifuge Protobuf codec: frames built with centrifuge-python's own generated
classes (an independent encoder of client.proto) decode into our commands, and our
replies and pushes decode with them."""

from __future__ import annotations

import contextlib
from typing import Any

import centrifuge.protocol.client_pb2 as sdk  # type: ignore[import-untyped]
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.centrifuge import codes, pbcodec
from shim.centrifuge.codec import (
    Command,
    ConnectRequest,
    HistoryRequest,
    ProtocolError,
    PublishRequest,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubscribeRequest,
)
from shim.centrifuge.wire import JSON, PROTOBUF, select
from shim.core.broker import (
    ClientInfo,
    LegacyFrame,
    PresenceStats,
    Publication,
    StreamPosition,
)


def frame(*commands: Any) -> bytes:
    return b"".join(pbcodec.delimited(c.SerializeToString()) for c in commands)


def replies(data: bytes) -> list[Any]:
    return [sdk.Reply.FromString(raw) for raw in pbcodec.split_frame(data)]


def test_several_commands_in_one_frame_in_order() -> None:
    connect = sdk.Command(id=1)
    connect.connect.token = "jwt"
    connect.connect.data = b'{"a":1}'
    connect.connect.name = "js"
    connect.connect.subs["user:1"].recover = True
    connect.connect.subs["user:1"].offset = 5
    connect.connect.subs["user:1"].epoch = "e"
    subscribe = sdk.Command(id=2)
    subscribe.subscribe.channel = "task:1"
    subscribe.subscribe.recoverable = True
    subscribe.subscribe.delta = "fossil"
    subscribe.subscribe.flag = 1
    history = sdk.Command(id=3)
    history.history.channel = "task:1"
    history.history.limit = -1
    history.history.since.offset = 2**64 - 1
    history.history.since.epoch = "x"
    commands = pbcodec.decode_frame(frame(connect, subscribe, history, sdk.Command()))
    assert commands[0] == Command(
        1,
        ConnectRequest(
            token="jwt",
            data=b'{"a":1}',
            subs={"user:1": SubscribeRequest(channel="user:1", recover=True, epoch="e", offset=5)},
            name="js",
        ),
    )
    assert commands[1] == Command(
        2, SubscribeRequest(channel="task:1", recoverable=True, delta="fossil", flag=1)
    )
    assert commands[2] == Command(
        3, HistoryRequest("task:1", limit=-1, since=StreamPosition(2**64 - 1, "x"))
    )
    assert commands[3] == Command(0, None)  # pong


def test_publish_rpc_send_and_sub_refresh() -> None:
    publish = sdk.Command(id=4)
    publish.publish.channel = "c"
    publish.publish.data = b'{"x":1}'
    rpc = sdk.Command(id=5)
    rpc.rpc.method = "ping"
    send = sdk.Command()
    send.send.data = b"1"
    sub_refresh = sdk.Command(id=6)
    sub_refresh.sub_refresh.token = "t"
    assert [c.request for c in pbcodec.decode_frame(frame(publish, rpc, send, sub_refresh))] == [
        PublishRequest("c", b'{"x":1}'),
        RPCRequest("ping", None),
        SendRequest(b"1"),
        SubRefreshRequest("", "t"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"",  # empty frame
        b"\x05\x08",  # length past the end
        b"\xff\xff\xff\xff\xff\xff",  # endless varint
        b"\x02\x08\x01",  # id but no request
        pbcodec.delimited(b"\x22\x05ab"),  # connect (field 4) runs past its message
    ],
)
def test_broken_frames_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        pbcodec.decode_frame(data)


def test_a_command_without_id_is_refused_unless_send() -> None:
    subscribe = sdk.Command()
    subscribe.subscribe.channel = "c"
    with pytest.raises(ProtocolError, match="id required"):
        pbcodec.decode_frame(frame(subscribe))


def test_text_frame_is_refused_on_protobuf_and_binary_on_json() -> None:
    with pytest.raises(ProtocolError):
        PROTOBUF.decode_frame('{"id":1,"connect":{}}')
    with pytest.raises(ProtocolError):
        JSON.decode_frame(b"\x00")


@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        pbcodec.decode_frame(data)


def test_replies_decode_with_the_sdk_classes() -> None:
    info = ClientInfo("u", "c", b'{"n":1}', b'{"ch":2}')
    pub = Publication(data=b'{"x":1}', offset=2**40, info=info)
    data = b"".join(
        [
            PROTOBUF.encode_connect_result(
                1,
                client="id",
                version="v",
                expires=True,
                ttl=60,
                subs={
                    "user:u": {
                        "recoverable": True,
                        "epoch": "e",
                        "offset": 3,
                        "publications": [pub],
                    }
                },
                ping=25,
                pong=True,
            ),
            PROTOBUF.encode_subscribe_result(
                2, positioned=True, recovered=True, publications=[pub]
            ),
            PROTOBUF.encode_error(3, codes.PERMISSION_DENIED),
            PROTOBUF.encode_reply(4, "publish", {}),
            PROTOBUF.encode_history_result(5, publications=[pub], position=StreamPosition(9, "e")),
            PROTOBUF.encode_presence_result(6, presence={"c": info}),
            PROTOBUF.encode_presence_stats_result(7, stats=PresenceStats(0, 0)),
            PROTOBUF.encode_rpc_result(8, data=b'{"pong":true}'),
            PROTOBUF.ping,
            PROTOBUF.publication_push("task:1", pub),
            PROTOBUF.encode_unsubscribe_push("task:1", codes.UNSUBSCRIBE_SERVER),
        ]
    )
    got = replies(data)
    connect = got[0].connect
    assert (connect.client, connect.version, connect.expires, connect.ttl) == ("id", "v", True, 60)
    assert (connect.ping, connect.pong) == (25, True)
    assert connect.subs["user:u"].publications[0].offset == 2**40
    assert got[1].subscribe.recovered and got[1].subscribe.publications[0].data == b'{"x":1}'
    assert (got[2].error.code, got[2].error.message) == (103, "permission denied")
    assert got[3].id == 4 and got[3].HasField("publish")
    assert (got[4].history.offset, got[4].history.epoch) == (9, "e")
    assert got[5].presence.presence["c"].conn_info == b'{"n":1}'
    assert got[6].HasField("presence_stats")
    assert got[7].rpc.data == b'{"pong":true}'
    assert got[8] == sdk.Reply()  # a ping: empty message
    push = got[9].push
    assert (push.channel, push.pub.data, push.pub.info.chan_info) == (
        "task:1",
        b'{"x":1}',
        b'{"ch":2}',
    )
    assert (got[10].push.unsubscribe.code, got[10].push.unsubscribe.reason) == (
        2000,
        "server unsubscribe",
    )


@pytest.mark.parametrize(
    ("query", "offered", "wire", "answer"),
    [
        (b"", [], "json", None),
        (b"", ["centrifuge-json"], "json", "centrifuge-json"),
        (b"", ["centrifuge-json", "centrifuge-protobuf"], "protobuf", "centrifuge-protobuf"),
        (b"", ["centrifuge-protobuf"], "protobuf", "centrifuge-protobuf"),
        (b"cf_protocol=protobuf", [], "protobuf", None),
        (b"a=1&format=protobuf", [], "protobuf", None),
        (b"cf_protocol=json", [], "json", None),
    ],
)
def test_wire_selection_as_centrifugo(
    query: bytes, offered: list[str], wire: str, answer: str | None
) -> None:
    chosen, subprotocol = select(query, offered)
    assert (chosen.name, subprotocol) == (wire, answer)


def test_message_push_decodes_with_the_sdk_classes() -> None:
    (reply,) = replies(PROTOBUF.encode_message_push(b'{"cutover_version":3}'))
    assert reply.id == 0
    assert reply.push.message.data == b'{"cutover_version":3}'
    assert orjson.loads(JSON.encode_message_push(b'{"cutover_version":3}')) == {
        "push": {"message": {"data": {"cutover_version": 3}}}
    }


def test_legacy_routing_ids_travel_as_tags_on_both_wires() -> None:
    legacy = LegacyFrame(event_id="e1", frame=b"{}", task_id="t9", project_id="p2")
    pub = Publication(data=b'{"x":1}', offset=4, legacy=legacy)
    (reply,) = replies(PROTOBUF.publication_push("task:t9", pub))
    assert dict(reply.push.pub.tags) == {"task_id": "t9", "project_id": "p2"}
    json_pub = orjson.loads(JSON.publication_push("task:t9", pub))["push"]["pub"]
    assert json_pub["tags"] == {"task_id": "t9", "project_id": "p2"}
    (history,) = replies(
        PROTOBUF.encode_history_result(1, publications=[pub], position=StreamPosition(4, "e"))
    )
    assert dict(history.history.publications[0].tags) == {"task_id": "t9", "project_id": "p2"}
    (untagged,) = replies(PROTOBUF.publication_push("task:t9", Publication(data=b"{}")))
    assert not untagged.push.pub.tags
