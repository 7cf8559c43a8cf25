"""Who may do what, as the store keeps it: users and their tokens, sharing, counts for quotas.

Run against the in-process store and the real Redis, as ``test_store.py`` is.
"""

from __future__ import annotations

import pytest

from farcall.broker.records import EndpointRecord, FunctionRecord, TokenRecord, UserRecord
from farcall.broker.store.base import Principal, Store
from farcall.broker.store.redis import RedisStore
from farcall.protocol.common import now
from harness.services import REDIS_URL, drop_redis_prefix

pytestmark = pytest.mark.anyio


def _user(user_id: str, name: str) -> UserRecord:
    return UserRecord(user_id=user_id, name=name, created_at=1.5)


def _token(token_id: str, user_id: str, created_at: float) -> TokenRecord:
    return TokenRecord(token_id=token_id, user_id=user_id, name=f"name of {token_id}",
                       created_at=created_at, token_hash=f"hash-{token_id}")


def _function(function_id: str, user_id: str = "u1") -> FunctionRecord:
    return FunctionRecord(function_id=function_id, user_id=user_id, function="PAYLOAD",
                          created_at=now())


def _endpoint(endpoint_id: str, user_id: str = "u1") -> EndpointRecord:
    return EndpointRecord(endpoint_id=endpoint_id, user_id=user_id, name="cluster",
                          created_at=now())


async def _listed(store: Store, user_id: str) -> list[str]:
    return [e.endpoint_id for e in await store.endpoints.list(user_id)]


async def test_user_names_are_unique_and_a_refused_create_changes_nothing(store: Store) -> None:
    assert await store.users.create(_user("u1", "alice"), _token("t1", "u1", 10.0))
    assert not await store.users.create(_user("u2", "alice"), _token("t2", "u2", 11.0))
    assert await store.users.get("u2") is None
    assert await store.users.resolve_token("hash-t2") is None
    assert await store.users.list_tokens() == [_token("t1", "u1", 10.0)]
    found = await store.users.by_name("alice")
    assert found == _user("u1", "alice")
    assert await store.users.by_name("bob") is None
    assert await store.users.create(_user("u2", "bob"), _token("t2", "u2", 11.0))
    assert await store.users.get_many(["u2", "nope", "u1"]) == {
        "u1": _user("u1", "alice"), "u2": _user("u2", "bob")}
    assert await store.users.get("nope") is None


async def test_several_tokens_resolve_with_their_ids_and_list_oldest_first(store: Store) -> None:
    await store.users.create(_user("u1", "alice"), _token("t1", "u1", 10.0))
    await store.users.create(_user("u2", "bob"), _token("t2", "u2", 7.0))
    await store.users.add_token(_token("t3", "u1", 5.0))
    await store.users.add_token(_token("t4", "u1", 20.0))
    for token_id, user_id in (("t1", "u1"), ("t2", "u2"), ("t3", "u1"), ("t4", "u1")):
        assert await store.users.resolve_token(f"hash-{token_id}") == Principal(
            "user", user_id, f"hash-{token_id}", token_id)
    assert await store.users.list_tokens("u1") == [
        _token("t3", "u1", 5.0), _token("t1", "u1", 10.0), _token("t4", "u1", 20.0)]
    assert [t.token_id for t in await store.users.list_tokens()] == ["t3", "t2", "t1", "t4"]
    assert await store.users.list_tokens("nobody") == []


async def test_revoking_a_token_takes_only_that_token_of_that_user(store: Store) -> None:
    await store.users.create(_user("u1", "alice"), _token("t1", "u1", 1.0))
    await store.users.create(_user("u2", "bob"), _token("t2", "u2", 2.0))
    await store.users.add_token(_token("t3", "u1", 3.0))
    assert await store.users.revoke_token("t1", user_id="u2") is None
    assert await store.users.resolve_token("hash-t1") is not None
    assert await store.users.revoke_token("t1", user_id="u1") == _token("t1", "u1", 1.0)
    assert await store.users.resolve_token("hash-t1") is None
    assert await store.users.revoke_token("t1", user_id="u1") is None
    assert await store.users.revoke_token("nope") is None
    assert [t.token_id for t in await store.users.list_tokens("u1")] == ["t3"]
    # without a user (the operator's CLI) any user's token
    assert await store.users.revoke_token("t2") == _token("t2", "u2", 2.0)
    assert [t.token_id for t in await store.users.list_tokens()] == ["t3"]
    p = await store.users.resolve_token("hash-t3")
    assert p is not None and p.token_id == "t3"


async def test_function_count_share_public_and_delete(store: Store) -> None:
    for fid, owner in (("f1", "u1"), ("f2", "u1"), ("f3", "u2")):
        await store.functions.put(_function(fid, owner))
    assert (await store.functions.count("u1"), await store.functions.count("u2")) == (2, 1)
    assert await store.functions.count("nobody") == 0

    async def f1() -> FunctionRecord:
        return (await store.functions.get_many(["f1"]))["f1"]

    assert ((await f1()).shared_with, (await f1()).public) == ([], False)
    await store.functions.share("f1", "u3", None, True)
    await store.functions.share("f1", "u2", None, True)
    await store.functions.share("f1", "u2", None, True)
    rec = await f1()
    assert (rec.shared_with, rec.public) == (["u2", "u3"], False)
    assert rec.usable_by("u2") and not rec.usable_by("u4")
    await store.functions.share("f1", None, True, True)
    rec = await f1()
    assert (rec.shared_with, rec.public) == (["u2", "u3"], True) and rec.usable_by("u4")
    await store.functions.share("f1", "u3", False, False)  # public False leaves the flag
    assert ((await f1()).shared_with, (await f1()).public) == (["u2"], True)
    await store.functions.share("f1", None, True, False)
    assert ((await f1()).shared_with, (await f1()).public) == (["u2"], False)
    # what get_many hands out is a copy; other functions are untouched
    (await f1()).shared_with.append("intruder")
    assert (await f1()).shared_with == ["u2"]
    assert (await store.functions.get_many(["f2"]))["f2"].shared_with == []
    await store.functions.share("gone", "u2", True, True)
    assert await store.functions.get_many(["gone"]) == {}

    await store.functions.delete("f1")
    assert list(await store.functions.get_many(["f1", "f2"])) == ["f2"]
    assert await store.functions.count("u1") == 1
    await store.functions.put(_function("f1"))
    assert ((await f1()).shared_with, (await f1()).public) == ([], False)


async def test_endpoint_sharing_lists_and_delete_cleanup(store: Store) -> None:
    await store.endpoints.put(_endpoint("b", "u2"), "cred-b")
    await store.endpoints.put(_endpoint("a", "u1"), "cred-a")
    await store.endpoints.put(_endpoint("c", "u2"), "cred-c")
    await store.endpoints.share("a", "u2", True)
    await store.endpoints.share("a", "u3", True)
    ep = await store.endpoints.get("a")
    assert ep is not None and ep.shared_with == ["u2", "u3"]
    assert ep.usable_by("u3") and not ep.usable_by("u4")
    assert await _listed(store, "u2") == ["a", "b", "c"]
    listed = {e.endpoint_id: e for e in await store.endpoints.list("u2")}
    assert listed["a"].shared_with == ["u2", "u3"] and listed["b"].shared_with == []
    assert await _listed(store, "u1") == ["a"]
    assert await _listed(store, "u4") == []

    await store.endpoints.share("a", "u2", False)
    assert await _listed(store, "u2") == ["b", "c"]
    ep = await store.endpoints.get("a")
    assert ep is not None and ep.shared_with == ["u3"]
    await store.endpoints.share("gone", "u2", True)
    assert await store.endpoints.get("gone") is None and await _listed(store, "u2") == ["b", "c"]

    await store.endpoints.delete("a")
    assert await _listed(store, "u3") == [] and await _listed(store, "u1") == []
    await store.endpoints.put(_endpoint("a", "u1"), "cred-a2")  # the id again: no old shares
    ep = await store.endpoints.get("a")
    assert ep is not None and ep.shared_with == [] and await _listed(store, "u3") == []


async def test_submission_context_carries_the_shares(store: Store) -> None:
    await store.endpoints.put(_endpoint("ep1", "u1"), "cred")
    await store.endpoints.share("ep1", "u2", True)
    await store.functions.put(_function("f1"))
    await store.functions.put(_function("f2"))
    await store.functions.share("f1", "u2", None, True)
    await store.functions.share("f2", None, True, True)
    ctx = await store.tasks.submission_context("ep1", ["f1", "f2", "nope"], None)
    assert (ctx.endpoint_owner, ctx.endpoint_shared_with) == ("u1", frozenset({"u2"}))
    assert ctx.endpoint_usable_by("u2") and not ctx.endpoint_usable_by("u3")
    assert (ctx.functions["f1"].shared_with, ctx.functions["f1"].public) == (["u2"], False)
    assert (ctx.functions["f2"].shared_with, ctx.functions["f2"].public) == ([], True)
    assert list(ctx.functions) == ["f1", "f2"]
    ctx = await store.tasks.submission_context("gone", [], None)
    assert (ctx.endpoint_owner, ctx.endpoint_shared_with) == (None, frozenset())


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

        await store.users.create(_user("u1", "alice"), _token("t1", "u1", 1.0))
        await store.users.add_token(_token("t2", "u1", 2.0))
        await store.functions.put(_function("f1"))
        await store.functions.share("f1", "u2", True, True)
        await store.endpoints.put(_endpoint("e1"), "cred")
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
