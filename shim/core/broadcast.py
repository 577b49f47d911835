"""Legacy hub messages in, Events out; Events out again as channel publication data.

The backend keeps sending what it handed the Go hub: one message object
`{type, timestamp?, payload, task_id?, project_id?}` or an array of them. Each item is
judged on its own, so one bad item never costs the rest of a batch its delivery.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from shim.core.events import Event, new_event_id, now_timestamp
from shim.core.jsonbytes import dumps_kept

# Activity kinds whose content names a model tool-use (legacy-hub-protocol.md §6.1).
_TOOL_EVENT_TYPES = frozenset({"tool_call", "tool_result"})
# Keys that carry a tool-use id outright; `id` counts only when it looks like one.
_ID_KEYS = ("tool_use_id", "call_id")
_TOOL_USE_ID_PREFIX = "toolu_"
# Channel data fields the event itself owns; a payload key of the same name is overridden.
_EVENT_OWNED = ("type", "timestamp")


class BroadcastError(ValueError):
    """The body as a whole is unusable (not JSON, or neither an object nor an array)."""


class TooManyItems(BroadcastError):
    """The body holds more items than one request may carry."""


@dataclass(slots=True)
class Accepted:
    index: int
    event: Event


@dataclass(slots=True)
class Refused:
    index: int
    error: str


ParsedItem = Accepted | Refused


def parse_broadcast(
    body: bytes, *, max_item_bytes: int, max_items: int | None = None
) -> list[ParsedItem]:
    """Parse one legacy hub message or a JSON array of them, in order.

    Raises BroadcastError when the body is not JSON or is neither an object nor an
    array (TooManyItems past `max_items`); every other problem refuses just the item
    concerned. Accepted events of `activity.new` tool calls/results already carry
    their tool-use id for channels (see with_tool_use_id).
    """
    return list(iter_broadcast(body, max_item_bytes=max_item_bytes, max_items=max_items))


def iter_broadcast(
    body: bytes, *, max_item_bytes: int, max_items: int | None = None
) -> Iterator[ParsedItem]:
    """parse_broadcast one item at a time. An array is cut into its items first and
    each is read on its own, so a body past `max_items` is refused after reading
    that many (not all of them), and a caller can pause between items."""
    stripped = body.lstrip(b" \t\r\n")
    if not stripped.startswith(b"["):
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BroadcastError(f"body is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise BroadcastError("body must be a JSON object or an array of objects")
        yield _parse_item(0, document, max_item_bytes)
        return
    whole: Any = None
    if len(stripped) <= _WHOLE_PARSE_MAX_BYTES:
        try:
            whole = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            whole = None
    if isinstance(whole, list) and (max_items is None or len(whole) <= max_items):
        # The common case: one parse for the whole array. A body that fails it (or
        # holds too many items, or is too large to parse in one step) takes the
        # item-by-item path below, which gives the same error the same way.
        yield from _parse_items(whole, max_item_bytes)
        return
    for index, raw in enumerate(_array_items(stripped)):
        if max_items is not None and index >= max_items:
            raise TooManyItems(
                f"body holds more than {max_items} items; at most {max_items} per request"
                " (split the batch)"
            )
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # As before: a body orjson cannot read is refused whole.
            raise BroadcastError(f"body is not valid JSON: {exc}") from exc
        yield _parse_item(index, item, max_item_bytes)


def _parse_items(items: list[Any], max_item_bytes: int) -> Iterator[ParsedItem]:
    try:
        # Re-encoded as a whole within the limit: no item can be over it.
        small = len(orjson.dumps(items)) <= max_item_bytes
    except orjson.JSONEncodeError:
        small = False  # too deep as a whole; each item is judged on its own
    for index, item in enumerate(items):
        yield _parse_item(index, item, max_item_bytes, sized=small)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# Only finds where each item ends (the items are then read by orjson).
_SCANNER = json.JSONDecoder(parse_constant=_no_constant)
_SPACE = re.compile(r"[ \t\r\n]*")


# Largest array parsed in one orjson call (about 3 ms): a larger one, such as a
# 6 MiB body of 100,000 items, would block the loop for hundreds of milliseconds
# before its 413, so it is read item by item, between pauses.
_WHOLE_PARSE_MAX_BYTES = 512 * 1024
# Bytes of the body decoded first; each later slice is twice the one before. A body
# past ingest_max_items is then refused after decoding about what its first items
# take, and a large body is never decoded in one blocking step.
_FIRST_SLICE = 64 * 1024
_WHITESPACE = b" \t\r\n"


class _Text:
    """The UTF-8 text of `body`, decoded a slice at a time as the scanner reaches
    the end of what is decoded; text before the item being read is dropped."""

    __slots__ = ("_body", "_decoder", "_fed", "_slice", "text")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._fed = 0
        self._slice = _FIRST_SLICE
        self.text = ""
        self.extend(0)

    @property
    def exhausted(self) -> bool:
        return self._fed >= len(self._body)

    def extend(self, keep_from: int) -> bool:
        """Drop text before `keep_from` and decode the next slice; False at the end
        (positions then count from `keep_from`, now 0)."""
        if self.exhausted:
            return False
        piece = self._body[self._fed : self._fed + self._slice]
        self._fed += len(piece)
        self._slice *= 2
        try:
            decoded = self._decoder.decode(piece, final=self.exhausted)
        except UnicodeDecodeError as exc:
            raise BroadcastError(f"body is not valid JSON: {exc}") from None
        self.text = self.text[keep_from:] + decoded
        return True

    def rest_is_blank(self, position: int) -> bool:
        # A byte held back as the start of a character is not blank either.
        return not (
            self.text[position:].strip(" \t\r\n")
            or self._decoder.getstate()[0]
            or self._body[self._fed :].strip(_WHITESPACE)
        )


def _array_items(body: bytes) -> Iterator[str]:
    """The JSON text of each element of the array `body` (starting with '['), in order."""
    window = _Text(body)
    position = _skip_space(window, 1)
    if window.text.startswith("]", position):
        _expect_end(window, position + 1)
        return
    while True:
        text = window.text
        try:
            _value, end = _SCANNER.raw_decode(text, position)
        except (ValueError, RecursionError) as exc:
            # The item may just go on past the decoded text.
            if window.extend(position):
                position = 0
                continue
            raise BroadcastError(f"body is not valid JSON: {exc}") from None
        if end >= len(text) and window.extend(position):
            position = 0  # a number may go on past the decoded text: read it again
            continue
        yield text[position:end]
        position = _skip_space(window, end)
        if window.text.startswith(",", position):
            position = _skip_space(window, position + 1)
        elif window.text.startswith("]", position):
            _expect_end(window, position + 1)
            return
        else:
            raise BroadcastError("body is not valid JSON: expected ',' or ']'")


def _skip_space(window: _Text, position: int) -> int:
    """The position of the next non-space character (decoding more when needed)."""
    while True:
        position = _SPACE.match(window.text, position).end()  # type: ignore[union-attr]
        if position < len(window.text) or not window.extend(position):
            return position
        position = 0


def _expect_end(window: _Text, position: int) -> None:
    if not window.rest_is_blank(position):
        raise BroadcastError("body is not valid JSON: trailing characters")


def _parse_item(index: int, item: Any, max_item_bytes: int, *, sized: bool = False) -> ParsedItem:
    """`sized`: the item is already known to re-encode within `max_item_bytes`."""
    if not isinstance(item, dict):
        return Refused(index, "not an object")
    if not sized:
        try:
            size = len(orjson.dumps(item))
        except orjson.JSONEncodeError:
            # orjson reads 1024 levels deep but writes only 254: such an item could
            # never be sent on, so it is refused like any other unusable item.
            return Refused(index, "item nested too deeply to re-encode")
        if size > max_item_bytes:
            return Refused(index, f"item exceeds {max_item_bytes} bytes ({size})")
    if "type" not in item:
        return Refused(index, "missing type")
    event_type = item["type"]
    if not isinstance(event_type, str) or not event_type:
        return Refused(index, "type must be a non-empty string")
    if "payload" not in item:
        return Refused(index, "missing payload")
    payload = item["payload"]
    if not isinstance(payload, dict):
        # Includes null: Go would have written `"payload":null`, which no legacy site sends.
        return Refused(index, "payload must be an object")
    try:
        # Absent and null mean "not given" for every optional field.
        timestamp = _optional_text(item, "timestamp", allow_empty=False) or now_timestamp()
        event_id = _optional_text(item, "id", allow_empty=False) or new_event_id()
        task_id = _optional_text(item, "task_id", allow_empty=True)
        project_id = _optional_text(item, "project_id", allow_empty=True)
    except _FieldError as exc:
        return Refused(index, str(exc))
    # Positional: a keyword call costs about twice as much, once per item.
    event = Event(event_id, event_type, payload, timestamp, task_id, project_id)
    return Accepted(index, with_tool_use_id(event))


class _FieldError(Exception):
    pass


def _optional_text(item: dict[str, Any], key: str, *, allow_empty: bool) -> str:
    value = item.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _FieldError(f"{key} must be a string")
    if not value and not allow_empty:
        raise _FieldError(f"{key} must be a non-empty string")
    return value


def channel_data(event: Event) -> bytes:
    """Publication data for channel clients: the flat shape of the design doc.

    Payload keys in their order, then `type` and `timestamp`. Event.extras are merged
    at top level and win over payload keys of the same name (keeping that key's
    place); the event's own `type` and `timestamp` win over both, because channel
    clients dispatch on them. Compact JSON, no Go escaping (clients parse it).
    """
    data = dict(event.payload)
    for key, value in event.extras.items():
        if key not in _EVENT_OWNED:
            data[key] = value
    for key in _EVENT_OWNED:
        data.pop(key, None)
    data["type"] = event.type
    data["timestamp"] = event.timestamp
    return dumps_kept(data)


def extract_tool_use_id(event: Event) -> str | None:
    """The model's tool-use id behind an `activity.new` tool_call/tool_result, if any.

    The legacy activity only has it (when at all) inside `content`, a JSON document
    serialised as a string (or, from newer producers, an object). Searched breadth
    first so the outermost id wins; per object `tool_use_id`, then `call_id`, then an
    `id` that starts with "toolu_". An id already on the activity is returned as is.
    """
    if event.type != "activity.new":
        return None
    activity = event.payload.get("activity")
    if not isinstance(activity, dict) or activity.get("event_type") not in _TOOL_EVENT_TYPES:
        return None
    existing = activity.get("tool_use_id")
    if isinstance(existing, str) and existing:
        return existing
    content = activity.get("content")
    if isinstance(content, str):
        try:
            content = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None  # plain-text content cannot name an id
    return _find_tool_use_id(content)


def _find_tool_use_id(root: Any) -> str | None:
    pending: deque[Any] = deque([root])
    while pending:
        node = pending.popleft()
        if isinstance(node, dict):
            for key in _ID_KEYS:
                value = node.get(key)
                if isinstance(value, str) and value:
                    return value
            plain_id = node.get("id")
            if isinstance(plain_id, str) and plain_id.startswith(_TOOL_USE_ID_PREFIX):
                return plain_id
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return None


def with_tool_use_id(event: Event) -> Event:
    """`event` with `activity.tool_use_id` added to its channel data, when one is found.

    The new UI pairs tool calls and results by this id (the product's known bug
    paired them by tool name). The id goes in Event.extras as a copy of the
    activity with the extra key, which channel_data lays over the payload's
    `activity`; Event.payload stays untouched, so the legacy frame is still
    byte-equal to Go's. Returns `event` itself when there is nothing to add.
    """
    tool_use_id = extract_tool_use_id(event)
    activity = event.payload.get("activity")
    if tool_use_id is None or not isinstance(activity, dict) or "tool_use_id" in activity:
        return event
    extras = {**event.extras, "activity": {**activity, "tool_use_id": tool_use_id}}
    return dataclasses.replace(event, extras=extras)
