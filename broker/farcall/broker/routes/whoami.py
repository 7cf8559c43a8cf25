"""``GET /v1/whoami``: who the token's user is, by name and by the identity id actions use."""

from __future__ import annotations

from fastapi import APIRouter

from farcall.broker.deps import USER_ERRORS, Svc, User
from farcall.broker.errors import Unauthorized
from farcall.protocol.rest import WhoAmI

router = APIRouter(prefix="/v1")


@router.get("/whoami", responses=USER_ERRORS)
async def whoami(user: User, svc: Svc) -> WhoAmI:
    """You: your user name, and your ``identity_id``, by which the Action Provider API names
    you (``creator_id``, ``manage_by``, ``monitor_by``: ``urn:globus:auth:identity:<id>``)."""
    found = await svc.store.users.get(user)
    if found is None:  # the user was removed while a token of theirs was still cached
        raise Unauthorized("the token's user no longer exists; ask your broker operator")
    return WhoAmI(username=found.name, identity_id=found.user_id)
