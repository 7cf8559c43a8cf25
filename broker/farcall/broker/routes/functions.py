"""``/v1/functions``: registering, reading and deleting functions (sharing them: ``sharing``)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from farcall.broker.deps import OBJECT_ERRORS, USER_ERRORS, Svc, User
from farcall.broker.errors import Forbidden, ObjectNotFound, QuotaExceeded, clip
from farcall.broker.records import FunctionRecord
from farcall.broker.services import Services
from farcall.protocol.common import now
from farcall.protocol.rest import FunctionDeleted, FunctionInfo, FunctionRegistered, FunctionRegistration

router = APIRouter(prefix="/v1")


async def find_function(svc: Services, user: str, function_id: str, *, owner: bool) -> FunctionRecord:
    """The function if ``user`` may see it (404 otherwise); with ``owner``, 403 unless theirs."""
    found = (await svc.store.functions.get_many([function_id])).get(function_id)
    if found is None or not found.usable_by(user):
        raise ObjectNotFound(f"function {clip(function_id)} not found; register it first")
    if owner and found.user_id != user:
        raise Forbidden(f"function {function_id} was shared with you; only its owner may "
                        "change, share or delete it")
    return found


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


@router.get("/functions/{function_id}", responses=OBJECT_ERRORS)
async def get_function(function_id: str, user: User, svc: Svc) -> FunctionInfo:
    f = await find_function(svc, user, function_id, owner=False)
    owner = None if f.user_id == user else await svc.store.users.get(f.user_id)
    return FunctionInfo(function_id=f.function_id, function_name=f.function_name,
                        description=f.description, function=f.function, created_at=f.created_at,
                        role="owner" if f.user_id == user else "shared", public=f.public,
                        shared_by=owner.name if owner else None)


@router.delete("/functions/{function_id}", responses=OBJECT_ERRORS)
async def delete_function(function_id: str, user: User, svc: Svc) -> FunctionDeleted:
    await find_function(svc, user, function_id, owner=True)
    await svc.store.functions.delete(function_id)
    svc.functions.pop(function_id)
    return FunctionDeleted(function_id=function_id, deleted=True)
