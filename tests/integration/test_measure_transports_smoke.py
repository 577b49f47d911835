"""The transport measurement (loadtests/measure_transports.py) works end to end on a
tiny run of every transport. Not a performance test: only that every client kind
connects, subscribes, receives everything and that the report adds up."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from loadtests.measure_core import Options
from loadtests.measure_transports import (
    SERVER_SETTINGS,
    TRANSPORTS,
    TransportResult,
    median_result,
    parse_args,
    render_table,
    run_measurements,
)


def result(transport: str, idle: float, p50: float) -> TransportResult:
    return TransportResult(transport, 10, idle, True, 2, 3, 6, 6, p50, p50 * 2, 0)


def test_medians_over_rounds_and_ratios_to_websocket() -> None:
    runs = [result("sse", 10, 3), result("sse", 30, 1), result("sse", 20, 2)]
    merged = median_result(runs)
    assert (merged.idle_kib, merged.p50_ms, merged.rounds) == (20, 2, 3)
    assert (merged.delivered, merged.expected) == (18, 18)
    table = render_table([result("websocket", 10, 2), merged])
    assert "| sse | 20.0 | 2.00x | 2.00 | 4.00 | 1.00x | 18/18 |" in table


def test_arguments() -> None:
    options, transports, rounds, as_json = parse_args(["--transports", "sse,websocket"])
    assert transports == ["sse", "websocket"] and rounds == 3 and not as_json
    assert dict(options.server_settings) == dict(SERVER_SETTINGS)
    with pytest.raises(SystemExit):
        parse_args(["--transports", "carrier-pigeon"])


async def test_every_transport_measures_without_loss() -> None:
    options = replace(
        Options(),
        connections=6,
        subscribers=3,
        publications=4,
        interval_ms=10,
        settle_interval=0.1,
        settle_timeout=1,  # the figures are not judged here
        server_settings=SERVER_SETTINGS,
    )
    results = await run_measurements(options, TRANSPORTS, rounds=1)
    assert [r.transport for r in results] == list(TRANSPORTS)
    for r in results:
        assert (r.delivered, r.lost, r.dropped) == (r.expected, 0, 0), r
        assert not math.isnan(r.p50_ms) and r.p99_ms >= r.p50_ms
