"""The scenario's results per phase, the pass/fail rules and the table. Pure: no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtests.measure_core import percentile


@dataclass(slots=True, frozen=True)
class Latency:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Latency:
        if not values_ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        # percentile() wants integers: work in microseconds.
        ordered = sorted(round(value * 1000) for value in values_ms)

        def ms(q: float) -> float:
            return percentile(ordered, q) / 1000

        return cls(len(ordered), ms(50), ms(95), ms(99), ms(100))


@dataclass(slots=True, frozen=True)
class PhaseResult:
    stalled_percent: float
    fast: int
    slow: int
    stalled: int
    # Subscribers that failed to connect, or never saw a primer (never subscribed).
    connect_errors: int
    not_ready: int
    publications: int
    refused_publications: int
    publish_seconds: float
    fast_expected: int
    fast_lost: int
    # Gaps, duplicates and reorderings seen by fast clients.
    sequence_errors: int
    fast_disconnects: int
    latency: Latency
    legacy_latency: Latency
    channel_latency: Latency
    slow_delivered: int
    slow_disconnects: int
    # Stalled sessions gone from the server (admin API), and seconds from the first
    # measured publication until the first / the last of them went; None = unknown
    # (no admin key) or, for the times, not reached within the phase.
    stalled_cut: int | None
    cutoff_first_s: float | None
    cutoff_all_s: float | None
    # Stalled clients that read a 3008 close (or disconnect push) once they woke up.
    stalled_saw_3008: int
    rss_before_kib: int | None
    rss_peak_kib: int | None
    rss_after_kib: int | None
    post_p50_ms: float
    # What one subscriber was sent per second (measured at the fast clients); with the
    # cut-off time it says how much a stalled client absorbed before it was cut off.
    offered_kib_per_second: float
    # CPU while publishing, in % of one core: this load generator, and the nodes
    # (None when they are not local processes).
    client_cpu_percent: float
    server_cpu_percent: float | None

    @property
    def label(self) -> str:
        return f"{self.stalled_percent:g} % stalled"


@dataclass(slots=True, frozen=True)
class Bound:
    """Fast clients' p99 in the bounded phase may be at most
    max(factor x baseline p99, baseline p99 + slack_ms)."""

    factor: float = 1.25
    slack_ms: float = 0.0
    # Which phase is held to it (stalled percent); the baseline is the 0 % phase.
    percent: float = 10.0
    # Also fail when stalled clients were not all cut off within their phase.
    require_cutoff: bool = False

    def limit_ms(self, baseline_p99_ms: float) -> float:
        return max(self.factor * baseline_p99_ms, baseline_p99_ms + self.slack_ms)


@dataclass(slots=True, frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    p99_limit_ms: float | None


def evaluate(results: Sequence[PhaseResult], bound: Bound) -> Verdict:
    reasons: list[str] = []
    for r in results:
        if r.connect_errors or r.not_ready:
            reasons.append(
                f"{r.label}: {r.connect_errors} subscribers failed to connect, "
                f"{r.not_ready} never subscribed"
            )
        if r.refused_publications:
            reasons.append(f"{r.label}: {r.refused_publications} publications refused")
        if r.publications == 0:
            reasons.append(f"{r.label}: nothing was published")
        if r.fast_lost:
            reasons.append(f"{r.label}: fast clients lost {r.fast_lost} deliveries")
        if r.sequence_errors:
            reasons.append(f"{r.label}: {r.sequence_errors} sequence errors at fast clients")
        if r.fast_disconnects:
            reasons.append(f"{r.label}: {r.fast_disconnects} fast clients were disconnected")
        if bound.require_cutoff and r.stalled and r.stalled_cut != r.stalled:
            reasons.append(f"{r.label}: stalled clients cut off: {r.stalled_cut}/{r.stalled}")
    baseline = _median_p99(results, 0.0)
    bounded = _median_p99(results, bound.percent)
    limit = None
    if baseline is not None and bounded is not None:
        limit = bound.limit_ms(baseline)
        if not bounded <= limit:
            rounds = sum(1 for r in results if r.stalled_percent == bound.percent)
            what = "fast p99" if rounds == 1 else f"median fast p99 of {rounds} rounds"
            reasons.append(
                f"{bound.percent:g} % stalled: {what} {bounded:.1f} ms exceeds "
                f"{limit:.1f} ms (baseline {baseline:.1f} ms)"
            )
    return Verdict(not reasons, tuple(reasons), limit)


def _median_p99(results: Sequence[PhaseResult], percent: float) -> float | None:
    """The fast clients' p99 of the phases with `percent` stalled; with several rounds
    (phases interleaved, so drift and noise hit every percent alike) their median."""
    values = [r.latency.p99_ms for r in results if r.stalled_percent == percent]
    return statistics.median(values) if values else None


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_table(results: Sequence[PhaseResult], verdict: Verdict, bound: Bound) -> str:
    heads = [r.label for r in results]
    rows: list[tuple[str, list[str]]] = [
        ("clients fast / slow / stalled", [f"{r.fast} / {r.slow} / {r.stalled}" for r in results]),
        (
            "publications (msgs/s achieved)",
            [
                f"{r.publications} ({r.publications / max(r.publish_seconds, 1e-9):.0f}/s)"
                for r in results
            ],
        ),
        ("fast deliveries / expected", [f"{r.latency.count}/{r.fast_expected}" for r in results]),
        ("**fast loss** (must be 0)", [str(r.fast_lost) for r in results]),
        (
            "fast sequence errors / disconnects",
            [f"{r.sequence_errors} / {r.fast_disconnects}" for r in results],
        ),
        ("fast p50 (ms)", [f"{r.latency.p50_ms:.1f}" for r in results]),
        ("fast p95 (ms)", [f"{r.latency.p95_ms:.1f}" for r in results]),
        ("**fast p99 (ms)**", [f"{r.latency.p99_ms:.1f}" for r in results]),
        ("fast max (ms)", [f"{r.latency.max_ms:.1f}" for r in results]),
        (
            "p99 legacy / channel (ms)",
            [f"{r.legacy_latency.p99_ms:.1f} / {r.channel_latency.p99_ms:.1f}" for r in results],
        ),
        (
            "stalled cut off (server count)",
            [
                "-"
                if not r.stalled
                else ("n/a" if r.stalled_cut is None else f"{r.stalled_cut}/{r.stalled}")
                for r in results
            ],
        ),
        (
            "bytes offered per subscriber (KiB/s)",
            [f"{r.offered_kib_per_second:.0f}" for r in results],
        ),
        (
            "time to first / last cut-off (s)",
            [
                "-"
                if not r.stalled
                else f"{_seconds(r.cutoff_first_s)} / {_seconds(r.cutoff_all_s)}"
                for r in results
            ],
        ),
        ("stalled that read 3008 on waking", [str(r.stalled_saw_3008) for r in results]),
        (
            "slow: deliveries / disconnected",
            [f"{r.slow_delivered} / {r.slow_disconnects}" for r in results],
        ),
        (
            "server RSS before / peak / after (MiB)",
            [
                f"{_mib(r.rss_before_kib)} / {_mib(r.rss_peak_kib)} / {_mib(r.rss_after_kib)}"
                for r in results
            ],
        ),
        ("broadcast POST p50 (ms)", [f"{r.post_p50_ms:.1f}" for r in results]),
        (
            "CPU while publishing, client / server (% of a core)",
            [f"{r.client_cpu_percent:.0f} / {_percent(r.server_cpu_percent)}" for r in results],
        ),
    ]
    lines = ["| measure | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    lines.append("")
    percents = sorted({r.stalled_percent for r in results})
    if len(results) > len(percents):
        medians = ", ".join(f"{p:g} % stalled {_median_p99(results, p):.1f} ms" for p in percents)
        lines.append(f"median fast p99 over the rounds: {medians}")
    if verdict.p99_limit_ms is not None:
        lines.append(
            f"p99 bound for {bound.percent:g} % stalled: {verdict.p99_limit_ms:.1f} ms "
            f"(max({bound.factor:g} x baseline, baseline + {bound.slack_ms:g} ms))"
        )
    if verdict.passed:
        lines.append("VERDICT: PASS")
    else:
        lines.append("VERDICT: FAIL")
        lines += [f"  - {reason}" for reason in verdict.reasons]
    return "\n".join(lines)


def as_json(results: Sequence[PhaseResult], verdict: Verdict, bound: Bound) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return {
        "phases": [clean(asdict(r)) for r in results],
        "bound": asdict(bound),
        "verdict": {
            "passed": verdict.passed,
            "reasons": list(verdict.reasons),
            "p99_limit_ms": verdict.p99_limit_ms,
        },
    }
