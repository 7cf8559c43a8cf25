"""``UserStore``: users, unique names and tokens, on the in-process store and the real Redis."""

from __future__ import annotations

import pytest

from farcall.broker.store.base import Principal, Store
from farcall.broker.store.redis import RedisStore
from harness.services import REDIS_URL, drop_redis_prefix
from tests.broker.records import endpoint_record, function_record, token_record, user_record

pytestmark = pytest.mark.anyio


async def test_user_names_are_unique_and_a_refused_create_changes_nothing(store: Store) -> None:
    assert await store.users.create(user_record("u1", "alice"), token_record("t1", "u1", 10.0))
    assert not await store.users.create(user_record("u2", "alice"), token_record("t2", "u2", 11.0))
    assert await store.users.get("u2") is None
    assert await store.users.resolve_token("hash-t2") is None
    assert await store.users.list_tokens() == [token_record("t1", "u1", 10.0)]
    found = await store.users.by_name("alice")
    assert found == user_record("u1", "alice")
    assert await store.users.by_name("bob") is None
    assert await store.users.create(user_record("u2", "bob"), token_record("t2", "u2", 11.0))
    assert await store.users.get_many(["u2", "nope", "u1"]) == {
        "u1": user_record("u1", "alice"), "u2": user_record("u2", "bob")}
    assert await store.users.get("nope") is None


async def test_several_tokens_resolve_with_their_ids_and_list_oldest_first(store: Store) -> None:
    await store.users.create(user_record("u1", "alice"), token_record("t1", "u1", 10.0))
    await store.users.create(user_record("u2", "bob"), token_record("t2", "u2", 7.0))
    await store.users.add_token(token_record("t3", "u1", 5.0))
    await store.users.add_token(token_record("t4", "u1", 20.0))
    for token_id, user_id in (("t1", "u1"), ("t2", "u2"), ("t3", "u1"), ("t4", "u1")):
        assert await store.users.resolve_token(f"hash-{token_id}") == Principal(
            "user", user_id, f"hash-{token_id}", token_id)
    assert await store.users.list_tokens("u1") == [
        token_record("t3", "u1", 5.0), token_record("t1", "u1", 10.0), token_record("t4", "u1", 20.0)]
    assert [t.token_id for t in await store.users.list_tokens()] == ["t3", "t2", "t1", "t4"]
    assert await store.users.list_tokens("nobody") == []


async def test_revoking_a_token_takes_only_that_token_of_that_user(store: Store) -> None:
    await store.users.create(user_record("u1", "alice"), token_record("t1", "u1", 1.0))
    await store.users.create(user_record("u2", "bob"), token_record("t2", "u2", 2.0))
    await store.users.add_token(token_record("t3", "u1", 3.0))
    assert await store.users.revoke_token("t1", user_id="u2") is None
    assert await store.users.resolve_token("hash-t1") is not None
    assert await store.users.revoke_token("t1", user_id="u1") == token_record("t1", "u1", 1.0)
    assert await store.users.resolve_token("hash-t1") is None
    assert await store.users.revoke_token("t1", user_id="u1") is None
    assert await store.users.revoke_token("nope") is None
    assert [t.token_id for t in await store.users.list_tokens("u1")] == ["t3"]
    # without a user (the operator's CLI) any user's token
    assert await store.users.revoke_token("t2") == token_record("t2", "u2", 2.0)
    assert [t.token_id for t in await store.users.list_tokens()] == ["t3"]
    p = await store.users.resolve_token("hash-t3")
    assert p is not None and p.token_id == "t3"


@pytest.mark.usefixtures("services")
async def test_redis_keeps_old_tokens_and_leaves_no_keys_behind(real_prefix: str) -> None:
    """A ``user:<id>`` token entry written before tokens had ids still resolves; deleting
    shared functions and endpoints and revoking tokens leaves only the user and name index."""
    prefix = f"{real_prefix}:"
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        await store.db.r.hset(store.db.k("tokens"), "old-hash", "user:u9")
        assert await store.users.resolve_token("old-hash") == Principal("user", "u9", "old-hash")
        await store.db.r.delete(store.db.k("tokens"))

        await store.users.create(user_record("u1", "alice"), token_record("t1", "u1", 1.0))
        await store.users.add_token(token_record("t2", "u1", 2.0))
        await store.functions.put(function_record("f1"))
        await store.functions.share("f1", "u2", True, True)
        await store.endpoints.put(endpoint_record("e1"), "cred")
        await store.endpoints.share("e1", "u2", True)
        await store.endpoints.share("e1", "u3", True)
        await store.functions.delete("f1")
        await store.endpoints.delete("e1")
        await store.users.revoke_token("t1", "u1")
        await store.users.revoke_token("t2")
        await store.functions.share("f1", "u2", True, True)  # after delete: makes nothing
        await store.endpoints.share("e1", "u2", True)
        left = {k async for k in store.db.r.scan_iter(match=f"{prefix}*")}
        assert left == {store.db.k("user", "u1"), store.db.k("users:names")}
    finally:
        await store.close()
        drop_redis_prefix(prefix)


async def test_a_disabled_users_tokens_and_endpoint_credentials_resolve_to_no_one(
    store: Store,
) -> None:
    await store.users.create(user_record("u1", "alice"), token_record("t1", "u1", 10.0))
    await store.users.create(user_record("u2", "bob"), token_record("t2", "u2", 11.0))
    await store.endpoints.put(endpoint_record("ep1", "u1"), "cred1")
    assert await store.users.set_disabled("u1", True)
    assert not await store.users.set_disabled("nobody", True)
    assert await store.users.resolve_token("hash-t1") is None
    assert await store.users.resolve_token("cred1") is None
    assert await store.users.resolve_token("hash-t2") is not None, "others are not touched"
    found = await store.users.get("u1")
    assert found is not None and found.disabled
    assert [u.name for u in await store.users.all()] == ["alice", "bob"]
    assert await store.users.token_count("u1") == 1, "kept, for enable"
    await store.users.set_disabled("u1", False)
    assert await store.users.resolve_token("hash-t1") == Principal("user", "u1", "hash-t1", "t1")
    assert await store.users.resolve_token("cred1") == Principal("endpoint", "ep1", "cred1")


async def test_a_user_holds_at_most_max_tokens(store: Store) -> None:
    await store.users.create(user_record("u1", "alice"), token_record("t1", "u1", 10.0))
    assert await store.users.add_token(token_record("t2", "u1", 11.0), max_tokens=2)
    assert not await store.users.add_token(token_record("t3", "u1", 12.0), max_tokens=2)
    assert await store.users.resolve_token("hash-t3") is None
    assert await store.users.token_count("u1") == 2
    await store.users.revoke_token("t1")
    assert await store.users.add_token(token_record("t3", "u1", 12.0), max_tokens=2)
