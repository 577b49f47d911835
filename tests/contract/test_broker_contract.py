"""Broker contract: offsets, history reads, expiry, epochs and delivery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shim.core.broker import (
    BrokerUnavailable,
    ClientInfo,
    Fence,
    LegacyFrame,
    Publication,
    PublishOptions,
    StreamPosition,
    Superseded,
    UnrecoverablePosition,
)
from tests.contract.conftest import EngineUnderTest

AdvanceTime = Callable[[float], Awaitable[None]]

KEEP_10 = PublishOptions(history_size=10, history_ttl_seconds=60.0, history_meta_ttl_seconds=600.0)
NO_HISTORY = PublishOptions()


def pub(n: int) -> Publication:
    return Publication(data=b'{"n":%d}' % n)


def offsets(pubs: list[Publication]) -> list[int]:
    return [p.offset for p in pubs]


async def publish_many(
    engine: EngineUnderTest, channel: str, count: int, options: PublishOptions = KEEP_10
) -> list[StreamPosition]:
    return [await engine.broker.publish(channel, pub(n), options) for n in range(1, count + 1)]


async def test_concurrent_publishes_get_offsets_one_to_n(
    engine: EngineUnderTest, channel: str
) -> None:
    await engine.broker.subscribe(channel)
    options = PublishOptions(history_size=500, history_ttl_seconds=60.0)

    positions = await asyncio.gather(
        *(engine.broker.publish(channel, pub(n), options) for n in range(200))
    )

    assert sorted(p.offset for p in positions) == list(range(1, 201))
    epochs = {p.epoch for p in positions}
    assert len(epochs) == 1
    assert "" not in epochs
    await engine.delivered(lambda: len(engine.handler.publications_of(channel)) == 200)
    delivered = engine.handler.publications_of(channel)
    assert [p.offset for p, _ in delivered] == list(range(1, 201))
    assert {epoch for _, epoch in delivered} == epochs
    # The offset each publisher was told is the one its publication carries.
    told = {pub(n).data: pos.offset for n, pos in enumerate(positions)}
    assert {p.data: p.offset for p, _ in delivered} == told


async def test_offsets_are_counted_per_channel(
    engine: EngineUnderTest, channel: str, other_channel: str
) -> None:
    for n in range(3):
        await engine.broker.publish(channel, pub(n), KEEP_10)
        await engine.broker.publish(other_channel, pub(n), KEEP_10)

    first = await engine.broker.history(channel, limit=-1)
    second = await engine.broker.history(other_channel, limit=-1)

    assert offsets(first.publications) == [1, 2, 3]
    assert offsets(second.publications) == [1, 2, 3]
    assert first.position.epoch != second.position.epoch


async def test_history_returns_what_was_published(engine: EngineUnderTest, channel: str) -> None:
    info = ClientInfo(user="42", client="c-1", conn_info=b'{"a":1}', chan_info=b'{"b":2}')
    sent = Publication(data=b'{"text":"hi"}', info=info, time_ms=1_700_000_000_123)

    position = await engine.broker.publish(channel, sent, KEEP_10)
    result = await engine.broker.history(channel, limit=-1)

    assert position.offset == 1
    assert result.position == position
    [got] = result.publications
    assert (got.data, got.offset, got.info, got.time_ms) == (sent.data, 1, info, sent.time_ms)


@pytest.mark.parametrize(
    ("limit", "reverse", "expected"),
    [
        (-1, False, [1, 2, 3, 4, 5]),
        (-1, True, [5, 4, 3, 2, 1]),
        (2, False, [1, 2]),
        (2, True, [5, 4]),
        (9, False, [1, 2, 3, 4, 5]),
        (0, False, []),
        (0, True, []),
    ],
)
async def test_history_without_since(
    engine: EngineUnderTest, channel: str, limit: int, reverse: bool, expected: list[int]
) -> None:
    positions = await publish_many(engine, channel, 5)

    result = await engine.broker.history(channel, limit=limit, reverse=reverse)

    assert offsets(result.publications) == expected
    assert [p.data for p in result.publications] == [pub(n).data for n in expected]
    assert result.position == positions[-1]


@pytest.mark.parametrize(
    ("since", "limit", "reverse", "expected"),
    [
        (2, -1, False, [3, 4, 5]),
        (2, 2, False, [3, 4]),
        (0, -1, False, [1, 2, 3, 4, 5]),
        (5, -1, False, []),
        (4, -1, True, [3, 2, 1]),
        (4, 1, True, [3]),
        (1, -1, True, []),
        (6, -1, True, [5, 4, 3, 2, 1]),
        (2, 0, False, []),
    ],
)
async def test_history_since(
    engine: EngineUnderTest,
    channel: str,
    since: int,
    limit: int,
    reverse: bool,
    expected: list[int],
) -> None:
    positions = await publish_many(engine, channel, 5)
    epoch = positions[-1].epoch

    result = await engine.broker.history(
        channel, since=StreamPosition(since, epoch), limit=limit, reverse=reverse
    )

    assert offsets(result.publications) == expected
    assert result.position == StreamPosition(5, epoch)


async def test_since_without_epoch_skips_the_epoch_check(
    engine: EngineUnderTest, channel: str
) -> None:
    await publish_many(engine, channel, 3)

    result = await engine.broker.history(channel, since=StreamPosition(1, ""), limit=-1)

    assert offsets(result.publications) == [2, 3]


@pytest.mark.parametrize("limit", [-1, 0, 3])
async def test_since_with_another_epoch_is_unrecoverable(
    engine: EngineUnderTest, channel: str, limit: int
) -> None:
    positions = await publish_many(engine, channel, 3)
    stale = StreamPosition(1, positions[-1].epoch + "x")

    with pytest.raises(UnrecoverablePosition):
        await engine.broker.history(channel, since=stale, limit=limit)


async def test_history_keeps_only_the_last_history_size(
    engine: EngineUnderTest, channel: str
) -> None:
    options = PublishOptions(history_size=3, history_ttl_seconds=60.0)
    positions = await publish_many(engine, channel, 7, options)
    epoch = positions[-1].epoch

    everything = await engine.broker.history(channel, limit=-1)
    # A trimmed `since` yields the oldest kept: the caller sees the gap (4 != 1 + 1).
    from_trimmed = await engine.broker.history(channel, since=StreamPosition(1, epoch), limit=-1)

    assert offsets(everything.publications) == [5, 6, 7]
    assert everything.position == StreamPosition(7, epoch)
    assert offsets(from_trimmed.publications) == [5, 6, 7]


@pytest.mark.parametrize(
    "options",
    [
        NO_HISTORY,
        PublishOptions(history_size=10, history_ttl_seconds=0.0),
        PublishOptions(history_size=0, history_ttl_seconds=60.0),
    ],
)
async def test_publish_without_history_delivers_at_offset_zero(
    engine: EngineUnderTest, channel: str, options: PublishOptions
) -> None:
    await engine.broker.subscribe(channel)

    position = await engine.broker.publish(channel, pub(1), options)

    assert position == StreamPosition(0, "")
    await engine.delivered(lambda: len(engine.handler.publications_of(channel)) == 1)
    assert engine.handler.publications_of(channel) == [(pub(1), "")]
    result = await engine.broker.history(channel, limit=-1)
    assert result.publications == []
    assert result.position.offset == 0


async def test_a_reader_of_an_unknown_channel_recovers_its_first_publications(
    engine: EngineUnderTest, channel: str
) -> None:
    first = await engine.broker.history(channel, limit=-1, options=KEEP_10)
    again = await engine.broker.history(channel, limit=0)

    assert first.publications == []
    assert first.position.offset == 0
    assert first.position.epoch != ""
    assert again.position == first.position

    await publish_many(engine, channel, 2)
    # The subscriber who saw the empty stream recovers everything published since.
    recovered = await engine.broker.history(channel, since=first.position, limit=-1)

    assert offsets(recovered.publications) == [1, 2]
    assert recovered.position.offset == 2
    # Having followed those live (offset 2, the epoch it was told), it is up to date.
    caught_up = StreamPosition(2, first.position.epoch)
    assert (await engine.broker.history(channel, since=caught_up, limit=-1)).publications == []


async def test_reading_or_subscribing_to_a_fresh_channel_stores_nothing(
    engine: EngineUnderTest, channel: str
) -> None:
    # What a subscribe does to the engine: listen, position, recover from there.
    await engine.broker.subscribe(channel)
    seen = await engine.broker.history(channel, limit=0, options=KEEP_10)
    await engine.broker.history(channel, since=seen.position, limit=-1, options=KEEP_10)
    await engine.broker.history(channel, limit=-1, reverse=True)
    await engine.broker.remove_history(channel)
    await engine.broker.unsubscribe(channel)

    assert not await engine.stores_stream(channel)
    await engine.broker.publish(channel, pub(1), KEEP_10)
    assert await engine.stores_stream(channel)


async def test_a_blank_position_followed_live_is_unrecoverable_after_a_removal(
    engine: EngineUnderTest, channel: str
) -> None:
    first = await engine.broker.history(channel, options=KEEP_10)
    await publish_many(engine, channel, 2)
    followed = StreamPosition(2, first.position.epoch)

    await engine.broker.remove_history(channel)
    await engine.broker.publish(channel, pub(3), KEEP_10)

    with pytest.raises(UnrecoverablePosition):
        await engine.broker.history(channel, since=followed, limit=-1)


async def test_reading_without_options_also_positions_the_reader(
    engine: EngineUnderTest, channel: str
) -> None:
    seen = await engine.broker.history(channel)

    position = await engine.broker.publish(channel, pub(1), KEEP_10)
    recovered = await engine.broker.history(channel, since=seen.position, limit=-1)

    assert position.offset == 1
    assert offsets(recovered.publications) == [1]


async def test_remove_history_starts_a_new_epoch(engine: EngineUnderTest, channel: str) -> None:
    old = (await publish_many(engine, channel, 3))[-1]

    await engine.broker.remove_history(channel)
    emptied = await engine.broker.history(channel, limit=-1)
    position = await engine.broker.publish(channel, pub(4), KEEP_10)

    assert emptied.publications == []
    assert emptied.position.offset == 0
    assert emptied.position.epoch not in ("", old.epoch)
    assert position.offset == 1 and position.epoch not in ("", old.epoch)
    with pytest.raises(UnrecoverablePosition):
        await engine.broker.history(channel, since=old, limit=-1)


@pytest.mark.expiry
async def test_history_expires_after_ttl_but_the_stream_goes_on(
    engine: EngineUnderTest, channel: str, advance_time: AdvanceTime
) -> None:
    options = PublishOptions(
        history_size=10, history_ttl_seconds=1.0, history_meta_ttl_seconds=10.0
    )
    top = (await publish_many(engine, channel, 3, options))[-1]

    await advance_time(1.5)
    expired = await engine.broker.history(channel, limit=-1)
    after = await engine.broker.publish(channel, pub(4), options)

    assert expired.publications == []
    assert expired.position == top
    assert after == StreamPosition(4, top.epoch)


@pytest.mark.expiry
async def test_each_publication_expires_on_its_own_ttl(
    engine: EngineUnderTest, channel: str, advance_time: AdvanceTime
) -> None:
    options = PublishOptions(
        history_size=10, history_ttl_seconds=1.0, history_meta_ttl_seconds=10.0
    )
    await engine.broker.publish(channel, pub(1), options)
    await advance_time(0.6)
    await engine.broker.publish(channel, pub(2), options)
    await advance_time(0.6)

    result = await engine.broker.history(channel, limit=-1)

    assert offsets(result.publications) == [2]
    assert result.position.offset == 2


@pytest.mark.expiry
async def test_meta_expiry_starts_a_new_epoch(
    engine: EngineUnderTest, channel: str, advance_time: AdvanceTime
) -> None:
    options = PublishOptions(history_size=10, history_ttl_seconds=1.0, history_meta_ttl_seconds=2.0)
    old = (await publish_many(engine, channel, 3, options))[-1]

    await advance_time(2.5)
    position = await engine.broker.publish(channel, pub(4), options)
    result = await engine.broker.history(channel, limit=-1)

    assert position.offset == 1
    assert position.epoch not in ("", old.epoch)
    assert offsets(result.publications) == [1]
    assert result.position == position
    with pytest.raises(UnrecoverablePosition):
        await engine.broker.history(channel, since=old, limit=-1)


@pytest.mark.expiry
async def test_meta_ttl_is_per_channel(
    engine: EngineUnderTest, channel: str, other_channel: str, advance_time: AdvanceTime
) -> None:
    short = PublishOptions(history_size=10, history_ttl_seconds=1.0, history_meta_ttl_seconds=2.0)
    lasting = (await publish_many(engine, other_channel, 1))[-1]
    old = (await publish_many(engine, channel, 2, short))[-1]

    await advance_time(2.5)
    reset = await engine.broker.publish(channel, pub(3), short)
    kept = await engine.broker.publish(other_channel, pub(2), KEEP_10)

    assert reset.offset == 1
    assert reset.epoch != old.epoch
    assert kept == StreamPosition(2, lasting.epoch)


@pytest.mark.expiry
async def test_meta_lives_on_after_publications_expire_until_its_own_ttl(
    engine: EngineUnderTest, channel: str, advance_time: AdvanceTime
) -> None:
    options = PublishOptions(history_size=10, history_ttl_seconds=1.0, history_meta_ttl_seconds=3.0)
    old = await engine.broker.publish(channel, pub(1), options)

    await advance_time(2.0)
    kept = await engine.broker.publish(channel, pub(2), options)
    await advance_time(3.5)
    reset = await engine.broker.publish(channel, pub(3), options)

    assert kept == StreamPosition(2, old.epoch)
    assert reset.offset == 1
    assert reset.epoch != old.epoch


@pytest.mark.expiry
async def test_a_position_from_before_an_expired_stream_is_unrecoverable(
    engine: EngineUnderTest, channel: str, advance_time: AdvanceTime
) -> None:
    options = PublishOptions(history_size=10, history_ttl_seconds=1.0, history_meta_ttl_seconds=2.0)
    first = await engine.broker.history(channel, options=options)
    await engine.broker.publish(channel, pub(1), options)
    followed = StreamPosition(1, first.position.epoch)

    await advance_time(2.5)
    second = await engine.broker.history(channel, options=options)
    await engine.broker.publish(channel, pub(2), options)

    assert second.position.offset == 0
    with pytest.raises(UnrecoverablePosition):
        await engine.broker.history(channel, since=followed, limit=-1)


async def test_delivery_only_while_subscribed(
    engine: EngineUnderTest, channel: str, other_channel: str
) -> None:
    # `other_channel` stays subscribed: once its publication arrives, an earlier
    # publication to `channel` would have arrived too.
    await engine.broker.subscribe(other_channel)

    before = await engine.broker.publish(channel, pub(1), KEEP_10)
    await engine.broker.publish(other_channel, pub(1), KEEP_10)
    await engine.delivered(lambda: len(engine.handler.publications_of(other_channel)) == 1)
    assert engine.handler.publications_of(channel) == []

    await engine.broker.subscribe(channel)
    legacy = LegacyFrame(event_id="e-2", frame=b'{"type":"x"}', task_id="t", project_id="p")
    sent = Publication(
        data=b'{"n":2}', info=ClientInfo(user="u", client="c"), time_ms=5, legacy=legacy
    )
    during = await engine.broker.publish(channel, sent, KEEP_10)
    await engine.delivered(lambda: len(engine.handler.publications_of(channel)) == 1)
    assert engine.handler.publications_of(channel) == [
        (
            Publication(data=sent.data, offset=2, info=sent.info, time_ms=5, legacy=legacy),
            during.epoch,
        )
    ]

    await engine.broker.unsubscribe(channel)
    await engine.broker.publish(channel, pub(3), KEEP_10)
    await engine.broker.publish(other_channel, pub(2), KEEP_10)
    await engine.delivered(lambda: len(engine.handler.publications_of(other_channel)) == 2)
    assert len(engine.handler.publications_of(channel)) == 1
    # Undelivered publications were still stored.
    history = await engine.broker.history(channel, limit=-1)
    assert offsets(history.publications) == [1, 2, 3]
    assert before.epoch == during.epoch


async def test_join_and_leave_reach_subscribed_channels_only(
    engine: EngineUnderTest, channel: str, other_channel: str
) -> None:
    alice = ClientInfo(user="alice", client="c-1", conn_info=b'{"name":"A"}')
    await engine.broker.subscribe(channel)

    await engine.broker.publish_join(other_channel, alice)
    await engine.broker.publish_join(channel, alice)
    await engine.broker.publish_leave(other_channel, alice)
    await engine.broker.publish_leave(channel, alice)

    await engine.delivered(lambda: len(engine.handler.leaves) >= 1)
    assert engine.handler.joins == [(channel, alice)]
    assert engine.handler.leaves == [(channel, alice)]
    assert engine.handler.publications == []


async def test_publish_after_close_is_refused(engine: EngineUnderTest, channel: str) -> None:
    await engine.broker.close()

    with pytest.raises(BrokerUnavailable):
        await engine.broker.publish(channel, pub(1), KEEP_10)


async def test_publish_many_keeps_each_channels_order(
    engine: EngineUnderTest, channel: str, other_channel: str
) -> None:
    # A channel's options are fixed (its namespace's), so one without history is its own.
    unkept_channel = other_channel + "-nohistory"
    for name in (channel, other_channel, unkept_channel):
        await engine.broker.subscribe(name)
    items = []
    for n in range(30):
        items.append((channel, pub(n), KEEP_10))
        items.append((other_channel, pub(100 + n), KEEP_10))
        if n % 10 == 0:
            items.append((unkept_channel, pub(1000 + n), NO_HISTORY))

    results = await engine.broker.publish_many(items)

    assert len(results) == len(items)
    assert not [r for r in results if isinstance(r, BrokerUnavailable)]
    kept = [r for (ch, _p, opts), r in zip(items, results, strict=True) if opts is KEEP_10]
    assert [
        r.offset for (ch, _p, o), r in zip(items, results, strict=True) if ch == channel
    ] == list(range(1, 31))
    assert all(isinstance(r, StreamPosition) and r.epoch for r in kept)
    unkept = [r for (_c, _p, opts), r in zip(items, results, strict=True) if opts is NO_HISTORY]
    assert unkept == [StreamPosition(0, "")] * 3

    await engine.delivered(lambda: len(engine.handler.publications_of(channel)) == 30)
    await engine.delivered(lambda: len(engine.handler.publications_of(other_channel)) == 30)
    await engine.delivered(lambda: len(engine.handler.publications_of(unkept_channel)) == 3)
    assert [p.data for p, _ in engine.handler.publications_of(channel)] == [
        pub(n).data for n in range(30)
    ]
    expected_other = [p.data for ch, p, _o in items if ch == other_channel]
    assert [p.data for p, _ in engine.handler.publications_of(other_channel)] == expected_other
    history = await engine.broker.history(channel, limit=-1)
    assert offsets(history.publications) == list(range(21, 31))


async def test_publish_many_after_close_reports_each_item_unavailable(
    engine: EngineUnderTest, channel: str
) -> None:
    await engine.broker.close()
    results = await engine.broker.publish_many([(channel, pub(1), KEEP_10)] * 2)
    assert all(isinstance(r, BrokerUnavailable) for r in results)


async def test_fenced_publishes_of_one_source_never_repeat_or_go_back(
    engine: EngineUnderTest, channel: str, other_channel: str
) -> None:
    """A writer that resumes with positions the channel already has (or older ones)
    publishes nothing; another source's positions are independent."""
    unkept_channel = other_channel + "-nohistory"
    for name in (channel, unkept_channel):
        await engine.broker.subscribe(name)
    a, b = "ingest:p0", "ingest:p1"

    def fenced(*items: tuple[str, int, str, tuple[int, int, int]]) -> Any:
        return engine.broker.publish_many(
            [(ch, pub(n), KEEP_10 if ch == channel else NO_HISTORY) for ch, n, _s, _p in items],
            [Fence(source, position) for _c, _n, source, position in items],
        )

    first = await fenced(
        (channel, 1, a, (5, 0, 0)),
        (unkept_channel, 1, a, (5, 0, 0)),
        (channel, 2, a, (5, 1, 0)),
        (channel, 3, a, (5, 1, 1)),  # the entry's second item
    )
    assert [type(r) for r in first] == [StreamPosition] * 4
    # The paused writer resumes: (5, 1, 1) again, older ones, then one the channel lacks.
    again = await fenced(
        (channel, 3, a, (5, 1, 1)),
        (channel, 1, a, (5, 0, 0)),
        (unkept_channel, 1, a, (5, 0, 0)),
        (channel, 4, a, (6, 0, 0)),
        (unkept_channel, 4, a, (6, 0, 0)),
    )
    assert [type(r) for r in again] == [Superseded] * 3 + [StreamPosition] * 2
    # Another source's older position is its own sequence: published.
    other = await fenced((channel, 5, b, (1, 0, 0)))
    assert isinstance(other[0], StreamPosition)

    history = await engine.broker.history(channel, limit=-1)
    assert [p.data for p in history.publications] == [pub(n).data for n in range(1, 6)]
    assert offsets(history.publications) == [1, 2, 3, 4, 5]
    await engine.delivered(lambda: len(engine.handler.publications_of(unkept_channel)) == 2)
    await engine.delivered(lambda: len(engine.handler.publications_of(channel)) == 5)
    assert [p.data for p, _ in engine.handler.publications_of(unkept_channel)] == [
        pub(1).data,
        pub(4).data,
    ]
    # Unfenced publishes are not affected by a channel's fences.
    plain = await engine.broker.publish_many([(channel, pub(6), KEEP_10)])
    assert isinstance(plain[0], StreamPosition) and plain[0].offset == 6
