"""The broker's REST routes (docs/protocol.md): functions, endpoints, task groups, tasks.

Routes only talk to the store's narrow interfaces and the task queue. User
payloads (function, args, data) pass through as opaque strings. Every route
documents its error answers (``ErrorBody``) in the OpenAPI document.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from farcall.broker import auth
from farcall.broker.endpoint_channel import read_queued, send_control
from farcall.broker.errors import Forbidden, ObjectNotFound, Unauthorized
from farcall.broker.health import check as check_health
from farcall.broker.services import Services
from farcall.broker.submission import publish_results, submit_batch
from farcall.messages import (
    BatchSubmission,
    BatchSubmitted,
    CancelRequest,
    EndpointDeleted,
    EndpointInfo,
    EndpointList,
    EndpointRegistered,
    EndpointRegistration,
    EndpointStatus,
    ErrorBody,
    FunctionDeleted,
    FunctionInfo,
    FunctionRegistered,
    FunctionRegistration,
    Health,
    TaskGroupCreated,
    TaskGroupInfo,
    TaskIds,
    TaskInfo,
    TasksCancelled,
    TaskStatuses,
    now,
    version_mismatch,
)
from farcall.records import EndpointRecord, FunctionRecord, TaskGroupRecord, TaskRecord

_bearer = HTTPBearer(auto_error=False, description="a user token (fcu_...)")

_WHY = {
    400: "the request is malformed",
    401: "no token, or an unknown or revoked one",
    403: "the credential may not do this (an endpoint credential on a user route)",
    404: "no such object, or not yours",
    413: "the request body is over the broker's limit",
    422: "the request does not match the schema; 'detail' says where",
    503: "the broker's store or queue is not answering; retry later",
}


def error_answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the ``ErrorBody`` schema."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


USER_ERRORS = error_answers(401, 403, 422, 503)
"""What any route taking a user token may answer."""

router = APIRouter(prefix="/v1")


def _services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def _user(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The id of the user whose token came with the request (401/403 otherwise)."""
    if creds is None:
        raise Unauthorized("no token: send 'Authorization: Bearer <your user token>'")
    principal = await _services(request).authenticate_user(creds.credentials)
    if principal is None:
        raise Unauthorized(
            "the token is unknown or revoked; ask your broker operator for a new one"
        )
    if principal.kind != "user":
        raise Forbidden(
            "an endpoint credential may only open its endpoint's channel; use a user token"
        )
    return principal.id


User = Annotated[str, Depends(_user)]
Svc = Annotated[Services, Depends(_services)]


def _json(model: Any, *, exclude_unset: bool = False) -> Response:
    """A model as JSON, without FastAPI validating it again (the hot routes)."""
    return Response(model.model_dump_json(exclude_unset=exclude_unset),
                    media_type="application/json")


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": (
    "a backing service (Redis or RabbitMQ) is not answering; 'services' says which")}})
async def health(svc: Svc) -> Response:
    """Whether the broker can serve: 200 when its store and queue answer, 503 (saying which
    is down) while one does not. Answers without a token."""
    status, body = await check_health(svc)
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


# ---- functions


@router.post("/functions", responses={**USER_ERRORS, **error_answers(413)})
async def register_function(body: FunctionRegistration, user: User, svc: Svc) -> FunctionRegistered:
    function_id = str(uuid.uuid4())
    await svc.store.functions.put(FunctionRecord(
        function_id=function_id,
        user_id=user,
        function_name=body.function_name,
        description=body.description,
        function=body.function,
        created_at=now(),
    ))
    return FunctionRegistered(function_id=function_id)


async def _own_function(svc: Services, user: str, function_id: str) -> FunctionRecord:
    found = (await svc.store.functions.get_many([function_id])).get(function_id)
    if found is None or found.user_id != user:
        raise ObjectNotFound(f"function {function_id} not found; register it first")
    return found


@router.get("/functions/{function_id}", responses={**USER_ERRORS, **error_answers(404)})
async def get_function(function_id: str, user: User, svc: Svc) -> FunctionInfo:
    f = await _own_function(svc, user, function_id)
    return FunctionInfo(function_id=f.function_id, function_name=f.function_name,
                        description=f.description, function=f.function, created_at=f.created_at)


@router.delete("/functions/{function_id}", responses={**USER_ERRORS, **error_answers(404)})
async def delete_function(function_id: str, user: User, svc: Svc) -> FunctionDeleted:
    await _own_function(svc, user, function_id)
    await svc.store.functions.delete(function_id)
    svc.functions.pop(function_id)
    return FunctionDeleted(function_id=function_id, deleted=True)


# ---- endpoints


@router.post("/endpoints", responses={**USER_ERRORS, **error_answers(413)})
async def register_endpoint(body: EndpointRegistration, user: User, svc: Svc) -> EndpointRegistered:
    endpoint_id = str(uuid.uuid4())
    credential = auth.new_token(auth.ENDPOINT_PREFIX)
    await svc.queue.declare(endpoint_id)
    await svc.store.endpoints.put(
        EndpointRecord(endpoint_id=endpoint_id, user_id=user, name=body.name,
                       description=body.description, created_at=now()),
        auth.token_hash(credential),
    )
    return EndpointRegistered(endpoint_id=endpoint_id, name=body.name, credential=credential)


def _status(svc: Services, ep: EndpointRecord) -> Literal["online", "offline"]:
    return "online" if ep.online(svc.settings.endpoint_timeout, now()) else "offline"


def _endpoint_info(svc: Services, ep: EndpointRecord) -> EndpointInfo:
    return EndpointInfo(endpoint_id=ep.endpoint_id, name=ep.name, description=ep.description,
                        status=_status(svc, ep), created_at=ep.created_at,
                        last_heartbeat=ep.last_heartbeat)


async def _own_endpoint(svc: Services, user: str, endpoint_id: str) -> EndpointRecord:
    ep = await svc.store.endpoints.get(endpoint_id)
    if ep is None or ep.user_id != user:
        raise ObjectNotFound(f"endpoint {endpoint_id} not found; list yours with GET /v1/endpoints")
    return ep


@router.get("/endpoints", responses=USER_ERRORS)
async def list_endpoints(user: User, svc: Svc) -> EndpointList:
    return EndpointList(
        endpoints=[_endpoint_info(svc, ep) for ep in await svc.store.endpoints.list(user)])


@router.get("/endpoints/{endpoint_id}", responses={**USER_ERRORS, **error_answers(404)})
async def get_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointInfo:
    return _endpoint_info(svc, await _own_endpoint(svc, user, endpoint_id))


@router.get("/endpoints/{endpoint_id}/status", responses={**USER_ERRORS, **error_answers(404)})
async def endpoint_status(endpoint_id: str, user: User, svc: Svc) -> EndpointStatus:
    ep = await _own_endpoint(svc, user, endpoint_id)
    hb = ep.heartbeat
    return EndpointStatus(
        endpoint_id=endpoint_id,
        name=ep.name,
        status=_status(svc, ep),
        last_heartbeat=ep.last_heartbeat,
        workers=hb.workers,
        idle_workers=hb.idle_workers,
        pending_tasks=hb.pending_tasks,
        running_tasks=hb.running_tasks,
        queued_tasks=ep.queued_tasks,
        engine=hb.engine,
        details=hb.details,
        versions=hb.versions,
    )


@router.delete("/endpoints/{endpoint_id}", responses={**USER_ERRORS, **error_answers(404)})
async def delete_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointDeleted:
    """Delete the endpoint: its credential stops working, its session ends, and every task
    still waiting for it (queued or in flight) fails with an error that says why."""
    await _own_endpoint(svc, user, endpoint_id)
    waiting = _task_ids(await svc.queue.drain(endpoint_id))  # 503 here changes nothing yet
    waiting += list(await svc.store.inflight.get(endpoint_id))
    await svc.store.endpoints.delete(endpoint_id)
    svc.endpoint_owners.pop(endpoint_id)
    await send_control(svc, endpoint_id, {"type": "deleted"})
    waiting += _task_ids(await svc.queue.drain(endpoint_id))  # queued while we deleted
    error = (f"endpoint {endpoint_id} was deleted before this task finished; submit it to "
             "another endpoint")
    await publish_results(svc, await svc.store.tasks.fail(waiting, error, now()))
    await svc.queue.delete(endpoint_id)
    return EndpointDeleted(endpoint_id=endpoint_id, deleted=True)


def _task_ids(bodies: list[bytes]) -> list[str]:
    """The task ids in queued messages, readable tasks or not."""
    ids: list[str] = []
    for body in bodies:
        tasks, unreadable = read_queued(body)
        ids += [t.task_id for t in tasks] + list(unreadable)
    return ids


# ---- task groups


@router.post("/task_groups", responses={**USER_ERRORS, **error_answers(413)})
async def create_task_group(
    user: User, svc: Svc, body: Annotated[dict[str, Any] | None, Body()] = None
) -> TaskGroupCreated:
    task_group_id = str(uuid.uuid4())
    await svc.store.tasks.create_group(
        TaskGroupRecord(task_group_id=task_group_id, user_id=user, created_at=now()))
    return TaskGroupCreated(task_group_id=task_group_id)


@router.get("/task_groups/{task_group_id}", responses={**USER_ERRORS, **error_answers(404)})
async def get_task_group(task_group_id: str, user: User, svc: Svc) -> TaskGroupInfo:
    if await svc.store.tasks.group_owner(task_group_id) != user:
        raise ObjectNotFound(
            f"task group {task_group_id} not found; create one with POST /v1/task_groups"
        )
    return TaskGroupInfo(task_group_id=task_group_id,
                         task_ids=await svc.store.tasks.group_tasks(task_group_id))


# ---- tasks


@router.post("/tasks", response_model=BatchSubmitted,
             responses={**USER_ERRORS, **error_answers(404, 413)})
async def submit_tasks(batch: BatchSubmission, user: User, svc: Svc) -> Response:
    """Record a batch (one store round trip) and queue it whole, as one confirmed message."""
    return _json(await submit_batch(svc, user, batch))


@router.post("/tasks/cancel", response_model=TasksCancelled,
             responses={**USER_ERRORS, **error_answers(413)})
async def cancel_tasks(body: CancelRequest, user: User, svc: Svc) -> Response:
    """Cancel tasks: queued ones never run; running ones are stopped on their endpoint (with
    ``only_queued``, left to finish). A cancelled task's state is ``cancelled``, final."""
    done = await svc.store.tasks.cancel(user, body.task_ids, body.only_queued, now())
    await publish_results(svc, [(group, result) for group, _, result in done.results])
    by_endpoint: dict[str, list[str]] = {}
    for _, endpoint_id, result in done.results:
        by_endpoint.setdefault(endpoint_id, []).append(result.task_id)
    for endpoint_id, ids in by_endpoint.items():
        await send_control(svc, endpoint_id, {"type": "cancel", "task_ids": ids})
    return _json(TasksCancelled(cancelled=[r.task_id for _, _, r in done.results],
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
            responses={**USER_ERRORS, **error_answers(404)})
async def get_task(task_id: str, user: User, svc: Svc) -> Response:
    (rec,) = await svc.store.tasks.get_many([task_id])
    if rec is None or rec.user_id != user:
        raise ObjectNotFound(f"task {task_id} not found (unknown, not yours, or its result expired)")
    return _json(task_info(rec), exclude_unset=True)


@router.post("/tasks/status", response_model=TaskStatuses, response_model_exclude_unset=True,
             responses={**USER_ERRORS, **error_answers(413)})
async def tasks_status(body: TaskIds, user: User, svc: Svc) -> Response:
    records = await svc.store.tasks.get_many(list(dict.fromkeys(body.task_ids)))
    tasks = {r.task_id: task_info(r) for r in records if r is not None and r.user_id == user}
    return _json(TaskStatuses.model_construct(tasks=tasks), exclude_unset=True)
