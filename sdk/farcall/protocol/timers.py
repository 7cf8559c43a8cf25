"""Timers' REST bodies (``/v1/timers``): a schedule, a timer as shown, its runs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from farcall.protocol.common import Message, ObjectId, Versions

MIN_TIMER_INTERVAL = 1.0
"""Shortest interval between a timer's runs, in seconds (the broker looks for due timers a few
times a second)."""
MAX_TIMER_INTERVAL = 366 * 24 * 3600.0
MAX_TIMESTAMP = 253402300799.0
"""The last second of the year 9999: the latest ``start`` or ``stop_at`` a timer takes."""
MAX_TIMER_ARGS = 1024 * 1024
"""Largest arguments payload of a timer: it is stored with the timer and read at every run, so
large data travels by reference (a path, a URL) instead."""
TIMER_RUNS_KEPT = 100
"""Runs a timer keeps (the latest); ``run_count`` counts them all."""
TimerState = Literal["active", "paused", "finished", "stopped"]
"""``active`` (it runs at ``next_run``), ``paused``, ``finished`` (its schedule ended:
``stop_after_runs`` or ``stop_at`` reached) or ``stopped`` (by the broker, ``reason`` says why)."""
Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)]


class TimerSchedule(Message):
    """When a timer runs: every ``interval`` seconds from ``start``, or at the times a 5-field
    ``cron`` expression (UTC) names from ``start`` on; until ``stop_at`` or ``stop_after_runs``."""

    interval: float | None = Field(
        default=None, ge=MIN_TIMER_INTERVAL, le=MAX_TIMER_INTERVAL, allow_inf_nan=False,
        description="seconds between runs (at least 1); give this or cron")
    cron: str | None = Field(default=None, max_length=200, description=(
        "a 5-field cron expression (minute hour day-of-month month day-of-week), in UTC; "
        "give this or interval"))
    start: Timestamp | None = Field(default=None, description=(
        "seconds since the epoch of the first run (interval) or from which cron times count; "
        "default: when the timer is created"))
    stop_after_runs: int | None = Field(default=None, ge=1, le=1_000_000_000, description=(
        "the timer finishes after this many runs"))
    stop_at: Timestamp | None = Field(default=None, description=(
        "seconds since the epoch after which the timer does not run again"))

    @model_validator(mode="after")
    def _one_way(self) -> TimerSchedule:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("give exactly one of interval (seconds between runs) or cron "
                             "(a 5-field cron expression)")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(
                f"cron {self.cron[:80]!r} has {len(self.cron.split())} fields; give 5: minute "
                "hour day-of-month month day-of-week, as in '*/5 * * * *'")
        if self.start is not None and self.stop_at is not None and self.stop_at <= self.start:
            raise ValueError("stop_at is not after start: the timer would never run")
        return self


class TimerRequest(TimerSchedule):
    """``POST /v1/timers``: run a registered function on an endpoint on a schedule. Each run is
    a task of the timer's creator, submitted as ``POST /v1/tasks`` submits one."""

    endpoint_id: ObjectId
    function_id: ObjectId
    args: str = Field(max_length=MAX_TIMER_ARGS, description=(
        "serialized (args, kwargs) payload (farcall.serialize.pack_args), the same every run"))
    name: str = Field(default="", max_length=200)
    submitter: Versions | None = None


class TimerCreated(Message):
    timer_id: str


class TimerRun(Message):
    """One run of a timer: when it fired and the task it submitted."""

    number: int = Field(description="1 for the timer's first run, 2 for the next, ...")
    at: float
    task_id: str | None = Field(default=None, description=(
        "the task this run submitted; null while it is being submitted or when it failed"))
    error: str | None = Field(default=None, description="why the run submitted no task")


class TimerInfo(Message):
    """A timer as the REST API shows it; ``runs`` (the latest ``TIMER_RUNS_KEPT``, oldest
    first) only with ``GET /v1/timers/{timer_id}``."""

    timer_id: str
    name: str
    endpoint_id: str
    function_id: str
    schedule: TimerSchedule
    state: TimerState
    reason: str | None = Field(default=None, description="why the broker stopped it")
    next_run: float | None = Field(description="when it runs next; null unless active")
    run_count: int = Field(description="how many times it ran")
    created_at: float
    runs: list[TimerRun] | None = None


class TimerList(Message):
    timers: list[TimerInfo] = Field(description="oldest first, without their runs")


class TimerDeleted(Message):
    timer_id: str
    deleted: bool

