"""The publish path's histogram (plain integers) scrapes as prometheus_client's own
Histogram would for the same observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from shim.app.metrics import BucketCounts

BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


def test_bucket_counts_scrape_like_a_prometheus_histogram() -> None:
    reference_registry, registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", registry=reference_registry, buckets=BOUNDS)
    counts = BucketCounts("x_seconds", "doc", BOUNDS)
    registry.register(counts)
    # On a bound, between bounds, below the first, above the last.
    for value in (0.0001, 0.0005, 0.003, 0.2, 1.0, 5.0, 0.01, 0.01):
        reference.observe(value)
        counts.observe(value)
    expected = [
        line
        for line in generate_latest(reference_registry).decode().splitlines()
        if "_created" not in line
    ]
    got = generate_latest(registry).decode().splitlines()
    assert got == expected
    assert 'x_seconds_bucket{le="0.01"} 5.0' in got
    assert "x_seconds_count 8.0" in got
