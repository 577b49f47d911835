"""Hypothesis strategies shared by the fuzz tests: JSON values, and inputs shaped
like what each parser expects, with every field free to take the wrong type."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

# orjson reads and writes signed and unsigned 64-bit integers.
JSON_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = (
    st.none()
    | st.booleans()
    | JSON_INTS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for n in range(depth):
        value = {"k": value} if n % 2 else [value]
    return value


def deep_json(depth: int) -> bytes:
    """JSON text nested `depth` levels (orjson.dumps stops at 254)."""
    return b'{"k":[' * (depth // 2) + b"1" + b"]}" * (depth // 2)


# A value of any type, often the wrong one for the field it lands in.
ANY_FIELD = json_values(8) | st.sampled_from([deep(300), deep(600)])

CENTRIFUGE_METHODS = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "send",
    "rpc",
    "refresh",
    "sub_refresh",
)
CENTRIFUGE_FIELDS = (
    "channel",
    "token",
    "data",
    "offset",
    "epoch",
    "recover",
    "since",
    "limit",
    "reverse",
    "method",
    "subs",
    "flag",
    "type",
    "positioned",
    "recoverable",
    "join_leave",
)


@st.composite
def centrifuge_commands(draw: st.DrawFn) -> dict[str, Any]:
    command: dict[str, Any] = {}
    if draw(st.booleans()):
        command["id"] = draw(st.integers(min_value=-5, max_value=2**33) | ANY_FIELD)
    for method in draw(st.lists(st.sampled_from(CENTRIFUGE_METHODS), max_size=2)):
        body = draw(
            st.dictionaries(st.sampled_from(CENTRIFUGE_FIELDS), ANY_FIELD, max_size=4) | ANY_FIELD
        )
        command[method] = body
    return command


def encode_lines(commands: list[Any]) -> str:
    """Commands one per line, as the SDKs send several in one frame; values orjson
    cannot write are written by hand."""
    return "\n".join(encode_body(command).decode() for command in commands)


CENTRIFUGE_FRAMES = (
    st.lists(centrifuge_commands(), min_size=1, max_size=4).map(encode_lines)
    | st.text(max_size=200)
    | st.sampled_from(["", "\n", "{}", "{}\n{}", "null", "[]", deep_json(2000).decode()])
)

LEGACY_FIELDS = ("action", "task_id", "project_id", "ACTION", "Task_ID", "ta\u017fk_id")
LEGACY_ACTIONS = ("subscribe", "unsubscribe", "subscribe_all", "unsubscribe_all", "Subscribe")


@st.composite
def legacy_commands(draw: st.DrawFn) -> str:
    body = draw(
        st.dictionaries(
            st.sampled_from(LEGACY_FIELDS),
            st.sampled_from(LEGACY_ACTIONS) | st.text(max_size=300) | ANY_FIELD,
            max_size=4,
        )
    )
    return encode_body(body).decode()


LEGACY_FRAMES = (
    legacy_commands()
    | st.text(max_size=200)
    | st.sampled_from(["", "null", "[]", '{"action":', deep_json(3000).decode()])
)

ITEM_FIELDS = ("type", "payload", "timestamp", "id", "task_id", "project_id")
EVENT_TYPES = ("task.updated", "approval.requested", "quest.message", "activity.new", "", "x.y")


@st.composite
def broadcast_items(draw: st.DrawFn) -> Any:
    item = draw(st.dictionaries(st.sampled_from(ITEM_FIELDS), ANY_FIELD, max_size=6))
    if draw(st.booleans()):
        item["type"] = draw(st.sampled_from(EVENT_TYPES))
    if draw(st.booleans()):
        item["payload"] = draw(
            st.dictionaries(
                st.sampled_from(("task_id", "project_id", "user_id", "quest_id", "activity")),
                ANY_FIELD,
                max_size=4,
            )
        )
    return item


def encode_body(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # Deeper than orjson writes (or too big an integer): write it by hand.
        if isinstance(value, list):
            return b"[" + b",".join(encode_body(v) for v in value) + b"]"
        if isinstance(value, dict):
            parts = [orjson.dumps(str(k)) + b":" + encode_body(v) for k, v in value.items()]
            return b"{" + b",".join(parts) + b"}"
        return b"18446744073709551616"  # one past what orjson reads


BROADCAST_BODIES = (
    st.lists(broadcast_items() | ANY_FIELD, max_size=6).map(encode_body)
    | broadcast_items().map(encode_body)
    | st.binary(max_size=100)
    | st.sampled_from([b"", b"[", b"{}", b"null", deep_json(1100)])
)
