"""Sharing functions and endpoints with other users (``/share``, ``/unshare``, ``/sharing``).

A function is shared with named users or with everyone (``public``); an endpoint with named
users only. Only the owner shares, unshares or reads the list. The replica's caches of who
may use what are dropped at once here; other replicas follow within
``services.OWNER_CACHE_SECONDS``.
"""

from __future__ import annotations

from fastapi import APIRouter

from farcall.broker.deps import OBJECT_ERRORS, Svc, User
from farcall.broker.errors import InvalidRequest, ObjectNotFound, clip
from farcall.broker.routes.endpoints import find_endpoint
from farcall.broker.routes.functions import find_function
from farcall.broker.services import Services
from farcall.protocol.rest import EndpointSharing, FunctionSharing, ShareRequest

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
    await find_function(svc, user, function_id, owner=True)
    return await _function_sharing(svc, function_id)


# ---- endpoints


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
    svc.endpoint_access.pop(endpoint_id)
    return await _endpoint_sharing(svc, user, endpoint_id)


async def _endpoint_sharing(svc: Services, user: str, endpoint_id: str) -> EndpointSharing:
    ep = await find_endpoint(svc, user, endpoint_id, owner=True)
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
