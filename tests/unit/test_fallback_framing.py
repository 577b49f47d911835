"""The fallback transports' wire functions, with vectors (shim/centrifuge/framing.py),
and the outboxes that apply them to what a session queues."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from shim.centrifuge import codec, codes, framing, pbcodec, pbschema, wire
from shim.centrifuge.emulation import EmulatedConnection, EmulationHub
from shim.centrifuge.framing import EmulationRequest, RequestError
from shim.centrifuge.outboxes import EmulationOutbox, UniOutbox

CONNECT_REPLY = codec.encode_connect_result(
    1,
    client="c-1",
    version="0.1.0",
    expires=True,
    ttl=60,
    subs={"user:a": {"recoverable": True, "offset": 3, "epoch": "e"}},
    ping=25,
    pong=True,
).encode()


def test_http_stream_chunks_are_newline_delimited() -> None:
    assert framing.http_stream_chunk(b'{"a":1}\n{}') == b'{"a":1}\n{}\n'


def test_sse_chunks_hold_one_event_per_message() -> None:
    assert framing.sse_chunk(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert framing.sse_chunk(b'{"a":1}\n{}') == b'data: {"a":1}\n\ndata: {}\n\n'


def test_uni_disconnect_push() -> None:
    assert framing.uni_disconnect_push(3008, "slow") == (
        b'{"disconnect":{"code":3008,"reason":"slow"}}'
    )


def test_connect_reply_gets_session_and_node() -> None:
    patched = framing.with_emulation_fields(CONNECT_REPLY, "s-1", 'node "a"')
    assert patched is not None
    reply = orjson.loads(patched)
    expected = orjson.loads(CONNECT_REPLY)
    expected["connect"].update(session="s-1", node='node "a"')
    assert reply == expected
    # Anything else passes untouched.
    for other in (codec.PING.encode(), codec.encode_error(1, codes.TOKEN_EXPIRED).encode()):
        assert framing.with_emulation_fields(other, "s", "n") is None
    push = codec.encode_subscribe_push("connect:{x", offset=1).encode()
    assert framing.with_emulation_fields(push, "s", "n") is None
    rpc = codec.encode_rpc_result(2, data=b'{"connect":{"x":1}}').encode()
    assert framing.with_emulation_fields(rpc, "s", "n") is None
    assert framing.uni_message(rpc, "s") == (None, 0)


def test_unidirectional_clients_read_bare_pushes() -> None:
    connect, error = framing.uni_message(CONNECT_REPLY, "s-1")
    assert error == 0 and connect is not None
    body = orjson.loads(CONNECT_REPLY)["connect"]
    del body["pong"]  # nobody answers pings on a unidirectional transport
    assert orjson.loads(connect) == {"connect": {"session": "s-1", **body}}

    push = codec.encode_unsubscribe_push("task:1", codes.UNSUBSCRIBE_SERVER).encode()
    bare, _ = framing.uni_message(push, "s-1")
    assert bare == b'{"channel":"task:1","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}'
    assert framing.uni_message(b"{}", "s-1") == (b"{}", 0)
    # Replies have nobody to go to; a refused connect's code is handed back.
    assert framing.uni_message(codec.encode_reply(3, "rpc", {}).encode(), "s") == (None, 0)
    refused = codec.encode_error(1, codes.TOKEN_EXPIRED).encode()
    assert framing.uni_message(refused, "s") == (None, codes.TOKEN_EXPIRED.code)


def test_refused_unidirectional_connects_close_with_centrifuges_codes() -> None:
    assert framing.uni_connect_disconnect(109) == codes.CONNECTION_EXPIRED
    assert framing.uni_connect_disconnect(103) == codes.DISCONNECT_PERMISSION_DENIED
    assert framing.uni_connect_disconnect(101) == codes.DISCONNECT_PERMISSION_DENIED
    assert framing.uni_connect_disconnect(100) == codes.SERVER_ERROR


def test_unidirectional_connect_requests_become_commands() -> None:
    assert orjson.loads(framing.uni_connect_command('{"token":"t"}')) == {
        "id": 1,
        "connect": {"token": "t"},
    }
    for nothing in (None, "", b"  ", "null"):
        assert orjson.loads(framing.uni_connect_command(nothing)) == {"id": 1, "connect": {}}
    for bad in ("[1]", "{", b"\xff", '"token"'):
        with pytest.raises(RequestError) as exc:
            framing.uni_connect_command(bad)
        assert exc.value.status == 400


def test_emulation_requests() -> None:
    body = b'{"session":"s","node":"n","data":"{\\"id\\":2,\\"rpc\\":{}}"}'
    request = framing.emulation_request(body)
    assert (request.session, request.node, request.data) == ("s", "n", '{"id":2,"rpc":{}}')
    for bad in (
        b"",
        b"[]",
        b'{"node":"n","data":"x"}',
        b'{"session":"s","data":"x"}',
        b'{"session":"s","node":"n"}',
        b'{"session":"s","node":"n","data":{"id":1}}',
        b'{"session":1,"node":"n","data":"x"}',
    ):
        with pytest.raises(RequestError) as exc:
            framing.emulation_request(bad)
        assert exc.value.status == 400
        assert orjson.loads(exc.value.body())["error"]


def test_query_param_and_commands_text() -> None:
    assert framing.query_param(b"cf_connect=%7B%22a%22%3A1%7D&x=2", "cf_connect") == '{"a":1}'
    assert framing.query_param(b"x=2", "cf_connect") is None
    assert framing.commands_text(b'{"id":1}') == '{"id":1}'
    for bad in (b"", b" \n", b"\xff\xfe"):
        with pytest.raises(RequestError):
            framing.commands_text(bad)


def test_protobuf_connect_reply_gets_session_and_node() -> None:
    reply = wire.PROTOBUF.encode_connect_result(3, client="c-1", version="v", ping=25, pong=True)
    patched = framing.pb_with_emulation_fields(reply, "s-1", "n-1")
    assert patched is not None
    (raw,) = pbcodec.split_frame(patched)
    decoded = pbschema.Reply.FromString(raw)
    assert decoded.id == 3
    assert (decoded.connect.client, decoded.connect.session, decoded.connect.node) == (
        "c-1",
        "s-1",
        "n-1",
    )
    assert decoded.connect.ping == 25 and decoded.connect.pong
    for other in (wire.PROTOBUF.ping, wire.PROTOBUF.encode_rpc_result(2), b"\x05\x01"):
        assert framing.pb_with_emulation_fields(other, "s", "n") is None


def test_protobuf_emulation_requests_and_final_push() -> None:
    request = pbschema.message_class("EmulationRequest")(
        node="n", session="s", data=b"\x02\x08\x01"
    )
    parsed = framing.pb_emulation_request(request.SerializeToString())
    assert (parsed.node, parsed.session, parsed.data) == ("n", "s", b"\x02\x08\x01")
    for bad in (
        b"\xff\xff",
        pbschema.message_class("EmulationRequest")(node="n").SerializeToString(),
    ):
        with pytest.raises(RequestError) as exc:
            framing.pb_emulation_request(bad)
        assert exc.value.status == 400
    final = framing.PROTOBUF_HTTP_STREAM.final(3001, "shutdown")
    assert final == wire.PROTOBUF.encode_disconnect_push(codes.SHUTDOWN)
    assert framing.JSON_HTTP_STREAM.final(3001, "shutdown") == (
        b'{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}\n'
    )
    assert framing.SSE.final(3008, "slow").startswith(b"data: {")


async def _nothing(_payload: bytes) -> None:
    return None


async def test_emulation_outbox_patches_only_the_connect_reply() -> None:
    outbox = EmulationOutbox(1024, _nothing, session_id="s-1", node_name="n-1")
    assert outbox.push(codec.PING.encode())
    assert outbox.push(CONNECT_REPLY)
    later = codec.encode_connect_result(7, client="x").encode()
    assert outbox.push(later)
    queued = outbox.take(4096)
    assert queued[0] == b"{}"
    assert orjson.loads(queued[1])["connect"]["session"] == "s-1"
    assert queued[2] == later  # patched once: a second connect reply is not this client's
    outbox.close(discard=True)


async def test_uni_outbox_keeps_the_byte_cap() -> None:
    outbox = UniOutbox(200, _nothing, session_id="s")
    push = codec.encode_unsubscribe_push("task:1", codes.UNSUBSCRIBE_SERVER).encode()
    assert outbox.push(codec.encode_reply(2, "rpc", {}).encode())  # dropped, not queued
    assert outbox.size == 0
    accepted = 0
    while outbox.push(push):
        accepted += 1
    assert 0 < outbox.size <= 200 and accepted == outbox.size // (len(push) - 9)
    outbox.close(discard=True)


class _SlowSession:
    """Handles frames one at a time, each until released."""

    def __init__(self) -> None:
        self.handled: list[str | bytes] = []
        self.release = asyncio.Event()

    async def handle_frame(self, frame: str | bytes) -> None:
        await self.release.wait()
        self.handled.append(frame)


async def test_emulated_commands_run_in_order_and_their_backlog_is_capped() -> None:
    session = _SlowSession()
    hub = EmulationHub("node-a")
    hub.add("s-1", EmulatedConnection(session, cap_bytes=10))  # type: ignore[arg-type]
    for frame in ("aaaa", "bbbb"):
        await hub.deliver(EmulationRequest(node="node-a", session="s-1", data=frame))
    with pytest.raises(RequestError) as full:
        hub.feed_local("s-1", "ccc")  # 4 + 4 + 3 bytes waiting: over the cap
    assert full.value.status == 429
    with pytest.raises(RequestError) as unknown:
        hub.feed_local("s-2", "x")
    assert unknown.value.status == 404
    with pytest.raises(RequestError) as elsewhere:  # no relay: the memory engine
        await hub.deliver(EmulationRequest(node="node-b", session="s-1", data="x"))
    assert elsewhere.value.status == 404
    session.release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert session.handled == ["aaaa", "bbbb"]
    hub.feed_local("s-1", "cccc")  # room again once handled
    hub.remove("s-1")
    assert len(hub) == 0
