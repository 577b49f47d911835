"""The memory engine's state stays bounded: streams are made by publishes only, and
at most `max_streams` are kept."""

from __future__ import annotations

import pytest

from adapters.brokers.memory import MemoryBroker
from shim.core.broker import Publication, PublishOptions, StreamPosition, UnrecoverablePosition

KEEP = PublishOptions(history_size=10, history_ttl_seconds=60.0, history_meta_ttl_seconds=600.0)


class Handler:
    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        pass

    def on_join(self, channel: str, info: object) -> None:
        pass

    def on_leave(self, channel: str, info: object) -> None:
        pass


async def started(**options: int) -> MemoryBroker:
    broker = MemoryBroker(**options)  # type: ignore[arg-type]
    await broker.start(Handler())  # type: ignore[arg-type]
    return broker


async def test_subscribing_and_reading_fresh_channels_keeps_nothing() -> None:
    broker = await started()
    for n in range(5000):
        channel = f"task:fresh-{n}"
        await broker.subscribe(channel)
        position = (await broker.history(channel, limit=0, options=KEEP)).position
        assert position.offset == 0
        await broker.unsubscribe(channel)
    assert broker.stream_count == 0
    await broker.publish("task:fresh-1", Publication(data=b"{}"), KEEP)
    assert broker.stream_count == 1


async def test_streams_are_capped_least_recently_published_first() -> None:
    broker = await started(max_streams=10)
    positions = {}
    for n in range(25):
        positions[n] = await broker.publish(f"c{n}", Publication(data=b"{}"), KEEP)
    # c15..c24 are kept; c15 is published again: now the most recent, it survives.
    await broker.publish("c15", Publication(data=b"{}"), KEEP)
    for n in range(25, 34):
        await broker.publish(f"c{n}", Publication(data=b"{}"), KEEP)
    assert broker.stream_count == 10
    assert (await broker.history("c15", limit=0)).position.offset == 2
    assert (await broker.history("c0", limit=0)).position.offset == 0  # dropped long ago
    # A dropped stream's old position is not taken for its next one.
    with pytest.raises(UnrecoverablePosition):
        await broker.history("c20", since=positions[20], limit=-1)


async def test_a_blank_position_recovers_only_the_stream_born_after_it() -> None:
    broker = await started()
    blank = (await broker.history("a", limit=0)).position
    for _ in range(3):
        await broker.publish("a", Publication(data=b"{}"), KEEP)
    # A subscriber that followed the three live still holds the blank epoch.
    followed = StreamPosition(2, blank.epoch)
    assert [
        p.offset for p in (await broker.history("a", since=followed, limit=-1)).publications
    ] == [3]
    # Once that stream is gone and another is made, the blank position means nothing.
    await broker.remove_history("a")
    await broker.publish("a", Publication(data=b"{}"), KEEP)
    with pytest.raises(UnrecoverablePosition):
        await broker.history("a", since=followed, limit=-1)
    # A position at 0 saw nothing: whatever its epoch, it recovers from the start.
    fresh = await broker.history("a", since=StreamPosition(0, blank.epoch), limit=-1)
    assert [p.offset for p in fresh.publications] == [1]


async def test_an_idle_channels_publications_go_after_their_ttl_its_position_stays() -> None:
    now = [1000.0]
    broker = MemoryBroker(clock=lambda: now[0])
    await broker.start(Handler())  # type: ignore[arg-type]
    short = PublishOptions(
        history_size=100, history_ttl_seconds=5.0, history_meta_ttl_seconds=600.0
    )
    for n in range(100):
        await broker.publish("task:idle", Publication(data=b'{"n":%d}' % n), short)
    top = (await broker.history("task:idle", limit=0)).position

    now[0] += 6.0
    # Any later publish sweeps: the idle stream keeps its position but no publications.
    await broker.publish("task:busy", Publication(data=b"{}"), short)

    assert broker._streams["task:idle"].entries is None
    after = await broker.history("task:idle", limit=-1)
    assert after.publications == [] and after.position == top
    resumed = await broker.publish("task:idle", Publication(data=b"{}"), short)
    assert resumed == StreamPosition(top.offset + 1, top.epoch)
