"""Backoff: the delay between attempts to reach the broker grows, is capped, is jittered, resets."""

from __future__ import annotations

from farcall.backoff import Backoff


def test_delays_double_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(cap=1.0)
    for attempt, nominal in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]):
        assert backoff.attempt == attempt
        delay = backoff.next_delay()
        assert 0.5 * nominal <= delay <= nominal


def test_jitter_spreads_the_delays() -> None:
    delays = {Backoff(cap=10.0, base=1.0).next_delay() for _ in range(50)}
    assert len(delays) > 1 and all(0.5 <= d <= 1.0 for d in delays)


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(cap=5.0, base=0.2)
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert 0.1 <= backoff.next_delay() <= 0.2


def test_a_long_outage_stays_at_the_cap() -> None:
    backoff = Backoff(cap=3.0)
    backoff.attempt = 5000
    assert 1.5 <= backoff.next_delay() <= 3.0
