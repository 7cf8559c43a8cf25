"""``farcall.broker.limits``: token buckets per key, on a fake clock."""

from __future__ import annotations

import pytest

from farcall.broker import limits
from farcall.broker.errors import TooManyRequests
from farcall.broker.limits import RateLimiter, retry_after, retry_seconds
from tests.helpers import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock.install(monkeypatch, limits)


def test_a_burst_then_the_rate(clock: FakeClock) -> None:
    bucket = RateLimiter(rate=2.0, burst=3)
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)  # one token comes back every half second
    assert bucket.take("b") == 0.0  # keys are separate
    clock.now += 0.5
    assert bucket.take("a") == 0.0
    assert bucket.take("a") > 0
    clock.now += 60
    assert [bucket.take("a") for _ in range(3)] == [0.0] * 3  # refilled to the burst, no more
    assert bucket.take("a") > 0


def test_a_refused_take_spends_nothing(clock: FakeClock) -> None:
    bucket = RateLimiter(rate=1.0, burst=1)
    bucket.take("a")
    for _ in range(10):
        assert bucket.take("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.take("a") == 0.0


def test_rate_zero_means_no_limit(clock: FakeClock) -> None:
    bucket = RateLimiter(rate=0, burst=1)
    assert all(bucket.take("a") == 0.0 for _ in range(1000))


def test_least_recently_used_keys_are_forgotten_first(clock: FakeClock) -> None:
    bucket = RateLimiter(rate=1.0, burst=1, max_keys=2)
    bucket.take("a")
    bucket.take("b")
    bucket.take("c")  # "a" is forgotten: a full bucket again
    assert bucket.take("a") == 0.0
    assert bucket.take("c") > 0


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after(s) for s in (0.01, 1.0, 1.2, 59.9)] == ["1", "1", "2", "60"]


def test_a_reported_wait_is_never_zero() -> None:
    # a bucket a hair short of a token asks for microseconds; rounded to 0.0 the client
    # would be told to send again at once (this made the SDK's rate-limit test flaky)
    assert [retry_seconds(s) for s in (0.0, 4e-5, 0.001, 0.0012, 1.5)] == [
        0.001, 0.001, 0.001, 0.002, 1.5]
    error = TooManyRequests("slow down", 4e-5)
    assert error.extra() == {"retry_after": 0.001} and error.headers() == {"Retry-After": "1"}
