"""Timers' bodies: a schedule is refused unless it can run."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from farcall.protocol.timers import (
    MAX_TIMER_ARGS,
    MAX_TIMESTAMP,
    MIN_TIMER_INTERVAL,
    TimerRequest,
    TimerSchedule,
)

T0 = 1718035200.0


@pytest.mark.parametrize("when", [
    {"interval": MIN_TIMER_INTERVAL},
    {"interval": 3600, "start": T0, "stop_at": T0 + 1, "stop_after_runs": 1},
    {"cron": "*/5 * * * *"},
    {"cron": "0 2 * * 1-5", "start": T0, "stop_at": MAX_TIMESTAMP},
])
def test_a_schedule_that_can_run_is_taken(when: dict[str, Any]) -> None:
    assert TimerSchedule(**when).model_dump(exclude_unset=True) == when


@pytest.mark.parametrize(("when", "says"), [
    ({}, "give exactly one of interval"),
    ({"interval": 60, "cron": "* * * * *"}, "give exactly one of interval"),
    ({"cron": "* * * *"}, "has 4 fields; give 5"),
    ({"cron": "0 0 * * * *"}, "has 6 fields; give 5"),
    ({"interval": 60, "start": T0, "stop_at": T0}, "stop_at is not after start"),
    ({"interval": MIN_TIMER_INTERVAL / 2}, "greater than or equal to 1"),
    ({"interval": float("inf")}, "finite number"),
    ({"interval": 60, "start": MAX_TIMESTAMP + 1}, "less than or equal to"),
    ({"interval": 60, "stop_after_runs": 0}, "greater than or equal to 1"),
])
def test_a_schedule_that_cannot_run_is_refused_with_the_reason(when: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        TimerSchedule(**when)


def test_a_timer_request_is_a_schedule_with_what_to_run() -> None:
    request = TimerRequest(interval=60, endpoint_id="e", function_id="f", args="11\nAAAA")
    assert isinstance(request, TimerSchedule) and request.name == ""
    with pytest.raises(ValidationError, match="give exactly one of interval"):
        TimerRequest(endpoint_id="e", function_id="f", args="11\nAAAA")
    with pytest.raises(ValidationError, match="at most"):
        TimerRequest(interval=60, endpoint_id="e", function_id="f", args="x" * (MAX_TIMER_ARGS + 1))
