"""Tokens: random, stored only as SHA-256 hashes, compared in constant time.

User tokens start ``fcu_``, endpoint credentials ``fce_``; the prefix only helps
humans and secret scanners, the store decides what a token may do.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid

from farcall.broker.records import TokenRecord, UserRecord
from farcall.broker.store.base import Principal, Store, UserStore
from farcall.protocol.common import USERNAME_PATTERN, now
from farcall.protocol.control import TokenRevocation

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


class UserExists(ValueError):
    """``create_user`` was given a name another user has."""


def check_username(name: str) -> str:
    """``name`` if it can be a user's name; ``ValueError`` saying what is allowed otherwise."""
    if not re.fullmatch(USERNAME_PATTERN, name):
        raise ValueError(
            f"{name[:80]!r} cannot be a user name: use 1 to 64 letters, digits and . _ @ + -, "
            "starting with a letter or digit")
    return name


def _token_for(user_id: str, name: str) -> tuple[TokenRecord, str]:
    token = new_token(USER_PREFIX)
    record = TokenRecord(token_id=str(uuid.uuid4()), user_id=user_id, name=name,
                         created_at=now(), token_hash=token_hash(token))
    return record, token


async def create_user(users: UserStore, name: str) -> tuple[str, str]:
    """Create a user; returns ``(user_id, token)``. The token is never stored, only its hash.

    Raises ``UserExists`` if the name is taken, ``ValueError`` if it cannot be a name.
    """
    user_id = str(uuid.uuid4())
    record, token = _token_for(user_id, "created with the user")
    if not await users.create(UserRecord(user_id=user_id, name=check_username(name),
                                         created_at=now()), record):
        raise UserExists(f"a user named {name!r} already exists; "
                         f"give it another token with 'farcall-broker users token {name}'")
    return user_id, token


class TooManyTokens(ValueError):
    """``add_token`` found the user holding the most tokens the broker allows."""


async def add_token(users: UserStore, user_id: str, name: str = "", max_tokens: int = 0
                    ) -> tuple[TokenRecord, str]:
    """Give the user a new token; returns its record and the token (shown once, never stored).
    Raises ``TooManyTokens`` when they hold ``max_tokens`` (0: no limit) already."""
    record, token = _token_for(user_id, name)
    if not await users.add_token(record, max_tokens):
        raise TooManyTokens(
            f"you hold {max_tokens} tokens, the most this broker allows (FARCALL_MAX_TOKENS); "
            "revoke those you no longer use (GET /v1/tokens lists them, Client.revoke_token or "
            "farcall-broker tokens revoke removes one)")
    return record, token


async def revoke_token(store: Store, token_id: str, user_id: str | None = None) -> TokenRecord | None:
    """Revoke a user token (only ``user_id``'s, when given) and tell every broker replica, so it is
    refused at once and open streams that authenticated with it close. The revoked record, or None."""
    record = await store.users.revoke_token(token_id, user_id)
    if record is not None:
        await store.pubsub.publish_revocation(
            TokenRevocation(token_id=record.token_id, token_hash=record.token_hash))
    return record
