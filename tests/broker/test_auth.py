"""Tokens are random, stored only as hashes, and tell users from endpoints."""

from __future__ import annotations

import hashlib

import pytest

from farcall.broker import auth
from farcall.broker.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


def test_token_shape_and_hash() -> None:
    a, b = auth.new_token(auth.USER_PREFIX), auth.new_token(auth.USER_PREFIX)
    assert a != b and a.startswith("fcu_") and len(a) == 4 + 43
    assert auth.new_token(auth.ENDPOINT_PREFIX).startswith("fce_")
    assert auth.token_hash(a) == hashlib.sha256(a.encode()).hexdigest()


def test_bearer_header_parsing() -> None:
    assert auth.bearer("Bearer abc") == "abc"
    assert auth.bearer("bearer  abc ") == "abc"
    assert auth.bearer("Basic abc") is None
    assert auth.bearer("Bearer ") is None
    assert auth.bearer(None) is None


async def test_create_user_stores_only_the_hash() -> None:
    store = MemoryStore()
    user_id, token = await auth.create_user(store.users, "alice")
    principal = await auth.authenticate(store.users, token)
    assert principal is not None and (principal.kind, principal.id) == ("user", user_id)
    assert token not in repr(vars(store.users))
    assert await auth.authenticate(store.users, token + "x") is None
    assert await auth.authenticate(store.users, None) is None
