from __future__ import annotations

import math

from loadtests.verdict import Bound, Latency, PhaseResult, evaluate


def phase(percent: float, p99_ms: float, *, lost: int = 0) -> PhaseResult:
    latency = Latency(1000, p99_ms / 2, p99_ms * 0.9, p99_ms, p99_ms * 1.5)
    stalled = round(percent * 2)
    return PhaseResult(
        stalled_percent=percent,
        fast=200,
        slow=10,
        stalled=stalled,
        connect_errors=0,
        not_ready=0,
        publications=1500,
        refused_publications=0,
        publish_seconds=30.0,
        fast_expected=300_000,
        fast_lost=lost,
        sequence_errors=0,
        fast_disconnects=0,
        latency=latency,
        legacy_latency=latency,
        channel_latency=latency,
        slow_delivered=1000,
        slow_disconnects=0,
        stalled_cut=stalled,
        cutoff_first_s=6.0 if stalled else None,
        cutoff_all_s=7.0 if stalled else None,
        stalled_saw_3008=stalled,
        rss_before_kib=100_000,
        rss_peak_kib=110_000,
        rss_after_kib=105_000,
        post_p50_ms=10.0,
        offered_kib_per_second=109.0,
        client_cpu_percent=50.0,
        server_cpu_percent=30.0,
    )


def test_one_round_holds_the_stalled_p99_to_the_baseline() -> None:
    assert evaluate([phase(0, 20.0), phase(10, 25.0), phase(50, 90.0)], Bound()).passed
    verdict = evaluate([phase(0, 20.0), phase(10, 25.1)], Bound())
    assert not verdict.passed
    assert verdict.p99_limit_ms == 25.0
    assert "fast p99 25.1 ms exceeds 25.0 ms" in verdict.reasons[0]


def test_several_rounds_compare_medians_so_one_noisy_phase_does_not_decide() -> None:
    # Round 1's baseline ran on a quiet moment; rounds 2 and 3 show the real spread.
    rounds = [phase(0, 15.7), phase(10, 25.8), phase(0, 24.9), phase(10, 21.2)]
    rounds += [phase(0, 22.0), phase(10, 23.0)]
    verdict = evaluate(rounds, Bound())
    assert verdict.passed, verdict.reasons
    assert verdict.p99_limit_ms is not None and math.isclose(verdict.p99_limit_ms, 22.0 * 1.25)
    # A stall effect that shows in every round still fails.
    slower = [phase(0, 20.0), phase(10, 30.0), phase(0, 21.0), phase(10, 29.0)]
    verdict = evaluate(slower, Bound())
    assert not verdict.passed
    assert "median fast p99 of 2 rounds 29.5 ms exceeds" in verdict.reasons[0]


def test_any_loss_fails_whatever_the_latency() -> None:
    verdict = evaluate([phase(0, 20.0), phase(10, 20.0, lost=1)], Bound())
    assert not verdict.passed
    assert verdict.reasons == ("10 % stalled: fast clients lost 1 deliveries",)
