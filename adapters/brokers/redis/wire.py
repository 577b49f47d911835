"""What the Redis engine stores and sends through pub/sub, as bytes. Pure: no I/O.

A *body* carries one publication without its position:

    <header>\\n<conn_info><chan_info><frame><data>

`header` is a compact orjson object; every key is optional and omitted when empty:
"t" time_ms; "u" user and "c" client (present together when the publication has a
ClientInfo); "ci" / "hi" byte lengths of conn_info / chan_info (absent = None);
"ev" event_id and "fr" byte length of the UTF-8 legacy frame (present together when
the publication has a LegacyFrame), "tk" task_id, "pj" project_id, "ch" the routed
channels (a list of strings). The raw segments
follow in that order and `data` is the rest, so no payload is ever escaped or copied
into JSON. orjson escapes newlines inside strings, so the first b"\\n" ends the header.

An *info body* is the same with only u/c/ci/hi and no frame or data (presence
entries, join and leave).

Messages on a channel's pub/sub name start with a kind byte:
  b"p<offset>:<epoch>\\n" + body   a publication (offset 0 and epoch "" without history)
  b"j" + info body / b"l" + info body   a join / a leave
History list entries are b"<expires_at_ms>:<offset>:" + body. The Lua publish script
builds both the message and the entry around the body encoded here; keep them in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shim.core.broker import ClientInfo, LegacyFrame, Publication


class WireError(ValueError):
    """Bytes that are not a message, entry or body of this format."""


@dataclass(slots=True, frozen=True)
class PublicationMessage:
    pub: Publication
    epoch: str


@dataclass(slots=True, frozen=True)
class PresenceMessage:
    join: bool
    info: ClientInfo


Message = PublicationMessage | PresenceMessage


def _info_header(header: dict[str, Any], segments: list[bytes], info: ClientInfo) -> None:
    header["u"] = info.user
    header["c"] = info.client
    if info.conn_info is not None:
        header["ci"] = len(info.conn_info)
        segments.append(info.conn_info)
    if info.chan_info is not None:
        header["hi"] = len(info.chan_info)
        segments.append(info.chan_info)


def encode_body(pub: Publication) -> bytes:
    """The publication's fields except offset (assigned in Redis) and epoch."""
    header: dict[str, Any] = {}
    segments: list[bytes] = []
    if pub.time_ms:
        header["t"] = pub.time_ms
    if pub.info is not None:
        _info_header(header, segments, pub.info)
    if pub.legacy is not None:
        tag = pub.legacy
        frame = tag.frame
        header["ev"] = tag.event_id
        header["fr"] = len(frame)
        if tag.task_id:
            header["tk"] = tag.task_id
        if tag.project_id:
            header["pj"] = tag.project_id
        if tag.channels:
            header["ch"] = tag.channels
        segments.append(frame)
    segments.append(pub.data)
    return b"".join((orjson.dumps(header), b"\n", *segments))


def encode_info(info: ClientInfo) -> bytes:
    header: dict[str, Any] = {}
    segments: list[bytes] = []
    _info_header(header, segments, info)
    return b"".join((orjson.dumps(header), b"\n", *segments))


def publication_message(body: bytes, offset: int = 0, epoch: str = "") -> bytes:
    return b"p%d:%s\n%s" % (offset, epoch.encode(), body)


def presence_message(join: bool, info: ClientInfo) -> bytes:
    return (b"j" if join else b"l") + encode_info(info)


# -- decoding ----------------------------------------------------------------------


class _Reader:
    """Walks the segments after a header, checking every length against the bytes."""

    __slots__ = ("header", "pos", "raw")

    def __init__(self, raw: bytes, start: int) -> None:
        end = raw.find(b"\n", start)
        if end < 0:
            raise WireError("no header line")
        try:
            header = orjson.loads(raw[start:end])
        except orjson.JSONDecodeError as error:
            raise WireError("header is not JSON") from error
        if not isinstance(header, dict):
            raise WireError("header is not an object")
        self.header: dict[str, Any] = header
        self.raw = raw
        self.pos = end + 1

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.header.get(key, default)
        if value is not None and not isinstance(value, str):
            raise WireError(f"{key} is not a string")
        return value

    def segment(self, key: str) -> bytes | None:
        length = self.header.get(key)
        if length is None:
            return None
        if type(length) is not int or length < 0 or self.pos + length > len(self.raw):
            raise WireError(f"bad length {key}")
        start, self.pos = self.pos, self.pos + length
        return self.raw[start : self.pos]

    def info(self) -> ClientInfo | None:
        user, client = self.text("u"), self.text("c")
        if user is None and client is None:
            return None
        if user is None or client is None:
            raise WireError("user and client go together")
        return ClientInfo(user, client, self.segment("ci"), self.segment("hi"))

    def legacy(self) -> LegacyFrame | None:
        event_id = self.text("ev")
        frame = self.segment("fr")
        if event_id is None and frame is None:
            return None
        if event_id is None or frame is None:
            raise WireError("event id and frame go together")
        try:
            frame.decode()  # legacy clients get it as a text frame
        except UnicodeDecodeError as error:
            raise WireError("frame is not UTF-8") from error
        return LegacyFrame(
            event_id,
            frame,
            self.text("tk", "") or "",
            self.text("pj", "") or "",
            self.strings("ch"),
        )

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.header.get(key, ())
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise WireError(f"{key} is not a list of strings")
        return tuple(value)

    def publication(self, offset: int) -> Publication:
        time_ms = self.header.get("t", 0)
        if type(time_ms) is not int:
            raise WireError("t is not an integer")
        info, legacy = self.info(), self.legacy()
        return Publication(self.raw[self.pos :], offset, info, time_ms, legacy)


def decode_body(raw: bytes, offset: int = 0, start: int = 0) -> Publication:
    return _Reader(raw, start).publication(offset)


def decode_info(raw: bytes, start: int = 0) -> ClientInfo:
    reader = _Reader(raw, start)
    info = reader.info()
    if info is None or reader.pos != len(raw):
        raise WireError("not an info body")
    return info


def _int(raw: bytes) -> int:
    if not raw.isdigit():
        raise WireError("not a decimal")
    return int(raw)


def decode_message(raw: bytes) -> Message:
    kind = raw[:1]
    if kind == b"p":
        end = raw.find(b"\n")
        colon = raw.find(b":", 1, end)
        if end < 0 or colon < 0:
            raise WireError("no position line")
        try:
            epoch = raw[colon + 1 : end].decode("ascii")
        except UnicodeDecodeError as error:
            raise WireError("epoch is not ASCII") from error
        return PublicationMessage(decode_body(raw, _int(raw[1:colon]), end + 1), epoch)
    if kind in (b"j", b"l"):
        return PresenceMessage(kind == b"j", decode_info(raw, 1))
    raise WireError("unknown message kind")


def decode_history_entry(raw: bytes) -> Publication:
    """A history list entry (its expiry is checked in Redis, not here)."""
    first = raw.find(b":")
    second = raw.find(b":", first + 1)
    if first < 0 or second < 0:
        raise WireError("no expiry and offset")
    _int(raw[:first])
    return decode_body(raw, _int(raw[first + 1 : second]), second + 1)
