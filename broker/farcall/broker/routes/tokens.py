"""``/v1/tokens``: a user's own tokens (list, create, revoke)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from farcall.broker import auth
from farcall.broker.deps import OBJECT_ERRORS, USER_ERRORS, Svc, User
from farcall.broker.errors import ObjectNotFound, QuotaExceeded, clip
from farcall.protocol.rest import TokenCreated, TokenInfo, TokenList, TokenRequest, TokenRevoked

router = APIRouter(prefix="/v1")


@router.get("/tokens", responses=USER_ERRORS)
async def list_tokens(user: User, svc: Svc) -> TokenList:
    """Your tokens, oldest first (never the tokens themselves)."""
    return TokenList(tokens=[TokenInfo(token_id=t.token_id, name=t.name, created_at=t.created_at)
                             for t in await svc.store.users.list_tokens(user)])


@router.post("/tokens", responses=USER_ERRORS)
async def create_token(
    user: User, svc: Svc, body: Annotated[TokenRequest | None, Body()] = None
) -> TokenCreated:
    """A new token for you; the answer is the only time the token is shown. 403
    ``quota_exceeded`` when you hold ``FARCALL_MAX_TOKENS`` already."""
    try:
        record, token = await auth.add_token(svc.store.users, user, body.name if body else "",
                                             svc.settings.max_tokens)
    except auth.TooManyTokens as e:
        raise QuotaExceeded(str(e)) from None
    return TokenCreated(token_id=record.token_id, token=token, name=record.name,
                        created_at=record.created_at)


@router.delete("/tokens/{token_id}", responses=OBJECT_ERRORS)
async def revoke_token(token_id: str, user: User, svc: Svc) -> TokenRevoked:
    """Revoke one of your tokens: every broker replica refuses it within a second, and result
    streams opened with it are closed."""
    if await auth.revoke_token(svc.store, token_id, user) is None:
        raise ObjectNotFound(f"token {clip(token_id)} not found; list yours with GET /v1/tokens")
    return TokenRevoked(token_id=token_id, revoked=True)
