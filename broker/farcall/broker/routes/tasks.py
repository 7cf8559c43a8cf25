"""``/v1/tasks`` and ``/v1/task_groups``: submitting, reading, listing and cancelling a user's
tasks, and their task groups. Taking a batch in is ``submission``; cancelling is
``endpoint_control``; listing is ``listing``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from farcall.broker import endpoint_control, listing
from farcall.broker.deps import (
    OBJECT_ERRORS,
    USER_ERRORS,
    Svc,
    User,
    json_response,
    with_conflict,
)
from farcall.broker.errors import ObjectNotFound, clip
from farcall.broker.records import TaskGroupRecord, TaskRecord
from farcall.broker.submission import submit_batch
from farcall.protocol.common import now, version_mismatch
from farcall.protocol.rest import (
    BatchSubmission,
    BatchSubmitted,
    CancelRequest,
    TaskGroupCreated,
    TaskGroupInfo,
    TaskGroupList,
    TaskIds,
    TaskInfo,
    TaskList,
    TasksCancelled,
    TaskStatuses,
)

router = APIRouter(prefix="/v1")

SUBMIT_ERRORS = with_conflict(OBJECT_ERRORS, "the request_id named another submission of yours "
                              "(another endpoint or number of tasks): use a new request_id")
"""A submission: an object's errors, and 409 for a request id used for another submission."""


# ---- task groups


@router.post("/task_groups", responses=USER_ERRORS)
async def create_task_group(
    user: User, svc: Svc, body: Annotated[dict[str, Any] | None, Body()] = None
) -> TaskGroupCreated:
    task_group_id = str(uuid.uuid4())
    await svc.store.tasks.create_group(
        TaskGroupRecord(task_group_id=task_group_id, user_id=user, created_at=now()))
    return TaskGroupCreated(task_group_id=task_group_id)


@router.get("/task_groups/{task_group_id}", responses=OBJECT_ERRORS)
async def get_task_group(task_group_id: str, user: User, svc: Svc) -> TaskGroupInfo:
    if await svc.store.tasks.group_owner(task_group_id) != user:
        raise ObjectNotFound(
            f"task group {clip(task_group_id)} not found; create one with POST /v1/task_groups"
        )
    return TaskGroupInfo(task_group_id=task_group_id,
                         task_ids=await svc.store.tasks.group_tasks(task_group_id))


@router.get("/task_groups", responses=USER_ERRORS)
async def list_task_groups(
    user: User, svc: Svc, limit: Annotated[int, Query(ge=1, le=listing.MAX_LIMIT)] = 20
) -> TaskGroupList:
    """Your task groups, the most recently submitted to first (the latest 1,000 are listed;
    an older one is still readable by its id until it expires)."""
    return await listing.task_groups(svc, user, limit)


# ---- tasks


@router.get("/tasks", responses=OBJECT_ERRORS)
async def list_tasks(
    user: User, svc: Svc,
    task_group_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=listing.MAX_LIMIT)] = 20,
) -> TaskList:
    """Your most recently submitted tasks (of one group with ``task_group_id``), newest first:
    state and times, not results (``GET /v1/tasks/{task_id}`` has those)."""
    return await listing.tasks(svc, user, limit, task_group_id)


@router.post("/tasks", response_model=BatchSubmitted,
             responses=SUBMIT_ERRORS)
async def submit_tasks(batch: BatchSubmission, user: User, svc: Svc) -> Response:
    """Record a batch (one store round trip) and queue it whole, as one confirmed message; sent
    again under its ``request_id``, the same answer (409: the id named another submission)."""
    return json_response(await submit_batch(svc, user, batch))


@router.post("/tasks/cancel", response_model=TasksCancelled,
             responses=USER_ERRORS)
async def cancel_tasks(body: CancelRequest, user: User, svc: Svc) -> Response:
    """Cancel tasks: queued ones never run; running ones are stopped on their endpoint (with
    ``only_queued``, left to finish). A cancelled task's state is ``cancelled``, final."""
    done = await endpoint_control.cancel_tasks(svc, user, body.task_ids, body.only_queued)
    return json_response(TasksCancelled(cancelled=[r.task_id for _, _, r in done.results],
                                        unchanged=done.unchanged))


def task_info(rec: TaskRecord) -> TaskInfo:
    """A task record as the REST API shows it; ``data``/``error`` only once terminal."""
    fields: dict[str, Any] = {
        "task_id": rec.task_id,
        "task_group_id": rec.task_group_id,
        "endpoint_id": rec.endpoint_id,
        "function_id": rec.function_id,
        "state": rec.state,
        "transitions": rec.transitions,
        "completed_at": rec.completed_at,
        "submitter": rec.submitter,
        "worker": rec.worker,
    }
    if rec.state.terminal:
        fields.update(data=rec.data, error=rec.error)
    if rec.attempts:
        fields["attempts"] = rec.attempts
    mismatch = version_mismatch(rec.submitter, rec.worker)
    if mismatch:
        fields["warnings"] = [mismatch]
    return TaskInfo.model_construct(**fields)


@router.get("/tasks/{task_id}", response_model=TaskInfo, response_model_exclude_unset=True,
            responses=OBJECT_ERRORS)
async def get_task(task_id: str, user: User, svc: Svc) -> Response:
    (rec,) = await svc.store.tasks.get_many([task_id])
    if rec is None or rec.user_id != user:
        raise ObjectNotFound(
            f"task {clip(task_id)} not found (unknown, not yours, or its result expired)")
    return json_response(task_info(rec), exclude_unset=True)


@router.post("/tasks/status", response_model=TaskStatuses, response_model_exclude_unset=True,
             responses=USER_ERRORS)
async def tasks_status(body: TaskIds, user: User, svc: Svc) -> Response:
    records = await svc.store.tasks.get_many(list(dict.fromkeys(body.task_ids)))
    tasks = {r.task_id: task_info(r) for r in records if r is not None and r.user_id == user}
    return json_response(TaskStatuses.model_construct(tasks=tasks), exclude_unset=True)
