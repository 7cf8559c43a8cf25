"""Redis ``EndpointStore``: a hash per endpoint, its sessions, its live session, its queued-task
count, and whom it is shared with.

Keys (``p`` is the prefix): ``p ep:<id>`` hash (the record's fields, ``credential_hash``,
heartbeat fields); ``p ep:<id>:shared`` set of user ids; ``p ep:<id>:sessions`` set;
``p ep:<id>:live`` the live session id; ``p ep:<id>:queued`` count of queued tasks;
``p user:<id>:endpoints`` set (owned); ``p user:<id>:shared_endpoints`` set (shared with them);
the credential in ``p tokens`` (see ``users``). ``delete`` also drops ``p ep:<id>:inflight``
(``inflight``). Sharing is the Lua ``scripts.SHARE``, a new credential ``scripts.ROTATE_CREDENTIAL``.

A multi-user endpoint's manager keeps ``multi_user`` (``1``) and ``user_config_schema`` (JSON) in
its hash and its user endpoints' ids in ``p ep:<id>:children`` (a set); a user endpoint keeps
``parent_id``, ``for_user``, ``config_hash`` and ``user_endpoint_config`` (JSON) in its hash, and
its start claim in ``p ep:<id>:starting`` (a key that expires).
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from farcall.broker.records import EndpointRecord
from farcall.broker.store.base import EndpointStore
from farcall.broker.store.redis.connection import RedisConnection, flat, optional_float
from farcall.broker.store.redis.scripts import ROTATE_CREDENTIAL, SHARE
from farcall.protocol.channel import Heartbeat

# KEYS[1] the user endpoint's hash, KEYS[2] its owner's endpoints, KEYS[3] the token-hash index,
# KEYS[4] its shared set, KEYS[5] the user's shared endpoints, KEYS[6] the manager's children,
# KEYS[7] the manager's hash; ARGV[1] credential hash, ARGV[2] principal, ARGV[3] the user to
# share with ('' for none), ARGV[4] its id, then the hash's field pairs. 1: it exists (made now
# or before); 0, changing nothing, when the manager is gone.
ENSURE_USER_ENDPOINT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[7]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'credential_hash', ARGV[1], unpack(ARGV, 5, #ARGV))
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('SADD', KEYS[4], ARGV[3])
  redis.call('SADD', KEYS[5], ARGV[4])
end
redis.call('SADD', KEYS[6], ARGV[4])
return 1
"""

# KEYS[1] the endpoint's hash; ARGV[1] '1' (a manager) or '', ARGV[2] its schema (JSON). 1 when
# multi_user changed; 0 when not, or (changing nothing) when the endpoint is gone.
SET_MULTI_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], 'multi_user') or ''
redis.call('HSET', KEYS[1], 'multi_user', ARGV[1], 'user_config_schema', ARGV[2])
if old == ARGV[1] then return 0 end
return 1
"""

# KEYS[1] the endpoint's live-session key, KEYS[2] its start claim; ARGV[1] the claim's
# milliseconds. 1 when claimed; 0 while a session is live or another claim holds.
CLAIM_START = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 1 end
return 0
"""

_CHILD_FIELDS = ("parent_id", "for_user", "config_hash")


def _json_field(value: str | None) -> Any:
    return json.loads(value) if value else None


class RedisEndpoints(EndpointStore):
    def __init__(self, db: RedisConnection) -> None:
        self._db = db
        self._share = db.r.register_script(SHARE)
        self._rotate = db.r.register_script(ROTATE_CREDENTIAL)
        self._ensure_child = db.r.register_script(ENSURE_USER_ENDPOINT)
        self._set_multi_user = db.r.register_script(SET_MULTI_USER)
        self._claim_start = db.r.register_script(CLAIM_START)
        self._del_if_equal = db.r.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end")

    async def put(self, endpoint: EndpointRecord, credential_hash: str) -> None:
        db, eid = self._db, endpoint.endpoint_id
        fields = _fields(endpoint)
        async with db.r.pipeline(transaction=True) as p:
            p.hset(db.k("ep", eid), mapping={**fields, "credential_hash": credential_hash})
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
                p.hlen(db.k("ep", e, "inflight"))
            raw = await p.execute()
        out: list[EndpointRecord | None] = []
        for rec, sessions, queued, shared, inflight in zip(
            raw[::5], raw[1::5], raw[2::5], raw[3::5], raw[4::5], strict=True
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
                inflight_tasks=inflight,
                shared_with=sorted(shared),
                multi_user=rec.get("multi_user") == "1",
                user_config_schema=_json_field(rec.get("user_config_schema")),
                user_endpoint_config=_json_field(rec.get("user_endpoint_config")) or {},
                **{f: rec.get(f, "") for f in _CHILD_FIELDS},
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
            p.hmget(key, ["credential_hash", "user_id", "parent_id"])
            p.smembers(db.k("ep", endpoint_id, "shared"))
            (credential, user_id, parent), shared = await p.execute()
        async with db.r.pipeline(transaction=True) as p:
            if credential:
                p.hdel(db.k("tokens"), credential)
            if user_id:
                p.srem(db.k("user", user_id, "endpoints"), endpoint_id)
            if parent:
                p.srem(db.k("ep", parent, "children"), endpoint_id)
            for other in shared:
                p.srem(db.k("user", other, "shared_endpoints"), endpoint_id)
            p.delete(
                key,
                db.k("ep", endpoint_id, "shared"),
                db.k("ep", endpoint_id, "sessions"),
                db.k("ep", endpoint_id, "live"),
                db.k("ep", endpoint_id, "inflight"),
                db.k("ep", endpoint_id, "queued"),
                db.k("ep", endpoint_id, "children"),
                db.k("ep", endpoint_id, "starting"),
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
            p.delete(db.k("ep", endpoint_id, "starting"))
            _, previous, _, _ = await p.execute()
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

    async def set_multi_user(
        self, endpoint_id: str, multi_user: bool, schema: dict[str, Any] | None
    ) -> bool:
        changed = await self._set_multi_user(
            keys=[self._db.k("ep", endpoint_id)],
            args=["1" if multi_user else "", "" if schema is None else json.dumps(schema)])
        return bool(changed)

    async def ensure_user_endpoint(self, child: EndpointRecord, credential_hash: str) -> bool:
        db, eid = self._db, child.endpoint_id
        share = child.for_user if child.for_user != child.user_id else ""
        pairs = [x for kv in _fields(child).items() for x in kv]
        found = await self._ensure_child(
            keys=[db.k("ep", eid), db.k("user", child.user_id, "endpoints"), db.k("tokens"),
                  db.k("ep", eid, "shared"), db.k("user", share or "-", "shared_endpoints"),
                  db.k("ep", child.parent_id, "children"), db.k("ep", child.parent_id)],
            args=[credential_hash, f"endpoint:{eid}", share, eid, *pairs])
        return bool(found)

    async def children(self, endpoint_id: str) -> builtins.list[EndpointRecord]:
        ids = await self._db.r.smembers(self._db.k("ep", endpoint_id, "children"))
        return [r for r in await self._get_many(sorted(ids)) if r is not None]

    async def claim_start(self, endpoint_id: str, seconds: float) -> bool:
        db = self._db
        claimed = await self._claim_start(
            keys=[db.k("ep", endpoint_id, "live"), db.k("ep", endpoint_id, "starting")],
            args=[max(1, int(seconds * 1000))])
        return bool(claimed)

    async def release_start(self, endpoint_id: str) -> None:
        await self._db.r.delete(self._db.k("ep", endpoint_id, "starting"))


def _fields(endpoint: EndpointRecord) -> dict[str, str]:
    """The hash fields ``put`` writes: what the endpoint was registered (or made) with."""
    fields = flat(endpoint.model_dump(
        include={"endpoint_id", "user_id", "name", "description", "created_at", *_CHILD_FIELDS}))
    if endpoint.parent_id:
        fields["user_endpoint_config"] = json.dumps(endpoint.user_endpoint_config)
    if endpoint.multi_user:
        fields["multi_user"] = "1"
        if endpoint.user_config_schema is not None:
            fields["user_config_schema"] = json.dumps(endpoint.user_config_schema)
    return fields
