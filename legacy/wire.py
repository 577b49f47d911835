"""The legacy hub's wire text: Go `encoding/json` bytes, reproduced exactly.

Legacy clients compare nothing byte-wise, but the shim promises byte parity with the
old Go hub (see legacy-hub-protocol.md §2.3-2.4) so that any consumer that diffs,
hashes or regex-matches frames keeps working. orjson already writes what Go writes
for strings (raw UTF-8; `\\b \\f \\n \\r \\t`; other controls as lower-case `\\u00xx`),
integers, booleans and null; the differences are HTML escaping, U+2028/U+2029,
and the text of floats, which are handled here.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import orjson

from shim.core.events import Event

# Go escapes these even inside strings; they are multi-byte or HTML-special. In JSON
# text every one of them can only occur inside a string (structural tokens are plain
# ASCII without them), so replacing them in the whole document is exact.
_GO_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def go_float(value: float) -> str:
    """A float64 as Go's encoding/json writes it (shortest round-trip digits).

    Plain decimal notation, except exponent form below 1e-6 or from 1e21 on, where
    Go writes `1e+21` and trims a leading exponent zero (`1e-7`, not `1e-07`).
    """
    if not math.isfinite(value):
        raise ValueError(f"Go's encoding/json refuses {value!r}")
    shortest = repr(value)  # Python and Go both print the shortest round-trip digits
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        # repr already uses exponent form here, with Go's `e+XX` / `e-XX` shape.
        mantissa, _, exponent = shortest.partition("e")
        sign, digits = exponent[0], exponent[1:]
        if len(digits) == 2 and digits[0] == "0" and sign == "-":
            digits = digits[1:]
        return f"{mantissa}e{sign}{digits}"
    plain = format(Decimal(shortest), "f")
    return plain.removesuffix(".0")


def _go_floats(value: Any) -> Any:
    """Swap floats for pre-rendered fragments; containers without floats come back
    unchanged (same object), so float-free payloads are not copied."""
    if isinstance(value, float):
        return orjson.Fragment(go_float(value))
    if isinstance(value, dict):
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            new = _go_floats(item)
            if new is not item and changed is None:
                changed = dict(value)
            if changed is not None:
                changed[key] = new
        return value if changed is None else changed
    if isinstance(value, list | tuple):
        items = [_go_floats(item) for item in value]
        if any(new is not old for new, old in zip(items, value, strict=True)):
            return items
        return value
    return value


def encode_go_json(value: Any) -> str:
    """Compact JSON text exactly as Go's encoding/json writes the same value.

    Dict key order is kept as given: map-typed levels must already be sorted by the
    producer, struct-typed ones in field order. Raises ValueError for NaN/Infinity
    and for values JSON cannot hold (lone surrogates, integers beyond 64 bits).
    """
    try:
        raw = orjson.dumps(_go_floats(value))
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"cannot encode as Go JSON: {exc}") from exc
    for plain, escaped in _GO_ESCAPES:
        if plain in raw:
            raw = raw.replace(plain, escaped)
    return raw.decode()


def encode_legacy_frame(event: Event) -> str:
    """The text frame every legacy client receives for `event`; build it once per event.

    Key order is the Go envelope's: type, timestamp, payload, then task_id and
    project_id, each only when non-empty (`omitempty`).
    """
    frame: dict[str, Any] = {
        "type": event.type,
        "timestamp": event.timestamp,
        "payload": event.payload,
    }
    if event.task_id:
        frame["task_id"] = event.task_id
    if event.project_id:
        frame["project_id"] = event.project_id
    return encode_go_json(frame)
