"""The broker's REST routes (docs/protocol.md): functions, endpoints, tokens, task groups, tasks.

Routes only talk to the store's narrow interfaces and the task queue. User
payloads (function, args, data) pass through as opaque strings. Every route
documents its error answers (``ErrorBody``) in the OpenAPI document.

Who may do what: an object's owner everything; a user an endpoint or function is
shared with may use and read it (others who can see it get 403 for owner-only
actions); everyone else gets 404, as for an unknown id. Tasks and task groups
are their submitter's alone.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from farcall.broker import auth, cancellation, listing
from farcall.broker.endpoint_channel import read_queued, send_control
from farcall.broker.errors import (
    Forbidden,
    InvalidRequest,
    ObjectNotFound,
    QuotaExceeded,
    Unauthorized,
    clip,
)
from farcall.broker.health import check as check_health
from farcall.broker.records import EndpointRecord, FunctionRecord, TaskGroupRecord, TaskRecord
from farcall.broker.services import Services
from farcall.broker.submission import publish_results, submit_batch
from farcall.protocol.common import now, version_mismatch
from farcall.protocol.control import EndpointRemoved
from farcall.protocol.rest import (
    BatchSubmission,
    BatchSubmitted,
    CancelRequest,
    EndpointDeleted,
    EndpointInfo,
    EndpointList,
    EndpointRegistered,
    EndpointRegistration,
    EndpointSharing,
    EndpointStatus,
    ErrorBody,
    FunctionDeleted,
    FunctionInfo,
    FunctionRegistered,
    FunctionRegistration,
    FunctionSharing,
    Health,
    ShareRequest,
    TaskGroupCreated,
    TaskGroupInfo,
    TaskGroupList,
    TaskIds,
    TaskInfo,
    TaskList,
    TasksCancelled,
    TaskStatuses,
    TokenCreated,
    TokenInfo,
    TokenList,
    TokenRequest,
    TokenRevoked,
    WhoAmI,
)

_bearer = HTTPBearer(auto_error=False, description="a user token (fcu_...)")

_WHY = {
    400: "the request is malformed (a Content-Length that is not a number, JSON nested too deep)",
    401: "no token, or an unknown or revoked one",
    403: "the credential may not do this: an endpoint credential on a user route, a shared "
         "object's owner-only action, or a quota (endpoints, functions) reached",
    404: "no such object, or not yours (nor shared with you)",
    413: "the request body is over the broker's limit",
    422: "the request does not match the schema; 'detail' says where",
    429: "too many requests (per token), too many failed authentications (per address), or the "
         "open-task quota reached; wait 'Retry-After' seconds",
    503: "the broker's store or queue is not answering; retry later",
}


def error_answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the ``ErrorBody`` schema."""
    answers: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        answers[code] = {"model": ErrorBody, "description": _WHY[code]}
        if code == 429:
            answers[code]["headers"] = {"Retry-After": {
                "description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
    return answers


ANY_ERRORS = error_answers(400, 413)
"""What any route may answer: the body limit and the body reader apply to every request."""
USER_ERRORS = error_answers(400, 401, 403, 413, 422, 429, 503)
"""What any route taking a user token may answer."""
OBJECT_ERRORS = error_answers(400, 401, 403, 404, 413, 422, 429, 503)
"""What a route about one object (by id) may answer."""

router = APIRouter(prefix="/v1")


def _services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def _user(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The id of the user whose token came with the request (401/403/429 otherwise)."""
    svc = _services(request)
    address = request.client.host if request.client else ""
    principal = await svc.authenticate(creds.credentials if creds else None, address)
    svc.charge(principal)
    return principal.id


User = Annotated[str, Depends(_user)]
Svc = Annotated[Services, Depends(_services)]


def _json(model: Any, *, exclude_unset: bool = False) -> Response:
    """A model as JSON, without FastAPI validating it again (the hot routes)."""
    return Response(model.model_dump_json(exclude_unset=exclude_unset),
                    media_type="application/json")


@router.get("/health", response_model=Health, responses={**ANY_ERRORS, 503: {
    "model": Health,
    "description": "a backing service (Redis or RabbitMQ) is not answering; 'services' says which"}})
async def health(svc: Svc) -> Response:
    """Whether the broker can serve: 200 when its store and queue answer, 503 (saying which
    is down) while one does not. Answers without a token."""
    status, body = await check_health(svc)
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


# ---- functions


@router.post("/functions", responses=USER_ERRORS)
async def register_function(body: FunctionRegistration, user: User, svc: Svc) -> FunctionRegistered:
    limit = svc.settings.max_functions
    if limit and await svc.store.functions.count(user) >= limit:
        raise QuotaExceeded(
            f"you have {limit} functions registered, the most this broker allows "
            "(FARCALL_MAX_FUNCTIONS); delete some with Client.delete_function")
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


async def _function(svc: Services, user: str, function_id: str, *, owner: bool) -> FunctionRecord:
    """The function if ``user`` may see it (404 otherwise); with ``owner``, 403 unless theirs."""
    found = (await svc.store.functions.get_many([function_id])).get(function_id)
    if found is None or not found.usable_by(user):
        raise ObjectNotFound(f"function {clip(function_id)} not found; register it first")
    if owner and found.user_id != user:
        raise Forbidden(f"function {function_id} was shared with you; only its owner may "
                        "change, share or delete it")
    return found


@router.get("/functions/{function_id}", responses=OBJECT_ERRORS)
async def get_function(function_id: str, user: User, svc: Svc) -> FunctionInfo:
    f = await _function(svc, user, function_id, owner=False)
    return FunctionInfo(function_id=f.function_id, function_name=f.function_name,
                        description=f.description, function=f.function, created_at=f.created_at,
                        role="owner" if f.user_id == user else "shared", public=f.public)


@router.delete("/functions/{function_id}", responses=OBJECT_ERRORS)
async def delete_function(function_id: str, user: User, svc: Svc) -> FunctionDeleted:
    await _function(svc, user, function_id, owner=True)
    await svc.store.functions.delete(function_id)
    svc.functions.pop(function_id)
    return FunctionDeleted(function_id=function_id, deleted=True)


async def _sharee(svc: Services, owner: str, body: ShareRequest) -> str | None:
    """The id of the user ``body`` names (404 if there is none), or None if it names nobody."""
    if body.username is None:
        return None
    found = await svc.store.users.by_name(body.username)
    if found is None:
        raise ObjectNotFound(f"no user named {body.username!r}; check the name with its owner")
    if found.user_id == owner:
        raise InvalidRequest("you own it already; name another user")
    return found.user_id


async def _usernames(svc: Services, user_ids: list[str]) -> list[str]:
    users = await svc.store.users.get_many(user_ids)
    return sorted(users[u].name for u in user_ids if u in users)


async def _function_sharing(svc: Services, function_id: str) -> FunctionSharing:
    f = (await svc.store.functions.get_many([function_id])).get(function_id)
    if f is None:  # deleted meanwhile
        raise ObjectNotFound(f"function {clip(function_id)} not found; register it first")
    return FunctionSharing(function_id=function_id, shared_with=await _usernames(svc, f.shared_with),
                           public=f.public)


async def _share_function(
    svc: Services, user: str, function_id: str, body: ShareRequest, shared: bool
) -> FunctionSharing:
    await _function(svc, user, function_id, owner=True)
    if body.username is None and not body.public:
        raise InvalidRequest("name a user ('username') or set 'public': true")
    await svc.store.functions.share(function_id, await _sharee(svc, user, body),
                                    True if body.public else None, shared)
    svc.functions.pop(function_id)
    return await _function_sharing(svc, function_id)


@router.post("/functions/{function_id}/share", responses=OBJECT_ERRORS)
async def share_function(
    function_id: str, body: ShareRequest, user: User, svc: Svc
) -> FunctionSharing:
    """Let a user (``username``) or every user (``public``) run the function and read it."""
    return await _share_function(svc, user, function_id, body, shared=True)


@router.post("/functions/{function_id}/unshare", responses=OBJECT_ERRORS)
async def unshare_function(
    function_id: str, body: ShareRequest, user: User, svc: Svc
) -> FunctionSharing:
    """Stop sharing the function with a user (``username``) or with everyone (``public``);
    tasks already submitted still run."""
    return await _share_function(svc, user, function_id, body, shared=False)


@router.get("/functions/{function_id}/sharing", responses=OBJECT_ERRORS)
async def function_sharing(function_id: str, user: User, svc: Svc) -> FunctionSharing:
    await _function(svc, user, function_id, owner=True)
    return await _function_sharing(svc, function_id)


# ---- endpoints


@router.post("/endpoints", responses=USER_ERRORS)
async def register_endpoint(body: EndpointRegistration, user: User, svc: Svc) -> EndpointRegistered:
    limit = svc.settings.max_endpoints
    if limit and sum(ep.user_id == user for ep in await svc.store.endpoints.list(user)) >= limit:
        raise QuotaExceeded(
            f"you own {limit} endpoints, the most this broker allows (FARCALL_MAX_ENDPOINTS); "
            "delete one you no longer use (farcall-endpoint delete, or Client.delete_endpoint)")
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


def _endpoint_info(svc: Services, ep: EndpointRecord, user: str) -> EndpointInfo:
    return EndpointInfo(endpoint_id=ep.endpoint_id, name=ep.name, description=ep.description,
                        status=_status(svc, ep), created_at=ep.created_at,
                        last_heartbeat=ep.last_heartbeat,
                        role="owner" if ep.user_id == user else "shared")


async def _endpoint(svc: Services, user: str, endpoint_id: str, *, owner: bool) -> EndpointRecord:
    """The endpoint if ``user`` may use it (404 otherwise); with ``owner``, 403 unless theirs."""
    ep = await svc.store.endpoints.get(endpoint_id)
    if ep is None or not ep.usable_by(user):
        raise ObjectNotFound(
            f"endpoint {clip(endpoint_id)} not found; list yours with GET /v1/endpoints")
    if owner and ep.user_id != user:
        raise Forbidden(f"endpoint {endpoint_id} is shared with you; only its owner may "
                        "change, share or delete it")
    return ep


@router.get("/endpoints", responses=USER_ERRORS)
async def list_endpoints(user: User, svc: Svc) -> EndpointList:
    """Your endpoints and those shared with you (``role``)."""
    return EndpointList(
        endpoints=[_endpoint_info(svc, ep, user) for ep in await svc.store.endpoints.list(user)])


@router.get("/endpoints/{endpoint_id}", responses=OBJECT_ERRORS)
async def get_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointInfo:
    return _endpoint_info(svc, await _endpoint(svc, user, endpoint_id, owner=False), user)


@router.get("/endpoints/{endpoint_id}/status", responses=OBJECT_ERRORS)
async def endpoint_status(endpoint_id: str, user: User, svc: Svc) -> EndpointStatus:
    ep = await _endpoint(svc, user, endpoint_id, owner=False)
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


@router.delete("/endpoints/{endpoint_id}", responses=OBJECT_ERRORS)
async def delete_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointDeleted:
    """Delete the endpoint: its credential stops working, its session ends, and every task
    still waiting for it (queued or in flight) fails with an error that says why."""
    await _endpoint(svc, user, endpoint_id, owner=True)
    waiting = _task_ids(await svc.queue.drain(endpoint_id))  # 503 here changes nothing yet
    waiting += list(await svc.store.inflight.get(endpoint_id))
    await svc.store.endpoints.delete(endpoint_id)
    svc.endpoint_access.pop(endpoint_id)
    await send_control(svc, endpoint_id, EndpointRemoved())
    waiting += _task_ids(await svc.queue.drain(endpoint_id))  # queued while we deleted
    error = (f"endpoint {endpoint_id} was deleted before this task finished; submit it to "
             "another endpoint")
    await publish_results(svc, await svc.store.tasks.fail(waiting, error, now()))
    await svc.queue.delete(endpoint_id)
    return EndpointDeleted(endpoint_id=endpoint_id, deleted=True)


async def _share_endpoint(
    svc: Services, user: str, endpoint_id: str, body: ShareRequest, shared: bool
) -> EndpointSharing:
    await _endpoint(svc, user, endpoint_id, owner=True)
    if body.public or body.username is None:
        raise InvalidRequest("an endpoint is shared with named users only: give 'username' "
                             "(and no 'public')")
    sharee = await _sharee(svc, user, body)
    assert sharee is not None
    await svc.store.endpoints.share(endpoint_id, sharee, shared)
    svc.endpoint_access.pop(endpoint_id)
    return await _endpoint_sharing(svc, user, endpoint_id)


async def _endpoint_sharing(svc: Services, user: str, endpoint_id: str) -> EndpointSharing:
    ep = await _endpoint(svc, user, endpoint_id, owner=True)
    return EndpointSharing(endpoint_id=endpoint_id,
                           shared_with=await _usernames(svc, ep.shared_with))


@router.post("/endpoints/{endpoint_id}/share", responses=OBJECT_ERRORS)
async def share_endpoint(
    endpoint_id: str, body: ShareRequest, user: User, svc: Svc
) -> EndpointSharing:
    """Let a user submit tasks to the endpoint and read its status (their tasks stay theirs)."""
    return await _share_endpoint(svc, user, endpoint_id, body, shared=True)


@router.post("/endpoints/{endpoint_id}/unshare", responses=OBJECT_ERRORS)
async def unshare_endpoint(
    endpoint_id: str, body: ShareRequest, user: User, svc: Svc
) -> EndpointSharing:
    """Stop sharing the endpoint with a user; tasks they already submitted still run."""
    return await _share_endpoint(svc, user, endpoint_id, body, shared=False)


@router.get("/endpoints/{endpoint_id}/sharing", responses=OBJECT_ERRORS)
async def endpoint_sharing(endpoint_id: str, user: User, svc: Svc) -> EndpointSharing:
    return await _endpoint_sharing(svc, user, endpoint_id)


# ---- tokens


@router.get("/tokens", responses=USER_ERRORS)
async def list_tokens(user: User, svc: Svc) -> TokenList:
    """Your tokens, oldest first (never the tokens themselves)."""
    return TokenList(tokens=[TokenInfo(token_id=t.token_id, name=t.name, created_at=t.created_at)
                             for t in await svc.store.users.list_tokens(user)])


@router.post("/tokens", responses=USER_ERRORS)
async def create_token(
    user: User, svc: Svc, body: Annotated[TokenRequest | None, Body()] = None
) -> TokenCreated:
    """A new token for you; the answer is the only time the token is shown."""
    record, token = await auth.add_token(svc.store.users, user, body.name if body else "")
    return TokenCreated(token_id=record.token_id, token=token, name=record.name,
                        created_at=record.created_at)


@router.delete("/tokens/{token_id}", responses=OBJECT_ERRORS)
async def revoke_token(token_id: str, user: User, svc: Svc) -> TokenRevoked:
    """Revoke one of your tokens: every broker replica refuses it within a second, and result
    streams opened with it are closed."""
    if await auth.revoke_token(svc.store, token_id, user) is None:
        raise ObjectNotFound(f"token {clip(token_id)} not found; list yours with GET /v1/tokens")
    return TokenRevoked(token_id=token_id, revoked=True)


def _task_ids(bodies: list[bytes]) -> list[str]:
    """The task ids in queued messages, readable tasks or not."""
    ids: list[str] = []
    for body in bodies:
        tasks, unreadable = read_queued(body)
        ids += [t.task_id for t in tasks] + list(unreadable)
    return ids


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
             responses=OBJECT_ERRORS)
async def submit_tasks(batch: BatchSubmission, user: User, svc: Svc) -> Response:
    """Record a batch (one store round trip) and queue it whole, as one confirmed message."""
    return _json(await submit_batch(svc, user, batch))


@router.post("/tasks/cancel", response_model=TasksCancelled,
             responses=USER_ERRORS)
async def cancel_tasks(body: CancelRequest, user: User, svc: Svc) -> Response:
    """Cancel tasks: queued ones never run; running ones are stopped on their endpoint (with
    ``only_queued``, left to finish). A cancelled task's state is ``cancelled``, final."""
    done = await cancellation.cancel_tasks(svc, user, body.task_ids, body.only_queued)
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
            responses=OBJECT_ERRORS)
async def get_task(task_id: str, user: User, svc: Svc) -> Response:
    (rec,) = await svc.store.tasks.get_many([task_id])
    if rec is None or rec.user_id != user:
        raise ObjectNotFound(
            f"task {clip(task_id)} not found (unknown, not yours, or its result expired)")
    return _json(task_info(rec), exclude_unset=True)


@router.post("/tasks/status", response_model=TaskStatuses, response_model_exclude_unset=True,
             responses=USER_ERRORS)
async def tasks_status(body: TaskIds, user: User, svc: Svc) -> Response:
    records = await svc.store.tasks.get_many(list(dict.fromkeys(body.task_ids)))
    tasks = {r.task_id: task_info(r) for r in records if r is not None and r.user_id == user}
    return _json(TaskStatuses.model_construct(tasks=tasks), exclude_unset=True)


# ---- identity


@router.get("/whoami", responses=USER_ERRORS)
async def whoami(user: User, svc: Svc) -> WhoAmI:
    """You: your user name, and your ``identity_id``, by which the Action Provider API names
    you (``creator_id``, ``manage_by``, ``monitor_by``: ``urn:globus:auth:identity:<id>``)."""
    found = await svc.store.users.get(user)
    if found is None:  # the user was removed while a token of theirs was still cached
        raise Unauthorized("the token's user no longer exists; ask your broker operator")
    return WhoAmI(username=found.name, identity_id=found.user_id)
