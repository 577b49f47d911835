"""The limits' state machines on a hand-driven clock."""

from __future__ import annotations

import asyncio
import time

from shim.core.limits import ChannelRates, Pacer, TokenBucket, Verdict, WorkPacer


def test_token_bucket_allows_the_burst_refuses_as_many_again_then_disconnects() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    verdicts = [bucket.take(0.0) for _ in range(7)]
    assert verdicts == [Verdict.ALLOW] * 3 + [Verdict.REFUSE] * 3 + [Verdict.DISCONNECT]


def test_token_bucket_debt_is_paid_back_by_waiting() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    for _ in range(5):
        bucket.take(0.0)  # three allowed, two refused: two tokens of debt
    assert bucket.take(0.25) is Verdict.REFUSE  # 2.5 tokens back: still -0.5 after this one
    assert bucket.take(0.40) is Verdict.ALLOW  # +1.5
    # Refill never saves more than the burst.
    assert [bucket.take(100.0) for _ in range(4)] == [Verdict.ALLOW] * 3 + [Verdict.REFUSE]


def test_channel_rates_take_from_every_channel_or_none() -> None:
    rates = ChannelRates(rate=1.0, burst=2, exempt=("global",))
    assert rates.take(["a", "global"], 0.0) is None
    assert rates.take(["a", "b"], 0.0) is None
    # `a` is empty now: the item is refused and `b` keeps its token.
    assert rates.take(["b", "a"], 0.0) == "a"
    assert rates.take(["b"], 0.0) is None
    assert rates.take(["b"], 0.0) == "b"
    assert rates.take(["global"] * 10, 0.0) is None
    assert rates.take(["a"], 1.0) is None


def test_channel_rates_forget_refilled_channels_and_stay_bounded() -> None:
    rates = ChannelRates(rate=1.0, burst=2, max_channels=50)
    for n in range(40):
        rates.take([f"c{n}"], 0.0)
    assert len(rates) == 40
    # Two seconds later every bucket is full again: they go as new ones come.
    for n in range(40):
        rates.take([f"d{n}"], 2.0 + n)
    assert len(rates) <= 3
    for n in range(1000):
        rates.take([f"e{n}"], 100.0)
    assert len(rates) == 50


def test_channel_rates_off_at_zero() -> None:
    rates = ChannelRates(rate=0.0, burst=1)
    assert not rates.enabled
    assert all(rates.take(["x"], 0.0) is None for _ in range(100))
    assert len(rates) == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_work_pacer_makes_commands_wait_once_the_shared_budget_is_spent() -> None:
    clock = _Clock()
    pacer = WorkPacer(budget=0.002, pause=0.002, gap=0.002, clock=clock)
    # Back-to-back commands of 0.5 ms each: four fit in the budget, the fifth waits.
    for _ in range(4):
        assert not pacer.must_wait()
        started = clock.now
        clock.now += 0.0005
        pacer.charge(started, clock.now)
    assert pacer.must_wait()
    # A quiet gap as long as `gap` gives the budget back.
    clock.now += 0.002
    assert not pacer.must_wait()


def test_work_pacer_charges_overlapping_commands_once() -> None:
    clock = _Clock()
    pacer = WorkPacer(budget=0.002, pause=0.002, gap=0.002, clock=clock)
    # Ten commands all running from 0 to 1.5 ms (each awaiting the engine): 1.5 ms.
    clock.now = 0.0015
    for _ in range(10):
        pacer.charge(0.0, 0.0015)
    assert not pacer.must_wait()
    # One more from 1 ms to 2.5 ms adds only the 1 ms past what was counted.
    clock.now = 0.0025
    pacer.charge(0.001, 0.0025)
    assert pacer.must_wait()


def test_work_pacer_wants_as_much_quiet_as_the_work_was() -> None:
    clock = _Clock()
    pacer = WorkPacer(budget=0.002, pause=0.002, gap=0.002, clock=clock)
    pacer.charge(0.0, 0.005)  # one long command ran 5 ms past the start
    clock.now = 0.008
    assert pacer.must_wait()  # 3 ms of quiet is not enough after 5 ms of work
    clock.now = 0.0101
    assert not pacer.must_wait()


async def test_pacer_pauses_at_least_as_long_as_the_step_it_follows() -> None:
    pacer = Pacer(budget=0.002, pause=0.002)
    step_end = time.perf_counter() + 0.008
    while time.perf_counter() < step_end:  # a step of 8 ms, past the 2 ms budget
        pass
    assert pacer.due()
    before = time.perf_counter()
    await pacer.tick()
    assert time.perf_counter() - before >= 0.008
    assert not pacer.due()


def test_work_pacer_spent_budget_without_a_gap_keeps_waiting() -> None:
    clock = _Clock()
    pacer = WorkPacer(budget=0.002, pause=0.002, gap=0.002, clock=clock)
    pacer.charge(0.0, 0.003)
    clock.now = 0.0039  # less than `gap` since the last command ended
    assert pacer.must_wait()
    clock.now = 0.0061  # as much quiet as the 3 ms of work
    assert not pacer.must_wait()


async def test_work_pacer_lets_waiters_resume_one_budget_at_a_time() -> None:
    pacer = WorkPacer(budget=0.002, pause=0.002, gap=0.002)
    order: list[int] = []

    async def command(number: int) -> None:
        if pacer.must_wait():
            await pacer.wait()
        started = pacer.now()
        deadline = started + 0.0015
        while pacer.now() < deadline:  # 1.5 ms of work holding the loop
            pass
        pacer.charge(started, pacer.now())
        order.append(number)

    started = pacer.now()
    await asyncio.gather(*(command(n) for n in range(6)))
    elapsed = pacer.now() - started
    assert sorted(order) == list(range(6))
    # 9 ms of work in steps of at most two commands, with pauses between the steps.
    assert elapsed >= 0.009 + 2 * 0.002
