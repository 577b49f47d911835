"""The limits' state machines on a hand-driven clock."""

from __future__ import annotations

from shim.core.limits import ChannelRates, TokenBucket, Verdict


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
