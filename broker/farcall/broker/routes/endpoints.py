"""``/v1/endpoints``: registering endpoints, reading them and their status, stopping and deleting them
(sharing them: ``sharing``; their WebSocket channel: ``endpoint_channel``)."""

from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter

from farcall.broker import auth, endpoint_control
from farcall.broker.deps import OBJECT_ERRORS, USER_ERRORS, Svc, User
from farcall.broker.errors import Forbidden, ObjectNotFound, QuotaExceeded, clip
from farcall.broker.records import EndpointRecord
from farcall.broker.services import Services
from farcall.protocol.common import now
from farcall.protocol.rest import (
    CredentialIssued,
    EndpointDeleted,
    EndpointInfo,
    EndpointList,
    EndpointRegistered,
    EndpointRegistration,
    EndpointStatus,
    EndpointStopping,
)

router = APIRouter(prefix="/v1")


async def find_endpoint(svc: Services, user: str, endpoint_id: str, *, owner: bool) -> EndpointRecord:
    """The endpoint if ``user`` may use it (404 otherwise); with ``owner``, 403 unless theirs."""
    ep = await svc.store.endpoints.get(endpoint_id)
    if ep is None or not ep.usable_by(user):
        raise ObjectNotFound(
            f"endpoint {clip(endpoint_id)} not found; list yours with GET /v1/endpoints")
    if owner and ep.user_id != user:
        raise Forbidden(f"endpoint {endpoint_id} is shared with you; only its owner may "
                        "change, share or delete it")
    return ep


def _status(svc: Services, ep: EndpointRecord) -> Literal["online", "offline"]:
    return "online" if ep.online(svc.settings.endpoint_timeout, now()) else "offline"


async def _endpoint_infos(svc: Services, eps: list[EndpointRecord], user: str
                          ) -> list[EndpointInfo]:
    """The endpoints as ``user`` sees them; a shared one names its owner (``shared_by``)."""
    owners = await svc.store.users.get_many(sorted({e.user_id for e in eps if e.user_id != user}))
    return [EndpointInfo(endpoint_id=ep.endpoint_id, name=ep.name, description=ep.description,
                         status=_status(svc, ep), created_at=ep.created_at,
                         last_heartbeat=ep.last_heartbeat,
                         role="owner" if ep.user_id == user else "shared",
                         shared_by=owner.name if (owner := owners.get(ep.user_id)) else None,
                         multi_user=ep.multi_user, parent_id=ep.parent_id or None)
            for ep in eps]


@router.post("/endpoints", responses=USER_ERRORS)
async def register_endpoint(body: EndpointRegistration, user: User, svc: Svc) -> EndpointRegistered:
    limit = svc.settings.max_endpoints
    owned = [ep for ep in await svc.store.endpoints.list(user)
             if ep.user_id == user and not ep.parent_id]  # user endpoints are the site's, not more
    if limit and len(owned) >= limit:
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
    return EndpointRegistered(endpoint_id=endpoint_id, name=body.name, credential=credential,
                              broker_id=await svc.broker_id())


@router.get("/endpoints", responses=USER_ERRORS)
async def list_endpoints(user: User, svc: Svc) -> EndpointList:
    """Your endpoints and those shared with you (``role``, and ``shared_by`` their owner)."""
    return EndpointList(
        endpoints=await _endpoint_infos(svc, await svc.store.endpoints.list(user), user))


@router.get("/endpoints/{endpoint_id}", responses=OBJECT_ERRORS)
async def get_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointInfo:
    ep = await find_endpoint(svc, user, endpoint_id, owner=False)
    return (await _endpoint_infos(svc, [ep], user))[0]


@router.get("/endpoints/{endpoint_id}/status", responses=OBJECT_ERRORS)
async def endpoint_status(endpoint_id: str, user: User, svc: Svc) -> EndpointStatus:
    ep = await find_endpoint(svc, user, endpoint_id, owner=False)
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
        multi_user=ep.multi_user,
        parent_id=ep.parent_id or None,
    )


@router.post("/endpoints/{endpoint_id}/credential", responses=OBJECT_ERRORS)
async def rotate_credential(endpoint_id: str, user: User, svc: Svc) -> CredentialIssued:
    """Give the endpoint a new credential (shown only this once): the old one is refused from
    now on and the sessions opened with it end, on every replica. For a credential that may
    have leaked; ``farcall-endpoint rotate-credential NAME`` calls this and stores the answer."""
    await find_endpoint(svc, user, endpoint_id, owner=True)
    credential = await endpoint_control.rotate_credential(svc, endpoint_id)
    if credential is None:  # deleted meanwhile
        raise ObjectNotFound(f"endpoint {clip(endpoint_id)} not found; list yours with GET /v1/endpoints")
    return CredentialIssued(endpoint_id=endpoint_id, credential=credential)


@router.post("/endpoints/{endpoint_id}/stop", responses=OBJECT_ERRORS)
async def stop_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointStopping:
    """Ask your endpoint's agent to stop (Globus Compute's ``stop_endpoint``): it takes no new
    task, finishes the running ones and exits; queued tasks wait for its next start.
    ``stopping`` is False when it was not connected (nothing to stop)."""
    ep = await find_endpoint(svc, user, endpoint_id, owner=True)
    online = _status(svc, ep) == "online"
    if online:
        await endpoint_control.stop_endpoint(svc, endpoint_id)
    return EndpointStopping(endpoint_id=endpoint_id, stopping=online)


@router.delete("/endpoints/{endpoint_id}", responses=OBJECT_ERRORS)
async def delete_endpoint(endpoint_id: str, user: User, svc: Svc) -> EndpointDeleted:
    """Delete the endpoint: its credential stops working, its session ends, and every task
    still waiting for it (queued or in flight) fails with an error that says why."""
    await find_endpoint(svc, user, endpoint_id, owner=True)
    await endpoint_control.delete_endpoint(svc, endpoint_id)
    return EndpointDeleted(endpoint_id=endpoint_id, deleted=True)
