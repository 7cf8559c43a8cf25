"""The REST routes of timers (``/v1/timers``): scheduled and recurring runs of a registered
function on an endpoint.

A timer is its creator's alone: anyone else gets 404, as for an unknown id. Creating one needs
the endpoint and the function to be usable by the creator (owned or shared), checked as a
submission checks them (``submission.authorize``); each run is then submitted by the
``scheduler`` as the creator's task, checked again. ``schedule`` computes the run times.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response

from farcall.broker import schedule
from farcall.broker.deps import (
    OBJECT_ERRORS,
    USER_ERRORS,
    Svc,
    User,
    json_response,
    with_conflict,
)
from farcall.broker.errors import Conflict, InvalidRequest, ObjectNotFound, QuotaExceeded, clip
from farcall.broker.records import TimerRecord
from farcall.broker.services import Services
from farcall.broker.submission import authorize
from farcall.protocol.common import now
from farcall.protocol.timers import (
    TimerCreated,
    TimerDeleted,
    TimerInfo,
    TimerList,
    TimerRequest,
    TimerSchedule,
)

router = APIRouter(prefix="/v1/timers")

STATE_ERRORS = with_conflict(OBJECT_ERRORS, "the timer has finished or was stopped: it does not "
                             "run again (create a new one)")
"""Pause and resume: an object's errors, and 409 for a timer that ended."""


def _info(timer: TimerRecord, *, runs: bool = False) -> TimerInfo:
    fields: dict[str, Any] = {
        "timer_id": timer.timer_id, "name": timer.name, "endpoint_id": timer.endpoint_id,
        "function_id": timer.function_id, "schedule": timer.schedule, "state": timer.state,
        "reason": timer.reason, "next_run": timer.next_run, "run_count": timer.run_count,
        "created_at": timer.created_at,
    }
    if runs:
        fields["runs"] = timer.runs
    return TimerInfo.model_construct(**fields)


async def _timer(svc: Services, user: str, timer_id: str) -> TimerRecord:
    found = await svc.store.timers.get(timer_id)
    if found is None or found.user_id != user:
        raise ObjectNotFound(f"timer {clip(timer_id)} not found; list yours with GET /v1/timers")
    return found


@router.post("", responses=OBJECT_ERRORS)
async def create_timer(body: TimerRequest, user: User, svc: Svc) -> TimerCreated:
    """Run a registered function on an endpoint every ``interval`` seconds or at the times of
    a 5-field ``cron`` expression (UTC), from ``start`` until ``stop_at`` or ``stop_after_runs``.
    Each run submits a task of yours, as ``POST /v1/tasks`` would."""
    await authorize(svc, user, body.endpoint_id, [body.function_id])
    at = now()
    fields = body.model_dump(include=set(TimerSchedule.model_fields))
    if fields["start"] is None:  # interval runs count from here
        fields["start"] = at
    when = TimerSchedule.model_construct(**fields)
    try:
        schedule.check(when)
    except schedule.InvalidSchedule as e:
        raise InvalidRequest(str(e)) from None
    if when.stop_at is not None and when.stop_at <= at:
        raise InvalidRequest("stop_at is in the past: the timer would never run; give a later "
                             "time, or none")
    first = schedule.first_run(when, at)
    if first is None:
        raise InvalidRequest("the schedule names no time to run (before stop_at, if given); "
                             "check the cron expression and stop_at")
    timer = TimerRecord.model_construct(
        timer_id=str(uuid.uuid4()), user_id=user, name=body.name, endpoint_id=body.endpoint_id,
        function_id=body.function_id, args=body.args, submitter=body.submitter, schedule=when,
        state="active", reason=None, next_run=first, run_count=0, runs=[], created_at=at)
    limit = svc.settings.max_timers
    if not await svc.store.timers.create(timer, limit):
        raise QuotaExceeded(
            f"you have {limit} timers, the most this broker allows (FARCALL_MAX_TIMERS); delete "
            "some you no longer need (finished ones too) with Client.delete_timer")
    return TimerCreated(timer_id=timer.timer_id)


@router.get("", response_model=TimerList, responses=USER_ERRORS)
async def list_timers(user: User, svc: Svc) -> Response:
    """Your timers, oldest first, without their runs."""
    timers = await svc.store.timers.by_user(user)
    return json_response(TimerList.model_construct(timers=[_info(t) for t in timers]),
                         exclude_unset=True)


@router.get("/{timer_id}", response_model=TimerInfo, responses=OBJECT_ERRORS)
async def get_timer(timer_id: str, user: User, svc: Svc) -> Response:
    """The timer with its latest runs: when each fired and the task it submitted."""
    timer = await _timer(svc, user, timer_id)
    return json_response(_info(timer, runs=True), exclude_unset=True)


@router.post("/{timer_id}/pause", response_model=TimerInfo, responses=STATE_ERRORS)
async def pause_timer(timer_id: str, user: User, svc: Svc) -> Response:
    """Stop running it until ``resume`` (pausing a paused timer changes nothing)."""
    timer = await _timer(svc, user, timer_id)
    if timer.state == "active":
        await svc.store.timers.pause(timer_id)
    return await _changed(svc, user, timer_id, "paused")


@router.post("/{timer_id}/resume", response_model=TimerInfo, responses=STATE_ERRORS)
async def resume_timer(timer_id: str, user: User, svc: Svc) -> Response:
    """Run it again from the next time of its schedule (the runs it missed while paused are
    skipped); resuming an active timer changes nothing."""
    timer = await _timer(svc, user, timer_id)
    if timer.state == "paused":
        await svc.store.timers.resume(timer_id, schedule.resume_run(timer.schedule, now()))
    return await _changed(svc, user, timer_id, "resumed")


async def _changed(svc: Services, user: str, timer_id: str, verb: str) -> Response:
    """The timer after pausing or resuming it; 409 if it had ended (or ended meanwhile)."""
    timer = await _timer(svc, user, timer_id)
    if timer.state in ("finished", "stopped"):
        why = f": {timer.reason}" if timer.reason else ""
        raise Conflict(f"timer {timer_id} is {timer.state}{why}; it cannot be {verb}, create a "
                       "new timer")
    return json_response(_info(timer), exclude_unset=True)


@router.delete("/{timer_id}", responses=OBJECT_ERRORS)
async def delete_timer(timer_id: str, user: User, svc: Svc) -> TimerDeleted:
    """Delete the timer and its runs; the tasks it submitted stay."""
    await _timer(svc, user, timer_id)
    await svc.store.timers.delete(timer_id)
    return TimerDeleted(timer_id=timer_id, deleted=True)
