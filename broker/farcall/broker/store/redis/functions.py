"""Redis ``FunctionStore``: a hash per function, the set of users it is shared with, and each
user's set of function ids (what ``count`` reads).

Keys (``p`` is the prefix): ``p fn:<id>`` (field ``public`` when public) and ``p fn:<id>:shared``
set of user ids; ``p user:<id>:functions`` set. Sharing is the Lua ``scripts.SHARE``, so a share
racing a delete leaves nothing behind. ``read_function`` and ``functions_from`` are also how
``tasks`` reads functions inside its one-round-trip submission context.
"""

from __future__ import annotations

from typing import Any

from farcall.broker.records import FunctionRecord
from farcall.broker.store.base import FunctionStore
from farcall.broker.store.redis.connection import RedisConnection, flat
from farcall.broker.store.redis.scripts import SHARE


class RedisFunctions(FunctionStore):
    def __init__(self, db: RedisConnection) -> None:
        self._db = db
        self._share = db.r.register_script(SHARE)

    async def put(self, function: FunctionRecord) -> None:
        db, fid = self._db, function.function_id
        fields = flat(function.model_dump(exclude={"shared_with", "public"}))
        if function.public:
            fields["public"] = "1"
        async with db.r.pipeline(transaction=True) as p:
            p.hset(db.k("fn", fid), mapping=fields)
            p.sadd(db.k("user", function.user_id, "functions"), fid)
            if function.shared_with:
                p.sadd(db.k("fn", fid, "shared"), *function.shared_with)
            await p.execute()

    async def get_many(self, function_ids: list[str]) -> dict[str, FunctionRecord]:
        async with self._db.r.pipeline(transaction=False) as p:
            for f in function_ids:
                read_function(p, self._db, f)
            found = await p.execute()
        return functions_from(function_ids, found)

    async def delete(self, function_id: str) -> None:
        db = self._db
        user_id = await db.r.hget(db.k("fn", function_id), "user_id")
        async with db.r.pipeline(transaction=True) as p:
            if user_id:
                p.srem(db.k("user", user_id, "functions"), function_id)
            p.delete(db.k("fn", function_id), db.k("fn", function_id, "shared"))
            await p.execute()

    async def count(self, user_id: str) -> int:
        return int(await self._db.r.scard(self._db.k("user", user_id, "functions")))

    async def share(
        self, function_id: str, user_id: str | None, public: bool | None, shared: bool
    ) -> None:
        db = self._db
        await self._share(
            keys=[db.k("fn", function_id), db.k("fn", function_id, "shared")],
            args=["1" if shared else "0", user_id or "", function_id, "1" if public else "0"])


def read_function(p: Any, db: RedisConnection, function_id: str) -> None:
    """Queue on pipeline ``p`` the two reads ``functions_from`` turns into a record."""
    p.hgetall(db.k("fn", function_id))
    p.smembers(db.k("fn", function_id, "shared"))


def functions_from(function_ids: list[str], raw: list[Any]) -> dict[str, FunctionRecord]:
    """The functions that exist, from the replies of ``read_function`` for each id in order."""
    return {
        f: _function(rec, shared)
        for f, rec, shared in zip(function_ids, raw[::2], raw[1::2], strict=True) if rec
    }


def _function(rec: dict[str, str], shared: set[str]) -> FunctionRecord:
    return FunctionRecord.model_construct(
        function_id=rec["function_id"],
        user_id=rec["user_id"],
        function_name=rec.get("function_name", ""),
        description=rec.get("description", ""),
        function=rec["function"],
        created_at=float(rec["created_at"]),
        shared_with=sorted(shared),
        public=rec.get("public") == "1",
    )
