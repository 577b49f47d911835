"""The two wire formats of the Centrifuge protocol behind one interface.

A connection picks its Wire at the handshake (JSON text frames or Protobuf binary
frames) and keeps it; the session speaks only to the Wire, whose encoders all
return the bytes of one message as queued in the outbox. Subscribe results hold
publications as `Publication`s; with fossil delta negotiated the Wire turns them
into the delta chain Centrifugo sends (the first in full, each next one a delta
against the one before when that is smaller).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from shim.centrifuge import codec, fossil, pbcodec
from shim.centrifuge.codec import Command
from shim.centrifuge.codes import DisconnectCode, ErrorCode, UnsubscribeCode
from shim.core.broker import ClientInfo, PresenceStats, Publication, StreamPosition

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
JSON_SUBPROTOCOL = "centrifuge-json"


class Wire(Protocol):
    name: str
    # Position in per-publication encoding caches.
    index: int
    binary: bool
    ping: bytes

    def decode_frame(self, data: str | bytes) -> list[Command]: ...

    def encode_reply(
        self, command_id: int, result_name: str, result: Mapping[str, Any]
    ) -> bytes: ...

    def encode_error(
        self, command_id: int, error: ErrorCode, message: str | None = None
    ) -> bytes: ...

    def encode_connect_result(
        self,
        command_id: int,
        *,
        client: str,
        version: str = "",
        expires: bool = False,
        ttl: int = 0,
        data: bytes | None = None,
        subs: Mapping[str, Mapping[str, Any]] | None = None,
        ping: int = 0,
        pong: bool = False,
    ) -> bytes: ...

    def encode_subscribe_result(self, command_id: int, **result: Any) -> bytes: ...

    def encode_history_result(
        self, command_id: int, *, publications: Iterable[Publication], position: StreamPosition
    ) -> bytes: ...

    def encode_presence_result(
        self, command_id: int, *, presence: Mapping[str, ClientInfo]
    ) -> bytes: ...

    def encode_presence_stats_result(self, command_id: int, *, stats: PresenceStats) -> bytes: ...

    def encode_refresh_result(
        self,
        command_id: int,
        *,
        client: str = "",
        version: str = "",
        expires: bool = False,
        ttl: int = 0,
    ) -> bytes: ...

    def encode_sub_refresh_result(
        self, command_id: int, *, expires: bool = False, ttl: int = 0
    ) -> bytes: ...

    def encode_rpc_result(self, command_id: int, *, data: bytes | None = None) -> bytes: ...

    def publication_push(self, channel: str, pub: Publication) -> bytes: ...

    def delta_push(self, channel: str, pub: Publication, patch: bytes | None) -> bytes | None:
        """A publication to a delta subscriber: in full when `patch` is None, else as
        that fossil delta; None when this wire cannot carry the patch."""

    def encode_message_push(self, data: bytes) -> bytes: ...

    def encode_join_push(self, channel: str, info: ClientInfo) -> bytes: ...

    def encode_leave_push(self, channel: str, info: ClientInfo) -> bytes: ...

    def encode_unsubscribe_push(self, channel: str, code: UnsubscribeCode) -> bytes: ...

    def encode_disconnect_push(self, code: DisconnectCode) -> bytes: ...

    def encode_subscribe_push(
        self,
        channel: str,
        *,
        recoverable: bool = False,
        epoch: str = "",
        offset: int = 0,
        positioned: bool = False,
        data: bytes | None = None,
    ) -> bytes: ...


def fossil_patch(base: bytes, data: bytes) -> bytes | None:
    """The fossil delta from `base` to `data`, or None when it is not smaller."""
    patch = fossil.create(base, data)
    return patch if len(patch) < len(data) else None


def delta_chain(pubs: Sequence[Publication]) -> list[tuple[Publication, bytes | None]]:
    """Recovered publications for a delta subscriber: (pub, patch against the previous
    one or None for full data)."""
    chain: list[tuple[Publication, bytes | None]] = []
    previous: Publication | None = None
    for pub in pubs:
        chain.append((pub, None if previous is None else fossil_patch(previous.data, pub.data)))
        previous = pub
    return chain


def _json_delta_pub(pub: Publication, patch: bytes | None) -> dict[str, Any] | None:
    """A publication with `data` as a JSON string: the payload text, or the patch
    (then delta: true). None when the patch is not UTF-8 (a literal run may cut a
    character in two), which a JSON string cannot carry."""
    body = codec.publication_dict(Publication(data=b"", offset=pub.offset, info=pub.info))
    try:
        body["data"] = (pub.data if patch is None else patch).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if patch is not None:
        body["delta"] = True
    return body


# --- Both wires ---------------------------------------------------------------------


class _CodecWire:
    """What only encodes, delegated to the codec module; results as message bytes."""

    # Its place in WIRES, set there.
    index: int

    def __init__(self, module: Any, as_bytes: Callable[[Any], bytes]) -> None:
        self._codec = module
        self._bytes = as_bytes

    def encode_reply(self, command_id: int, result_name: str, result: Mapping[str, Any]) -> bytes:
        return self._bytes(self._codec.encode_reply(command_id, result_name, result))

    def encode_error(self, command_id: int, error: ErrorCode, message: str | None = None) -> bytes:
        return self._bytes(self._codec.encode_error(command_id, error, message))

    def encode_history_result(self, command_id: int, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_history_result(command_id, **fields))

    def encode_presence_result(self, command_id: int, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_presence_result(command_id, **fields))

    def encode_presence_stats_result(self, command_id: int, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_presence_stats_result(command_id, **fields))

    def encode_refresh_result(self, command_id: int, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_refresh_result(command_id, **fields))

    def encode_sub_refresh_result(self, command_id: int, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_sub_refresh_result(command_id, **fields))

    def encode_rpc_result(self, command_id: int, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_rpc_result(command_id, **fields))

    def encode_message_push(self, data: bytes) -> bytes:
        return self._bytes(self._codec.encode_message_push(data))

    def encode_join_push(self, channel: str, info: ClientInfo) -> bytes:
        return self._bytes(self._codec.encode_join_push(channel, info))

    def encode_leave_push(self, channel: str, info: ClientInfo) -> bytes:
        return self._bytes(self._codec.encode_leave_push(channel, info))

    def encode_unsubscribe_push(self, channel: str, code: UnsubscribeCode) -> bytes:
        return self._bytes(self._codec.encode_unsubscribe_push(channel, code))

    def encode_disconnect_push(self, code: DisconnectCode) -> bytes:
        return self._bytes(self._codec.encode_disconnect_push(code))

    def encode_subscribe_push(self, channel: str, **fields: Any) -> bytes:
        return self._bytes(self._codec.encode_subscribe_push(channel, **fields))


def _utf8(text: str) -> bytes:
    return text.encode()


def _same(message: bytes) -> bytes:
    return message


# --- JSON ----------------------------------------------------------------------------


class JsonWire(_CodecWire):
    name = "json"
    binary = False
    ping = codec.PING.encode()

    def __init__(self) -> None:
        super().__init__(codec, _utf8)

    def decode_frame(self, data: str | bytes) -> list[Command]:
        if isinstance(data, bytes):
            raise codec.ProtocolError("binary frame on a JSON connection")
        return codec.decode_frame(data)

    def _subscribe_result(self, result: Mapping[str, Any]) -> dict[str, Any]:
        fields = dict(result)
        delta = bool(fields.pop("delta", False))
        publications: Sequence[Publication] = fields.pop("publications", ())
        body = codec.subscribe_result_dict(**fields)
        if publications:
            if delta:
                pubs = []
                for pub, patch in delta_chain(publications):
                    item = _json_delta_pub(pub, patch) or _json_delta_pub(pub, None)
                    assert item is not None  # payloads are JSON text, so UTF-8
                    pubs.append(item)
                body["publications"] = pubs
            else:
                body["publications"] = [codec.publication_dict(p) for p in publications]
        if delta:
            body["delta"] = True
        return body

    def encode_connect_result(
        self, command_id: int, *, subs: Mapping[str, Mapping[str, Any]] | None = None, **fields: Any
    ) -> bytes:
        results = {channel: self._subscribe_result(r) for channel, r in (subs or {}).items()}
        return codec.encode_connect_result(command_id, subs=results, **fields).encode()

    def encode_subscribe_result(self, command_id: int, **result: Any) -> bytes:
        return orjson.dumps({"id": command_id, "subscribe": self._subscribe_result(result)})

    def publication_push(self, channel: str, pub: Publication) -> bytes:
        return codec.publication_push(channel, pub)

    def delta_push(self, channel: str, pub: Publication, patch: bytes | None) -> bytes | None:
        body = _json_delta_pub(pub, patch)
        if body is None:
            return None
        return orjson.dumps({"push": {"channel": channel, "pub": body}})


# --- Protobuf ---------------------------------------------------------------------------


def _pb_subscribe_result(result: Mapping[str, Any]) -> dict[str, Any]:
    fields = dict(result)
    pubs: Sequence[Publication] = fields.get("publications", ())
    if fields.get("delta"):
        fields["publications"] = delta_chain(pubs)
    else:
        fields["publications"] = [(pub, None) for pub in pubs]
    return fields


class ProtobufWire(_CodecWire):
    name = "protobuf"
    binary = True
    ping = pbcodec.PING

    def __init__(self) -> None:
        super().__init__(pbcodec, _same)

    def decode_frame(self, data: str | bytes) -> list[Command]:
        return pbcodec.decode_frame(data)

    def encode_connect_result(
        self, command_id: int, *, subs: Mapping[str, Mapping[str, Any]] | None = None, **fields: Any
    ) -> bytes:
        results = {channel: _pb_subscribe_result(r) for channel, r in (subs or {}).items()}
        return pbcodec.encode_connect_result(command_id, subs=results, **fields)

    def encode_subscribe_result(self, command_id: int, **result: Any) -> bytes:
        return pbcodec.encode_subscribe_result(command_id, _pb_subscribe_result(result))

    def publication_push(self, channel: str, pub: Publication) -> bytes:
        return pbcodec.publication_push(channel, pub)

    def delta_push(self, channel: str, pub: Publication, patch: bytes | None) -> bytes | None:
        if patch is None:
            return pbcodec.publication_push(channel, pub)
        return pbcodec.publication_push(channel, pub, patch, True)


JSON = JsonWire()
PROTOBUF = ProtobufWire()
# Every wire, each at its own `index` (per-publication caches keep one slot per wire).
WIRES: tuple[Wire, ...] = (JSON, PROTOBUF)
for _index, _wire in enumerate(WIRES):
    _wire.index = _index


def select(query_string: bytes, subprotocols: Sequence[str]) -> tuple[Wire, str | None]:
    """The wire of a new connection and the subprotocol to answer, as Centrifugo
    chooses: `cf_protocol=protobuf` (or `format=protobuf`) in the query, else the
    `centrifuge-protobuf` subprotocol when offered, else JSON. A subprotocol is
    answered only when the client offered it (a browser that offers one and gets
    none aborts the handshake)."""
    offered = PROTOBUF_SUBPROTOCOL in subprotocols
    protobuf = offered
    for pair in query_string.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key in (b"cf_protocol", b"format") and value == b"protobuf":
            protobuf = True
    if protobuf:
        return PROTOBUF, PROTOBUF_SUBPROTOCOL if offered else None
    return JSON, JSON_SUBPROTOCOL if JSON_SUBPROTOCOL in subprotocols else None
