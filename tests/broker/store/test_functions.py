"""``FunctionStore``: functions, their count per user and sharing, on the in-process store and
the real Redis."""

from __future__ import annotations

import pytest

from farcall.broker.records import FunctionRecord
from farcall.broker.store.base import Store
from tests.broker.records import function_record

pytestmark = pytest.mark.anyio


async def test_functions(store: Store) -> None:
    rec = function_record(function_name="sq")
    await store.functions.put(rec)
    found = await store.functions.get_many(["f1", "missing"])
    assert list(found) == ["f1"] and found["f1"] == rec
    await store.functions.delete("f1")
    assert await store.functions.get_many(["f1"]) == {}


async def test_function_count_share_public_and_delete(store: Store) -> None:
    for fid, owner in (("f1", "u1"), ("f2", "u1"), ("f3", "u2")):
        await store.functions.put(function_record(fid, owner))
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
    await store.functions.put(function_record("f1"))
    assert ((await f1()).shared_with, (await f1()).public) == ([], False)
