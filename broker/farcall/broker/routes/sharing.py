"""Sharing functions and endpoints with other users (``/share``, ``/unshare``, ``/sharing``), and
leaving what was shared with you (``/leave``).

A function is shared with named users or with everyone (``public``); an endpoint with named
users only. Only the owner shares, unshares or reads the list; anyone can share with anyone,
so the user shared with can leave it. Taking access away (an unshare, a leave) is told to every
replica at once (``access.withdraw``), and an endpoint's unshare or leave cancels the tasks that
user has waiting or running there, saying why.

Sharing a single-user endpoint answers with ``SINGLE_USER_WARNING``: its tasks all run as the
owner's Unix account, so the users it is shared with can act as the owner there.
"""

from __future__ import annotations

from fastapi import APIRouter

from farcall.broker import access
from farcall.broker.deps import OBJECT_ERRORS, Svc, User
from farcall.broker.errors import InvalidRequest, ObjectNotFound, clip
from farcall.broker.routes.endpoints import find_endpoint
from farcall.broker.routes.functions import find_function
from farcall.broker.services import Services
from farcall.protocol.control import AccessRevoked
from farcall.protocol.rest import (
    EndpointLeft,
    EndpointSharing,
    FunctionLeft,
    FunctionSharing,
    ShareRequest,
)

router = APIRouter(prefix="/v1")


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


# ---- functions


async def _function_sharing(svc: Services, function_id: str) -> FunctionSharing:
    f = (await svc.store.functions.get_many([function_id])).get(function_id)
    if f is None:  # deleted meanwhile
        raise ObjectNotFound(f"function {clip(function_id)} not found; register it first")
    return FunctionSharing(function_id=function_id, shared_with=await _usernames(svc, f.shared_with),
                           public=f.public)


async def _share_function(
    svc: Services, user: str, function_id: str, body: ShareRequest, shared: bool
) -> FunctionSharing:
    await find_function(svc, user, function_id, owner=True)
    if body.username is None and not body.public:
        raise InvalidRequest("name a user ('username') or set 'public': true")
    await svc.store.functions.share(function_id, await _sharee(svc, user, body),
                                    True if body.public else None, shared)
    await _function_withdrawn(svc, function_id)
    return await _function_sharing(svc, function_id)


async def _function_withdrawn(svc: Services, function_id: str) -> None:
    """Every replica reads the function's access anew (here at once, elsewhere on the broadcast)."""
    svc.functions.pop(function_id)
    await svc.store.pubsub.publish_revocation(AccessRevoked(type="access", function_id=function_id))


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
    """Stop sharing the function with a user (``username``) or with everyone (``public``):
    every broker replica refuses new submissions of it at once; tasks already submitted still
    run."""
    return await _share_function(svc, user, function_id, body, shared=False)


@router.post("/functions/{function_id}/leave", responses=OBJECT_ERRORS)
async def leave_function(function_id: str, user: User, svc: Svc) -> FunctionLeft:
    """Stop using a function another user shared with you by name: you can no longer run it
    (tasks already submitted still run). A public function is shared with everyone, so it
    cannot be left (400)."""
    f = await find_function(svc, user, function_id, owner=False)
    if f.user_id == user:
        raise InvalidRequest(f"function {function_id} is yours; delete it instead "
                             "(DELETE /v1/functions/{function_id})")
    if user not in f.shared_with:
        raise InvalidRequest(f"function {function_id} is public, shared with every user, not "
                             "with you by name: there is nothing to leave")
    await svc.store.functions.share(function_id, user, None, False)
    await _function_withdrawn(svc, function_id)
    return FunctionLeft(function_id=function_id, left=True)


@router.get("/functions/{function_id}/sharing", responses=OBJECT_ERRORS)
async def function_sharing(function_id: str, user: User, svc: Svc) -> FunctionSharing:
    await find_function(svc, user, function_id, owner=True)
    return await _function_sharing(svc, function_id)


# ---- endpoints


SINGLE_USER_WARNING = (
    "endpoint {endpoint_id} is a single-user endpoint: it runs every task as its owner's Unix "
    "account, so the users it is shared with can act as its owner there and see each other's "
    "work on it; share a multi-user endpoint to keep users apart")
"""What sharing an endpoint that does not isolate its users (``EndpointRecord.isolates_users``)
answers, beside its sharing."""


async def _share_endpoint(
    svc: Services, user: str, endpoint_id: str, body: ShareRequest, shared: bool
) -> EndpointSharing:
    await find_endpoint(svc, user, endpoint_id, owner=True)
    if body.public or body.username is None:
        raise InvalidRequest("an endpoint is shared with named users only: give 'username' "
                             "(and no 'public')")
    sharee = await _sharee(svc, user, body)
    assert sharee is not None
    await svc.store.endpoints.share(endpoint_id, sharee, shared)
    if shared:
        svc.endpoint_access.pop(endpoint_id)
    else:
        await access.withdraw(svc, sharee, endpoint_id, access.unshared_task(endpoint_id))
    return await _endpoint_sharing(svc, user, endpoint_id)


async def _endpoint_sharing(svc: Services, user: str, endpoint_id: str) -> EndpointSharing:
    ep = await find_endpoint(svc, user, endpoint_id, owner=True)
    warning = None if ep.isolates_users or not ep.shared_with else SINGLE_USER_WARNING.format(
        endpoint_id=endpoint_id)
    return EndpointSharing(endpoint_id=endpoint_id,
                           shared_with=await _usernames(svc, ep.shared_with), warning=warning)


@router.post("/endpoints/{endpoint_id}/share", responses=OBJECT_ERRORS)
async def share_endpoint(
    endpoint_id: str, body: ShareRequest, user: User, svc: Svc
) -> EndpointSharing:
    """Let a user submit tasks to the endpoint and read its status (their tasks stay theirs).
    ``warning`` says what sharing a single-user endpoint lets them do."""
    return await _share_endpoint(svc, user, endpoint_id, body, shared=True)


@router.post("/endpoints/{endpoint_id}/unshare", responses=OBJECT_ERRORS)
async def unshare_endpoint(
    endpoint_id: str, body: ShareRequest, user: User, svc: Svc
) -> EndpointSharing:
    """Stop sharing the endpoint with a user: every broker replica refuses their submissions at
    once, and the tasks they have waiting or running there are cancelled (saying so)."""
    return await _share_endpoint(svc, user, endpoint_id, body, shared=False)


@router.post("/endpoints/{endpoint_id}/leave", responses=OBJECT_ERRORS)
async def leave_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointLeft:
    """Remove an endpoint another user shared with you from your list: you can no longer submit
    to it, and your tasks waiting or running there are cancelled."""
    ep = await find_endpoint(svc, user, endpoint_id, owner=False)
    if ep.user_id == user:
        raise InvalidRequest(f"endpoint {endpoint_id} is yours; delete it instead "
                             "(farcall-endpoint delete, or DELETE /v1/endpoints/{endpoint_id})")
    await svc.store.endpoints.share(endpoint_id, user, False)
    await access.withdraw(svc, user, endpoint_id, access.left_task(endpoint_id))
    return EndpointLeft(endpoint_id=endpoint_id, left=True)


@router.get("/endpoints/{endpoint_id}/sharing", responses=OBJECT_ERRORS)
async def endpoint_sharing(endpoint_id: str, user: User, svc: Svc) -> EndpointSharing:
    return await _endpoint_sharing(svc, user, endpoint_id)
