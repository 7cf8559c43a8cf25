"""Redis ``EndpointStore``: a hash per endpoint, its sessions, its live session, its queued-task
count, and whom it is shared with.

Keys (``p`` is the prefix): ``p ep:<id>`` hash (the record's fields, ``credential_hash``,
heartbeat fields); ``p ep:<id>:shared`` set of user ids; ``p ep:<id>:sessions`` set;
``p ep:<id>:live`` the live session id; ``p ep:<id>:queued`` count of queued tasks;
``p user:<id>:endpoints`` set (owned); ``p user:<id>:shared_endpoints`` set (shared with them);
the credential in ``p tokens`` (see ``users``). ``delete`` also drops ``p ep:<id>:inflight``
(``inflight``). Sharing is the Lua ``scripts.SHARE``, a new credential ``scripts.ROTATE_CREDENTIAL``.
"""

from __future__ import annotations

from farcall.broker.records import EndpointRecord
from farcall.broker.store.base import EndpointStore
from farcall.broker.store.redis.connection import RedisConnection, flat, optional_float
from farcall.broker.store.redis.scripts import ROTATE_CREDENTIAL, SHARE
from farcall.protocol.channel import Heartbeat


class RedisEndpoints(EndpointStore):
    def __init__(self, db: RedisConnection) -> None:
        self._db = db
        self._share = db.r.register_script(SHARE)
        self._rotate = db.r.register_script(ROTATE_CREDENTIAL)
        self._del_if_equal = db.r.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end")

    async def put(self, endpoint: EndpointRecord, credential_hash: str) -> None:
        db, eid = self._db, endpoint.endpoint_id
        fields = endpoint.model_dump(
            include={"endpoint_id", "user_id", "name", "description", "created_at"})
        async with db.r.pipeline(transaction=True) as p:
            p.hset(db.k("ep", eid), mapping={**flat(fields), "credential_hash": credential_hash})
            p.sadd(db.k("user", endpoint.user_id, "endpoints"), eid)
            p.hset(db.k("tokens"), credential_hash, f"endpoint:{eid}")
            for user_id in endpoint.shared_with:
                p.sadd(db.k("ep", eid, "shared"), user_id)
                p.sadd(db.k("user", user_id, "shared_endpoints"), eid)
            await p.execute()

    async def get(self, endpoint_id: str) -> EndpointRecord | None:
        return (await self._get_many([endpoint_id]))[0]

    async def _get_many(self, endpoint_ids: list[str]) -> list[EndpointRecord | None]:
        db = self._db
        async with db.r.pipeline(transaction=False) as p:
            for e in endpoint_ids:
                p.hgetall(db.k("ep", e))
                p.scard(db.k("ep", e, "sessions"))
                p.get(db.k("ep", e, "queued"))
                p.smembers(db.k("ep", e, "shared"))
            raw = await p.execute()
        out: list[EndpointRecord | None] = []
        for rec, sessions, queued, shared in zip(
            raw[::4], raw[1::4], raw[2::4], raw[3::4], strict=True
        ):
            out.append(None if not rec else EndpointRecord(
                endpoint_id=rec["endpoint_id"],
                user_id=rec["user_id"],
                name=rec["name"],
                description=rec.get("description", ""),
                created_at=float(rec["created_at"]),
                last_heartbeat=optional_float(rec.get("last_heartbeat")),
                last_seen=optional_float(rec.get("last_seen")),
                heartbeat=Heartbeat.model_validate_json(rec.get("heartbeat") or "{}"),
                heartbeat_period=optional_float(rec.get("heartbeat_period")),
                connected=sessions > 0,
                queued_tasks=max(0, int(queued or 0)),
                shared_with=sorted(shared),
            ))
        return out

    async def list(self, user_id: str) -> list[EndpointRecord]:
        db = self._db
        async with db.r.pipeline(transaction=False) as p:
            p.smembers(db.k("user", user_id, "endpoints"))
            p.smembers(db.k("user", user_id, "shared_endpoints"))
            owned, shared = await p.execute()
        records = await self._get_many(sorted(owned | shared))
        return [r for r in records if r is not None and r.usable_by(user_id)]

    async def credential_hash(self, endpoint_id: str) -> str | None:
        found: str | None = await self._db.r.hget(self._db.k("ep", endpoint_id), "credential_hash")
        return found or None

    async def delete(self, endpoint_id: str) -> None:
        db = self._db
        key = db.k("ep", endpoint_id)
        async with db.r.pipeline(transaction=False) as p:
            p.hmget(key, ["credential_hash", "user_id"])
            p.smembers(db.k("ep", endpoint_id, "shared"))
            (credential, user_id), shared = await p.execute()
        async with db.r.pipeline(transaction=True) as p:
            if credential:
                p.hdel(db.k("tokens"), credential)
            if user_id:
                p.srem(db.k("user", user_id, "endpoints"), endpoint_id)
            for other in shared:
                p.srem(db.k("user", other, "shared_endpoints"), endpoint_id)
            p.delete(
                key,
                db.k("ep", endpoint_id, "shared"),
                db.k("ep", endpoint_id, "sessions"),
                db.k("ep", endpoint_id, "live"),
                db.k("ep", endpoint_id, "inflight"),
                db.k("ep", endpoint_id, "queued"),
            )
            await p.execute()

    async def share(self, endpoint_id: str, user_id: str, shared: bool) -> None:
        db = self._db
        await self._share(
            keys=[db.k("ep", endpoint_id), db.k("ep", endpoint_id, "shared"),
                  db.k("user", user_id, "shared_endpoints")],
            args=["1" if shared else "0", user_id, endpoint_id, "0"])

    async def rotate_credential(self, endpoint_id: str, credential_hash: str) -> str | None:
        db = self._db
        old = await self._rotate(keys=[db.k("ep", endpoint_id), db.k("tokens")],
                                 args=[credential_hash, f"endpoint:{endpoint_id}"])
        return None if old is None else str(old)

    async def connect_session(
        self, endpoint_id: str, session_id: str, heartbeat_period: float | None, at: float
    ) -> str | None:
        db = self._db
        fields = {"last_seen": repr(at)}
        if heartbeat_period is not None:
            fields["heartbeat_period"] = repr(heartbeat_period)
        async with db.r.pipeline(transaction=True) as p:
            p.sadd(db.k("ep", endpoint_id, "sessions"), session_id)
            p.set(db.k("ep", endpoint_id, "live"), session_id, get=True)
            p.hset(db.k("ep", endpoint_id), mapping=fields)
            _, previous, _ = await p.execute()
        return previous or None

    async def disconnect_session(self, endpoint_id: str, session_id: str, at: float) -> None:
        db = self._db
        async with db.r.pipeline(transaction=True) as p:
            p.srem(db.k("ep", endpoint_id, "sessions"), session_id)
            p.hset(db.k("ep", endpoint_id), "last_seen", repr(at))
            await p.execute()
        await self._del_if_equal(keys=[db.k("ep", endpoint_id, "live")], args=[session_id])

    async def live_session(self, endpoint_id: str) -> str | None:
        return await self._db.r.get(self._db.k("ep", endpoint_id, "live")) or None

    async def set_heartbeat(self, endpoint_id: str, heartbeat: Heartbeat, at: float) -> None:
        await self._db.r.hset(
            self._db.k("ep", endpoint_id),
            mapping={
                "heartbeat": heartbeat.model_dump_json(),
                "last_heartbeat": repr(at),
                "last_seen": repr(at),
            },
        )

    async def touch(self, endpoint_id: str, at: float) -> None:
        await self._db.r.hset(self._db.k("ep", endpoint_id), "last_seen", repr(at))

    async def count_queued(self, endpoint_id: str, delta: int) -> None:
        await self._db.r.incrby(self._db.k("ep", endpoint_id, "queued"), delta)
