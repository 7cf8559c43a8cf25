"""Redis store: every key under one prefix, batches in one pipeline or one Lua call.

Keys (``p`` is the prefix):
``p tokens`` hash sha256 -> ``user:<user id>:<token id>`` / ``endpoint:<id>`` (a ``user:<id>``
written before tokens had ids still resolves, with no token id); ``p token:<id>`` hash (the
TokenRecord); ``p tokens:all`` and ``p user:<id>:tokens`` sorted sets of token ids by creation;
``p users:names`` hash name -> user id (what keeps names unique); ``p user:<id>``;
``p user:<id>:endpoints`` set (owned); ``p user:<id>:shared_endpoints`` set (shared with them);
``p user:<id>:functions`` set; ``p user:<id>:open`` count of open tasks; ``p user:<id>:groups``
sorted set of task group ids by last submission (the index of recent groups); ``p fn:<id>`` (field
``public`` when public) and ``p fn:<id>:shared`` set of user ids; ``p ep:<id>``;
``p ep:<id>:shared`` set of user ids; ``p ep:<id>:sessions`` set;
``p ep:<id>:inflight`` hash task id -> TaskMessage JSON; ``p ep:<id>:queued`` count of queued
tasks; ``p tg:<id>`` and ``p tg:<id>:tasks`` list; ``p task:<id>`` hash with one ``t:<state>``
field per transition; ``p ap:...`` actions (:mod:`.redis_actions`); ``p timer:...``,
``p timers:due`` and ``p user:<id>:timers`` timers (:mod:`.redis_timers`). Results are published
on channel ``p results:<task group id>`` as ``<replica id> <frame>``; a replica hands its own
frames to its subscribers directly. State changes that must not go backwards (running after
success, a second result) are Lua scripts (:mod:`.redis_scripts`), so they are atomic across
broker replicas.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from farcall.broker.records import (
    EndpointRecord,
    FunctionRecord,
    NewTasks,
    TaskGroupRecord,
    TaskRecord,
    TokenRecord,
    UserRecord,
)
from farcall.broker.store import redis_scripts
from farcall.broker.store.base import (
    CANCELLED_ERROR,
    CRASH_ATTEMPT,
    LOST_ATTEMPT,
    MAX_USER_GROUPS,
    Cancelled,
    EndpointStore,
    FunctionStore,
    GroupActivity,
    InflightStore,
    OverQuota,
    Principal,
    Reconciled,
    Store,
    SubmissionContext,
    TaskStore,
    UserStore,
    crash_failure,
    ordered_transitions,
)
from farcall.broker.store.redis_actions import RedisActions
from farcall.broker.store.redis_pubsub import RedisPubSub
from farcall.broker.store.redis_timers import RedisTimers
from farcall.protocol.channel import Heartbeat, ResultMessage
from farcall.protocol.common import Attempt, TaskState, Versions
from farcall.protocol.stream import TaskResult

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 100
"""Redis connections a broker process uses for commands (pub/sub has its own one)."""
POOL_WAIT = 5.0
"""Seconds a command waits for a free connection before the request answers 503."""
COMMAND_TIMEOUT = 10.0
"""Seconds a command may wait for Redis's answer (the largest batch script takes milliseconds)."""

_ATTEMPTS: TypeAdapter[list[Attempt]] = TypeAdapter(list[Attempt])
_SUMMARY_FIELDS = ["task_id", "user_id", "task_group_id", "endpoint_id", "function_id", "state",
                   f"t:{TaskState.RECEIVED.value}", "completed_at"]
"""What ``summaries`` reads of a task hash (never its data)."""


class _Redis:
    """The connection, key prefix, result lifetime and scripts every part of one store shares."""

    def __init__(self, url: str, prefix: str, result_ttl: int) -> None:
        self.prefix = prefix
        self.result_ttl = result_ttl
        # Any: redis-py's annotations do not model decode_responses=True (we get str, not bytes).
        # A blocking pool: a burst of more commands than connections (hundreds of result
        # streams authenticating at once) waits its turn instead of failing; a few retries
        # carry commands over a Redis restart instead of failing the first one per connection.
        # A read timeout: no command may wait for ever on a connection a restart left mute
        # (seen once in twenty Redis restarts); the caller gets an error and retries instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
            socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=POOL_WAIT)
        self.r: Any = aioredis.Redis(
            connection_pool=pool, retry=Retry(ExponentialBackoff(cap=0.5), 2))
        self.inflight_add = self.r.register_script(redis_scripts.INFLIGHT_ADD)
        self.transition = self.r.register_script(redis_scripts.TRANSITION)
        self.complete = self.r.register_script(redis_scripts.COMPLETE)
        self.create_tasks = self.r.register_script(redis_scripts.CREATE_TASKS)
        self.cancel = self.r.register_script(redis_scripts.CANCEL)
        self.del_if_equal = self.r.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end")
        self.reconcile = self.r.register_script(redis_scripts.RECONCILE)
        self.create_user = self.r.register_script(redis_scripts.CREATE_USER)
        self.revoke_token = self.r.register_script(redis_scripts.REVOKE_TOKEN)
        self.share = self.r.register_script(redis_scripts.SHARE)

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)


class RedisUsers(UserStore):
    def __init__(self, db: _Redis) -> None:
        self._db = db

    async def create(self, user: UserRecord, token: TokenRecord) -> bool:
        db = self._db
        fields = _pairs(user.model_dump())
        keys = [db.k("users:names"), db.k("user", user.user_id), db.k("tokens"),
                db.k("token", token.token_id), db.k("user", user.user_id, "tokens"),
                db.k("tokens:all")]
        args: list[Any] = [user.name, user.user_id, token.token_hash, _token_value(token),
                           token.token_id, repr(token.created_at), len(fields), *fields,
                           *_pairs(token.model_dump())]
        return bool(await db.create_user(keys=keys, args=args))

    async def get(self, user_id: str) -> UserRecord | None:
        return (await self.get_many([user_id])).get(user_id)

    async def get_many(self, user_ids: list[str]) -> dict[str, UserRecord]:
        async with self._db.r.pipeline(transaction=False) as p:
            for u in user_ids:
                p.hgetall(self._db.k("user", u))
            found = await p.execute()
        return {u: UserRecord.model_validate(rec)
                for u, rec in zip(user_ids, found, strict=True) if rec}

    async def by_name(self, name: str) -> UserRecord | None:
        user_id = await self._db.r.hget(self._db.k("users:names"), name)
        return None if user_id is None else await self.get(user_id)

    async def add_token(self, token: TokenRecord) -> None:
        db = self._db
        async with db.r.pipeline(transaction=True) as p:
            p.hset(db.k("token", token.token_id), mapping=_flat(token.model_dump()))
            p.hset(db.k("tokens"), token.token_hash, _token_value(token))
            p.zadd(db.k("user", token.user_id, "tokens"), {token.token_id: token.created_at})
            p.zadd(db.k("tokens:all"), {token.token_id: token.created_at})
            await p.execute()

    async def list_tokens(self, user_id: str | None = None) -> list[TokenRecord]:
        db = self._db
        index = db.k("tokens:all") if user_id is None else db.k("user", user_id, "tokens")
        token_ids = await db.r.zrange(index, 0, -1)
        async with db.r.pipeline(transaction=False) as p:
            for t in token_ids:
                p.hgetall(db.k("token", t))
            found = await p.execute()
        return [TokenRecord.model_validate(rec) for rec in found if rec]

    async def revoke_token(self, token_id: str, user_id: str | None = None) -> TokenRecord | None:
        db = self._db
        flat = await db.revoke_token(
            keys=[db.k("token", token_id), db.k("tokens"), db.k("tokens:all")],
            args=[token_id, user_id or "", db.prefix])
        if not flat:
            return None
        return TokenRecord.model_validate(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def resolve_token(self, token_hash: str) -> Principal | None:
        value = await self._db.r.hget(self._db.k("tokens"), token_hash)
        if not value:
            return None
        kind, _, ident = value.partition(":")
        if kind == "endpoint":
            return Principal("endpoint", ident, token_hash)
        user_id, _, token_id = ident.partition(":")
        return Principal("user", user_id, token_hash, token_id)


class RedisFunctions(FunctionStore):
    def __init__(self, db: _Redis) -> None:
        self._db = db

    async def put(self, function: FunctionRecord) -> None:
        db, fid = self._db, function.function_id
        fields = _flat(function.model_dump(exclude={"shared_with", "public"}))
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
                _read_function(p, self._db, f)
            found = await p.execute()
        return _functions(function_ids, found)

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
        await db.share(
            keys=[db.k("fn", function_id), db.k("fn", function_id, "shared")],
            args=["1" if shared else "0", user_id or "", function_id, "1" if public else "0"])


class RedisEndpoints(EndpointStore):
    def __init__(self, db: _Redis) -> None:
        self._db = db

    async def put(self, endpoint: EndpointRecord, credential_hash: str) -> None:
        db, eid = self._db, endpoint.endpoint_id
        fields = endpoint.model_dump(
            include={"endpoint_id", "user_id", "name", "description", "created_at"})
        async with db.r.pipeline(transaction=True) as p:
            p.hset(db.k("ep", eid), mapping={**_flat(fields), "credential_hash": credential_hash})
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
                last_heartbeat=_float(rec.get("last_heartbeat")),
                last_seen=_float(rec.get("last_seen")),
                heartbeat=Heartbeat.model_validate_json(rec.get("heartbeat") or "{}"),
                heartbeat_period=_float(rec.get("heartbeat_period")),
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
        await db.share(
            keys=[db.k("ep", endpoint_id), db.k("ep", endpoint_id, "shared"),
                  db.k("user", user_id, "shared_endpoints")],
            args=["1" if shared else "0", user_id, endpoint_id, "0"])

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
        await db.del_if_equal(keys=[db.k("ep", endpoint_id, "live")], args=[session_id])

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


class RedisTasks(TaskStore):
    def __init__(self, db: _Redis) -> None:
        self._db = db

    async def create_group(self, group: TaskGroupRecord) -> None:
        db = self._db
        key = db.k("tg", group.task_group_id)
        index = db.k("user", group.user_id, "groups")
        async with db.r.pipeline(transaction=False) as p:
            p.hset(key, mapping={"user_id": group.user_id, "created_at": repr(group.created_at)})
            p.expire(key, db.result_ttl)
            p.zadd(index, {group.task_group_id: group.created_at})
            p.zremrangebyscore(index, "-inf", f"({group.created_at - db.result_ttl!r}")
            p.zremrangebyrank(index, 0, -(MAX_USER_GROUPS + 1))
            p.expire(index, db.result_ttl)
            await p.execute()

    async def group_owner(self, task_group_id: str) -> str | None:
        return await self._db.r.hget(self._db.k("tg", task_group_id), "user_id")

    async def group_tasks(self, task_group_id: str, last: int | None = None) -> list[str]:
        if last is not None and last <= 0:
            return []
        start = 0 if last is None else -last
        return await self._db.r.lrange(self._db.k("tg", task_group_id, "tasks"), start, -1)

    async def recent_groups(self, user_id: str, limit: int, offset: int = 0) -> list[GroupActivity]:
        db = self._db
        live_since = time.time() - db.result_ttl  # older entries name groups that expired
        found = await db.r.zrevrangebyscore(db.k("user", user_id, "groups"), "+inf",
                                            repr(live_since), start=offset, num=limit,
                                            withscores=True)
        async with db.r.pipeline(transaction=False) as p:
            for group_id, _ in found:
                p.hget(db.k("tg", group_id), "created_at")
                p.llen(db.k("tg", group_id, "tasks"))
            raw = await p.execute()
        return [GroupActivity(group_id, float(created), float(active), int(count))
                for (group_id, active), created, count in zip(found, raw[::2], raw[1::2],
                                                             strict=True) if created]

    async def summaries(self, task_ids: list[str]) -> list[TaskRecord | None]:
        async with self._db.r.pipeline(transaction=False) as p:
            for t in task_ids:
                p.hmget(self._db.k("task", t), _SUMMARY_FIELDS)
            raw = await p.execute()
        return [_task({k: v for k, v in zip(_SUMMARY_FIELDS, values, strict=True) if v is not None})
                if values[0] else None for values in raw]

    async def submission_context(
        self, endpoint_id: str, function_ids: list[str], task_group_id: str | None
    ) -> SubmissionContext:
        db = self._db
        async with db.r.pipeline(transaction=False) as p:
            p.hget(db.k("ep", endpoint_id), "user_id")
            p.smembers(db.k("ep", endpoint_id, "shared"))
            p.hget(db.k("tg", task_group_id or "-"), "user_id")
            for f in function_ids:
                _read_function(p, db, f)
            owner, endpoint_shared, group_owner, *found = await p.execute()
        return SubmissionContext(
            owner, frozenset(endpoint_shared) if owner else frozenset(),
            _functions(function_ids, found), group_owner if task_group_id else None)

    async def create(
        self, batch: NewTasks, inflight: dict[str, str] | None = None, session_id: str = "",
        max_open: int = 0,
    ) -> bool:
        if not batch.task_ids:
            return False
        db = self._db
        group, endpoint = batch.task_group_id, batch.endpoint_id
        inflight = inflight or {}
        keys = [
            db.k("tg", group),
            db.k("tg", group, "tasks"),
            db.k("ep", endpoint, "queued"),
            db.k("ep", endpoint, "inflight"),
            db.k("ep", endpoint, "live"),
            db.k("user", batch.user_id, "open"),
            db.k("user", batch.user_id, "groups"),
        ]
        keys += [db.k("task", t) for t in batch.task_ids]
        shared = [
            "user_id", batch.user_id, "task_group_id", group, "endpoint_id", endpoint,
            "state", TaskState.WAITING.value,
            "submitter", batch.submitter.model_dump_json() if batch.submitter else "",
            f"t:{TaskState.RECEIVED.value}", repr(batch.received_at),
            f"t:{TaskState.WAITING.value}", repr(batch.waiting_at),
        ]
        args: list[Any] = [
            db.result_ttl,
            "1" if batch.new_group else "0",
            batch.user_id,
            repr(batch.received_at),
            len(batch.task_ids) - len(inflight),
            session_id,
            max_open,
            len(inflight),
            group,
            MAX_USER_GROUPS,
        ]
        for pair in inflight.items():
            args += pair
        args.append(len(shared))
        args += shared
        for pair in zip(batch.task_ids, batch.function_ids, strict=True):
            args += pair
        direct, open_tasks = await db.create_tasks(keys=keys, args=args)
        if direct < 0:
            raise OverQuota(open_tasks, max_open)
        return bool(direct)

    async def get_many(self, task_ids: list[str]) -> list[TaskRecord | None]:
        async with self._db.r.pipeline(transaction=False) as p:
            for t in task_ids:
                p.hgetall(self._db.k("task", t))
            raw = await p.execute()
        return [_task(rec) if rec else None for rec in raw]

    async def open_tasks(self, user_id: str) -> int:
        return max(0, int(await self._db.r.get(self._db.k("user", user_id, "open")) or 0))

    async def fail(self, task_ids: list[str], error: str, at: float) -> list[tuple[str, TaskResult]]:
        if not task_ids:
            return []
        db = self._db
        keys = [db.k("task", t) for t in task_ids]
        args: list[Any] = ["", TaskState.FAILED.value, error, db.result_ttl, db.prefix]
        args += [repr(at)] * len(keys)
        groups = await db.transition(keys=keys, args=args)
        return [(group, TaskResult.ended_by_broker(t, TaskState.FAILED, error, at))
                for t, group in zip(task_ids, groups, strict=True) if group]

    async def cancel(
        self, user_id: str, task_ids: list[str], only_queued: bool, at: float
    ) -> Cancelled:
        db = self._db
        ids = list(dict.fromkeys(task_ids))
        records = await self.get_many(ids)
        mine = [r for r in records if r is not None and r.user_id == user_id]
        unchanged = {t: "not_found" for t in ids}
        if not mine:
            return Cancelled([], unchanged)
        keys = [db.k("task", r.task_id) for r in mine]
        keys += [db.k("ep", r.endpoint_id, "inflight") for r in mine]
        args: list[Any] = ["1" if only_queued else "0", repr(at), CANCELLED_ERROR, db.result_ttl,
                           db.prefix]
        args += [r.task_id for r in mine]
        outcome = await db.cancel(keys=keys, args=args)
        results = []
        for rec, what in zip(mine, outcome, strict=True):
            if what == "cancelled":
                del unchanged[rec.task_id]
                results.append((rec.task_group_id, rec.endpoint_id, TaskResult.ended_by_broker(
                    rec.task_id, TaskState.CANCELLED, CANCELLED_ERROR, at)))
            else:
                unchanged[rec.task_id] = what or "not_found"
        return Cancelled(results, unchanged)

    async def mark_running(self, endpoint_id: str, started: dict[str, float]) -> None:
        if started:
            keys = [self._db.k("task", t) for t in started]
            args: list[Any] = [endpoint_id, TaskState.RUNNING.value, "", 0, self._db.prefix]
            args += [repr(at) for at in started.values()]
            await self._db.transition(keys=keys, args=args)

    async def complete(
        self, endpoint_id: str, results: list[ResultMessage], at: float
    ) -> list[tuple[str, TaskResult]]:
        if not results:
            return []
        db = self._db
        keys = [db.k("ep", endpoint_id, "inflight")] + [db.k("task", r.task_id) for r in results]
        args: list[str] = [endpoint_id, str(db.result_ttl), repr(at), db.prefix]
        for r in results:
            worker = r.worker.model_dump_json() if r.worker else ""
            started = repr(r.started_at) if r.started_at is not None else ""
            attempts = _ATTEMPTS.dump_json(r.attempts).decode() if r.attempts else ""
            args += [r.task_id, TaskState(r.state).value, r.data, r.error, worker, started,
                     attempts]
        groups = await db.complete(keys=keys, args=args)
        return [
            (group, TaskResult.stored(r, at))
            for r, group in zip(results, groups, strict=True)
            if group
        ]


class RedisInflight(InflightStore):
    def __init__(self, db: _Redis) -> None:
        self._db = db

    async def add(
        self, endpoint_id: str, session_id: str, tasks: dict[str, str], taken: int
    ) -> list[str] | None:
        db = self._db
        keys = [db.k("ep", endpoint_id, "inflight"), db.k("ep", endpoint_id, "queued"),
                db.k("ep", endpoint_id, "live")]
        keys += [db.k("task", t) for t in tasks]
        args: list[str] = [endpoint_id, str(taken), session_id]
        for task_id, body in tasks.items():
            args += [task_id, body]
        accepted = await db.inflight_add(keys=keys, args=args)
        return None if accepted is None else list(accepted)

    async def reconcile(
        self, endpoint_id: str, held: set[str], crashed: set[str], max_losses: int, at: float
    ) -> Reconciled:
        db = self._db
        inflight = await self.get(endpoint_id)
        lost = [t for t in inflight if t not in held]
        if not lost:
            return Reconciled({}, [], 0)
        keys = [db.k("ep", endpoint_id, "inflight")] + [db.k("task", t) for t in lost]
        failure = crash_failure(max_losses)
        args: list[Any] = [endpoint_id, max_losses, repr(at), db.result_ttl, LOST_ATTEMPT,
                           CRASH_ATTEMPT, failure, db.prefix]
        for t in lost:
            args += [t, "1" if t in crashed else "0"]
        outcome = await db.reconcile(keys=keys, args=args)
        again: dict[str, str] = {}
        failed: list[tuple[str, TaskResult]] = []
        dropped = 0
        for t, what in zip(lost, outcome, strict=True):
            if what == "again":
                again[t] = inflight[t]
            elif what == "dropped":
                dropped += 1
            else:
                failed.append((what.partition(":")[2],
                               TaskResult.ended_by_broker(t, TaskState.FAILED, failure, at)))
        return Reconciled(again, failed, dropped)

    async def get(self, endpoint_id: str) -> dict[str, str]:
        return await self._db.r.hgetall(self._db.k("ep", endpoint_id, "inflight"))

    async def remove(self, endpoint_id: str, task_ids: list[str]) -> None:
        if task_ids:
            await self._db.r.hdel(self._db.k("ep", endpoint_id, "inflight"), *task_ids)


class RedisStore(Store):
    def __init__(self, url: str, prefix: str = "farcall:", result_ttl: int = 7 * 24 * 3600) -> None:
        self.db = _Redis(url, prefix, result_ttl)
        self.users = RedisUsers(self.db)
        self.functions = RedisFunctions(self.db)
        self.endpoints = RedisEndpoints(self.db)
        self.tasks = RedisTasks(self.db)
        self.inflight = RedisInflight(self.db)
        self.actions = RedisActions(self.db.r, prefix)
        self.pubsub = RedisPubSub(self.db.r, prefix)
        self.timers = RedisTimers(self.db.r, prefix)

    async def start(self) -> None:
        await self.db.r.ping()

    async def ping(self) -> None:
        await self.db.r.ping()

    async def close(self) -> None:
        await self.pubsub.close()
        await self.db.r.aclose()


def _flat(record: dict[str, Any]) -> dict[str, str]:
    return {
        k: (repr(v) if isinstance(v, float) else str(v)) for k, v in record.items() if v is not None
    }


def _pairs(record: dict[str, Any]) -> list[str]:
    """A record's fields as the flat name, value list a Lua ``HSET`` takes."""
    return [x for pair in _flat(record).items() for x in pair]


def _token_value(token: TokenRecord) -> str:
    """What ``p tokens`` maps a user token's hash to."""
    return f"user:{token.user_id}:{token.token_id}"


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _read_function(p: Any, db: _Redis, function_id: str) -> None:
    """Queue on pipeline ``p`` the two reads ``_functions`` turns into a record."""
    p.hgetall(db.k("fn", function_id))
    p.smembers(db.k("fn", function_id, "shared"))


def _functions(function_ids: list[str], raw: list[Any]) -> dict[str, FunctionRecord]:
    """The functions that exist, from the replies of ``_read_function`` for each id in order."""
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


def _versions(raw: str | None) -> Versions | None:
    return Versions.model_validate_json(raw) if raw else None


def _task(rec: dict[str, str]) -> TaskRecord:
    transitions = {k[2:]: float(v) for k, v in rec.items() if k.startswith("t:")}
    attempts = _ATTEMPTS.validate_json(rec["attempts"]) if rec.get("attempts") else []
    if rec.get("result_attempts"):
        attempts = sorted(attempts + _ATTEMPTS.validate_json(rec["result_attempts"]),
                          key=lambda a: a.at)
    return TaskRecord.model_construct(
        task_id=rec["task_id"],
        user_id=rec.get("user_id", ""),
        task_group_id=rec.get("task_group_id", ""),
        endpoint_id=rec.get("endpoint_id", ""),
        function_id=rec.get("function_id", ""),
        state=TaskState(rec.get("state", TaskState.RECEIVED.value)),
        transitions=ordered_transitions(transitions),
        data=rec.get("data", ""),
        error=rec.get("error", ""),
        completed_at=_float(rec.get("completed_at")),
        submitter=_versions(rec.get("submitter")),
        worker=_versions(rec.get("worker")),
        attempts=attempts,
    )
