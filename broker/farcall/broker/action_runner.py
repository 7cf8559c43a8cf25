"""The life of an action of the Action Provider API: run, status, cancel, release, log.

An action is one record in ``store.actions`` naming its tasks. The tasks are ordinary tasks
of the action's creator, submitted through ``submission.submit_batch`` as the SDK submits
them, with the flow's JSON arguments (``serialize.pack_json_args``) and
``result_format="json"``, so the results are JSON the broker can hand on without unpickling
anything. The status is computed from the task records while the action runs; once it has
ended, the final status is written into the action record, which then lives
``release_after`` however long the task records do.

Who may do what: the creator everything; a user named in ``manage_by`` what the creator may;
in ``monitor_by``, see it (status, log), and others who can see it get 403 for cancel and
release; everyone else 404, as for an action that never existed.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from farcall.broker.actions import (
    TERMINAL,
    ActionInput,
    ActionLog,
    ActionLogEntry,
    ActionRequest,
    ActionStatus,
    duration_seconds,
    identity_urn,
    input_errors,
    iso_duration,
    iso_time,
    read_input,
)
from farcall.broker.endpoint_control import cancel_tasks
from farcall.broker.errors import Conflict, Forbidden, InvalidRequest, ObjectNotFound, clip
from farcall.broker.records import ActionRecord, TaskRecord
from farcall.broker.services import Services
from farcall.broker.submission import submit_batch
from farcall.errors import DeserializationError, SerializationError
from farcall.protocol.common import TaskState, now
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.serialize import deserialize_json, pack_json_args

RELEASE_AFTER = 30 * 86400.0
"""Seconds an ended action's status is kept when the request does not say (and at most)."""
SUBMIT_GRACE = 60.0
"""An action whose tasks are still not all submitted this long after it started never will be
(the broker that took it stopped midway, and its request was not sent again): the batches not
submitted are given up and their calls fail, saying so."""
LOG_LIMIT = 1000
"""Most log entries one answer carries (the default, and the most a caller may ask for)."""
NOT_JSON = ("the task's result is not JSON: the endpoint runs a farcall older than the broker, "
            "which ignores result_format 'json'; upgrade the endpoint")
EXPIRED = ("the task's record expired (FARCALL_RESULT_TTL) before the action ended; run the "
           "action again")
NEVER_SUBMITTED = ("the broker stopped while submitting this action's tasks and never submitted "
                   "this one, so it did not run; run the action again with a new request_id")
Outcome = Literal["ACTIVE", "SUCCEEDED", "FAILED"]
_LOG_CODES = {
    TaskState.RECEIVED: "TaskReceived", TaskState.WAITING: "TaskQueued",
    TaskState.RUNNING: "TaskRunning", TaskState.SUCCESS: "TaskSucceeded",
    TaskState.FAILED: "TaskFailed", TaskState.CANCELLED: "TaskCancelled",
}


# ---------------------------------------------------------------------------- run


async def run(svc: Services, user: str, request: ActionRequest) -> tuple[ActionStatus, bool]:
    """Start the action ``request`` asks for; its status and whether it is new (False: the
    action this user started before with the same ``request_id``, whose submission this
    completes if the broker that took it stopped midway)."""
    try:
        wanted = read_input(request.body)
    except ValidationError as e:
        raise RequestValidationError(input_errors(e)) from None
    release_after = RELEASE_AFTER
    if request.release_after is not None:
        release_after = min(duration_seconds(request.release_after), RELEASE_AFTER)
    batches = _batches(wanted)
    call_batch = [0] * len(wanted.calls)
    for k, (_, indexes) in enumerate(batches):
        for i in indexes:
            call_batch[i] = k
    record = ActionRecord(
        action_id=str(uuid.uuid4()), user_id=user, request_id=request.request_id,
        request_digest=request.digest(), label=request.label,
        monitor_by=list(dict.fromkeys(request.monitor_by)),
        manage_by=list(dict.fromkeys(request.manage_by)),
        created_at=now(), release_after=release_after, task_count=len(wanted.calls),
        batches=len(batches), call_batch=call_batch if len(batches) > 1 else [])
    stored = await svc.store.actions.create(record, _lifetime(svc))
    if stored.action_id != record.action_id:
        if stored.request_digest != record.request_digest:
            raise Conflict(
                f"request_id {clip(request.request_id)!r} started action {stored.action_id} with "
                "another request; send that request again, or use a new request_id")
        if stored.status == "ACTIVE" and not stored.task_ids and stored.batches == len(batches):
            await _submit_all(svc, stored, wanted, batches)  # its broker stopped midway
        return await _status(svc, stored), False
    await _submit_all(svc, record, wanted, batches)
    just_submitted = [{"task_id": t, "status": TaskState.WAITING.value} for t in record.task_ids]
    return _document(record, *_progress(record, just_submitted)), True


def _batches(wanted: ActionInput) -> list[tuple[str, list[int]]]:
    """The calls by endpoint, ``(endpoint id, indexes of its calls)``, in first-seen order."""
    by_endpoint: dict[str, list[int]] = {}
    for i, call in enumerate(wanted.calls):
        by_endpoint.setdefault(call.endpoint_id, []).append(i)
    return list(by_endpoint.items())


def _request_id(record: ActionRecord, batch: int) -> str:
    """The request id the action's ``batch``-th batch is submitted under."""
    return f"action:{record.action_id}:{batch}"


async def _submit_all(svc: Services, record: ActionRecord, wanted: ActionInput,
                      batches: list[tuple[str, list[int]]]) -> None:
    """Submit the calls, one batch per endpoint under its request id, in one task group, and
    record the task ids. Sent again (the action's request resent), a batch submitted before
    gets its tasks back instead of new ones. A refusal cancels what was submitted before it
    and forgets the action, so the request may be sent again."""
    task_ids = [""] * len(wanted.calls)
    group: str | None = wanted.task_group_id
    submitted: list[str] = []
    try:
        for k, (endpoint_id, indexes) in enumerate(batches):
            tasks = [TaskSpec(function_id=wanted.calls[i].function_id,
                              args=pack_json_args(wanted.calls[i].args, wanted.calls[i].kwargs),
                              resource_specification=wanted.resource_specification,
                              result_format="json") for i in indexes]
            answer = await submit_batch(svc, record.user_id, BatchSubmission(
                endpoint_id=endpoint_id, tasks=tasks, task_group_id=group,
                request_id=_request_id(record, k)))
            group = answer.task_group_id
            submitted += answer.task_ids
            for i, task_id in zip(indexes, answer.task_ids, strict=True):
                task_ids[i] = task_id
    except BaseException as e:
        if submitted:
            await cancel_tasks(svc, record.user_id, submitted)
        await svc.store.actions.release(record)  # nothing runs: the request may be sent again
        if isinstance(e, ObjectNotFound):
            raise InvalidRequest(e.message) from None
        if isinstance(e, SerializationError):
            raise InvalidRequest(f"the arguments are not plain JSON: {e}") from None
        raise
    assert group is not None
    record.task_group_id, record.task_ids = group, task_ids
    await svc.store.actions.update(record, _lifetime(svc))


async def _recover(svc: Services, record: ActionRecord, give_up: bool) -> bool:
    """For an action whose tasks are not recorded in it (its broker stopped while submitting
    them): find the batches that were submitted, by their request ids, and record them; with
    ``give_up``, a batch never submitted is given up for good (it can no longer be) and its
    calls fail, the other tasks are cancelled. Whether the action now names its tasks."""
    found = [await svc.store.tasks.submitted(record.user_id, _request_id(record, k),
                                             abandon=give_up)
             for k in range(record.batches)]
    if any(f is None for f in found):
        return False  # still being submitted, or not given up on yet
    per_batch = {k: iter(f.task_ids) for k, f in enumerate(found) if f and not f.abandoned}
    call_batch = record.call_batch or [0] * record.task_count
    task_ids = [next(per_batch[k]) if k in per_batch else "" for k in call_batch]
    if "" in task_ids:
        await cancel_tasks(svc, record.user_id, [t for t in task_ids if t])
    record.task_group_id = next((f.task_group_id for f in found if f and not f.abandoned), "")
    record.task_ids = task_ids
    return await svc.store.actions.update(record, _lifetime(svc))


def _lifetime(svc: Services) -> float:
    """Seconds a running action's record lives: as long as its task records."""
    return float(svc.settings.result_ttl)


# ------------------------------------------------------------------------- status


async def status(svc: Services, user: str, action_id: str) -> ActionStatus:
    return await _status(svc, await _visible(svc, user, action_id))


async def cancel(svc: Services, user: str, action_id: str) -> ActionStatus:
    """Cancel the action's tasks that have not ended; its status after that (FAILED, unless
    every task had ended already). An action whose tasks are still being submitted goes on:
    a cancel is advisory in the specification."""
    record = await _managed(svc, user, action_id)
    if record.status == "ACTIVE" and (submitted := [t for t in record.task_ids if t]):
        await cancel_tasks(svc, record.user_id, submitted)
    return await _status(svc, record)


async def release(svc: Services, user: str, action_id: str) -> ActionStatus:
    """Forget an ended action; its final status. From here on it answers 404."""
    record = await _managed(svc, user, action_id)
    final = await _status(svc, record)
    if final.status not in TERMINAL:
        raise Conflict(f"action {action_id} is still running ({final.display_status}); cancel "
                       "it, or release it once it has ended")
    if not await svc.store.actions.release(record):
        raise _not_found(action_id)
    return final


async def _visible(svc: Services, user: str, action_id: str) -> ActionRecord:
    record = await svc.store.actions.get(action_id)
    if record is None or not record.may_monitor(user):
        raise _not_found(action_id)
    return record


async def _managed(svc: Services, user: str, action_id: str) -> ActionRecord:
    record = await _visible(svc, user, action_id)
    if not record.may_manage(user):
        raise Forbidden(f"you may see action {action_id} but not cancel or release it; its "
                        "creator can name you in manage_by")
    return record


def _not_found(action_id: str) -> ObjectNotFound:
    return ObjectNotFound(f"action {clip(action_id)} not found (never started, released, expired, "
                          "or not visible to you)")


async def _status(svc: Services, record: ActionRecord) -> ActionStatus:
    """The action's status; when it has just ended, its final status is stored first."""
    if record.status != "ACTIVE":
        return _document(record, record.status, record.display_status, record.details or {})
    state: Outcome
    overdue = now() - record.created_at > SUBMIT_GRACE
    if not record.task_ids and record.batches:
        await _recover(svc, record, give_up=overdue)
    if record.task_ids:
        known = [t for t in record.task_ids if t]
        found = dict(zip(known, await svc.store.tasks.get_many(known), strict=True))
        entries = [_entry(t, found[t]) if t else _never_submitted() for t in record.task_ids]
        state, display, details = _progress(record, entries)
    elif overdue and not record.batches:
        state, display, details = "FAILED", "its tasks were never submitted", {
            "code": "NotSubmitted", "description": NEVER_SUBMITTED, "results": []}
    else:
        state, display, details = _progress(record, [])
    if state == "ACTIVE":
        return _document(record, state, display, details)
    record.status, record.display_status, record.details = state, display, details
    record.completed_at = now()
    if not await svc.store.actions.update(record, record.release_after):
        raise _not_found(record.action_id)  # released meanwhile
    return _document(record, state, display, details)


def _progress(
    record: ActionRecord, entries: list[dict[str, Any]]
) -> tuple[Outcome, str, dict[str, Any]]:
    """``(status, display_status, details)`` of the action from its tasks' entries."""
    total = record.task_count
    ended = [e for e in entries if e["status"] in ("success", "failed", "cancelled")]
    details: dict[str, Any] = {"task_group_id": record.task_group_id, "results": entries}
    if len(ended) < total or not record.task_ids:
        details.update(done=len(ended), total=total)
        return "ACTIVE", f"{len(ended)}/{total} tasks done", details
    failed = [e for e in entries if e["status"] == "failed"]
    cancelled = [e for e in entries if e["status"] == "cancelled"]
    never = [e for e in failed if e["task_id"] is None]
    if never:
        details.update(code="NotSubmitted", description=(
            f"{len(never)} of {total} tasks were never submitted: {NEVER_SUBMITTED}"))
        return "FAILED", f"{len(never)} of {total} tasks never submitted", details
    if failed:
        details.update(code="TaskFailed", description=(
            f"{len(failed)} of {total} tasks failed; task {failed[0]['task_id']}: "
            f"{_last_line(failed[0]['exception'])}"))
        return "FAILED", f"{len(failed)} of {total} tasks failed", details
    if cancelled:
        details.update(code="ActionCancelled", description=(
            f"the action was cancelled: {len(cancelled)} of {total} tasks did not run to "
            "their end"))
        return "FAILED", f"cancelled ({len(cancelled)} of {total} tasks)", details
    details["result"] = [e["output"] for e in entries]
    return "SUCCEEDED", f"{total}/{total} tasks done", details


def _never_submitted() -> dict[str, Any]:
    """The line in ``details.results`` of a call whose batch was given up."""
    return {"task_id": None, "status": "failed", "exception": NEVER_SUBMITTED}


def _entry(task_id: str, rec: TaskRecord | None) -> dict[str, Any]:
    """One task's line in ``details.results``."""
    if rec is None:
        return {"task_id": task_id, "status": "failed", "exception": EXPIRED}
    if rec.state == TaskState.SUCCESS:
        try:
            return {"task_id": task_id, "status": "success", "output": deserialize_json(rec.data)}
        except DeserializationError:
            return {"task_id": task_id, "status": "failed", "exception": NOT_JSON}
    if rec.state == TaskState.FAILED:
        return {"task_id": task_id, "status": "failed",
                "exception": rec.error or "the task failed and left no error text"}
    if rec.state == TaskState.CANCELLED:
        return {"task_id": task_id, "status": "cancelled", "exception": rec.error}
    return {"task_id": task_id, "status": rec.state.value}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return clip(lines[-1] if lines else text, 200)


def _document(record: ActionRecord, state: str, display: str | None,
              details: dict[str, Any]) -> ActionStatus:
    return ActionStatus.model_construct(
        action_id=record.action_id, status=state, creator_id=identity_urn(record.user_id),
        label=record.label, monitor_by=record.monitor_by, manage_by=record.manage_by,
        start_time=iso_time(record.created_at),
        completion_time=None if record.completed_at is None else iso_time(record.completed_at),
        release_after=iso_duration(record.release_after), display_status=display,
        details=details)


# ---------------------------------------------------------------------------- log


async def log(svc: Services, user: str, action_id: str, limit: int = LOG_LIMIT) -> ActionLog:
    """What happened, oldest first: the action's start, each state its tasks went through (while
    their records last), and its end."""
    record = await _visible(svc, user, action_id)
    known = [t for t in record.task_ids if t]
    tasks = await svc.store.tasks.get_many(known) if known else []
    events: list[tuple[float, ActionLogEntry]] = [(record.created_at, ActionLogEntry(
        code="ActionStarted", description=f"action started with {record.task_count} tasks",
        details={"time": iso_time(record.created_at)}))]
    for rec in tasks:
        if rec is None:
            continue
        for state, at in rec.transitions.items():
            code = _LOG_CODES.get(TaskState(state), "TaskStateChanged")
            events.append((at, ActionLogEntry(
                code=code, description=f"task {rec.task_id}: {state}",
                details={"task_id": rec.task_id, "state": state, "time": iso_time(at)})))
    if record.completed_at is not None:
        events.append((record.completed_at, ActionLogEntry(
            code="ActionSucceeded" if record.status == "SUCCEEDED" else "ActionFailed",
            description=record.display_status or record.status,
            details={"time": iso_time(record.completed_at)})))
    events.sort(key=lambda e: e[0])
    limit = max(1, min(limit, LOG_LIMIT))
    return ActionLog(limit=limit, has_next_page=len(events) > limit,
                     entries=[entry for _, entry in events[:limit]])
