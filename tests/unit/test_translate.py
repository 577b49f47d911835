"""Ingest parsing, channel publication data and tool-use id pairing."""

from __future__ import annotations

import copy
import time
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from legacy.wire import encode_legacy_frame
from shim.core import broadcast as broadcast_module
from shim.core.broadcast import (
    Accepted,
    BroadcastError,
    Refused,
    TooManyItems,
    channel_data,
    extract_tool_use_id,
    parse_broadcast,
    with_tool_use_id,
)
from shim.core.events import Event, go_timestamp
from tests.unit.test_legacy_wire import CORPUS, GO_TIMESTAMP

LIMIT = 1 << 20


def accept_one(body: bytes) -> Event:
    [item] = parse_broadcast(body, max_item_bytes=LIMIT)
    assert isinstance(item, Accepted), item
    return item.event


def refusal(item: Any) -> str:
    [parsed] = parse_broadcast(orjson.dumps([item]), max_item_bytes=LIMIT)
    assert isinstance(parsed, Refused), parsed
    assert parsed.index == 0
    return parsed.error


# --- parse_broadcast ----------------------------------------------------------------


def test_single_message_becomes_an_event() -> None:
    event = accept_one(
        b'{"type":"task.updated","timestamp":"2026-02-04T16:21:55Z",'
        b'"payload":{"task_id":"task-1","status":"running"},"task_id":"task-1"}'
    )
    assert event.type == "task.updated"
    assert event.timestamp == "2026-02-04T16:21:55Z"
    assert event.payload == {"task_id": "task-1", "status": "running"}
    assert event.task_id == "task-1"
    assert event.project_id == ""
    assert len(event.id) == 32 and int(event.id, 16) >= 0


def test_batch_refuses_bad_items_and_keeps_the_rest() -> None:
    body = (
        b'[{"type":"a.b","payload":{}},'
        b'"text",'
        b'{"type":"c.d","payload":null},'
        b'{"type":"e.f","payload":{"k":1},"project_id":"p-1"}]'
    )
    items = parse_broadcast(body, max_item_bytes=LIMIT)
    assert [type(i) for i in items] == [Accepted, Refused, Refused, Accepted]
    assert [i.index for i in items] == [0, 1, 2, 3]
    assert items[1] == Refused(1, "not an object")
    assert items[2] == Refused(2, "payload must be an object")
    last = items[3]
    assert isinstance(last, Accepted)
    assert (last.event.type, last.event.payload, last.event.project_id) == ("e.f", {"k": 1}, "p-1")


def test_empty_batch_is_empty() -> None:
    assert parse_broadcast(b"[]", max_item_bytes=LIMIT) == []


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"type":"a"} x', b"\xff\xfe"])
def test_body_that_is_not_json_is_a_broadcast_error(body: bytes) -> None:
    with pytest.raises(BroadcastError, match="not valid JSON"):
        parse_broadcast(body, max_item_bytes=LIMIT)


@pytest.mark.parametrize("body", [b"42", b'"task.updated"', b"null", b"true"])
def test_body_that_is_neither_object_nor_array_is_a_broadcast_error(body: bytes) -> None:
    with pytest.raises(BroadcastError, match="object or an array"):
        parse_broadcast(body, max_item_bytes=LIMIT)


@pytest.mark.parametrize(
    ("item", "error"),
    [
        (None, "not an object"),
        ([], "not an object"),
        (7, "not an object"),
        ({"payload": {}}, "missing type"),
        ({"type": "", "payload": {}}, "type must be a non-empty string"),
        ({"type": 5, "payload": {}}, "type must be a non-empty string"),
        ({"type": None, "payload": {}}, "type must be a non-empty string"),
        ({"type": "a.b"}, "missing payload"),
        ({"type": "a.b", "payload": None}, "payload must be an object"),
        ({"type": "a.b", "payload": []}, "payload must be an object"),
        ({"type": "a.b", "payload": "x"}, "payload must be an object"),
        ({"type": "a.b", "payload": {}, "timestamp": 17}, "timestamp must be a string"),
        ({"type": "a.b", "payload": {}, "timestamp": ""}, "timestamp must be a non-empty string"),
        ({"type": "a.b", "payload": {}, "id": 3}, "id must be a string"),
        ({"type": "a.b", "payload": {}, "id": ""}, "id must be a non-empty string"),
        ({"type": "a.b", "payload": {}, "task_id": 1}, "task_id must be a string"),
        ({"type": "a.b", "payload": {}, "project_id": ["p"]}, "project_id must be a string"),
    ],
)
def test_refusal_messages(item: Any, error: str) -> None:
    assert refusal(item) == error


def test_item_size_is_its_compact_json_length() -> None:
    body = b'[ {"type" : "a.b", "payload" : {} } ]'  # the item is 27 bytes once compact
    [at_limit] = parse_broadcast(body, max_item_bytes=27)
    [over] = parse_broadcast(body, max_item_bytes=26)
    assert isinstance(at_limit, Accepted)
    assert over == Refused(0, "item exceeds 26 bytes (27)")


def test_missing_or_null_timestamp_is_now_in_go_format() -> None:
    before = time.time_ns()
    events = [
        accept_one(b'{"type":"a.b","payload":{}}'),
        accept_one(b'{"type":"a.b","payload":{},"timestamp":null}'),
    ]
    after = time.time_ns()
    for event in events:
        assert GO_TIMESTAMP.match(event.timestamp)
        seconds = {go_timestamp(s * 10**9)[:19] for s in range(before // 10**9, after // 10**9 + 1)}
        assert event.timestamp[:19] in seconds


def test_given_timestamp_is_kept_verbatim() -> None:
    event = accept_one(b'{"type":"a.b","payload":{},"timestamp":"2026-02-04T16:21:30.500+00:00"}')
    assert event.timestamp == "2026-02-04T16:21:30.500+00:00"


def test_ids_are_fresh_unless_the_message_names_one() -> None:
    body = (
        b'[{"type":"a.b","payload":{}},{"type":"a.b","payload":{}},'
        b'{"type":"a.b","payload":{},"id":"retry-7"}]'
    )
    events = [
        i.event for i in parse_broadcast(body, max_item_bytes=LIMIT) if isinstance(i, Accepted)
    ]
    assert len(events) == 3
    assert events[0].id != events[1].id
    assert all(len(e.id) == 32 for e in events[:2])
    assert events[2].id == "retry-7"


def test_payload_key_order_is_preserved() -> None:
    event = accept_one(b'{"type":"a.b","payload":{"z":1,"a":{"y":2,"b":3},"m":null}}')
    assert list(event.payload) == ["z", "a", "m"]
    assert list(event.payload["a"]) == ["y", "b"]


def test_null_routing_fields_are_absent_and_unknown_keys_ignored() -> None:
    event = accept_one(b'{"type":"a.b","payload":{},"task_id":null,"project_id":"","extra":1}')
    assert (event.task_id, event.project_id, event.extras) == ("", "", {})


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_broadcast_error(body: bytes) -> None:
    try:
        items = parse_broadcast(body, max_item_bytes=64)
    except BroadcastError:
        return
    assert all(isinstance(i, Accepted | Refused) for i in items)


json_scalars = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["type", "payload", "timestamp", "id", "task_id", "x"]) | st.text(),
            children,
            max_size=5,
        )
    ),
    max_leaves=15,
)


@given(st.lists(json_values, max_size=5))
def test_any_json_batch_yields_one_result_per_item(batch: list[Any]) -> None:
    items = parse_broadcast(orjson.dumps(batch), max_item_bytes=128)
    assert [i.index for i in items] == list(range(len(batch)))


# --- channel_data -------------------------------------------------------------------


def test_channel_data_is_flat_payload_then_type_and_timestamp() -> None:
    event = Event(
        id="e",
        type="quest.content_delta",
        payload={"content": "a<b", "delta": "é", "quest_id": "q-1"},
        timestamp="2026-02-04T16:21:01.104882311Z",
        task_id="ignored-for-channels",
    )
    assert (
        channel_data(event)
        == (
            '{"content":"a<b","delta":"é","quest_id":"q-1",'
            '"type":"quest.content_delta","timestamp":"2026-02-04T16:21:01.104882311Z"}'
        ).encode()
    )


def test_event_type_and_timestamp_win_over_payload_and_extras() -> None:
    event = Event(
        id="e",
        type="a.b",
        payload={"type": "old", "x": 1, "timestamp": "old", "y": 2},
        timestamp="T",
        extras={"type": "extra", "x": "from-extras", "z": 3},
    )
    assert channel_data(event) == b'{"x":"from-extras","y":2,"z":3,"type":"a.b","timestamp":"T"}'
    assert event.payload == {"type": "old", "x": 1, "timestamp": "old", "y": 2}


def test_channel_data_holds_about_its_own_size() -> None:
    # Kept in history for minutes: orjson's own output would hold a 4 KiB buffer each.
    event = Event(id="e", type="task.updated", payload={"task_id": "t-1"}, timestamp="T")
    tracemalloc.start()
    try:
        kept = [channel_data(event) for _ in range(100)]
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept[0]) < 100
    assert held < 100 * 256


@pytest.mark.parametrize("site", CORPUS, ids=[f"{i}-{s['event']}" for i, s in enumerate(CORPUS)])
def test_channel_data_carries_every_payload_field_of_each_site(site: dict[str, Any]) -> None:
    example = site["example"]
    data = orjson.loads(channel_data(accept_one(orjson.dumps(example))))
    payload_keys = [k for k in example["payload"] if k not in ("type", "timestamp")]
    assert list(data) == [*payload_keys, "type", "timestamp"]
    assert all(data[k] == example["payload"][k] for k in payload_keys)
    assert (data["type"], data["timestamp"]) == (example["type"], example["timestamp"])


# --- tool-use id pairing ------------------------------------------------------------


def activity_event(event_type: str, content: Any, **activity: Any) -> Event:
    return Event(
        id="e",
        type="activity.new",
        payload={
            "activity": {
                "content": content,
                "event_type": event_type,
                "id": "act-33d4e5f6",
                **activity,
            },
            "session_id": "sess-1",
            "task_id": "task-1",
        },
        timestamp="2026-02-04T16:21:37.147514185Z",
        task_id="task-1",
    )


@pytest.mark.parametrize(
    ("event_type", "content", "expected"),
    [
        ("tool_call", '{"tool_use_id":"toolu_01A","name":"bash","input":{}}', "toolu_01A"),
        ("tool_call", '{"id":"toolu_01B","name":"bash","input":{"cmd":"ls"}}', "toolu_01B"),
        ("tool_result", '{"name":"bash","result":{"call_id":"call_9","Output":""}}', "call_9"),
        ("tool_result", [{"type": "tool_result", "tool_use_id": "toolu_L"}], "toolu_L"),
        ("tool_call", {"name": "bash", "id": "toolu_obj"}, "toolu_obj"),
        # The outermost id wins over one nested in the tool input.
        ("tool_call", '{"input":{"tool_use_id":"toolu_inner"},"call_id":"outer"}', "outer"),
        # An `id` that is not a tool-use id is not one.
        ("tool_call", '{"id":"req-1","name":"bash","input":{}}', None),
        ("tool_call", '{"name":"bash","input":{"command":"go test"}}', None),
        ("tool_result", "plain text, not JSON", None),
        ("tool_result", None, None),
        ("assistant_response", '{"tool_use_id":"toolu_X"}', None),
    ],
)
def test_extract_tool_use_id(event_type: str, content: Any, expected: str | None) -> None:
    assert extract_tool_use_id(activity_event(event_type, content)) == expected


def test_extract_ignores_other_event_types() -> None:
    event = Event(
        id="e",
        type="quest.tool_call",
        payload={"activity": {"event_type": "tool_call", "content": '{"call_id":"c"}'}},
        timestamp="T",
    )
    assert extract_tool_use_id(event) is None


def test_legacy_corpus_activities_carry_no_tool_use_id() -> None:
    # The product's recorded tool calls and results have none: the pairing bug is real.
    [site] = [s for s in CORPUS if s["event"] == "activity.new"]
    examples = [e["example"] for e in site["examples_by_event_type"].values()]
    assert {"tool_call", "tool_result"} <= {
        e["payload"]["activity"]["event_type"] for e in examples
    }
    for example in examples:
        assert extract_tool_use_id(accept_one(orjson.dumps(example))) is None


def test_with_tool_use_id_reaches_channels_and_leaves_the_legacy_frame_alone() -> None:
    event = activity_event("tool_call", '{"name":"bash","input":{},"id":"toolu_01Z"}', hat=None)
    frame_before = encode_legacy_frame(event)
    payload_before = copy.deepcopy(event.payload)

    paired = with_tool_use_id(event)

    assert encode_legacy_frame(paired) == frame_before
    assert paired.payload == payload_before
    assert "tool_use_id" not in frame_before
    data = orjson.loads(channel_data(paired))
    assert list(data["activity"]) == ["content", "event_type", "id", "hat", "tool_use_id"]
    assert data["activity"]["tool_use_id"] == "toolu_01Z"
    assert list(data) == ["activity", "session_id", "task_id", "type", "timestamp"]


def test_with_tool_use_id_returns_the_same_event_when_nothing_to_add() -> None:
    plain = activity_event("tool_call", '{"name":"bash","input":{}}')
    already = activity_event("tool_result", '{"call_id":"c"}', tool_use_id="toolu_known")
    assert with_tool_use_id(plain) is plain
    assert with_tool_use_id(already) is already
    assert extract_tool_use_id(already) == "toolu_known"


def test_ingest_adds_tool_use_id_for_channel_clients() -> None:
    wire = (
        '{"type":"activity.new","timestamp":"2026-02-04T16:21:37.147514185Z","payload":'
        '{"activity":{"content":"{\\"tool_use_id\\":\\"toolu_01Q\\",\\"name\\":\\"bash\\"}",'
        '"event_type":"tool_call","id":"act-1"},"task_id":"task-1"},"task_id":"task-1"}'
    )
    event = accept_one(wire.encode())
    assert encode_legacy_frame(event) == wire
    assert orjson.loads(channel_data(event))["activity"]["tool_use_id"] == "toolu_01Q"


_ITEMS = st.lists(
    st.one_of(
        st.integers(-(10**12), 10**12),
        st.text(max_size=6),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["task.updated", "é.€", "𝄞"]),
                "payload": st.dictionaries(
                    st.text(max_size=4),
                    st.one_of(st.integers(-100, 100), st.text(max_size=6)),
                    max_size=3,
                ),
            }
        ),
    ),
    max_size=6,
)


@given(items=_ITEMS, first_slice=st.integers(1, 9), space=st.sampled_from(["", " ", "\n\t "]))
def test_a_body_decoded_in_small_slices_reads_as_a_whole(
    items: list[Any], first_slice: int, space: str
) -> None:
    body = (
        "[" + space + ("," + space).join(orjson.dumps(i).decode() for i in items) + "]"
    ).encode()
    expected = [(type(i), i.index) for i in parse_broadcast(body, max_item_bytes=1 << 20)]
    saved = broadcast_module._FIRST_SLICE
    broadcast_module._FIRST_SLICE = first_slice
    try:
        sliced = parse_broadcast(body, max_item_bytes=1 << 20)
    finally:
        broadcast_module._FIRST_SLICE = saved
    assert (
        [(type(i), i.index) for i in sliced]
        == expected
        == [(Accepted if isinstance(i, dict) else Refused, n) for n, i in enumerate(items)]
    )


def test_a_body_past_the_item_cap_is_refused_without_decoding_the_rest() -> None:
    items = b",".join([b'{"type":"t","payload":{}}'] * 5000)
    # Invalid UTF-8 far past the cap: never decoded, so the answer is the cap's.
    body = b"[" + items + b"," + b'"' + b"\xff" * 10 + b'"]'
    with pytest.raises(TooManyItems):
        parse_broadcast(body, max_item_bytes=1024, max_items=1000)
    with pytest.raises(BroadcastError, match="utf-8"):
        parse_broadcast(body, max_item_bytes=1024)
