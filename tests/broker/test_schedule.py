"""When a timer runs (farcall.broker.schedule): an interval's fixed grid, cron times in UTC,
``stop_at``, and cron expressions croniter refuses."""

from __future__ import annotations

import pytest

from farcall.broker import schedule
from farcall.protocol.timers import TimerSchedule

DAY = 86400.0
T0 = 1_800_000_000.0
"""2027-01-15 08:00 UTC: a whole hour, so cron times are easy to read."""


def test_interval_runs_from_start_on_a_fixed_grid() -> None:
    every = TimerSchedule(interval=10, start=T0)
    assert schedule.first_run(every, T0) == T0
    assert schedule.first_run(every, T0 - 100) == T0, "a start in the future waits"
    assert schedule.next_run(every, T0 + 0.3) == T0 + 10, "a late run does not shift the grid"
    assert schedule.next_run(every, T0 + 10) == T0 + 20
    assert schedule.next_run(every, T0 + 95.5) == T0 + 100, "missed runs are skipped, not made up"
    assert schedule.resume_run(every, T0 + 20) == T0 + 20
    assert schedule.resume_run(every, T0 + 20.1) == T0 + 30


def test_a_start_in_the_past_runs_now_or_at_the_next_time_of_the_grid() -> None:
    every = TimerSchedule(interval=10, start=T0)
    assert schedule.first_run(every, T0 + schedule.START_SLACK) == T0 + schedule.START_SLACK
    assert schedule.first_run(every, T0 + 31) == T0 + 40


def test_cron_times_are_utc_and_count_from_start() -> None:
    nightly = TimerSchedule(cron="0 2 * * *")
    assert schedule.first_run(nightly, T0) == T0 - 6 * 3600 + DAY
    assert schedule.next_run(nightly, T0 + 18 * 3600) == T0 + 18 * 3600 + DAY
    hourly = TimerSchedule(cron="0 * * * *", start=T0 + 3600)
    assert schedule.first_run(hourly, T0) == T0 + 3600, "a cron time at start counts"
    assert schedule.next_run(hourly, T0 + 3600) == T0 + 7200
    assert schedule.next_run(hourly, T0 + 5 * 3600 + 1) == T0 + 6 * 3600


def test_stop_at_ends_the_schedule() -> None:
    every = TimerSchedule(interval=10, start=T0, stop_at=T0 + 20)
    assert schedule.next_run(every, T0 + 10) == T0 + 20, "a run at stop_at is the last"
    assert schedule.next_run(every, T0 + 20) is None
    assert schedule.first_run(TimerSchedule(cron="0 2 * * *", stop_at=T0 + 60), T0) is None
    assert schedule.first_run(TimerSchedule(cron="0 0 31 2 *"), T0) is None, "no 31 February"


def test_cron_that_croniter_refuses_says_why() -> None:
    with pytest.raises(schedule.InvalidSchedule, match="out of range"):
        schedule.check(TimerSchedule(cron="61 * * * *"))
    schedule.check(TimerSchedule(cron="*/15 9-17 * * 1-5"))
