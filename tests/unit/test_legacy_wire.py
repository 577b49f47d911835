"""The legacy frame text: byte parity with Go's encoding/json on the recorded corpus."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from legacy.wire import (
    encode_go_json,
    encode_legacy_frame,
    go_float,
)
from shim.core.broadcast import Accepted, parse_broadcast
from shim.core.events import Event, go_timestamp, now_timestamp

# Vendored with the repository (tests/data/README.md says where it came from).
CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "legacy-broadcasts.json"
GO_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z$")


def load_corpus() -> list[dict[str, Any]]:
    """Every emitting site's example and Go wire text. A missing file fails the run."""
    corpus: list[dict[str, Any]] = orjson.loads(CORPUS_PATH.read_bytes())
    return corpus


def corpus_vectors() -> list[tuple[str, dict[str, Any], str]]:
    """(label, example, wire): the 49 sites plus the per-kind activity.new examples."""
    vectors = []
    for index, site in enumerate(load_corpus()):
        label = f"{index}-{site['event']}-{site['file']}:{site['line']}"
        vectors.append((label, site["example"], site["wire"]))
        for kind, extra in (site.get("examples_by_event_type") or {}).items():
            vectors.append((f"{label}-{kind}", extra["example"], extra["wire"]))
    return vectors


CORPUS = load_corpus()
VECTORS = corpus_vectors()


def event_from(body: bytes) -> Event:
    [item] = parse_broadcast(body, max_item_bytes=1 << 20)
    assert isinstance(item, Accepted), item
    return item.event


def test_corpus_has_every_emitting_site() -> None:
    assert len(CORPUS) == 49
    assert len({v[0] for v in VECTORS}) == len(VECTORS) > 49


@pytest.mark.parametrize(("label", "example", "wire"), VECTORS, ids=[v[0] for v in VECTORS])
def test_example_encodes_to_go_wire_text(label: str, example: dict[str, Any], wire: str) -> None:
    event = event_from(orjson.dumps(example))
    assert encode_legacy_frame(event) == wire


@pytest.mark.parametrize(("label", "example", "wire"), VECTORS, ids=[v[0] for v in VECTORS])
def test_go_wire_text_survives_ingest_unchanged(
    label: str, example: dict[str, Any], wire: str
) -> None:
    # What the backend actually sends is Go's own bytes; the shim must hand them back as-is.
    assert encode_legacy_frame(event_from(wire.encode())) == wire


def test_frame_keys_follow_go_envelope_order() -> None:
    event = Event(
        id="e1",
        type="task.updated",
        payload={"status": "running"},
        timestamp="2026-02-04T16:21:55Z",
        task_id="task-1",
        project_id="proj-1",
    )
    assert encode_legacy_frame(event) == (
        '{"type":"task.updated","timestamp":"2026-02-04T16:21:55Z",'
        '"payload":{"status":"running"},"task_id":"task-1","project_id":"proj-1"}'
    )


def test_frame_omits_empty_routing_fields() -> None:
    event = Event(id="e", type="x.y", payload={}, timestamp="2026-02-04T16:21:55Z")
    assert encode_legacy_frame(event) == (
        '{"type":"x.y","timestamp":"2026-02-04T16:21:55Z","payload":{}}'
    )
    only_project = Event(id="e", type="x.y", payload={}, timestamp="T", project_id="p")
    assert encode_legacy_frame(only_project) == (
        '{"type":"x.y","timestamp":"T","payload":{},"project_id":"p"}'
    )


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (1770222090_500000000, "2026-02-04T16:21:30.5Z"),
        (1770222115_000000000, "2026-02-04T16:21:55Z"),
        (1770222061_104882311, "2026-02-04T16:21:01.104882311Z"),
        (1770222090_120000000, "2026-02-04T16:21:30.12Z"),
        (1770222090_000000001, "2026-02-04T16:21:30.000000001Z"),
        (0, "1970-01-01T00:00:00Z"),
        (-1, "1969-12-31T23:59:59.999999999Z"),
        (951825600_000000000, "2000-02-29T12:00:00Z"),
        (253402300799_999999999, "9999-12-31T23:59:59.999999999Z"),
    ],
)
def test_go_timestamp(ns: int, text: str) -> None:
    assert go_timestamp(ns) == text


def test_go_timestamp_refuses_years_go_cannot_write() -> None:
    with pytest.raises(ValueError):
        go_timestamp(253402300800 * 1_000_000_000)


def test_now_timestamp_is_current_go_text() -> None:
    before = time.time_ns() // 1_000_000_000
    text = now_timestamp()
    after = time.time_ns() // 1_000_000_000
    assert GO_TIMESTAMP.match(text)
    assert text[:19] in {go_timestamp(s * 1_000_000_000)[:19] for s in range(before, after + 1)}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3.0, "3"),
        (-0.0, "-0"),
        (0.0, "0"),
        (0.5, "0.5"),
        (0.1, "0.1"),
        (123.456, "123.456"),
        (12.5, "12.5"),
        (1e-6, "0.000001"),
        (1.5e-5, "0.000015"),
        (1e-7, "1e-7"),
        (2.5e-10, "2.5e-10"),
        (1e-100, "1e-100"),
        (5e-324, "5e-324"),
        (1e16, "10000000000000000"),
        (1e20, "100000000000000000000"),
        (123456789012345680000.0, "123456789012345680000"),
        (1e21, "1e+21"),
        (-1.5e21, "-1.5e+21"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
    ],
)
def test_go_float_text(value: float, text: str) -> None:
    assert go_float(value) == text
    assert encode_go_json({"v": value}) == '{"v":' + text + "}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(value: float) -> None:
    with pytest.raises(ValueError):
        encode_go_json({"estimated_budget": value})


def test_floats_are_rewritten_at_any_depth_without_touching_the_input() -> None:
    value = {"a": [1, 2.0, {"b": (1e-7, "x")}], "c": True, "d": None}
    assert encode_go_json(value) == '{"a":[1,2,{"b":[1e-7,"x"]}],"c":true,"d":null}'
    assert value == {"a": [1, 2.0, {"b": (1e-7, "x")}], "c": True, "d": None}


def test_go_string_escapes() -> None:
    value = {"<k&>": 'a<b>&c \u2028\u2029 é ✓ \x08\x0c\n\r\t\x01\x1f\x7f "q" \\ \\u0026'}
    assert encode_go_json(value) == (
        '{"\\u003ck\\u0026\\u003e":"a\\u003cb\\u003e\\u0026c \\u2028\\u2029 é ✓ '
        '\\b\\f\\n\\r\\t\\u0001\\u001f\x7f \\"q\\" \\\\ \\\\u0026"}'
    )


def test_key_order_is_kept_not_sorted() -> None:
    assert encode_go_json({"z": 1, "a": {"y": 2, "b": 3}}) == '{"z":1,"a":{"y":2,"b":3}}'


@pytest.mark.parametrize("value", [{"n": 1 << 64}, {"s": "\ud800"}, {1: "non-string key"}])
def test_values_json_cannot_hold_are_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        encode_go_json(value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"])), children, max_size=4)
    ),
    max_leaves=20,
)


def same_json(decoded: Any, original: Any) -> bool:
    # Go writes integral floats without a fraction, so they decode as ints: compare as floats.
    if isinstance(original, float):
        return isinstance(decoded, int | float) and float(decoded) == original
    if isinstance(original, list):
        return (
            isinstance(decoded, list)
            and len(decoded) == len(original)
            and all(same_json(d, o) for d, o in zip(decoded, original, strict=True))
        )
    if isinstance(original, dict):
        return (
            isinstance(decoded, dict)
            and list(decoded) == list(original)
            and all(same_json(decoded[k], v) for k, v in original.items())
        )
    return bool(decoded == original and type(decoded) is type(original))


@given(json_values)
def test_go_json_decodes_to_the_same_value(value: Any) -> None:
    text = encode_go_json(value)
    assert same_json(orjson.loads(text), value)
    assert not re.search("[<>&\u2028\u2029]", text)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_go_float_round_trips(value: float) -> None:
    text = go_float(value)
    assert float(text) == value
    assert not text.endswith(".0")
    assert ("e" in text) == (value != 0 and not 1e-6 <= abs(value) < 1e21)
