"""Tokens: random, stored only as SHA-256 hashes, compared in constant time.

User tokens start ``fcu_``, endpoint credentials ``fce_``; the prefix only helps
humans and secret scanners, the store decides what a token may do.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from farcall.broker.store.base import Principal, UserStore
from farcall.messages import now
from farcall.records import UserRecord

USER_PREFIX = "fcu_"
ENDPOINT_PREFIX = "fce_"


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def authenticate(users: UserStore, token: str | None) -> Principal | None:
    """Who holds ``token``: a user, an endpoint, or nobody (None)."""
    if not token:
        return None
    digest = token_hash(token)
    principal = await users.resolve_token(digest)
    if principal is None or not hmac.compare_digest(principal.token_hash, digest):
        return None
    return principal


async def create_user(users: UserStore, name: str) -> tuple[str, str]:
    """Create a user; returns ``(user_id, token)``. The token is never stored, only its hash."""
    user_id = str(uuid.uuid4())
    token = new_token(USER_PREFIX)
    await users.create(UserRecord(user_id=user_id, name=name, created_at=now()), token_hash(token))
    return user_id, token
