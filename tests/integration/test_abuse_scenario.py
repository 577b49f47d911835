"""The short version of `python -m loadtests.abuse` (issue 10's proof), run against a
real `dex-shim serve` with bystanders on both protocols, and its verdict rules on
literal numbers.

The in-suite run allows P99_SLACK_MS over twice a bystander's baseline p99: the
suite's machine is shared (other suites, the scenario's own flooding client and
three bystander processes on two cores), and a window of under a second holds some
forty samples; the command itself allows no slack by default. Half a second still
catches what issue 10 measured before the fixes: a ping flood delaying a bystander
by up to 1 s, a 100,000-item request blocking the loop for 6.2 s.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtests.abuse import (
    CONTROL,
    CONTROL_WINDOWS,
    QUICK,
    ProbeResult,
    judge,
    noise_floor,
    p99_limit_ms,
)

REPO = Path(__file__).resolve().parents[2]
P99_SLACK_MS = 500.0
RUN_TIMEOUT_SECONDS = 150


async def test_quick_abuse_scenario_passes() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtests.abuse",
        "--quick",
        "--json",
        "--slack-ms",
        str(P99_SLACK_MS),
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    log = err.decode()[-4000:]
    assert out, f"no report (exit {process.returncode}):\n{log}"
    report: dict[str, Any] = orjson.loads(out)
    rows = report["probes"]
    assert [p["probe"] for p in rows[:CONTROL_WINDOWS]] == [CONTROL] * CONTROL_WINDOWS
    probes = {p["probe"]: p for p in rows[CONTROL_WINDOWS:]}
    assert list(probes) == list(QUICK)
    for name, probe in probes.items():
        # The parts that do not depend on the machine's load, one by one.
        assert probe["expected"], (name, probe["outcome"])
        assert probe["lost"] == {"legacy": 0, "channels": 0}, (name, probe)
        assert probe["rss_after_kib"] <= 1.2 * probe["rss_before_kib"], (name, probe)
    assert report["passed"] and process.returncode == 0, log


def _result(before: float, during: float, *, lost: int = 0, rss_after: int = 100) -> ProbeResult:
    return ProbeResult(
        probe="p",
        outcome="as expected",
        expected=True,
        p99_before_ms={"legacy": before, "channels": before},
        p99_during_ms={"legacy": during, "channels": before},
        lost={"legacy": lost, "channels": 0},
        rss_before_kib=100,
        rss_after_kib=rss_after,
    )


@pytest.mark.parametrize(
    ("before", "during", "floor", "passed"),
    [
        (20.0, 40.0, 10.0, True),
        (20.0, 40.1, 10.0, False),
        (2.0, 20.0, 10.0, True),
        (2.0, 20.1, 10.0, False),
        # Without a floor a small baseline is held to exactly twice itself.
        (2.0, 4.0, 0.0, True),
        (2.0, 4.1, 0.0, False),
    ],
)
def test_p99_may_double_a_baseline_floored_at_the_noise_floor(
    before: float, during: float, floor: float, passed: bool
) -> None:
    result = _result(before, during)
    judge(result, floor_ms={"legacy": floor, "channels": floor})
    assert result.passed is passed, result.failures


def test_the_noise_floor_is_the_median_p99_of_the_control_windows() -> None:
    controls = [_result(1.0, during) for during in (5.0, 30.0, 6.0)]
    # The channel bystander's p99 during each window is 1.0 here (see _result).
    assert noise_floor(controls) == {"legacy": 6.0, "channels": 1.0}


def test_slack_widens_the_bound_for_small_baselines_only() -> None:
    assert p99_limit_ms(20.0, 0.0) == 40.0
    assert p99_limit_ms(20.0, 50.0) == 70.0
    assert p99_limit_ms(200.0, 50.0) == 400.0


def test_any_loss_or_unsettled_rss_fails_the_probe() -> None:
    lost = _result(20.0, 20.0, lost=1)
    judge(lost)
    assert lost.failures == ["legacy bystander lost 1"]
    grown = _result(20.0, 20.0, rss_after=121)
    judge(grown)
    assert grown.failures == ["RSS not back within 20 %"]
    unexpected = _result(20.0, 20.0)
    unexpected.expected = False
    judge(unexpected)
    assert unexpected.failures == ["unexpected outcome"]
