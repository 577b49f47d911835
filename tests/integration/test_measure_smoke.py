"""The measurement tool (loadtests/measure_core.py) works end to end on a tiny run.

Not a performance test: the figures' sizes are never asserted, only that the run
completes, loses nothing and reports readings."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest

from loadtests.measure_core import (
    Options,
    Publisher,
    Tally,
    close_clients,
    main,
    open_clients,
    percentile,
    ping_count,
    run_measurements,
    sent_times,
    spawned_server,
    wait_deliveries,
)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 100) == 100
    assert percentile([7, 9], 50) == 7
    assert percentile([7, 9], 51) == 9
    with pytest.raises(ValueError):
        percentile([], 50)


def test_frames_with_several_messages_are_split_cheaply() -> None:
    frame = (
        '{"push":{"channel":"task:latency","pub":{"data":{"task_id":"latency","sent_ns":17,'
        '"seq":0},"offset":1}}}\n{}\n'
        '{"push":{"channel":"task:latency","pub":{"data":{"sent_ns":42},"offset":2}}}'
    )
    assert sent_times(frame) == [17, 42]
    assert ping_count(frame) == 1
    assert ping_count("{}") == 1
    assert ping_count('{"id":1,"connect":{}}') == 0


async def test_small_run_completes_without_loss() -> None:
    options = Options(
        connections=20,
        subscribers=10,
        publications=10,
        interval_ms=10,
        settle_interval=0.1,
        settle_window=3,
        settle_timeout=3,
        delivery_timeout=5,
    )
    results = await asyncio.wait_for(run_measurements(options), timeout=14)

    assert [r.memory.compression for r in results] == [False, True]
    for result in results:
        memory, latency = result.memory, result.latency
        assert result.lost == 0
        assert memory.delivered == 20 * options.first_messages
        assert latency.delivered == 10 * 10
        assert memory.rss_before_kib > 0
        assert memory.rss_connected_kib > 0
        assert memory.rss_messaged_kib > 0
        values = [latency.p50_ms, latency.p95_ms, latency.p99_ms, latency.max_ms]
        assert latency.post_p50_ms > 0
        assert all(v > 0 and math.isfinite(v) for v in values)
        assert values == sorted(values)
    # The server's switch decides: every client offered permessage-deflate.
    assert results[0].memory.negotiated == 0
    assert results[1].memory.negotiated == 20


async def test_idle_clients_answer_server_pings(tmp_path: Path) -> None:
    # Pings every second, 1 s to answer: a client that ignored them would be
    # closed (3012) well within the wait below.
    options = Options(
        server_settings=(
            ("client_ping_interval_seconds", "1"),
            ("client_pong_timeout_seconds", "1"),
        )
    )
    async with spawned_server(tmp_path, compression=False, options=options) as server:
        tally = Tally()
        clients = await open_clients(
            server, count=3, channel="task:idle", user_prefix="p", tally=tally, options=options
        )
        try:
            await asyncio.sleep(3.5)
            async with httpx.AsyncClient(timeout=5) as http:
                await Publisher(server, http).publish("idle", measured=True, seq=0)
            await wait_deliveries(tally, 3, timeout=5)
        finally:
            await close_clients(clients)
    assert tally.dropped == 0, tally.close_codes
    assert tally.deliveries == 3


def test_cli_rejects_overriding_the_settings_it_controls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--set", "websocket_compression=true"])
    assert exc.value.code == 2
    assert "websocket_compression" in capsys.readouterr().err
