"""What the fallback transports put on the wire and read from it: pure functions
over bytes, the same for every connection (tested with vectors).

The session encodes replies and pushes exactly as for WebSocket (Centrifuge JSON
protocol v2: one reply object per message, `{"push": {...}}` for pushes); these
functions only frame them for a stream, add the emulation fields to the connect
reply, and turn replies into the bare pushes unidirectional clients read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import orjson
from google.protobuf.message import DecodeError

from shim.centrifuge import codes, pbcodec, pbschema, wire
from shim.centrifuge.codec import ProtocolError

# The query parameter carrying the connect command (SSE, uni_sse, uni_websocket): an
# EventSource can only GET, so the command travels in the URL.
CONNECT_PARAM = "cf_connect"
# First bytes of an SSE response: flushes the headers through proxies at once.
SSE_PREAMBLE = b"\r\n"
# The id a unidirectional connect request is handled under (its reply never leaves).
UNI_CONNECT_ID = 1

_PUSH_PREFIX = b'{"push":'
_CONNECT_KEY = b'"connect":{'
_PONG_TAIL = b',"pong":true}}'
# What precedes the result in a reply: `"connect":{` right after it is a connect
# reply, not a key that happens to be inside some data.
_REPLY_HEAD = re.compile(rb'\{"id":\d+,')
_ERROR_REPLY = re.compile(rb'\{"id":\d+,"error":')


class RequestError(ValueError):
    """A request we cannot serve; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> bytes:
        return orjson.dumps({"error": self.message})


# -- framing of outgoing messages ---------------------------------------------------


def http_stream_chunk(payload: bytes) -> bytes:
    """Newline-delimited JSON: the payload already holds messages joined by newlines."""
    return payload + b"\n"


def sse_chunk(payload: bytes) -> bytes:
    """One event per message; JSON messages never hold a raw newline, so splitting the
    joined payload gives them back."""
    return b"".join([b"data: " + message + b"\n\n" for message in payload.split(b"\n")])


def uni_disconnect_push(code: int, reason: str) -> bytes:
    return orjson.dumps({"disconnect": {"code": code, "reason": reason}})


# -- the connect reply ------------------------------------------------------------------


def with_emulation_fields(message: bytes, session: str, node: str) -> bytes | None:
    """The connect reply with `session` and `node` added (what the SDK sends back with
    every emulation request), or None when `message` is not a connect reply."""
    head, found, tail = message.partition(_CONNECT_KEY)
    if not found or not _REPLY_HEAD.fullmatch(head):
        return None
    extra = b'"session":' + orjson.dumps(session) + b',"node":' + orjson.dumps(node) + b","
    return head + found + extra + tail


def uni_message(message: bytes, session: str) -> tuple[bytes | None, int]:
    """(what a unidirectional client gets for `message`, connect error code or 0).

    Pushes lose their `{"push": ...}` envelope, the connect reply becomes a connect
    push (with the session id, without `pong`: nobody answers pings on these), pings
    stay `{}`, and other replies are dropped (None); a connect error reply is dropped
    and its code returned for the caller to turn into a disconnect."""
    if message.startswith(_PUSH_PREFIX):
        return message[len(_PUSH_PREFIX) : -1], 0
    if message == b"{}":
        return message, 0
    head, found, tail = message.partition(_CONNECT_KEY)
    if found and _REPLY_HEAD.fullmatch(head):
        if tail.endswith(_PONG_TAIL):
            tail = tail[: -len(_PONG_TAIL)] + b"}}"
        return b'{"connect":{"session":' + orjson.dumps(session) + b"," + tail, 0
    if _ERROR_REPLY.match(message):
        try:
            error = orjson.loads(message)["error"]
            return None, int(error.get("code") or codes.INTERNAL.code)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None, codes.INTERNAL.code
    return None, 0


# What a failed unidirectional connect closes with (Centrifuge's defaults; anything
# else is a server error, which clients retry).
_UNI_ERROR_DISCONNECTS = {
    codes.TOKEN_EXPIRED.code: codes.CONNECTION_EXPIRED,
    codes.EXPIRED.code: codes.CONNECTION_EXPIRED,
    codes.TOO_MANY_REQUESTS.code: codes.DisconnectCode(3013, "too many requests"),
    codes.PERMISSION_DENIED.code: codes.DISCONNECT_PERMISSION_DENIED,
    # No token while anonymous clients are refused: retrying cannot help.
    codes.UNAUTHORIZED.code: codes.DISCONNECT_PERMISSION_DENIED,
}


def uni_connect_disconnect(error_code: int) -> codes.DisconnectCode:
    return _UNI_ERROR_DISCONNECTS.get(error_code, codes.SERVER_ERROR)


# -- incoming requests --------------------------------------------------------------------


def query_param(query_string: bytes, name: str) -> str | None:
    try:
        values = parse_qs(query_string.decode("latin-1"), keep_blank_values=True).get(name)
    except ValueError:
        return None
    return values[0] if values else None


def commands_text(body: bytes) -> str:
    """An initial request's commands (JSON protocol: text)."""
    if not body.strip():
        raise RequestError(400, "no connect command")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise RequestError(400, "commands must be UTF-8 JSON") from None


def uni_connect_command(raw: bytes | str | None) -> str:
    """A unidirectional connect request (a ConnectRequest object, not a command) as the
    connect command the session handles; nothing at all is an empty request."""
    if raw is None or (isinstance(raw, bytes | str) and not raw.strip()):
        request: object = {}
    else:
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RequestError(400, "connect request must be a JSON object") from None
    if request is None:
        request = {}
    if not isinstance(request, dict):
        raise RequestError(400, "connect request must be a JSON object")
    return orjson.dumps({"id": UNI_CONNECT_ID, "connect": request}).decode()


@dataclass(slots=True, frozen=True)
class EmulationRequest:
    node: str
    session: str
    # The commands: text (JSON protocol) or varint-delimited Protobuf messages.
    data: str | bytes


def emulation_request(body: bytes) -> EmulationRequest:
    """POST /emulation with the JSON protocol: {"session", "node", "data"}, where data
    is the commands as one JSON string."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(400, "emulation request must be a JSON object") from None
    if not isinstance(request, dict):
        raise RequestError(400, "emulation request must be a JSON object")
    session, node, data = request.get("session"), request.get("node"), request.get("data")
    if not isinstance(session, str) or not session:
        raise RequestError(400, "emulation request needs a session")
    if not isinstance(node, str) or not node:
        raise RequestError(400, "emulation request needs a node")
    if not isinstance(data, str) or not data:
        raise RequestError(400, "emulation request needs data (the commands as a string)")
    return EmulationRequest(node=node, session=session, data=data)


_PbEmulationRequest = pbschema.message_class("EmulationRequest")


def pb_emulation_request(body: bytes) -> EmulationRequest:
    """POST /emulation with the Protobuf protocol (application/octet-stream): an
    EmulationRequest message, data holding the commands as a Protobuf frame."""
    try:
        request = _PbEmulationRequest.FromString(body)
    except DecodeError:
        raise RequestError(400, "emulation request must be a Protobuf EmulationRequest") from None
    if not request.session:
        raise RequestError(400, "emulation request needs a session")
    if not request.node:
        raise RequestError(400, "emulation request needs a node")
    if not request.data:
        raise RequestError(400, "emulation request needs data (the commands)")
    return EmulationRequest(node=request.node, session=request.session, data=bytes(request.data))


# -- stream codecs ----------------------------------------------------------------------


def pb_with_emulation_fields(message: bytes, session: str, node: str) -> bytes | None:
    """with_emulation_fields for the Protobuf wire: the connect reply re-encoded with
    ConnectResult.session and .node set."""
    try:
        (raw,) = pbcodec.split_frame(message)
        reply = pbschema.Reply.FromString(raw)
    except (ProtocolError, DecodeError, ValueError):
        return None
    if not reply.HasField("connect"):
        return None
    reply.connect.session = session
    reply.connect.node = node
    return pbcodec.delimited(reply.SerializeToString())


@dataclass(slots=True, frozen=True)
class StreamCodec:
    """How an emulated stream speaks: its wire, its framing, its connect reply."""

    name: str
    wire: wire.Wire
    content_type: bytes
    # Frames one batch of queued messages (joined by the outbox) for the response.
    frame: Callable[[bytes], bytes]
    patch_connect: Callable[[bytes, str, str], bytes | None]
    preamble: bytes = b""

    def final(self, code: int, reason: str) -> bytes:
        """The disconnect push that ends the response."""
        return self.frame(self.wire.encode_disconnect_push(codes.DisconnectCode(code, reason)))


def _as_is(payload: bytes) -> bytes:
    return payload  # Protobuf: the messages already carry their length prefixes


JSON_HTTP_STREAM = StreamCodec(
    "http_stream", wire.JSON, b"application/x-ndjson", http_stream_chunk, with_emulation_fields
)
PROTOBUF_HTTP_STREAM = StreamCodec(
    "http_stream", wire.PROTOBUF, b"application/octet-stream", _as_is, pb_with_emulation_fields
)
SSE = StreamCodec(
    "sse",
    wire.JSON,
    b"text/event-stream; charset=utf-8",
    sse_chunk,
    with_emulation_fields,
    SSE_PREAMBLE,
)
