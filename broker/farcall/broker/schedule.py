"""When a timer runs: the times its ``TimerSchedule`` names, from a clock reading.

An ``interval`` schedule runs at ``start``, ``start + interval``, ``start + 2 * interval``,
...; a ``cron`` one at the times its expression names (UTC, parsed by croniter) from ``start``
on. No run is later than ``stop_at``. These are pure functions of the schedule and the time
given, so whichever broker replica fires a run computes the same next one.

A run is never made up: after a run at ``at`` (however late), the next is the first time of the
schedule after ``at``, so runs missed while no broker was up fire once, not as a burst.
"""

from __future__ import annotations

import logging
import math

from croniter import croniter

from farcall.protocol.timers import MAX_TIMESTAMP, TimerSchedule

log = logging.getLogger(__name__)

START_SLACK = 5.0
"""A ``start`` this many seconds in the past still means "now": a client that passes its own
clock's now must not lose the first run to the request's time on the wire."""


class InvalidSchedule(ValueError):
    """A schedule that passed the message's checks but not croniter's, or has no run at all."""


def check(schedule: TimerSchedule) -> None:
    """Raise ``InvalidSchedule`` saying what is wrong with a cron expression croniter refuses."""
    if schedule.cron is None:
        return
    try:
        croniter(schedule.cron, 0.0)
    except Exception as e:  # noqa: BLE001 - a parser of anyone's text: never a 500 for its error
        raise InvalidSchedule(
            f"cron {schedule.cron[:80]!r} is not a cron expression croniter reads ({e}); give "
            "5 fields: minute (0-59) hour (0-23) day-of-month (1-31) month (1-12) "
            "day-of-week (0-6, 0 is Sunday), as in '30 2 * * 1-5'") from None


def first_run(schedule: TimerSchedule, at: float) -> float | None:
    """The first run of a timer created at ``at``: its ``start`` (default ``at``) for an
    interval, or if that has passed the first time of the schedule from ``at`` on; None when
    the schedule has no run (before ``stop_at``)."""
    start = at if schedule.start is None else schedule.start
    if schedule.interval is not None and start >= at - START_SLACK:
        return _bounded(schedule, max(start, at))
    return _bounded(schedule, _from(schedule, at, inclusive=True))


def next_run(schedule: TimerSchedule, at: float) -> float | None:
    """The run after one fired at ``at``: the first time of the schedule after ``at``."""
    return _bounded(schedule, _from(schedule, at, inclusive=False))


def resume_run(schedule: TimerSchedule, at: float) -> float | None:
    """The next run of a timer resumed at ``at``: the first time of the schedule from ``at``
    on (runs it would have had while paused are skipped)."""
    return _bounded(schedule, _from(schedule, at, inclusive=True))


def _from(schedule: TimerSchedule, at: float, *, inclusive: bool) -> float | None:
    """The first time of the schedule at or after (``inclusive``) or after ``at``, not before
    ``start``."""
    start = schedule.start
    if schedule.interval is not None:
        return _grid(at if start is None else start, schedule.interval, at, inclusive)
    assert schedule.cron is not None
    base = at if start is None or start <= at else start
    if inclusive or (start is not None and start > at):
        base -= 0.001  # croniter gives times strictly after its base
    try:
        return float(croniter(schedule.cron, base).get_next(float))
    except (ValueError, OverflowError):  # no time matches (31 February), or past the year 9999
        return None
    except Exception:  # noqa: BLE001 - croniter's own failure on odd input: no time it can name
        log.warning("croniter failed on %r from %r", schedule.cron, base, exc_info=True)
        return None


def _grid(start: float, interval: float, at: float, inclusive: bool) -> float:
    """The first ``start + k * interval`` (k >= 0) at or after (``inclusive``) or after ``at``."""
    k = max(0, math.floor((at - start) / interval))
    t = start + k * interval
    while t < at or (not inclusive and t <= at):
        k += 1
        t = start + k * interval
    return t


def _bounded(schedule: TimerSchedule, t: float | None) -> float | None:
    if t is None or t > MAX_TIMESTAMP or (schedule.stop_at is not None and t > schedule.stop_at):
        return None
    return t
