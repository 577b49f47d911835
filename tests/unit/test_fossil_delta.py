"""Fossil deltas: what we create, centrifuge-python's own applier turns back into
the target (centrifuge-js's applier is exercised end to end in the SDK suites);
deltas are computed once per publication and shared by subscribers in sync."""

from __future__ import annotations

import orjson
from centrifuge.fossil import apply_delta  # type: ignore[import-untyped]
from centrifuge.fossil import checksum as sdk_checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.centrifuge import fossil, pbcodec
from shim.centrifuge.fanout import PreparedPublication
from shim.centrifuge.wire import JSON, PROTOBUF, delta_chain
from shim.core.broker import Publication
from tests.streams import content_event


@st.composite
def edited(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A source and a target made from it by a few inserts, deletes and moves."""
    alphabet = st.sampled_from(list(b'ab{}":, \n\xc3\xa9x0123456789'))
    source = bytes(draw(st.lists(alphabet, max_size=300)))
    target = bytearray(source)
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(target)))
        kind = draw(st.sampled_from(["insert", "delete", "copy"]))
        if kind == "insert":
            target[at:at] = bytes(draw(st.lists(alphabet, min_size=1, max_size=80)))
        elif kind == "delete":
            del target[at : at + draw(st.integers(1, 50))]
        elif source:
            start = draw(st.integers(0, len(source) - 1))
            target[at:at] = source[start : start + draw(st.integers(1, 120))]
    return source, bytes(target)


@settings(max_examples=400)
@given(edited())
def test_sdk_applier_rebuilds_the_target(pair: tuple[bytes, bytes]) -> None:
    source, target = pair
    assert apply_delta(source, fossil.create(source, target)) == target


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_unrelated_bytes_round_trip_too(source: bytes, target: bytes) -> None:
    assert apply_delta(source, fossil.create(source, target)) == target


@given(st.binary(max_size=100))
def test_checksum_matches_the_sdk(data: bytes) -> None:
    assert fossil.checksum(data) == sdk_checksum(data)


def test_growing_text_delta_is_small() -> None:
    before = orjson.dumps(content_event("q", 150)["payload"])
    after = orjson.dumps(content_event("q", 151)["payload"])
    patch = fossil.create(before, after)
    assert apply_delta(before, patch) == after
    assert len(patch) < 80 < len(after) // 10


def pub(step: int, offset: int) -> Publication:
    return Publication(data=orjson.dumps(content_event("q", step)["payload"]), offset=offset)


def test_subscribers_in_sync_share_one_delta_encoding() -> None:
    first, second = pub(1, 1), pub(2, 2)
    prepared = PreparedPublication("quest:q", second, first)
    in_sync = [prepared.delta_push(JSON, first) for _ in range(3)]
    assert all(p is in_sync[0] for p in in_sync)  # encoded once, shared
    body = orjson.loads(in_sync[0])["push"]["pub"]
    assert body["delta"] is True and body["offset"] == 2
    assert apply_delta(first.data, body["data"].encode()) == second.data
    # A subscriber that did not get `first` (just subscribed) gets the full text, as a string.
    full = orjson.loads(prepared.delta_push(JSON, None))["push"]["pub"]
    assert "delta" not in full and full["data"] == second.data.decode()
    # Without delta: the ordinary push, raw JSON data.
    assert orjson.loads(prepared.push(JSON))["push"]["pub"]["data"] == orjson.loads(second.data)


def test_protobuf_delta_push_carries_the_patch_as_bytes() -> None:
    import centrifuge.protocol.client_pb2 as sdk  # type: ignore[import-untyped]

    first, second = pub(5, 1), pub(6, 2)
    prepared = PreparedPublication("quest:q", second, first)
    (raw,) = pbcodec.split_frame(prepared.delta_push(PROTOBUF, first))
    got = sdk.Reply.FromString(raw).push.pub
    assert got.delta and apply_delta(first.data, got.data) == second.data
    (raw,) = pbcodec.split_frame(prepared.delta_push(PROTOBUF, None))
    full = sdk.Reply.FromString(raw).push.pub
    assert not full.delta and full.data == second.data


def test_a_delta_that_is_not_smaller_is_sent_in_full() -> None:
    first = Publication(data=b'{"a":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}', offset=1)
    second = Publication(data=b"[1,2]", offset=2)
    body = orjson.loads(PreparedPublication("c", second, first).delta_push(JSON, first))
    assert "delta" not in body["push"]["pub"] and body["push"]["pub"]["data"] == "[1,2]"


def test_recovered_publications_form_a_chain() -> None:
    pubs = [pub(step, step) for step in range(1, 5)]
    chain = delta_chain(pubs)
    assert chain[0] == (pubs[0], None)
    data = pubs[0].data
    for (publication, patch), expected in zip(chain[1:], pubs[1:], strict=True):
        assert publication is expected and patch is not None
        data = apply_delta(data, patch)
        assert data == expected.data


def test_each_wire_encodes_a_publication_once() -> None:
    prepared = PreparedPublication("quest:q", pub(3, 3), pub(2, 2))
    json_pushes = {id(prepared.push(JSON)) for _ in range(5)}
    protobuf_pushes = {id(prepared.push(PROTOBUF)) for _ in range(5)}
    assert len(json_pushes) == 1 and len(protobuf_pushes) == 1
    assert prepared.push(JSON) != prepared.push(PROTOBUF)
